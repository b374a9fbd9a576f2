"""A tool's guard: the tool never outlives the run worker that started it.

The runtimes start every local tool (and apptainer) as
``python -I -S guard.py [--grace S] [--lock FILE] -- argv...`` instead of ``argv``
directly. The guard leads the tool's process group (the runtime starts it in a
new session) and:

- watches its standard input, a pipe whose only writer is the run worker: the
  pipe reaches end-of-file exactly when the worker is gone (exited, crashed,
  SIGKILLed with ``dagster dev``), and the guard then stops the whole group
  (SIGTERM, SIGKILL after the grace period). Nothing keeps computing into the
  derivatives for a run that Dagster has already given up on;
- resets the signal dispositions a tool inherits (a worker started from a
  background shell ignores SIGINT, and Dagster maps SIGTERM to the same
  handler): ignored SIGINT/SIGTERM/SIGHUP/SIGQUIT in the tool would turn every
  graceful stop into a SIGKILL;
- optionally holds an exclusive lock (``--lock``) for the tool's lifetime and
  hands it to the tool, so two processes of the same work (a stage x
  partition) never run at once, even across a restart: the lock is released
  only when the last process holding it is gone;
- exits with the tool's exit status (re-raising the signal that killed it),
  so the runtime classifies the run exactly as without the guard.

For work the worker does not run as a child process (a Docker container), the
guard's ``--cleanup`` mode is a dead man's switch: it runs nothing until its
standard input ends; ``done`` on that pipe disarms it, end-of-file without
``done`` (the worker died) runs the given cleanup command (e.g. remove the
container) and records it in the run's log file.

Standard library only, run with ``-I -S`` (no site-packages): it starts in ~20 ms and imports
nothing of the project (it must work in any worker that can run Python).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time

# Exit codes of the guard itself (the shell's conventions for "cannot run the command").
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_LOCK_TIMEOUT = 75  # EX_TEMPFAIL: another process of the same work still runs
PREFIX = "[neuroflow-guard] "
LOCK_BUSY = "another process of this work still runs"
# SIGPIPE is not here: subprocess resets it for the child (restore_signals), and the guard itself must
# survive writing to the pipe of a worker that is gone.
RESET_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")


LOG_FILE: str | None = None
PARENT_GONE = False


def say(text: str) -> None:
    """One line into the tool's output stream (which the worker copies into the run log), marked as ours.

    When the worker is gone nobody reads that stream, so the line goes straight into the per-run log
    file (``--log``) instead: the operator must find why the tool stopped.
    """
    if not PARENT_GONE:
        try:
            sys.stdout.write(PREFIX + text + "\n")
            sys.stdout.flush()
            return
        except (OSError, ValueError):
            pass
    if LOG_FILE:
        try:
            with open(LOG_FILE, "a", encoding="utf-8") as fh:
                fh.write(PREFIX + text + "\n")
        except OSError:
            pass


def reset_signal_dispositions() -> None:
    """Back to the defaults: an ignored signal is inherited through exec, a handler is not."""
    for name in RESET_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_DFL)


class Group:
    """The guard's own process group (the tool and everything it starts)."""

    def __init__(self, grace_s: float) -> None:
        self.pgid = os.getpgrp()
        self.grace_s = grace_s
        self.child: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Lock()

    def signal_members(self, sig: int) -> None:
        """Signal every member but the guard (killpg would hit the guard too)."""
        me = os.getpid()
        for pid in members(self.pgid):
            if pid != me:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def stop(self, why: str) -> None:
        """SIGTERM the group, SIGKILL what is left after the grace period (once)."""
        if not self._stopping.acquire(blocking=False):
            return
        say(f"{why}: stopping the tool's process group {self.pgid} (SIGTERM, SIGKILL after {self.grace_s:g} s)")
        self.signal_members(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if self.child is not None:
                self.child.poll()
            if not [p for p in members(self.pgid) if p != os.getpid()]:
                return
            time.sleep(0.05)
        self.signal_members(signal.SIGKILL)


def members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a group, from /proc."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            found.append(int(name))
    return found


def watch_parent(group: Group) -> None:
    """Block on stdin; end-of-file while the tool runs means the run worker is gone."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    global PARENT_GONE
    if group.child is not None and group.child.poll() is None:
        PARENT_GONE = True  # nobody reads our output any more: say() writes to the log file
        group.stop("the run worker that started this tool is gone")


def take_lock(path: str, info: dict[str, object], wait_s: float) -> int | None:
    """Exclusive flock on ``path``; the holder's description is written into the file.

    Returns the descriptor (kept open and passed to the tool), or None when another
    process still holds it after ``wait_s`` (its description is reported).
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip() or "unknown"
            if not announced:
                say(f"waiting up to {wait_s:g} s for the previous process of this work to end: {holder}")
                announced = True
            if time.monotonic() >= deadline:
                say(f"{LOCK_BUSY} after {wait_s:g} s: {holder}")
                os.close(fd)
                return None
            time.sleep(0.5)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info, sort_keys=True) + "\n").encode(), 0)
    return fd


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="guard.py", description=__doc__.splitlines()[0])
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--log", help="the per-run log file (the guard's notes go there once the worker is gone)")
    parser.add_argument(
        "--cleanup", action="store_true", help="dead man's switch: run the command only if stdin ends without 'done'"
    )
    parser.add_argument("--lock", help="exclusive lock file held for the tool's lifetime")
    parser.add_argument("--lock-info", default="{}", help="JSON describing this work, written into the lock")
    parser.add_argument("--lock-wait", type=float, default=120.0, help="seconds to wait for a held lock")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given")
    return args


def cleanup_when_orphaned(command: list[str]) -> int:
    """Wait for the worker: ``done`` disarms; end-of-file without it runs ``command``."""
    global PARENT_GONE
    received = b""
    try:
        while chunk := os.read(0, 4096):
            received += chunk
    except OSError:
        pass
    if received.strip() == b"done":
        return 0
    PARENT_GONE = True
    say(f"the run worker is gone: running its cleanup {' '.join(command)}")
    try:
        code = subprocess.call(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"cleanup failed: {exc}")
        return 1
    say(f"cleanup finished with exit code {code}")
    return code


def main(argv: list[str] | None = None) -> int:
    global LOG_FILE
    args = parse(sys.argv[1:] if argv is None else argv)
    LOG_FILE = args.log
    if args.cleanup:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe decides
        return cleanup_when_orphaned(args.command)
    group = Group(args.grace)
    reset_signal_dispositions()
    lock_fd = None
    if args.lock:
        info = {
            **json.loads(args.lock_info),
            "guard_pid": os.getpid(),
            "host": os.uname().nodename,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        lock_fd = take_lock(args.lock, info, args.lock_wait)
        if lock_fd is None:
            return EXIT_LOCK_TIMEOUT
    try:
        group.child = subprocess.Popen(
            args.command, stdin=subprocess.DEVNULL, pass_fds=(lock_fd,) if lock_fd is not None else ()
        )
    except FileNotFoundError:
        say(f"executable not found: {args.command[0]}")
        return EXIT_NOT_FOUND
    except PermissionError:
        say(f"cannot execute {args.command[0]}: permission denied")
        return EXIT_CANNOT_EXECUTE
    # The runtime signals the whole group, so the tool gets every stop signal directly; the guard
    # itself stays to report the tool's exit status (SIGKILL still ends it with the group).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda _signum, _frame: None)
    threading.Thread(target=watch_parent, args=(group,), daemon=True, name="guard-parent").start()
    while True:
        try:
            code = group.child.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue
    if code < 0:
        # Mirror "killed by signal N" so the runtime sees what the tool saw.
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main())
