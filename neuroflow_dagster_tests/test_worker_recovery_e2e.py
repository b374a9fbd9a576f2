"""A killed `dagster dev` mid-QSIPrep: recovered within minutes, no orphan tool, one materialization.

Real parts: `dagster dev` (webserver, daemon, code server) SIGKILLed as a whole
process group while the QSIPrep stand-in runs, then restarted on the same
DAGSTER_HOME; the daemon's run monitoring with the project's launcher
(`defs/launcher.py`) finds the dead run worker and fails the run; Dagster's
run retries launch it again. The tool guard (`runtimes/guard.py`) stops the
orphaned tool. Throughout, a sampler checks that no two QSIPrep processes of
the subject ever run at once.
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

from neuroflow_dagster.demo import synth
from neuroflow_dagster_tests.daemon_harness import REPO, dagster_dev, materialized, wait_for
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

pytestmark = pytest.mark.slow

PREPROC = "neuroflow_dagster.tools.builtin.preproc"


def tool_pids(root: Path, marker: str = PREPROC) -> list[int]:
    """Live processes running the QSIPrep stand-in on the workspace under ``root`` (not their guards;
    not the stand-ins of other test runs sharing the machine)."""
    found = []
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
        args = [a.decode(errors="replace") for a in argv]
        joined = " ".join(args)
        if marker in args and "guard.py" not in joined and str(root) in joined:
            found.append(int(entry.name))
    return found


class Sampler(threading.Thread):
    """Records the largest number of QSIPrep stand-in processes seen at once."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.most = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.most = max(self.most, len(tool_pids(self.root)))
            time.sleep(0.2)


def test_killed_dagster_dev_mid_qsiprep_recovers_with_one_materialization(tmp_path: Path) -> None:
    config = make_workspace(
        tmp_path / "ws",
        overrides={"discovery": {"stability_wait_minutes": 0, "interval_seconds": 5}},
        mapping={"20240115_1430": "SUBJ_A"},
    )
    staging = config.paths.dicom_incoming / ".tmp"
    synth.write_session(staging, seed=1, n_directions=30, acquired=datetime(2024, 1, 15, 14, 30))
    staging.rename(config.paths.dicom_incoming / "20240115_1430")

    # The shipped instance settings, with run monitoring polling every 5 s instead of 60 s.
    settings = yaml.safe_load((REPO / "dagster.yaml").read_text())
    settings["run_monitoring"].update(poll_interval_seconds=5, free_slots_after_run_end_seconds=5)
    dagster_yaml = tmp_path / "dagster.yaml"
    dagster_yaml.write_text(yaml.safe_dump(settings))
    home = tmp_path / "home"

    sampler = Sampler(tmp_path)

    def in_ws() -> list[int]:
        return tool_pids(tmp_path)

    sampler.start()
    try:
        with dagster_dev(config.source, home, dagster_yaml=dagster_yaml) as dev:
            orphans = wait_for("the QSIPrep stand-in to start", in_ws, timeout=600, log=dev["log"], interval=0.2)
            os.killpg(dev["proc"].pid, signal.SIGKILL)  # dagster dev and everything in its process group
            dev["proc"].wait(timeout=30)
        # The tool ran in its own session (it survived the group kill); its guard stops it.
        wait_for("the orphaned QSIPrep stand-in to be stopped by its guard",
                 lambda: not any(p in in_ws() for p in orphans), timeout=30, interval=0.5)

        with dagster_dev(config.source, home, dagster_yaml=dagster_yaml) as dev:
            instance = dg.DagsterInstance.from_config(str(home))
            wait_for("QSIPrep of SUBJA to succeed after the restart",
                     lambda: materialized(instance, "qsiprep_subject").get("SUBJA"), timeout=600, log=dev["log"])
            runs = instance.get_runs(dg.RunsFilter(tags={"neuroflow/stage": "qsiprep"}))
            killed = [r for r in runs if r.status == dg.DagsterRunStatus.FAILURE]
            assert len(killed) == 1, [(r.run_id, r.status) for r in runs]
            assert killed[0].tags.get("neuroflow/failure_class") == "transient"
            failure = instance.all_logs(killed[0].run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
            assert failure and "run worker process" in (failure[-1].message or "")
            retried = [r for r in runs if r.tags.get("dagster/parent_run_id") == killed[0].run_id]
            assert len(retried) == 1 and retried[0].status == dg.DagsterRunStatus.SUCCESS
            time.sleep(15)  # nothing else may follow: no second QSIPrep of the subject
            assert materialized(instance, "qsiprep_subject") == {"SUBJA": 1}
            assert len(instance.get_runs(dg.RunsFilter(tags={"neuroflow/stage": "qsiprep"}))) == 2
    finally:
        sampler.stop.set()
        sampler.join(timeout=5)
    assert sampler.most == 1, f"{sampler.most} QSIPrep processes of one subject ran at once"
    assert in_ws() == []


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
