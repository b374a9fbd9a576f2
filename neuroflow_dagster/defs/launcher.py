"""Dagster's default run launcher, plus the run-worker health check it lacks, for every run status.

`DefaultRunLauncher` starts each run in a worker process of the code server but
cannot tell anyone whether that worker still lives. When the worker is killed
(``dagster dev`` SIGKILLed, the host's OOM killer, a power cut of the process
tree), its run stays where it was: STARTED until ``dagster/max_runtime`` (48 h),
STARTING until ``run_monitoring.start_timeout_seconds`` (10 min), CANCELING until
the cancel timeout. The operator sees "running" and nothing retries it.

`HealthCheckedRunLauncher` launches exactly as `DefaultRunLauncher` does and judges a
run's worker from what the worker and the launch leave behind (`worker_verdict`):

- the worker's own "Started process for run (pid: N)" engine event, written by
  the worker before its run can become STARTED: the worker is alive if that
  process exists, is not a zombie and started before the event (so a recycled
  pid, e.g. after a reboot, does not pass);
- before that event exists (the run is STARTING and its worker has not reported
  yet), the launch itself: the process launching a run holds a lock for it
  (`LaunchLocks`, an flock, released by the kernel when that process dies) from
  the moment the run is STARTING until the code server has started the worker,
  which writes its pid right after. So a STARTING run with no worker pid is
  healthy while its launch lock is held, or for `LAUNCH_GRACE_S` after the
  launch let go of it; past that, nobody is starting it: the launch was cut
  (the launching process died with the process tree) or ended without a worker
  (the storage was unreachable, so the launch's own failure could not be recorded).
  Should that ever judge a worker that is merely slow to write its pid, nothing runs
  twice: Dagster's worker checks its run's status before running anything and leaves
  a run that is already finished alone (pinned by test_launcher.py).

Who asks: Dagster's run monitoring calls `check_run_worker_health` for STARTED runs
only (dagster/_daemon/monitoring/run_monitoring.py; pinned by test_launcher.py), so the
`run_worker_watchdog` sensor (`build_run_worker_watchdog`) asks for STARTING and
CANCELING runs. A dead worker's STARTED or STARTING run is marked failed, tagged
``neuroflow/failure_class=transient``, and Dagster's run retries (`run_retries` in
dagster.yaml) launch it again; a dead worker's CANCELING run is marked canceled (the
operator asked for it to stop). A worker that is alive but stuck is not judged here:
the start timeout and the maximum runtime stay the last resort. The tool the dead worker
had started is stopped by its guard (`runtimes/guard.py`), so the retry never runs
beside an orphan.

Only workers on this host can be checked: a run whose code server is remote (its gRPC
host is not local) is reported alive, as without this check.
Configured in dagster.yaml::

    run_launcher:
      module: neuroflow_dagster.defs.launcher
      class: HealthCheckedRunLauncher
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster import DagsterEventType, DagsterRun, DagsterRunStatus, DefaultRunLauncher
from dagster._core.events import JobFailureData, RunFailureReason
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG

from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY
from neuroflow_dagster.runtimes.failures import FailureClass

FAILURE_CLASS_TAG = FAILURE_CLASS_KEY
WORKER_LOST = str(FailureClass.TRANSIENT)
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}
_PID_MESSAGE = "Started process for run (pid: "
# After a launch let go of its lock, the worker's pid event follows within milliseconds (the code
# server returns once the worker has signalled that it started, and the worker writes its pid next).
# The grace covers a slow storage write, not a slow start: the start itself is under the lock.
LAUNCH_GRACE_S = 30.0
# The statuses the watchdog sensor checks; STARTED is run monitoring's (check_run_worker_health).
WATCHED_STATUSES = (DagsterRunStatus.STARTING, DagsterRunStatus.CANCELING)
WATCHDOG_SENSOR = "run_worker_watchdog"
WATCHDOG_INTERVAL_S = 20
# Test hooks (never set in a deployment): hold a run where a power cut is hard to hit by chance.
TEST_HOLD_WORKER_ENV = "NEUROFLOW_TEST_HOLD_RUN_WORKER"


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):  # pragma: no cover - Linux always has it
        return 100


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def process_state(pid: int) -> tuple[str, float | None] | None:
    """(state letter, start time as epoch seconds) of a process, or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ("?", None)
        return ("?", None)
    fields = stat[stat.rfind(")") + 2 :].split()
    boot = _boot_time()
    started = None if boot is None else boot + int(fields[19]) / _clock_ticks()
    return fields[0], started


def worker_status(pid: int, reported_at: float, slack_s: float = 2.0) -> tuple[bool, str]:
    """Is the run worker ``pid`` (which reported itself at ``reported_at``) still alive? And why not."""
    state = process_state(pid)
    if state is None:
        return False, f"run worker process {pid} no longer exists"
    letter, started = state
    if letter in ("Z", "X"):
        return False, f"run worker process {pid} has exited (zombie)"
    if started is not None and started > reported_at + slack_s:
        return False, (
            f"run worker process {pid} is gone (pid {pid} now belongs to a process started "
            f"{time.strftime('%H:%M:%S', time.localtime(started))}, after the worker)"
        )
    return True, f"run worker process {pid} is alive"


def is_local_run(run: DagsterRun) -> bool:
    """Was the run's worker started by a code server on this host (so its pid means something here)?"""
    info = run.tags.get(GRPC_INFO_TAG)
    if not info:
        return True  # launched in-process, by an older launcher, or the launch has not got that far: local
    try:
        grpc = json.loads(info)
    except ValueError:
        return False
    if grpc.get("socket"):
        return True
    return str(grpc.get("host", "")).lower() in _LOCAL_HOSTS


@dataclass(frozen=True)
class LaunchState:
    """A run's launch lock: held (a live process is launching the run) or not, and when it last changed."""

    held: bool
    changed: float
    holder: str


class LaunchLocks:
    """One lock file per launch, ``<DAGSTER_HOME>/neuroflow-launches/<run id>.lock``.

    The launching process holds an exclusive flock on it while it launches; the kernel releases
    the lock when that process dies, however it dies, and a reboot releases every lock. The file's
    modification time is when the launch let go of it. Files of finished launches are pruned after
    a day (a later launch does it).
    """

    PRUNE_AFTER_S = 86400.0

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.lock"

    @contextmanager
    def hold(self, run_id: str) -> Iterator[None]:
        path = self.path(run_id)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            # Launching without it would let the watchdog take a slow launch for a cut one: refuse.
            raise RuntimeError(
                f"run launcher: cannot create the launch lock {path}: {exc} "
                "(DAGSTER_HOME must be writable by the process that launches runs)"
            ) from exc
        self._prune()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            try:
                yield
            finally:
                os.utime(fd)  # when the launch let go: the worker's pid event follows at once
        finally:
            os.close(fd)  # releases the flock

    def state(self, run_id: str) -> LaunchState | None:
        """None when this run was never launched through a lock here."""
        try:
            fd = os.open(self.path(run_id), os.O_RDONLY)
        except OSError:
            return None
        try:
            holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                held = False
            except BlockingIOError:
                held = True
            return LaunchState(held=held, changed=os.fstat(fd).st_mtime, holder=holder)
        finally:
            os.close(fd)

    def _prune(self) -> None:
        cutoff = time.time() - self.PRUNE_AFTER_S
        for path in self.folder.glob("*.lock"):
            try:
                if path.stat().st_mtime >= cutoff:
                    continue
            except OSError:
                continue
            state = self.state(path.stem)
            if state is not None and not state.held:
                path.unlink(missing_ok=True)


@dataclass(frozen=True)
class WorkerVerdict:
    alive: bool
    why: str
    pid: int | None = None


class HealthCheckedRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher whose run workers can be checked in any status (see the module docstring)."""

    @property
    def launches(self) -> LaunchLocks:
        return LaunchLocks(Path(self._instance.root_directory) / "neuroflow-launches")

    def launch_run(self, context: LaunchRunContext) -> None:
        with self.launches.hold(context.dagster_run.run_id):
            super().launch_run(context)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        """Run monitoring's question (STARTED runs): a dead worker's run is tagged and reported FAILED."""
        verdict = self.worker_verdict(run)
        worker = str(verdict.pid) if verdict.pid is not None else None
        if verdict.alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING, verdict.why, run_worker_id=worker)
        self._tag_worker_lost(run)
        return CheckRunHealthResult(WorkerStatus.FAILED, lost_message(verdict), transient=False, run_worker_id=worker)

    def worker_verdict(self, run: DagsterRun, now: float | None = None) -> WorkerVerdict:
        """Is there a live worker for ``run`` (or a live launch about to start one)? And why (not)."""
        if not is_local_run(run):
            return WorkerVerdict(True, "worker on another host: not checked here")
        found = self._worker_pid(run.run_id)
        if found is not None:
            pid, reported_at = found
            alive, why = worker_status(pid, reported_at)
            return WorkerVerdict(alive, why, pid)
        if run.status == DagsterRunStatus.STARTED:
            # The worker writes its pid before the run can become STARTED; without it, trust the run.
            return WorkerVerdict(True, "no worker pid recorded yet")
        launch = self.launches.state(run.run_id)
        if launch is not None and launch.held:
            return WorkerVerdict(True, f"its launch is in progress ({launch.holder})")
        since = launch.changed if launch is not None else self._launch_time(run.run_id)
        if since is None:
            return WorkerVerdict(True, "no launch recorded: left to the start timeout")
        age = (time.time() if now is None else now) - since
        if age < LAUNCH_GRACE_S:
            return WorkerVerdict(True, f"launched {age:.0f} s ago; its worker has not reported yet")
        return WorkerVerdict(False, (
            f"no run worker reported its pid within {age:.0f} s of the launch "
            + ("ending" if launch is not None else "starting")
            + ", and no process is launching the run: the launch was cut (the process launching it died) or "
            "failed without being recorded (the storage was unreachable)"
        ))

    def end_runs_of_dead_workers(self, statuses: tuple[DagsterRunStatus, ...] = WATCHED_STATUSES) -> list[str]:
        """Fail (STARTING, STARTED) or cancel (CANCELING) each run in ``statuses`` whose worker is gone.

        Returns one line per run ended. A run whose status changed while it was judged is left alone.
        """
        ended = []
        for record in self._instance.get_run_records(dg.RunsFilter(statuses=list(statuses))):
            run = record.dagster_run
            verdict = self.worker_verdict(run)
            if verdict.alive:
                continue
            current = self._instance.get_run_by_id(run.run_id)
            if current is None or current.status != run.status:
                continue
            if run.status == DagsterRunStatus.CANCELING:
                self._instance.report_run_canceled(run, f"{verdict.why}: canceled (its worker is gone).")
                ended.append(f"{run.run_id} canceled: {verdict.why}")
                continue
            self._tag_worker_lost(run)
            self._instance.report_run_failed(
                run,
                lost_message(verdict),
                JobFailureData(error=None, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION),
            )
            ended.append(f"{run.run_id} failed ({run.status.value}): {verdict.why}")
        return ended

    def _tag_worker_lost(self, run: DagsterRun) -> None:
        try:
            self._instance.add_run_tags(run.run_id, {FAILURE_CLASS_TAG: WORKER_LOST})
        except Exception:  # pragma: no cover - a tag is a courtesy; the failure is what counts
            pass

    def _launch_time(self, run_id: str) -> float | None:
        try:
            return self._instance.get_run_stats(run_id).launch_time
        except Exception:  # pragma: no cover - no STARTING event: not ours to judge
            return None

    def _worker_pid(self, run_id: str) -> tuple[int, float] | None:
        records = self._instance.event_log_storage.get_logs_for_run(
            run_id, of_type={DagsterEventType.ENGINE_EVENT}, limit=20
        )
        for event in records:
            message = event.message or ""
            if event.is_dagster_event and message.startswith(_PID_MESSAGE):
                try:
                    return int(message[len(_PID_MESSAGE) :].split(")")[0]), float(event.timestamp)
                except ValueError:
                    continue
        return None


def lost_message(verdict: WorkerVerdict) -> str:
    return (
        f"{verdict.why}: the run's worker is gone without finishing the run (e.g. `dagster dev` or the code "
        "server was killed). Marked failed so that Dagster's run retries launch it again; a tool it had "
        "started is stopped by its guard."
    )


def build_run_worker_watchdog() -> dg.SensorDefinition:
    """The sensor that asks the launcher about STARTING and CANCELING runs (run monitoring asks about STARTED)."""

    @dg.sensor(
        name=WATCHDOG_SENSOR,
        minimum_interval_seconds=WATCHDOG_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Fails a STARTING run whose worker is gone (a killed process tree, a launch cut short) and "
            "cancels a CANCELING one, so that run retries start it again within a minute instead of after "
            "the start timeout. STARTED runs are checked by run monitoring (defs/launcher.py)."
        ),
    )
    def run_worker_watchdog(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        launcher = context.instance.run_launcher
        if not isinstance(launcher, HealthCheckedRunLauncher):
            return dg.SkipReason(f"run launcher {type(launcher).__name__}: its workers are not checked here")
        ended = launcher.end_runs_of_dead_workers()
        for line in ended:
            context.log.warning(line)
        return dg.SkipReason(f"{len(ended)} run(s) of dead workers ended" if ended else "every run worker is alive")

    return run_worker_watchdog


def hold_run_worker_for_test() -> None:
    """Test hook: hold a run worker while its run is STARTING (its pid recorded, STARTED not yet reported).

    Only when ``$NEUROFLOW_TEST_HOLD_RUN_WORKER`` names a folder holding a file ``armed``: the first
    run worker (a process the code server spawned) that loads the code location renames it to
    ``held-<pid>`` and sleeps until it is killed (at most 15 min). The power-cut tests use it to cut a
    run at a moment they cannot otherwise hit on purpose; it is never set in a deployment.
    """
    folder = os.environ.get(TEST_HOLD_WORKER_ENV)
    if not folder or multiprocessing.parent_process() is None:
        return
    try:
        os.rename(os.path.join(folder, "armed"), os.path.join(folder, f"held-{os.getpid()}"))
    except OSError:
        return
    time.sleep(900)
