"""`neuroflow demo` and `neuroflow start` stop their whole process tree on SIGTERM, however they were started.

A background job of a non-interactive shell starts with SIGINT ignored (here: `trap '' INT`, and for
`start` also `trap '' TERM`), ignored dispositions are inherited through exec, and `dagster dev` maps
SIGTERM to SIGINT's handler: before the fix only SIGKILL stopped it, leaving the webserver, the daemon
and the code server behind. Each test starts the real command that way (a real `dagster dev` on a free
port; the demo with its real DICOM, so sensors and runs may be under way), waits for the webserver,
records every process of the tree, sends SIGTERM to the `neuroflow` process alone and requires it to
exit 0 with every recorded process gone and the port free.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuroflow_dagster.runtimes.process import proc_stats
from neuroflow_dagster_tests.daemon_harness import REPO, _answers, free_port, wait_for
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc's parent links), whatever its session or group."""
    children: dict[int, list[int]] = {}
    for child, fields in proc_stats():
        children.setdefault(int(fields[1]), []).append(child)
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def stop_and_check(argv: list[str], trap: str, env: dict[str, str], cwd: Path, port: int, log: Path) -> str:
    """Start `argv` under `trap`, wait for the webserver, SIGTERM the neuroflow process; its output."""
    with log.open("w") as fh:
        shell = subprocess.Popen(["bash", "-c", f"{trap}; exec \"$@\"", "bash", *argv], env=env, cwd=cwd,
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    tree: set[int] = set()
    try:
        wait_for("the webserver", lambda: _answers(port) or shell.poll() is not None, timeout=300, log=log)
        assert shell.poll() is None, log.read_text()[-4000:]
        time.sleep(5)  # let the daemon start its sensors (and the demo its first runs)
        tree = descendants(shell.pid)
        assert len(tree) >= 3, tree  # dagster dev, its webserver, daemon and code server
        started = time.monotonic()
        os.kill(shell.pid, signal.SIGTERM)  # the neuroflow process alone, as a supervisor or `kill` would
        code = shell.wait(timeout=120)
        stopped_s = time.monotonic() - started
        wait_for("the tree to be gone", lambda: not any(alive(p) for p in tree), timeout=30, log=log, interval=0.5)
        assert code == 0, log.read_text()[-4000:]
        assert port_free(port)
        print(f"stopped {len(tree)} processes in {stopped_s:.1f}s")
        return log.read_text()
    finally:
        for pid in [shell.pid, *tree]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        shell.wait(timeout=30)


@pytest.mark.timeout(600)
def test_demo_stops_on_sigterm_from_a_background_shell(tmp_path: Path) -> None:
    port = free_port()
    neuroflow = str(Path(sys.executable).with_name("neuroflow"))
    out = stop_and_check([neuroflow, "demo", "--dir", str(tmp_path / "demo"), "--port", str(port)],
                         "trap '' INT", dict(os.environ), tmp_path, port, tmp_path / "demo.log")  # fmt: skip
    assert "SIGTERM received, stopping dagster dev" in out


@pytest.mark.timeout(600)
def test_start_stops_on_sigterm_with_int_and_term_ignored(tmp_path: Path) -> None:
    config = make_workspace(tmp_path / "ws")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    neuroflow = str(Path(sys.executable).with_name("neuroflow"))
    argv = [neuroflow, "--config", str(config.source), "start", "--dagster-home", str(home), "--port", str(port)]
    out = stop_and_check(argv, "trap '' INT TERM", dict(os.environ), tmp_path, port, tmp_path / "start.log")
    assert "SIGTERM received, stopping dagster dev" in out
