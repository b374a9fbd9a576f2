"""Orchestration cost per session: how many runs each stage takes and what each run's start-up costs.

Runs the whole flow in a real `dagster dev` (daemon, code server, run workers, SQLite) on
`--sessions` synthetic sessions (two per subject), waits until every session is parcellated, then
reads the run records and events:

- start-up: the run was launched (RUN_STARTING) -> its first STEP_START, split into the process
  (RUN_STARTING -> RUN_START: spawn, imports, loading the code location) and the run's
  initialisation (RUN_START -> STEP_START: plan, resources, log capture);
- tear-down: the last step's end -> the run's end;
- step: the steps themselves (the tools' work, not counted as orchestration).

Per session = the runs of the session's stages, a subject-level run divided by the subject's
sessions. `--code-root DIR` runs another checkout (e.g. the commit before issue 12) for the
before/after comparison.

Usage::

    .venv/bin/python benchmarks/run_startup.py --sessions 4 [--code-root /tmp/nf-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dagster as dg  # noqa: E402
from dagster import DagsterEventType  # noqa: E402

STEP_END = (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.STEP_SKIPPED)
RUN_END = (DagsterEventType.RUN_SUCCESS, DagsterEventType.RUN_FAILURE, DagsterEventType.RUN_CANCELED)


def run_phases(instance: dg.DagsterInstance, run_id: str) -> dict[str, float] | None:
    """launch -> first step start -> last step end -> run end, from the run's events."""
    launched = started = first_step = last_step = ended = None
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        kind = event.event_type
        if kind == DagsterEventType.RUN_STARTING and launched is None:
            launched = entry.timestamp
        elif kind == DagsterEventType.RUN_START and started is None:
            started = entry.timestamp
        elif kind == DagsterEventType.STEP_START and first_step is None:
            first_step = entry.timestamp
        elif kind in STEP_END:
            last_step = entry.timestamp
        elif kind in RUN_END:
            ended = entry.timestamp
    if None in (launched, started, first_step, last_step, ended):
        return None
    return {
        "startup_s": first_step - launched,  # type: ignore[operator]
        "process_s": started - launched,  # type: ignore[operator]  # spawn, imports, code location
        "run_init_s": first_step - started,  # type: ignore[operator]  # plan, resources, log capture
        "steps_s": last_step - first_step,  # type: ignore[operator]
        "teardown_s": ended - last_step,  # type: ignore[operator]
    }


def stage_of(run: Any) -> str:
    stage = run.tags.get("neuroflow/stage", "")
    assets = sorted(k.to_user_string() for k in run.asset_selection or ())
    return f"{stage} ({', '.join(assets) or 'checks'})"


def analyse(instance: dg.DagsterInstance, sessions: int, subjects: int) -> dict[str, Any]:
    per_stage: dict[str, list[dict[str, float]]] = {}
    for rec in instance.get_run_records():
        phases = run_phases(instance, rec.dagster_run.run_id)
        if phases is not None:
            per_stage.setdefault(stage_of(rec.dagster_run), []).append(phases)
    stages = {}
    total_orchestration = 0.0
    total_runs = 0
    for name, runs in sorted(per_stage.items()):
        startup = [r["startup_s"] for r in runs]
        teardown = [r["teardown_s"] for r in runs]
        steps = [r["steps_s"] for r in runs]
        stages[name] = {
            "runs": len(runs),
            "runs_per_session": len(runs) / sessions,
            "startup_s": {"min": min(startup), "median": statistics.median(startup), "max": max(startup)},
            "teardown_s_median": statistics.median(teardown),
            "process_s_median": statistics.median(r["process_s"] for r in runs),
            "run_init_s_median": statistics.median(r["run_init_s"] for r in runs),
            "steps_s_median": statistics.median(steps),
        }
        total_orchestration += sum(startup) + sum(teardown)
        total_runs += len(runs)
    return {
        "sessions": sessions,
        "subjects": subjects,
        "runs": total_runs,
        "runs_per_session": total_runs / sessions,
        "orchestration_per_session_s": total_orchestration / sessions,
        "stages": stages,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--code-root", default=str(ROOT))
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    from neuroflow_dagster.demo import synth
    from neuroflow_dagster_tests.daemon_harness import dagster_dev, materialized, wait_for
    from neuroflow_dagster_tests.workspace_fixtures import make_workspace

    code_root = str(Path(args.code_root).resolve())
    # As pip installs it (the Docker image): with bytecode. PYTHONDONTWRITEBYTECODE is set on the
    # development machines, so an editable checkout is otherwise compiled again in every run worker.
    import compileall

    compileall.compile_dir(str(Path(code_root) / "neuroflow_dagster"), quiet=1)
    subjects = (args.sessions + 1) // 2
    mapping = {f"2024{i + 1:02d}01_0900": f"SUBJ_{i // 2:03d}" for i in range(args.sessions)}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="nf-startup-") as tmp:
        base = Path(tmp)
        config = make_workspace(
            base / "ws", overrides={"discovery": {"stability_wait_minutes": 0, "interval_seconds": 5}}, mapping=mapping
        )
        started = time.monotonic()
        env = {"PYTHONPATH": code_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with dagster_dev(
            config.source, base / "home", extra_env=env, dagster_yaml=Path(code_root) / "dagster.yaml"
        ) as dev:
            instance = dg.DagsterInstance.from_config(str(dev["home"]))
            for i, scan_id in enumerate(mapping):
                staging = config.paths.dicom_incoming / f".tmp-{scan_id}"
                synth.write_session(staging, seed=i, n_directions=12, acquired=datetime(2024, i + 1, 1, 9))
                staging.rename(config.paths.dicom_incoming / scan_id)
            wait_for(
                "every session parcellated",
                lambda: len(materialized(instance, "qsiparc_session")) >= args.sessions,
                timeout=args.timeout,
                log=dev["log"],
            )
            time.sleep(10)  # let the last runs end
            out = analyse(instance, args.sessions, subjects)
        out.update(
            {
                "code_root": code_root,
                "flow_s": time.monotonic() - started,
                "load_before": load_before,
                "load_after": os.getloadavg()[0],
            }
        )
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
