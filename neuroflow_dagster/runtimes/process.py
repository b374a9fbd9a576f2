"""The process toolkit every runtime uses: log sink, run records, timeouts, process groups.

Why a process group: QSIPrep and friends are trees of processes (nipype
workers, ANTs, MRtrix). Killing only the leader leaves the workers running
for hours, holding CPUs, memory and the log pipe. The child therefore starts
in its own session/process group and every stop (hard timeout, cancellation,
stragglers after exit) signals the whole group: SIGTERM, then SIGKILL after a
grace period.

Cancellation: when a Dagster run is terminated the run worker gets SIGTERM,
which Dagster turns into ``DagsterExecutionInterruptedError`` (a
BaseException) raised in the step's thread. Anything that escapes the wait
loop - that error, KeyboardInterrupt, a bug - stops the group before it
propagates, so a cancelled run never leaves an orphaned 24 h job behind.

Output is read by a thread into a queue and handled on the caller's thread,
so the ``log`` callable (Dagster's ``context.log.info``) is only ever called
from the thread that owns the context. Runs that are not child processes
(containers, batch jobs) get the same soft and hard limits from ``Watchdog``.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from neuroflow_dagster.runtimes import guard
from neuroflow_dagster.runtimes.base import DEFAULT_KILL_GRACE_S, LogFn, RunRecord, ToolRunError
from neuroflow_dagster.runtimes.failures import FailureClass, classify
from neuroflow_dagster.tools.spec import ToolSpec

NOTE_PREFIX = "[neuroflow] "
TAIL_LINES = 50
# After the leader exits, how long its children may keep the output pipe open before being killed.
STRAGGLER_GRACE_S = 5.0
_POLL_S = 0.1


def fmt_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


class LogSink:
    """One run's output: the per-run log file, the caller's ``log`` callable and the last lines.

    Our own remarks (timeouts, cancellation, exit) are prefixed with ``[neuroflow]`` so that
    they are visible in the same file but never mistaken for the tool's output when a failure
    is classified. Thread-safe: the Docker watchdog writes from its own thread.
    """

    def __init__(self, path: Path, log: LogFn | None, tail_lines: int = TAIL_LINES) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Append: a caller that reuses a path for a retry keeps the earlier attempt's log.
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8", errors="replace")
        self._log = log
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._lock = threading.Lock()
        self._log_broken = False
        self.lines = 0

    def line(self, text: str, *, forward: bool = True) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(text + "\n")
                self._file.flush()
            self._tail.append(text)
            if not text.startswith(NOTE_PREFIX):
                self.lines += 1
        if forward and self._log is not None and not self._log_broken:
            try:
                self._log(text)
            except Exception as exc:  # a broken log sink must not kill a 24 h run
                self._log_broken = True
                self.line(f"{NOTE_PREFIX}log callable failed ({exc!r}); lines go to this file only", forward=False)

    def note(self, text: str, *, forward: bool = True) -> None:
        self.line(NOTE_PREFIX + text, forward=forward)

    def write_raw(self, text: str) -> None:
        """File only (e.g. Dagster Pipes protocol messages): kept for the record, not shown."""
        with self._lock:
            if self._file is not None:
                self._file.write(text + "\n")
                self._file.flush()

    @property
    def tail(self) -> str:
        with self._lock:
            return "\n".join(self._tail)

    def tool_text(self) -> str:
        """The tail without our own notes: what classification looks at."""
        with self._lock:
            return "\n".join(t for t in self._tail if not t.startswith(NOTE_PREFIX))

    def last_output(self) -> str:
        with self._lock:
            for text in reversed(self._tail):
                if text.strip() and not text.startswith(NOTE_PREFIX):
                    return text.strip()
        return ""

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class LineSplitter:
    """Turns arbitrary chunks (Docker log frames) into whole lines."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, chunk: bytes | str) -> list[str]:
        if isinstance(chunk, bytes):
            chunk = chunk.decode("utf-8", errors="replace")
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split("\n")
        return [line.rstrip("\r") for line in lines]

    def flush(self) -> list[str]:
        rest, self._buffer = self._buffer, ""
        return [rest.rstrip("\r")] if rest else []


def new_record(spec: ToolSpec, *, runtime: str, command: Sequence[str], log_path: Path, image: str | None) -> RunRecord:
    return RunRecord(
        tool=spec.tool,
        runtime=runtime,
        command=shlex.join(command),
        output_dir=str(spec.output_dir),
        log_path=str(log_path),
        started=time.time(),
        image=image,
        extra={"stand_in": True} if spec.stand_in else {},
    )


def fail(
    record: RunRecord,
    sink: LogSink | None,
    message: str,
    failure_class: FailureClass | str,
    exit_code: int | None = None,
) -> ToolRunError:
    """Finish the record of a failed run and build the error (the caller raises it)."""
    if record.ended is None:
        record.ended = time.time()
    if exit_code is not None:
        record.exit_code = exit_code
    failure_class = str(FailureClass(failure_class))
    record.extra["failure_class"] = failure_class
    if sink is not None:
        sink.note(f"failed ({failure_class}): {message}")
        record.log_tail = sink.tail
        sink.close()
    return ToolRunError(message, record, failure_class)


def exit_failure(record: RunRecord, sink: LogSink, exit_code: int | None) -> ToolRunError:
    """A non-zero exit: message names the tool, the code, the log and the last output line."""
    if exit_code is None:
        how = "an unknown exit code"
    elif exit_code < 0:
        try:
            how = f"killed by signal {signal.Signals(-exit_code).name}"
        except ValueError:
            how = f"killed by signal {-exit_code}"
    else:
        how = f"exit code {exit_code}"
    last = sink.last_output()
    message = f"{record.tool} failed with {how} (log: {record.log_path})"
    if last:
        message += f"; last output: {last[:500]}"
    failure_class = classify(f"{message}\n{sink.tool_text()}", exit_code)
    return fail(record, sink, message, failure_class, exit_code=exit_code)


def succeed(record: RunRecord, sink: LogSink, exit_code: int = 0) -> RunRecord:
    record.ended = time.time()
    record.exit_code = exit_code
    sink.note(f"finished: exit code {exit_code} after {fmt_duration(record.ended - record.started)}")
    record.log_tail = sink.tail
    sink.close()
    return record


# --------------------------------------------------------------------------- timeouts and cancellation


def soft_timeout_note(elapsed: float, soft_timeout_s: float, timeout_s: float | None) -> str:
    hard = f", hard limit {fmt_duration(timeout_s)}" if timeout_s else ""
    return (
        f"WARNING soft timeout: still running after {fmt_duration(elapsed)} "
        f"(soft limit {fmt_duration(soft_timeout_s)}{hard}); not stopped"
    )


def hard_timeout_note(timeout_s: float, target: str, grace_s: float) -> str:
    return (
        f"hard timeout of {fmt_duration(timeout_s)} reached: stopping {target} "
        f"(SIGTERM, SIGKILL after {fmt_duration(grace_s)})"
    )


def timeout_failure(record: RunRecord, sink: LogSink, timeout_s: float | None, exit_code: int | None) -> ToolRunError:
    """A run stopped at its hard timeout: a resource failure (it may fit with more time or less load)."""
    record.extra["timed_out"] = True
    record.extra["timeout_s"] = timeout_s
    message = (
        f"{record.tool} exceeded its hard timeout of {fmt_duration(timeout_s or 0)} and was stopped "
        f"(log: {record.log_path})"
    )
    return fail(record, sink, message, FailureClass.RESOURCE, exit_code=exit_code)


def mark_cancelled(record: RunRecord, exc: BaseException, after_s: float | None = None) -> str:
    """Record that the run was interrupted (Dagster cancellation, Ctrl-C); returns the note."""
    record.ended = time.time()
    after = f" after {fmt_duration(after_s)}" if after_s is not None else ""
    record.error = f"cancelled ({type(exc).__name__}){after}"
    record.extra["cancelled"] = True
    return record.error


class Watchdog:
    """Soft warning and hard stop for a run that is not a child process (a container, a batch job).

    Runs in its own thread while the caller's thread reads the output. At the hard limit
    ``stop`` is called, and again every 5 s until it reports an attempt (the thing to stop may
    not exist yet, e.g. a container still being created).
    """

    def __init__(
        self,
        sink: LogSink,
        timeout_s: float | None,
        soft_timeout_s: float | None,
        grace_s: float,
        stop: Callable[[], bool],
        target: str,
    ) -> None:
        self.sink = sink
        self.timeout_s = timeout_s
        self.soft_timeout_s = soft_timeout_s
        self.grace_s = grace_s
        self.stop_target = stop
        self.target = target
        self.timed_out = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"neuroflow-watchdog-{target}")
        self._started = time.monotonic()

    def start(self) -> Watchdog:
        if self.timeout_s is not None or self.soft_timeout_s is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.grace_s + 15)

    def _watch(self) -> None:
        warned = False
        last_stop = 0.0
        while not self._done.wait(_POLL_S):
            elapsed = time.monotonic() - self._started
            if self.soft_timeout_s is not None and not warned and elapsed >= self.soft_timeout_s:
                warned = True
                self.sink.note(soft_timeout_note(elapsed, self.soft_timeout_s, self.timeout_s))
            if self.timeout_s is not None and elapsed >= self.timeout_s:
                if not self.timed_out:
                    self.timed_out = True
                    self.sink.note(hard_timeout_note(self.timeout_s, self.target, self.grace_s))
                if time.monotonic() - last_stop > 5 and self.stop_target():
                    last_stop = time.monotonic()


# --------------------------------------------------------------------------- process groups


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, ...) of every process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), stat[stat.rfind(")") + 2 :].split()


def group_alive(pgid: int) -> bool:
    """Does the group still have a live (non-zombie) member?

    Zombies count as members for ``killpg(pgid, 0)``; where PID 1 does not reap orphans (some
    containers) that would make every stop wait the full grace period, so /proc is read when
    it exists.
    """
    if Path("/proc").is_dir():
        return any(len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z" for _, fields in proc_stats())
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the child's process group, SIGKILL whatever is left after ``grace_s``."""
    pgid = proc.pid  # start_new_session=True: the child leads its own group
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader so it does not count as a member
        if not group_alive(pgid):
            break
        time.sleep(0.05)
    else:
        signal_group(pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        pass


def read_lines(stream: IO[bytes], sink_queue: queue.Queue[str | None]) -> None:
    try:
        for raw in iter(stream.readline, b""):
            sink_queue.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
    except (OSError, ValueError):  # pipe closed under us during a kill
        pass
    finally:
        sink_queue.put(None)


GUARD_SCRIPT = Path(guard.__file__).resolve()


def guarded(
    argv: Sequence[str],
    *,
    grace_s: float,
    log_path: Path | str | None = None,
    lock: Path | None = None,
    lock_info: Mapping[str, Any] | None = None,
    lock_wait_s: float = 120.0,
) -> list[str]:
    """``argv`` wrapped in its guard: ``python -I -S guard.py --grace S [--log F] [--lock F ...] -- argv``."""
    wrapper = [sys.executable, "-I", "-S", str(GUARD_SCRIPT), "--grace", f"{grace_s:g}"]
    if log_path:
        wrapper += ["--log", str(log_path)]
    if lock is not None:
        wrapper += [
            "--lock",
            str(lock),
            "--lock-info",
            json.dumps(dict(lock_info or {}), sort_keys=True),
            "--lock-wait",
            f"{lock_wait_s:g}",
        ]
    return [*wrapper, "--", *argv]


class DeadMansSwitch:
    """Runs ``cleanup`` if this process dies before :meth:`disarm` (guard.py ``--cleanup``).

    For work that is not a child process of the worker (a Docker container): the guard holds the
    read end of a pipe whose only writer is this process; the pipe ends without ``done`` exactly
    when the worker died, and the guard then runs ``cleanup`` (e.g. remove the container).
    """

    def __init__(self, cleanup: Sequence[str], log_path: Path | str | None = None) -> None:
        argv = [sys.executable, "-I", "-S", str(GUARD_SCRIPT), "--cleanup"]
        if log_path:
            argv += ["--log", str(log_path)]
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [*argv, "--", *cleanup],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def disarm(self) -> None:
        """The worker finished the work itself: the cleanup must not run."""
        proc, self._proc = self._proc, None
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write(b"done\n")
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()


def executable_problem(program: str, env: Mapping[str, str], cwd: Path | None = None) -> str | None:
    """Why ``program`` cannot be executed on this worker (None if it can), as exec would find it."""
    if os.sep in program:
        path = program if os.path.isabs(program) or cwd is None else os.path.join(cwd, program)
        if not os.path.exists(path):
            return f"executable not found: {program} (looked up on PATH of the worker)"
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            return f"cannot execute {program}: permission denied"
        return None
    if shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        return f"executable not found: {program} (looked up on PATH of the worker)"
    return None


def run_process(
    argv: Sequence[str],
    *,
    record: RunRecord,
    sink: LogSink,
    env: Mapping[str, str],
    cwd: Path | None,
    timeout_s: float | None,
    soft_timeout_s: float | None,
    kill_grace_s: float = DEFAULT_KILL_GRACE_S,
    lock: Path | None = None,
    lock_info: Mapping[str, Any] | None = None,
    lock_wait_s: float = 120.0,
) -> RunRecord:
    """Run ``argv`` (never through a shell) under its guard, stream its output, enforce the timeouts.

    Returns the finished record on exit code 0, raises ToolRunError otherwise. Interrupts
    (cancellation) stop the process group and are re-raised unchanged. The guard (guard.py)
    stops the group by itself if this process dies, resets inherited ignored signals, and holds
    ``lock`` (if given) for as long as any process of the tool lives.
    """
    sink.note(f"running: {record.command}")
    if cwd is not None and not Path(cwd).is_dir():
        raise fail(record, sink, f"{record.tool}: working directory {cwd} does not exist", FailureClass.CONFIGURATION)
    problem = executable_problem(argv[0], env, cwd)
    if problem:
        raise fail(record, sink, f"{record.tool}: {problem}", FailureClass.CONFIGURATION)
    guard_argv = guarded(
        argv, grace_s=kill_grace_s, log_path=record.log_path, lock=lock, lock_info=lock_info, lock_wait_s=lock_wait_s
    )
    try:
        proc = subprocess.Popen(
            guard_argv,
            # The guard's stdin is the run worker's lifeline: end-of-file = the worker is gone.
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
        )
    except OSError as exc:  # the interpreter itself cannot start: the worker is broken
        raise fail(
            record, sink, f"{record.tool}: cannot start {guard_argv[0]}: {exc.strerror}", FailureClass.CONFIGURATION
        ) from exc
    record.extra["pid"] = proc.pid
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(
        target=read_lines, args=(proc.stdout, lines), daemon=True, name=f"neuroflow-log-{record.tool}"
    )
    reader.start()
    started = time.monotonic()
    timed_out = False
    try:
        timed_out = _pump(proc, lines, sink, started, timeout_s, soft_timeout_s, kill_grace_s)
    except BaseException as exc:
        # Cancellation (DagsterExecutionInterruptedError / KeyboardInterrupt) or a bug: the tree
        # must not outlive us. A second interrupt during the grace period gets a SIGKILL.
        try:
            sink.note(f"interrupted by {type(exc).__name__}: stopping process group {proc.pid}")
            kill_group(proc, kill_grace_s)
        except BaseException:
            signal_group(proc.pid, signal.SIGKILL)
            raise
        finally:
            record.exit_code = proc.returncode
            sink.note(mark_cancelled(record, exc, time.monotonic() - started))
            record.log_tail = sink.tail
            sink.close()
        raise
    finally:
        # Closing the pipe while the reader is blocked in readline() would deadlock on the
        # buffer's lock (seen when something outside the group keeps the pipe open): close it
        # only once the reader is done, otherwise leave the daemon thread to the pipe's EOF.
        reader.join(timeout=1.0)
        if not reader.is_alive():
            proc.stdout.close()
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
    rc = proc.returncode
    if lock is not None and rc == guard.EXIT_LOCK_TIMEOUT and guard.LOCK_BUSY in sink.tail:
        message = (
            f"{record.tool} was not started: another process of the same work is still running "
            f"(lock {lock}); see the log {record.log_path}"
        )
        raise fail(record, sink, message, FailureClass.TRANSIENT, exit_code=rc)
    if timed_out:
        raise timeout_failure(record, sink, timeout_s, rc)
    if rc != 0:
        raise exit_failure(record, sink, rc)
    return succeed(record, sink, rc)


def _pump(
    proc: subprocess.Popen[bytes],
    lines: queue.Queue[str | None],
    sink: LogSink,
    started: float,
    timeout_s: float | None,
    soft_timeout_s: float | None,
    kill_grace_s: float,
) -> bool:
    """Forward output until the process has exited and its output is closed; True if timed out."""
    eof = warned = timed_out = stragglers_killed = False
    exited_at: float | None = None
    while True:
        elapsed = time.monotonic() - started
        if proc.poll() is None:
            if soft_timeout_s is not None and not warned and elapsed >= soft_timeout_s:
                warned = True
                sink.note(soft_timeout_note(elapsed, soft_timeout_s, timeout_s))
            if timeout_s is not None and not timed_out and elapsed >= timeout_s:
                timed_out = True
                sink.note(hard_timeout_note(timeout_s, f"process group {proc.pid}", kill_grace_s))
                kill_group(proc, kill_grace_s)
                continue
        else:
            if exited_at is None:
                exited_at = time.monotonic()
            if eof:
                if not stragglers_killed and group_alive(proc.pid):
                    # Background children that closed their output but still run: not ours to keep.
                    sink.note(f"processes of group {proc.pid} still running after exit: stopping them")
                    kill_group(proc, min(kill_grace_s, 2.0))
                return timed_out
            if time.monotonic() - exited_at > STRAGGLER_GRACE_S:
                if not stragglers_killed:
                    stragglers_killed = True
                    sink.note(f"exited, but processes of group {proc.pid} still hold its output open: killing them")
                    signal_group(proc.pid, signal.SIGKILL)
                elif time.monotonic() - exited_at > 2 * STRAGGLER_GRACE_S:
                    return timed_out
        if eof:
            try:
                proc.wait(timeout=_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            continue
        try:
            item = lines.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        if item is None:
            eof = True
            continue
        sink.line(item)
