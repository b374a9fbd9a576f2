"""How long a run whose worker is gone stays "running": a STARTING and a STARTED run, cut together.

Builds the scene of test_worker_recovery_e2e.py (neuroflow_dagster_tests/recovery_harness.py): a
real `dagster dev` with the shipped dagster.yaml (run monitoring every 60 s, the
`run_worker_watchdog` sensor every 20 s), two conversions launched together, one held STARTING by
the test hook and one STARTED running HeudiConv. Then either

- ``--cut workers`` (default): SIGKILL only the two run workers; everything else keeps running
  (the OOM killer, a crashed worker). Times are counted from the kill;
- ``--cut tree``: SIGKILL the whole `dagster dev` process group (a power cut of the process tree)
  and start it again on the same DAGSTER_HOME. Times are counted from the restart.

Prints, in seconds: when each run was marked failed, when its retry was created and when the retry
started; with ``--cut tree`` also when the UI answered again and when the graph completed. Appends
the result to benchmarks/results/worker_loss.jsonl.

    .venv/bin/python benchmarks/worker_loss.py [--cut workers|tree] [--storage sqlite|postgres]
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
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import dagster as dg  # noqa: E402

from neuroflow_dagster_tests.daemon_harness import dagster_dev, materialized, wait_for  # noqa: E402
from neuroflow_dagster_tests.pg_server import pg_server  # noqa: E402
from neuroflow_dagster_tests.recovery_harness import (  # noqa: E402
    PARTITIONS,
    bring_to_cut,
    first_event_time,
    prepare,
    recovery_figures,
    retry_of,
)

RESULTS = REPO / "benchmarks" / "results" / "worker_loss.jsonl"


def both_retries_started(instance: dg.DagsterInstance, run_ids: tuple[str, ...]) -> bool:
    retries = [retry_of(instance, run_id) for run_id in run_ids]
    return all(
        r is not None and first_event_time(instance, r.dagster_run.run_id, dg.DagsterEventType.RUN_START) is not None
        for r in retries
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cut", choices=("workers", "tree"), default="workers")
    parser.add_argument("--storage", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="neuroflow-worker-loss-"))
    result: dict[str, object] = {"host": platform.node(), "cpus": os.cpu_count(), "cut": args.cut,
                                 "storage": args.storage, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "load_1min_before": os.getloadavg()[0]}
    try:
        with ExitStack() as stack:
            url = None
            if args.storage == "postgres":
                server = stack.enter_context(pg_server())
                url = server.create_database("worker_loss")
            scenario = prepare(root, url)
            with dagster_dev(scenario.config.source, scenario.home, scenario.env, scenario.dagster_yaml) as dev:
                instance = dg.DagsterInstance.from_config(str(scenario.home))
                cut = bring_to_cut(scenario, dev, instance)
                run_ids = (cut.starting.run_id, cut.started.run_id)
                if args.cut == "workers":
                    since = time.time()
                    for pid in (cut.held_pid, cut.started_pid):
                        os.kill(pid, signal.SIGKILL)
                    wait_for("both retries to start", lambda: both_retries_started(instance, run_ids), 600, dev["log"])
                    figures = recovery_figures(instance, cut, since)
                else:
                    os.killpg(dev["proc"].pid, signal.SIGKILL)
                    dev["proc"].wait(timeout=30)
            if args.cut == "tree":
                since = time.time()
                with dagster_dev(scenario.config.source, scenario.home, scenario.env, scenario.dagster_yaml) as dev:
                    up = time.time() - since
                    instance = dg.DagsterInstance.from_config(str(scenario.home))
                    wait_for("the graph to complete",
                             lambda: set(PARTITIONS) <= set(materialized(instance, "qsiparc_session")), 900, dev["log"])
                    complete = time.time() - since
                    figures = {"up": up, **recovery_figures(instance, cut, since), "graph_complete": complete}
        result["seconds"] = {k: round(v, 1) for k, v in figures.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["load_1min_after"] = os.getloadavg()[0]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
