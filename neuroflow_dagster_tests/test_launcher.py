"""The run-worker check of defs/launcher.py, in every status, on a real instance with real processes.

Real parts: a Dagster instance built from the project's dagster.yaml (SQLite), runs in the states
Dagster's own launch and monitoring code put them in, the worker's pid event as Dagster's run
worker writes it, launch locks held and released by real processes (flock, SIGKILL), and
Dagster's own run-monitoring iteration and run-retry decision. The whole chain on a real
`dagster dev` killed and restarted: test_worker_recovery_e2e.py.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import dagster as dg
import pytest
import yaml
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.launcher import LaunchRunContext, WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG
from dagster._daemon.auto_run_reexecution.auto_run_reexecution import should_retry
from dagster._daemon.monitoring.run_monitoring import execute_run_monitoring_iteration

from neuroflow_dagster.defs import launcher as launcher_module
from neuroflow_dagster.defs.launcher import (
    LAUNCH_GRACE_S,
    HealthCheckedRunLauncher,
    build_run_worker_watchdog,
    hold_run_worker_for_test,
)

REPO = Path(__file__).resolve().parent.parent


@dg.op
def noop() -> None:
    pass


@dg.job
def tiny() -> None:
    noop()


class RecordingLauncher(HealthCheckedRunLauncher):
    """The project's launcher, noting which runs Dagster's run monitoring asks about."""

    asked: ClassVar[list[str]] = []

    def check_run_worker_health(self, run: dg.DagsterRun):  # type: ignore[override]
        RecordingLauncher.asked.append(run.run_id)
        return super().check_run_worker_health(run)


def make_instance(home: Path, launcher: dict | None = None) -> dg.DagsterInstance:
    settings = yaml.safe_load((REPO / "dagster.yaml").read_text())
    if launcher:
        settings["run_launcher"] = launcher
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    return dg.DagsterInstance.from_config(str(home))


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    with make_instance(tmp_path / "home") as inst:
        yield inst


def new_run(instance: dg.DagsterInstance, status: dg.DagsterRunStatus) -> dg.DagsterRun:
    """A run brought to ``status`` by the events Dagster's launch, worker and terminate write."""
    run = instance.create_run_for_job(job_def=tiny)
    if status in (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING):
        instance.report_dagster_event(
            DagsterEvent(event_type_value=DagsterEventType.PIPELINE_STARTING.value, job_name=run.job_name),
            run_id=run.run_id,
        )
    if status in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING):
        instance.report_dagster_event(
            DagsterEvent(event_type_value=DagsterEventType.RUN_START.value, job_name=run.job_name),
            run_id=run.run_id,
        )
    if status == dg.DagsterRunStatus.CANCELING:
        instance.report_run_canceling(instance.get_run_by_id(run.run_id))
    run = instance.get_run_by_id(run.run_id)
    assert run is not None and run.status == status
    return run


def report_worker(instance: dg.DagsterInstance, run: dg.DagsterRun, pid: int) -> None:
    """The event a run worker writes first (dagster/_grpc/impl.py), before its run can be STARTED."""
    instance.report_engine_event(f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def status_of(instance: dg.DagsterInstance, run: dg.DagsterRun) -> dg.DagsterRunStatus:
    current = instance.get_run_by_id(run.run_id)
    assert current is not None
    return current.status


def test_run_monitoring_asks_about_started_runs_only(tmp_path: Path) -> None:
    """Pins the Dagster behaviour the watchdog sensor exists for: run monitoring asks the launcher about
    STARTED runs and never about STARTING or CANCELING ones (it only times those out). If a Dagster
    upgrade changes this, this test fails: then the sensor may be redundant (or must not double-report)."""
    home = tmp_path / "home"
    with make_instance(home, {"module": __name__, "class": "RecordingLauncher"}) as instance:
        assert isinstance(instance.run_launcher, RecordingLauncher)
        runs = {status: new_run(instance, status) for status in (
            dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)}
        for run in runs.values():
            report_worker(instance, run, os.getpid())  # alive: nothing may be failed here
        RecordingLauncher.asked = []
        context = SimpleNamespace(instance=instance, create_request_context=lambda: None)
        errors = [e for e in execute_run_monitoring_iteration(context, logging.getLogger("test")) if e]
        assert not errors, errors
        assert RecordingLauncher.asked == [runs[dg.DagsterRunStatus.STARTED].run_id]
        assert {status_of(instance, run) for run in runs.values()} == set(runs)


def test_a_starting_run_whose_worker_died_is_failed_tagged_and_retried(instance: dg.DagsterInstance) -> None:
    run = new_run(instance, dg.DagsterRunStatus.STARTING)
    live = new_run(instance, dg.DagsterRunStatus.STARTING)
    report_worker(instance, run, dead_pid())
    report_worker(instance, live, os.getpid())
    result = build_run_worker_watchdog()(dg.build_sensor_context(instance=instance))
    assert isinstance(result, dg.SkipReason) and "1 run(s)" in str(result.skip_message)
    assert status_of(instance, live) == dg.DagsterRunStatus.STARTING
    failed = instance.get_run_by_id(run.run_id)
    assert failed is not None and failed.status == dg.DagsterRunStatus.FAILURE
    assert failed.tags["neuroflow/failure_class"] == "transient"
    message = instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)[-1].message or ""
    assert "no longer exists" in message and "run's worker is gone" in message
    # Dagster's run-retry daemon takes it (run_retries in dagster.yaml; not a step failure).
    assert should_retry(failed, instance)


def test_a_launch_lock_held_by_a_live_process_keeps_a_starting_run_and_its_death_ends_it(
    instance: dg.DagsterInstance,
) -> None:
    """A STARTING run with no worker yet: healthy while a live process launches it; once that process is
    SIGKILLed (the kernel releases its flock), failed after the grace period."""
    launcher = instance.run_launcher
    assert isinstance(launcher, HealthCheckedRunLauncher)
    run = new_run(instance, dg.DagsterRunStatus.STARTING)
    holder_code = (
        "import sys, time; from pathlib import Path; from neuroflow_dagster.defs.launcher import LaunchLocks\n"
        "with LaunchLocks(Path(sys.argv[1])).hold(sys.argv[2]):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    argv = [sys.executable, "-c", holder_code, str(launcher.launches.folder), run.run_id]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        verdict = launcher.worker_verdict(run, now=time.time() + 3600)
        assert verdict.alive and f'"pid": {holder.pid}' in verdict.why
        assert launcher.end_runs_of_dead_workers() == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert launcher.worker_verdict(run).alive  # within the grace period after the launch let go
    verdict = launcher.worker_verdict(run, now=time.time() + LAUNCH_GRACE_S + 1)
    assert not verdict.alive and "no process is launching the run" in verdict.why
    lock = launcher.launches.path(run.run_id)
    os.utime(lock, (time.time() - LAUNCH_GRACE_S - 5,) * 2)
    assert len(launcher.end_runs_of_dead_workers()) == 1
    assert status_of(instance, run) == dg.DagsterRunStatus.FAILURE


def test_a_launch_that_failed_unrecorded_is_ended_after_the_grace(instance: dg.DagsterInstance) -> None:
    """The storage-outage case: the launch raised after the run became STARTING and its failure could not
    be written, so the run sits STARTING with no worker; the released launch lock dates the end."""
    launcher = instance.run_launcher
    assert isinstance(launcher, HealthCheckedRunLauncher)
    run = new_run(instance, dg.DagsterRunStatus.STARTING)
    with pytest.raises(dg.DagsterInvariantViolationError, match="requires a workspace"):
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    state = launcher.launches.state(run.run_id)
    assert state is not None and not state.held
    assert launcher.worker_verdict(run).alive
    assert not launcher.worker_verdict(run, now=time.time() + LAUNCH_GRACE_S + 1).alive
    # A run that never reached the launcher (cut right after STARTING): dated by its STARTING event.
    cut = new_run(instance, dg.DagsterRunStatus.STARTING)
    assert launcher.launches.state(cut.run_id) is None
    assert launcher.worker_verdict(cut).alive
    verdict = launcher.worker_verdict(cut, now=time.time() + LAUNCH_GRACE_S + 1)
    assert not verdict.alive and "of the launch starting" in verdict.why


def test_a_canceling_run_whose_worker_died_is_canceled_not_retried(instance: dg.DagsterInstance) -> None:
    run = new_run(instance, dg.DagsterRunStatus.CANCELING)
    report_worker(instance, run, dead_pid())
    build_run_worker_watchdog()(dg.build_sensor_context(instance=instance))
    assert status_of(instance, run) == dg.DagsterRunStatus.CANCELED
    assert "neuroflow/failure_class" not in instance.get_run_by_id(run.run_id).tags  # type: ignore[union-attr]


def test_started_runs_stay_with_run_monitoring(instance: dg.DagsterInstance) -> None:
    """The sensor leaves STARTED runs to run monitoring (one reporter per run); the launcher answers it."""
    launcher = instance.run_launcher
    assert isinstance(launcher, HealthCheckedRunLauncher)
    run = new_run(instance, dg.DagsterRunStatus.STARTED)
    report_worker(instance, run, dead_pid())
    build_run_worker_watchdog()(dg.build_sensor_context(instance=instance))
    assert status_of(instance, run) == dg.DagsterRunStatus.STARTED
    result = launcher.check_run_worker_health(run)
    assert result.status == WorkerStatus.FAILED and "no longer exists" in (result.msg or "")
    assert instance.get_run_by_id(run.run_id).tags["neuroflow/failure_class"] == "transient"  # type: ignore[union-attr]


def test_a_worker_on_another_host_is_not_judged(instance: dg.DagsterInstance) -> None:
    run = new_run(instance, dg.DagsterRunStatus.STARTING)
    instance.add_run_tags(run.run_id, {GRPC_INFO_TAG: '{"host": "node42.example.org", "port": 4000}'})
    report_worker(instance, run, dead_pid())
    build_run_worker_watchdog()(dg.build_sensor_context(instance=instance))
    assert status_of(instance, run) == dg.DagsterRunStatus.STARTING


def test_the_watchdog_leaves_other_launchers_alone(tmp_path: Path) -> None:
    with make_instance(tmp_path / "home", {"module": "dagster", "class": "DefaultRunLauncher"}) as instance:
        run = new_run(instance, dg.DagsterRunStatus.STARTING)
        report_worker(instance, run, dead_pid())
        result = build_run_worker_watchdog()(dg.build_sensor_context(instance=instance))
        assert "DefaultRunLauncher" in str(result.skip_message)  # type: ignore[union-attr]
        assert status_of(instance, run) == dg.DagsterRunStatus.STARTING


def test_launch_locks_are_pruned_after_a_day(tmp_path: Path) -> None:
    locks = launcher_module.LaunchLocks(tmp_path / "launches")
    with locks.hold("old-run"):
        pass
    os.utime(locks.path("old-run"), (time.time() - 2 * 86400,) * 2)
    with locks.hold("new-run"):
        assert locks.state("new-run").held  # type: ignore[union-attr]
    assert sorted(p.name for p in locks.folder.iterdir()) == ["new-run.lock"]


def test_the_test_hold_is_a_no_op_outside_a_run_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "armed").touch()
    monkeypatch.setenv(launcher_module.TEST_HOLD_WORKER_ENV, str(tmp_path))
    started = time.monotonic()
    hold_run_worker_for_test()  # this process was not spawned by a code server
    assert time.monotonic() - started < 1 and (tmp_path / "armed").exists()


def test_a_launch_that_cannot_take_its_lock_is_refused(tmp_path: Path) -> None:
    """Without its lock a slow launch would look cut to the watchdog: the launch fails, saying why."""
    (tmp_path / "launches").write_text("a file where the folder should be")
    locks = launcher_module.LaunchLocks(tmp_path / "launches")
    with pytest.raises(RuntimeError, match="cannot create the launch lock"), locks.hold("run-1"):
        pass


def test_a_worker_whose_run_was_already_failed_runs_nothing(instance: dg.DagsterInstance) -> None:
    """Pins the Dagster behaviour that makes a verdict on a slow worker safe: a worker that reaches its
    run after the watchdog failed it runs no step (dagster/_core/execution/api.py::execute_run_iterator)."""
    from dagster._core.execution.api import execute_run_iterator

    run = new_run(instance, dg.DagsterRunStatus.STARTING)
    instance.report_run_failed(run, "failed by the watchdog")
    failed = instance.get_run_by_id(run.run_id)
    assert failed is not None
    events = list(execute_run_iterator(dg.reconstructable(tiny), failed, instance))
    assert [e.event_type for e in events] == [DagsterEventType.ENGINE_EVENT]
    assert "already finished" in (events[0].message or "")
    assert not instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)
