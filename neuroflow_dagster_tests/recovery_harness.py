"""A real `dagster dev` brought to the moment a power cut hurts most: one run STARTING, one STARTED.

Shared by test_worker_recovery_e2e.py (the whole process tree killed, then restarted) and
benchmarks/worker_loss.py (the same, or only the two run workers killed). Two sessions of one
subject arrive together, so their two conversions are launched together. The run worker that
loads the code location first is held by the test hook `hold_run_worker_for_test`
(`NEUROFLOW_TEST_HOLD_RUN_WORKER`): its run stays STARTING with its pid recorded, because
Dagster's worker writes its pid before it loads the code and reports STARTED after. The other
conversion runs its tool (HeudiConv); the cut comes once that tool's process is seen.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.launcher import TEST_HOLD_WORKER_ENV
from neuroflow_dagster.demo import synth
from neuroflow_dagster_tests.daemon_harness import REPO, wait_for
from neuroflow_dagster_tests.test_throttling import automation_ticked
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

SESSIONS = {"20240115_1430": datetime(2024, 1, 15, 14, 30), "20240301_0900": datetime(2024, 3, 1, 9, 0)}
PARTITIONS = ("01|SUBJA", "02|SUBJA")
CONVERSION_TOOL = "heudiconv"


@dataclass
class Scenario:
    root: Path
    config: NeuroflowConfig
    dagster_yaml: Path
    home: Path
    hold: Path

    @property
    def env(self) -> dict[str, str]:
        return {TEST_HOLD_WORKER_ENV: str(self.hold)}


@dataclass
class Cut:
    """The two conversion runs at the moment of the cut, their workers, and the STARTED run's tool."""

    starting: dg.DagsterRun
    started: dg.DagsterRun
    held_pid: int
    started_pid: int
    tools: dict[int, list[str]]


def prepare(root: Path, postgres_url: str | None = None) -> Scenario:
    """The workspace (two sessions staged, not yet in incoming), the shipped dagster.yaml as it is (run
    monitoring every 60 s) on SQLite or PostgreSQL, and the worker hold armed."""
    config = make_workspace(
        root / "ws",
        overrides={"discovery": {"stability_wait_minutes": 0, "interval_seconds": 5}},
        mapping=dict.fromkeys(SESSIONS, "SUBJ_A"),
    )
    for seed, (scan, acquired) in enumerate(SESSIONS.items(), start=1):
        synth.write_session(config.paths.work_dir / f"export-{scan}", seed=seed, n_directions=12, acquired=acquired)
    settings = yaml.safe_load((REPO / "dagster.yaml").read_text())
    if postgres_url:
        settings["storage"] = {"postgres": {"postgres_url": postgres_url}}
    dagster_yaml = root / "dagster.yaml"
    dagster_yaml.write_text(yaml.safe_dump(settings))
    hold = root / "hold"
    hold.mkdir()
    (hold / "armed").touch()
    return Scenario(root=root, config=config, dagster_yaml=dagster_yaml, home=root / "home", hold=hold)


def bring_to_cut(scenario: Scenario, dev: dict[str, Any], instance: dg.DagsterInstance) -> Cut:
    """Drop both sessions and wait until one conversion is held STARTING and the other runs its tool."""
    wait_for("the automation sensors' first ticks", lambda: automation_ticked(dev["log"]), 240, dev["log"])
    for scan in SESSIONS:
        (scenario.config.paths.work_dir / f"export-{scan}").rename(scenario.config.paths.dicom_incoming / scan)
    held = wait_for("a run worker held while STARTING", lambda: list(scenario.hold.glob("held-*")),
                    300, dev["log"], 0.1)
    held_pid = int(held[0].name.split("-")[1])
    tools = wait_for(f"the other conversion's {CONVERSION_TOOL}",
                     lambda: tool_processes(scenario.root, CONVERSION_TOOL), 300, dev["log"], 0.1)
    runs = conversion_runs(instance)
    starting = next(r for r in runs if worker_pid(instance, r.run_id) == held_pid)
    started = next(r for r in runs if r.run_id != starting.run_id)
    return Cut(starting=starting, started=started, held_pid=held_pid,
               started_pid=worker_pid(instance, started.run_id) or -1, tools=tools)


def recovery_figures(instance: dg.DagsterInstance, cut: Cut, since: float) -> dict[str, float]:
    """Seconds after ``since`` at which each cut run was failed, its retry created and started."""
    figures: dict[str, float] = {}
    for name, run in (("starting", cut.starting), ("started", cut.started)):
        retry = retry_of(instance, run.run_id)
        failed_at = first_event_time(instance, run.run_id, dg.DagsterEventType.RUN_FAILURE)
        retry_start = retry and first_event_time(instance, retry.dagster_run.run_id, dg.DagsterEventType.RUN_START)
        figures[f"{name}_failed"] = (failed_at or float("nan")) - since
        figures[f"{name}_retry_created"] = (retry.create_timestamp.timestamp() if retry else float("nan")) - since
        figures[f"{name}_retry_started"] = (retry_start or float("nan")) - since
    return figures


def tool_processes(root: Path, name: str) -> dict[int, list[str]]:
    """Live processes (not zombies, not their guards) of the tool ``name`` working under ``root`` (not
    the tools of other test runs sharing the machine): pid -> argv."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text()
        except OSError:
            continue
        if state[state.rfind(")") + 2 :].split()[0] == "Z":
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        joined = " ".join(args)
        if "guard.py" in joined or str(root) not in joined:
            continue
        if any(a == name or a.endswith(f"/{name}") for a in args[:2]):
            found[int(entry.name)] = args
    return found


class Sampler(threading.Thread):
    """Records the largest number of conversion tool processes seen at once for one session."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.most = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            per_session: dict[str, int] = {}
            for argv in tool_processes(self.root, CONVERSION_TOOL).values():
                folder = argv[argv.index("--files") + 1] if "--files" in argv else "?"
                per_session[folder] = per_session.get(folder, 0) + 1
            self.most = max([self.most, *per_session.values()])
            time.sleep(0.2)


def conversion_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs(dg.RunsFilter(tags={"neuroflow/stage": "bids_conversion"})))


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid in the run worker's own "Started process for run (pid: N)" event."""
    for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        message = event.message or ""
        if message.startswith("Started process for run (pid: "):
            return int(message.split("pid: ")[1].split(")")[0])
    return None


def retry_of(instance: dg.DagsterInstance, run_id: str) -> dg.RunRecord | None:
    records = instance.get_run_records(dg.RunsFilter(tags={"dagster/parent_run_id": run_id}))
    return records[0] if records else None


def first_event_time(instance: dg.DagsterInstance, run_id: str, kind: dg.DagsterEventType) -> float | None:
    events = instance.all_logs(run_id, of_type=kind)
    return float(events[0].timestamp) if events else None
