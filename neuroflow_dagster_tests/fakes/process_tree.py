"""A small process tree for timeout/cancellation tests: this process plus a ``sleep 60`` child.

``python process_tree.py PIDFILE [--ignore-term]`` writes "<own pid> <child pid>" to PIDFILE
(atomically, via rename), prints ``started`` and sleeps. With ``--ignore-term`` it ignores
SIGTERM, so only the runtime's SIGKILL escalation can stop it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Running and not a zombie (this machine's PID 1 does not reap orphans promptly)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def read_pids(pidfile: Path, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        if pidfile.exists():
            return [int(p) for p in pidfile.read_text().split()]
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    raise TimeoutError(f"{pidfile} was not written within {timeout} s")


def wait_dead(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def kill_leftovers(pidfile: Path) -> None:
    """Test teardown: SIGKILL what a failed test left running (by the pids it wrote, nothing else)."""
    if not pidfile.exists():
        return
    for pid in (int(p) for p in pidfile.read_text().split()):
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main() -> None:
    pidfile = Path(sys.argv[1])
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "60"])
    tmp = pidfile.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()} {child.pid}")
    tmp.rename(pidfile)
    print("started", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    main()
