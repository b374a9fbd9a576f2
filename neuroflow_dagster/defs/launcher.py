"""Dagster's default run launcher, plus the run-worker health check it lacks.

`DefaultRunLauncher` starts each run in a worker process of the code server but
cannot tell run monitoring whether that worker still lives. When the worker is
killed (``dagster dev`` SIGKILLed, the host's OOM killer, a power cut of the
process tree), its run stays STARTED until ``dagster/max_runtime`` (48 h): the
operator sees "running" and nothing retries it.

`HealthCheckedRunLauncher` launches exactly as `DefaultRunLauncher` does and
answers run monitoring's health check from the worker's own record: the run's
"Started process for run (pid: N)" engine event. The worker is alive if that
process exists, is not a zombie and started before the event (so a recycled
pid does not pass). A dead worker is reported FAILED; run monitoring then marks
the run failed, and Dagster's run retries (`run_retries` in dagster.yaml)
launch it again. The tool the dead worker had started is stopped by its guard
(`runtimes/guard.py`), so the retry never runs beside an orphan.

Only workers on this host can be checked: a run whose code server is remote
(its gRPC host is not local) is reported RUNNING, as without this check.
Configured in dagster.yaml::

    run_launcher:
      module: neuroflow_dagster.defs.launcher
      class: HealthCheckedRunLauncher
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from dagster import DagsterEventType, DagsterRun, DefaultRunLauncher
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG

FAILURE_CLASS_TAG = "neuroflow/failure_class"
WORKER_LOST = "transient"
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}
_PID_MESSAGE = "Started process for run (pid: "


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
        return True  # launched in-process or by an older launcher: the worker was local
    try:
        grpc = json.loads(info)
    except ValueError:
        return False
    if grpc.get("socket"):
        return True
    return str(grpc.get("host", "")).lower() in _LOCAL_HOSTS


class HealthCheckedRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher whose run workers run monitoring can check (see the module docstring)."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        if not is_local_run(run):
            return CheckRunHealthResult(WorkerStatus.RUNNING, "worker on another host: not checked here")
        found = self._worker_pid(run.run_id)
        if found is None:
            # The worker writes its pid before the run can become STARTED; without it, trust the run.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no worker pid recorded yet")
        pid, reported_at = found
        alive, why = worker_status(pid, reported_at)
        if alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING, why, run_worker_id=str(pid))
        message = (
            f"{why}: the run's worker died without finishing the run (e.g. `dagster dev` or the code "
            "server was killed). Marked failed so that Dagster's run retries launch it again; its tool "
            "was stopped by the tool guard."
        )
        try:
            self._instance.add_run_tags(run.run_id, {FAILURE_CLASS_TAG: WORKER_LOST})
        except Exception:  # pragma: no cover - a tag is a courtesy; the health result is what counts
            pass
        return CheckRunHealthResult(WorkerStatus.FAILED, message, transient=False, run_worker_id=str(pid))

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
