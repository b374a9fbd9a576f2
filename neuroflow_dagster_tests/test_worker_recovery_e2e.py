"""A power cut of `dagster dev` while one run is STARTING and one is STARTED: both retried within 90 s.

Real parts: `dagster dev` (webserver, daemon, code server, run workers) SIGKILLed as a whole process
group, as a power cut of the process tree would end it, then restarted on the same DAGSTER_HOME with
the shipped dagster.yaml unchanged (run monitoring every 60 s), on SQLite and on a real PostgreSQL
server. After the restart, run monitoring (STARTED runs) and the `run_worker_watchdog` sensor
(STARTING runs) ask the project's launcher (`defs/launcher.py`), which finds both workers gone;
the runs are failed and Dagster's run retries launch them again. The tool the STARTED run had
started (HeudiConv, in a session of its own, so it survives the group kill) is stopped by its
guard (`runtimes/guard.py`). Throughout, a sampler checks that no session ever has two
conversions running at once, and at the end every stage of the graph is materialized exactly once.

How the STARTING window is hit on purpose (recovery_harness.py): a run is STARTING from the
moment the daemon launches it until its worker has loaded the code location and reported
STARTED, a few seconds that a kill at a random time rarely hits, and killing "when the status
becomes STARTING" would race the worker. The test sets `NEUROFLOW_TEST_HOLD_RUN_WORKER` (read by
`hold_run_worker_for_test`, a no-op in any deployment), so the first run worker to load the code
location holds right there: its pid is recorded (Dagster's worker writes it before loading the
code), STARTED is not. The two sessions' conversions are launched together; whichever worker
comes first is held, the other runs its tool, and the test kills the tree once it sees that
tool's process. Without the `run_worker_watchdog` sensor the STARTING run stays STARTING after the
restart and this test times out (checked by removing the sensor's action once). The other
STARTING moment (before any worker exists: the launch itself cut) is decided by the same launcher
code from the launch lock, tested with real processes in test_launcher.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import dagster as dg
import pytest

from neuroflow_dagster_tests.daemon_harness import dagster_dev, materialized, wait_for
from neuroflow_dagster_tests.pg_server import pg_database, postgres  # noqa: F401 (fixtures)
from neuroflow_dagster_tests.recovery_harness import (
    CONVERSION_TOOL,
    PARTITIONS,
    Sampler,
    bring_to_cut,
    conversion_runs,
    prepare,
    recovery_figures,
    retry_of,
    tool_processes,
)

pytestmark = pytest.mark.slow

RECOVERY_BOUND_S = 90.0


@pytest.mark.parametrize("storage", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_power_cut_while_a_run_is_starting_and_another_started(
    tmp_path: Path, storage: str, request: pytest.FixtureRequest
) -> None:
    scenario = prepare(tmp_path, request.getfixturevalue("pg_database") if storage == "postgres" else None)
    sampler = Sampler(tmp_path)
    sampler.start()
    try:
        with dagster_dev(scenario.config.source, scenario.home, scenario.env, scenario.dagster_yaml) as dev:
            instance = dg.DagsterInstance.from_config(str(scenario.home))
            cut = bring_to_cut(scenario, dev, instance)
            os.killpg(dev["proc"].pid, signal.SIGKILL)  # the power cut: dagster dev and its whole group
            dev["proc"].wait(timeout=30)
        # What each run was at the moment of the cut (nothing can change it any more).
        assert instance.get_run_by_id(cut.starting.run_id).status == dg.DagsterRunStatus.STARTING  # type: ignore[union-attr]
        assert instance.get_run_by_id(cut.started.run_id).status == dg.DagsterRunStatus.STARTED  # type: ignore[union-attr]
        # The tool ran in its own session (it survived the group kill); its guard stops it.
        wait_for(f"the orphaned {CONVERSION_TOOL} to be stopped by its guard",
                 lambda: not set(cut.tools) & set(tool_processes(tmp_path, CONVERSION_TOOL)), timeout=30, interval=0.5)

        restarted = time.time()
        with dagster_dev(scenario.config.source, scenario.home, scenario.env, scenario.dagster_yaml) as dev:
            up = time.time() - restarted
            instance = dg.DagsterInstance.from_config(str(scenario.home))
            wait_for("both cut runs to be failed and retried",
                     lambda: all(retry_of(instance, r.run_id) for r in (cut.starting, cut.started)),
                     timeout=300, log=dev["log"])
            wait_for("the graph to complete", lambda: set(PARTITIONS) <= set(materialized(instance, "qsiparc_session")),
                     timeout=600, log=dev["log"])
            complete = time.time() - restarted
            figures = {"up": up, **recovery_figures(instance, cut, restarted), "graph_complete": complete}
            print(f"\nrecovery figures ({storage}, load {os.getloadavg()[0]:.1f}), seconds after the restart: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))

            for run, reason in ((cut.starting, f"run worker process {cut.held_pid} no longer exists"),
                                (cut.started, f"run worker process {cut.started_pid} no longer exists")):
                failed = instance.get_run_by_id(run.run_id)
                assert failed is not None and failed.status == dg.DagsterRunStatus.FAILURE
                assert failed.tags.get("neuroflow/failure_class") == "transient"
                message = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[-1].message or ""
                assert reason in message, message
                retry = retry_of(instance, run.run_id)
                assert retry is not None and retry.dagster_run.status == dg.DagsterRunStatus.SUCCESS
            # Counted from the restart command: most of it is the services coming up (load-dependent).
            assert figures["starting_retry_created"] <= RECOVERY_BOUND_S, figures
            assert figures["started_retry_created"] <= RECOVERY_BOUND_S, figures
            time.sleep(10)  # nothing else may follow: no second conversion, QSIPrep or recon
            stages = ("bids_session", "qsiprep_subject", "qsirecon_session", "qsiparc_session")
            counts = {key: materialized(instance, key) for key in stages}
            assert counts == {
                "bids_session": dict.fromkeys(PARTITIONS, 1),
                "qsiprep_subject": {"SUBJA": 1},
                "qsirecon_session": dict.fromkeys(PARTITIONS, 1),
                "qsiparc_session": dict.fromkeys(PARTITIONS, 1),
            }
            assert len(conversion_runs(instance)) == 4  # the two cut runs and their two retries
            # No healthy run was taken for a dead one: every other run (QSIPrep, recon) succeeded.
            others = [r for r in instance.get_runs() if r.run_id not in (cut.starting.run_id, cut.started.run_id)]
            assert {r.status for r in others} == {dg.DagsterRunStatus.SUCCESS}, [(r.job_name, r.status) for r in others]
    finally:
        sampler.stop.set()
        sampler.join(timeout=5)
    assert sampler.most == 1, f"{sampler.most} conversions of one session ran at once"
    assert tool_processes(tmp_path, CONVERSION_TOOL) == {}


@pytest.mark.parametrize("case", ["alive", "exited", "recycled"])
def test_worker_status_tells_a_live_worker_from_a_dead_or_recycled_pid(case: str) -> None:
    """The launcher's health check: the pid must exist, not be a zombie, and predate the worker's report."""
    import subprocess
    import sys

    from neuroflow_dagster.defs.launcher import worker_status

    if case == "alive":
        alive, why = worker_status(os.getpid(), reported_at=time.time())
        assert alive, why
    elif case == "exited":
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        alive, why = worker_status(proc.pid, reported_at=time.time())
        assert not alive and "no longer exists" in why
    else:  # this process stands in for a new process that got the dead worker's pid
        alive, why = worker_status(os.getpid(), reported_at=time.time() - 3600)
        assert not alive and "now belongs to a process started" in why
