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

How the STARTING window is hit on purpose: a run is STARTING from the moment the daemon launches
it until its worker has loaded the code location and reported STARTED, a few seconds that a kill
at a random time rarely hits. The test sets `NEUROFLOW_TEST_HOLD_RUN_WORKER` (read by
`hold_run_worker_for_test`, a no-op in any deployment), so the first run worker to load the code
location after `armed` exists holds right there: its pid is recorded (Dagster's worker writes it
before loading the code), STARTED is not. The two sessions' conversions are launched together;
whichever worker comes first is held, the other runs its tool, and the test kills the tree once it
sees that tool's process. The other STARTING moment (before any worker exists: the launch itself
cut) is decided by the same launcher code from the launch lock, tested with real processes in
test_launcher.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml

from neuroflow_dagster.defs.launcher import TEST_HOLD_WORKER_ENV
from neuroflow_dagster.demo import synth
from neuroflow_dagster_tests.daemon_harness import REPO, dagster_dev, materialized, wait_for
from neuroflow_dagster_tests.pg_server import pg_database, postgres  # noqa: F401 (fixtures)
from neuroflow_dagster_tests.test_throttling import automation_ticked
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

pytestmark = pytest.mark.slow

SESSIONS = {"20240115_1430": datetime(2024, 1, 15, 14, 30), "20240301_0900": datetime(2024, 3, 1, 9, 0)}
PARTITIONS = ("01|SUBJA", "02|SUBJA")
RECOVERY_BOUND_S = 90.0


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


def session_of(argv: list[str]) -> str:
    """The DICOM folder a HeudiConv process converts (its ``--files`` argument)."""
    return argv[argv.index("--files") + 1] if "--files" in argv else "?"


class Sampler(threading.Thread):
    """Records the largest number of HeudiConv processes seen at once for one session."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.most = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            per_session: dict[str, int] = {}
            for argv in tool_processes(self.root, "heudiconv").values():
                per_session[session_of(argv)] = per_session.get(session_of(argv), 0) + 1
            self.most = max([self.most, *per_session.values()])
            time.sleep(0.2)


def conversion_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs(dg.RunsFilter(tags={"neuroflow/stage": "bids_conversion"})))


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
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


@pytest.mark.parametrize("storage", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_power_cut_while_a_run_is_starting_and_another_started(
    tmp_path: Path, storage: str, request: pytest.FixtureRequest
) -> None:
    config = make_workspace(
        tmp_path / "ws",
        overrides={"discovery": {"stability_wait_minutes": 0, "interval_seconds": 5}},
        mapping=dict.fromkeys(SESSIONS, "SUBJ_A"),
    )
    for seed, (scan, acquired) in enumerate(SESSIONS.items(), start=1):
        synth.write_session(config.paths.work_dir / f"export-{scan}", seed=seed, n_directions=12, acquired=acquired)
    # The shipped instance settings as they are (run monitoring every 60 s), on the storage under test.
    settings = yaml.safe_load((REPO / "dagster.yaml").read_text())
    if storage == "postgres":
        settings["storage"] = {"postgres": {"postgres_url": request.getfixturevalue("pg_database")}}
    dagster_yaml = tmp_path / "dagster.yaml"
    dagster_yaml.write_text(yaml.safe_dump(settings))
    home = tmp_path / "home"
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "armed").touch()
    env = {TEST_HOLD_WORKER_ENV: str(hold)}

    sampler = Sampler(tmp_path)
    sampler.start()
    try:
        with dagster_dev(config.source, home, extra_env=env, dagster_yaml=dagster_yaml) as dev:
            instance = dg.DagsterInstance.from_config(str(home))
            wait_for("the automation sensors' first ticks", lambda: automation_ticked(dev["log"]), 240, dev["log"])
            for scan in SESSIONS:
                (config.paths.work_dir / f"export-{scan}").rename(config.paths.dicom_incoming / scan)
            held = wait_for("a run worker held while STARTING", lambda: list(hold.glob("held-*")), 300, dev["log"], 0.1)
            held_pid = int(held[0].name.split("-")[1])
            orphans = wait_for("the other conversion's HeudiConv", lambda: tool_processes(tmp_path, "heudiconv"),
                               300, dev["log"], 0.1)
            runs = {run.run_id: run for run in conversion_runs(instance)}
            starting = next(r for r in runs.values() if worker_pid(instance, r.run_id) == held_pid)
            started = next(r for r in runs.values() if r.run_id != starting.run_id)
            os.killpg(dev["proc"].pid, signal.SIGKILL)  # the power cut: dagster dev and its whole group
            dev["proc"].wait(timeout=30)
        # What each run was at the moment of the cut (nothing can change it any more).
        assert instance.get_run_by_id(starting.run_id).status == dg.DagsterRunStatus.STARTING  # type: ignore[union-attr]
        assert instance.get_run_by_id(started.run_id).status == dg.DagsterRunStatus.STARTED  # type: ignore[union-attr]
        # The tool ran in its own session (it survived the group kill); its guard stops it.
        wait_for("the orphaned HeudiConv to be stopped by its guard",
                 lambda: not set(orphans) & set(tool_processes(tmp_path, "heudiconv")), timeout=30, interval=0.5)

        restarted = time.time()
        with dagster_dev(config.source, home, extra_env=env, dagster_yaml=dagster_yaml) as dev:
            up = time.time()
            instance = dg.DagsterInstance.from_config(str(home))
            killed = (starting, started)
            wait_for("both cut runs to be failed and retried",
                     lambda: all(retry_of(instance, r.run_id) for r in killed), timeout=300, log=dev["log"])
            figures = {"up": up - restarted}
            for name, run in (("starting", starting), ("started", started)):
                failed_at = first_event_time(instance, run.run_id, dg.DagsterEventType.RUN_FAILURE)
                retry = retry_of(instance, run.run_id)
                assert failed_at is not None and retry is not None
                figures[f"{name}_failed"] = failed_at - restarted
                figures[f"{name}_retry_created"] = retry.create_timestamp.timestamp() - restarted
            wait_for("the graph to complete", lambda: set(PARTITIONS) <= set(materialized(instance, "qsiparc_session")),
                     timeout=600, log=dev["log"])
            figures["graph_complete"] = time.time() - restarted
            for name, run in (("starting", starting), ("started", started)):
                retry_started = first_event_time(instance, retry_of(instance, run.run_id).dagster_run.run_id,  # type: ignore[union-attr]
                                                 dg.DagsterEventType.RUN_START)
                figures[f"{name}_retry_started"] = (retry_started or float("nan")) - restarted
            print(f"\nrecovery figures ({storage}), seconds after the restart: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))

            for run, reason in ((starting, f"run worker process {held_pid} no longer exists"),
                                (started, "run worker process")):
                failed = instance.get_run_by_id(run.run_id)
                assert failed is not None and failed.status == dg.DagsterRunStatus.FAILURE
                assert failed.tags.get("neuroflow/failure_class") == "transient"
                message = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[-1].message or ""
                assert reason in message, message
                retry = retry_of(instance, run.run_id)
                assert retry is not None and retry.dagster_run.status == dg.DagsterRunStatus.SUCCESS
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
    finally:
        sampler.stop.set()
        sampler.join(timeout=5)
    assert sampler.most == 1, f"{sampler.most} conversions of one session ran at once"
    assert tool_processes(tmp_path, "heudiconv") == {}


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
