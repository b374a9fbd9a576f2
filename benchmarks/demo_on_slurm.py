"""The demo's whole graph on a real Slurm cluster: every tool run is a Slurm job.

Starts the one-node test cluster (neuroflow_dagster_tests/engines/slurm_cluster.py, with
accounting), builds the demo workspace (`neuroflow demo`'s sessions), then runs a real
`dagster dev` with ONE change to the configuration per stage, made from the environment:

    NEUROFLOW_PIPELINES__<STAGE>__RUNTIME=slurm      (and SLURM_CONF, for the Slurm clients)

plus NEUROFLOW_PIPELINES__QSIPREP/QSIRECON__NPROCS=1 and __MEM_MB=1000: a job asks for the tool's
nprocs and mem_mb (+ margin), and the defaults (8 CPUs, 16000 MB) do not fit the test node (2 CPUs).
Inside the jobs the stages run what they run in the demo (HeudiConv + dcm2niix, the stand-ins).
Waits until the three good sessions are parcellated, then prints the figures: wall time, jobs
per stage, queue wait, run time, the most jobs of one stage in flight at once (from sacct).
``--baseline`` runs the same demo without Slurm, for comparison on the same machine.

    .venv/bin/python benchmarks/demo_on_slurm.py [--baseline] [--poll-seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import dagster as dg  # noqa: E402

from neuroflow_dagster.demo.workspace import build_demo_workspace  # noqa: E402
from neuroflow_dagster_tests.daemon_harness import dagster_dev, materialized, wait_for  # noqa: E402
from neuroflow_dagster_tests.engines.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: E402

STAGES = ("bids_conversion", "qsiprep", "qsirecon", "qsiparc")
GOOD_SESSIONS = 4  # the demo's sessions that reach qsiparc (the real Prisma volume stops at qsirecon)


def overlap(spans: list[tuple[float, float]]) -> int:
    points = sorted([p for s, e in spans for p in ((s, 1), (e, -1))], key=lambda p: (p[0], p[1]))
    best = current = 0
    for _, delta in points:
        current += delta
        best = max(best, current)
    return best


def _ts(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


def job_figures(cluster: SlurmCluster) -> dict[str, object]:
    out = cluster.client("sacct", "-X", "-n", "-P", "-S", "2020-01-01", "-o",
                         "JobIDRaw,JobName,State,Submit,Start,End,ElapsedRaw").stdout
    jobs = [line.split("|") for line in out.splitlines() if line.startswith(tuple("0123456789"))]
    figures: dict[str, object] = {"jobs": len(jobs)}
    for stage in STAGES:
        mine = [j for j in jobs if j[1].startswith(f"nf-{stage}-")]
        if not mine:
            continue
        waits = [_ts(j[4]) - _ts(j[3]) for j in mine if j[4] not in ("", "Unknown", "None")]
        spans = [(_ts(j[4]), _ts(j[5])) for j in mine if j[5] not in ("", "Unknown")]
        figures[stage] = {
            "jobs": len(mine),
            "states": sorted({j[2] for j in mine}),
            "queue_wait_s_mean": round(sum(waits) / len(waits), 1) if waits else None,
            "run_s_mean": round(sum(int(j[6]) for j in mine) / len(mine), 1),
            "max_in_flight": overlap(spans),
        }
    all_spans = [(_ts(j[4]), _ts(j[5])) for j in jobs if j[5] not in ("", "Unknown")]
    figures["max_jobs_in_flight"] = overlap(all_spans)
    return figures


def run_demo(root: Path, env: dict[str, str], timeout: float) -> dict[str, object]:
    config = build_demo_workspace(root / "demo")
    with dagster_dev(config, root / "home", extra_env=env) as dev:
        started = time.monotonic()
        instance = dg.DagsterInstance.from_config(str(dev["home"]))
        wait_for("the three good sessions' parcellations",
                 lambda: len(materialized(instance, "qsiparc_session")) >= GOOD_SESSIONS, timeout=timeout,
                 log=dev["log"])
        seconds = time.monotonic() - started
        counts = {key: materialized(instance, key) for key in
                  ("bids_session", "qsiprep_subject", "qsirecon_session", "qsiparc_session")}
        runs = instance.get_run_records()
        failed = sorted({r.dagster_run.tags.get("neuroflow/stage", r.dagster_run.job_name) for r in runs
                         if r.dagster_run.status == dg.DagsterRunStatus.FAILURE})
    return {"seconds_from_ui_up_to_all_parcellated": round(seconds, 1), "materializations": counts,
            "runs": len(runs), "failed_runs_of": failed}


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so that dagster dev and the cluster are stopped


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", action="store_true", help="the same demo without Slurm (runtime unchanged)")
    parser.add_argument("--poll-seconds", type=float, default=None, help="pipelines.<stage>.slurm.poll_seconds")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="keep the demo workspace and DAGSTER_HOME (printed)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="neuroflow-demo-slurm-"))
    load_before = os.getloadavg()[0]
    result: dict[str, object] = {"host": platform.node(), "cpus": os.cpu_count(), "load_1min_before": load_before,
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.baseline:
        result["mode"] = "baseline (no slurm)"
        result.update(run_demo(root, {}, args.timeout))
    else:
        with slurm_cluster(accounting=True) as cluster:
            env = {**cluster.env, **{f"NEUROFLOW_PIPELINES__{s.upper()}__RUNTIME": "slurm" for s in STAGES}}
            for stage in ("QSIPREP", "QSIRECON"):  # the job's --cpus-per-task/--mem follow these
                env[f"NEUROFLOW_PIPELINES__{stage}__NPROCS"] = "1"
                env[f"NEUROFLOW_PIPELINES__{stage}__MEM_MB"] = "1000"
            if args.poll_seconds is not None:
                env.update({f"NEUROFLOW_PIPELINES__{s.upper()}__SLURM__POLL_SECONDS": str(args.poll_seconds)
                            for s in STAGES})
            result["mode"] = "slurm"
            result["environment"] = sorted(k for k in env if k.startswith("NEUROFLOW_"))
            result.update(run_demo(root, env, args.timeout))
            time.sleep(5)  # slurmdbd hears of the last job's end asynchronously
            result["slurm"] = job_figures(cluster)
    result["load_1min_after"] = os.getloadavg()[0]
    if args.keep:
        result["kept"] = str(root)
    else:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
