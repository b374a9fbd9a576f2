"""The tool guard: no tool outlives its run worker, inherited ignored signals are reset, one process per work.

Real processes and real signals throughout: a worker process is SIGKILLed the
way `dagster dev` is when its process group is killed; a worker that ignores
SIGINT/SIGTERM (started from a background shell) starts a tool; two runs of
the same work compete for the lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuroflow_dagster.runtimes import LocalRuntime, ToolRunError
from neuroflow_dagster.runtimes.process import run_process
from neuroflow_dagster.tools.spec import ToolSpec
from neuroflow_dagster_tests.fakes.process_tree import kill_leftovers, pid_alive, read_pids, wait_dead

TREE = str(Path(__file__).parent / "fakes" / "process_tree.py")
PY = sys.executable
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_leftover_processes(tmp_path: Path) -> Iterator[None]:
    yield
    for pidfile in tmp_path.rglob("pids*"):
        if pidfile.suffix != ".tmp":
            kill_leftovers(pidfile)


WORKER = textwrap.dedent(
    """
    import signal, sys
    from pathlib import Path
    from neuroflow_dagster.runtimes import LocalRuntime, ToolRunError
    from neuroflow_dagster.tools.spec import ToolSpec

    tmp, tree, ignore = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "ignore"
    if ignore:  # as a worker started from a background shell, after Dagster mapped SIGTERM to SIGINT's handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spec = ToolSpec(tool="sleeper", argv=(sys.executable, tree, str(tmp / "pids")), output_dir=tmp)
    try:
        LocalRuntime(kill_grace_s=3).run(spec, log_path=tmp / "run.log", timeout_s=float(sys.argv[4]))
    except ToolRunError as exc:
        print("tool exit code", exc.record.exit_code, flush=True)
    """
)


def start_worker(tmp_path: Path, *, ignore: bool = False, timeout_s: float = 120) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen(
        [PY, str(script), str(tmp_path), TREE, "ignore" if ignore else "default", str(timeout_s)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )


def test_a_sigkilled_worker_takes_its_tool_tree_with_it(tmp_path: Path) -> None:
    """The worker dies without a chance to clean up (SIGKILL): the guard stops the tool within its grace."""
    worker = start_worker(tmp_path)
    try:
        pids = read_pids(tmp_path / "pids", timeout=45)
        assert all(pid_alive(p) for p in pids)
        worker.kill()
        worker.wait(timeout=10)
        assert wait_dead(pids, timeout=15), f"tool outlived its worker: {[p for p in pids if pid_alive(p)]}"
    finally:
        if worker.poll() is None:
            worker.kill()
    log = (tmp_path / "run.log").read_text()
    assert "the run worker that started this tool is gone" in log


def test_signals_ignored_by_the_worker_are_reset_for_the_tool(tmp_path: Path) -> None:
    """A worker that ignores SIGINT/SIGTERM still starts tools that obey them: the hard timeout's
    SIGTERM stops the tool gracefully (killed by SIGTERM, no SIGKILL escalation)."""
    worker = start_worker(tmp_path, ignore=True, timeout_s=4)
    try:
        pids = read_pids(tmp_path / "pids", timeout=45)
        ignored = int(_status_field(pids[0], "SigIgn"), 16)
        assert not ignored & (1 << (signal.SIGTERM - 1)), "the tool inherited an ignored SIGTERM"
        assert not ignored & (1 << (signal.SIGINT - 1)), "the tool inherited an ignored SIGINT"
        out, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert wait_dead(pids, timeout=5)
    assert "hard timeout" in (tmp_path / "run.log").read_text()
    # -15: the SIGTERM stopped it; an ignored SIGTERM would have needed the SIGKILL escalation (-9).
    assert "tool exit code -15" in out, out


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1]
    raise AssertionError(f"{name} not in /proc/{pid}/status")


def test_exit_status_and_signals_pass_through_the_guard(tmp_path: Path) -> None:
    ok = LocalRuntime().run(ToolSpec(tool="t", argv=(PY, "-c", "print('hi')"), output_dir=tmp_path),
                            log_path=tmp_path / "ok.log")
    assert ok.exit_code == 0
    with pytest.raises(ToolRunError) as info:
        LocalRuntime().run(ToolSpec(tool="t", argv=(PY, "-c", "import sys; sys.exit(7)"), output_dir=tmp_path),
                           log_path=tmp_path / "seven.log")
    assert info.value.record.exit_code == 7 and "exit code 7" in str(info.value)
    with pytest.raises(ToolRunError) as info:
        LocalRuntime().run(ToolSpec(tool="t", argv=(PY, "-c", "import os, signal; os.kill(os.getpid(), 9)"),
                                    output_dir=tmp_path), log_path=tmp_path / "nine.log")
    assert info.value.record.exit_code == -9 and "killed by signal SIGKILL" in str(info.value)
    assert info.value.failure_class == "resource"


def test_one_process_per_work_even_when_the_first_guard_died(tmp_path: Path) -> None:
    """The lock is held by the tool too: with its guard SIGKILLed (its worker gone as well), a second run of
    the same work waits for the orphan rather than computing beside it, and says who holds the lock."""
    lock = tmp_path / "locks" / "qsiprep" / "SUBJ.lock"
    first = subprocess.Popen(
        [PY, "-I", "-S", str(REPO / "neuroflow_dagster/runtimes/guard.py"), "--lock", str(lock),
         "--lock-info", json.dumps({"run_id": "run-1"}), "--", PY, TREE, str(tmp_path / "pids")],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        pids = read_pids(tmp_path / "pids", timeout=45)
        os.kill(first.pid, signal.SIGKILL)  # the guard alone dies; its tool (holding the lock) lives on
        first.wait(timeout=10)
        assert pid_alive(pids[0])
        sink = []
        with pytest.raises(ToolRunError) as info:
            _run_locked(tmp_path, lock, lines=sink, wait_s=2)
        assert info.value.failure_class == "transient"
        assert "another process of the same work is still running" in str(info.value)
        assert any('"run_id": "run-1"' in line for line in sink), sink
        os.kill(pids[0], signal.SIGKILL)
        os.kill(pids[1], signal.SIGKILL)
        assert wait_dead(pids, timeout=5)
        record = _run_locked(tmp_path, lock, lines=[], wait_s=2)
        assert record.exit_code == 0
    finally:
        if first.stdin:
            first.stdin.close()


def _run_locked(tmp_path: Path, lock: Path, *, lines: list[str], wait_s: float) -> object:
    from neuroflow_dagster.runtimes.process import LogSink, new_record

    spec = ToolSpec(tool="t", argv=(PY, "-c", "print('second')"), output_dir=tmp_path)
    record = new_record(spec, runtime="local", command=spec.argv, log_path=tmp_path / "second.log", image=None)
    sink = LogSink(tmp_path / "second.log", lines.append)
    return run_process(spec.argv, record=record, sink=sink, env=dict(os.environ), cwd=None, timeout_s=30,
                       soft_timeout_s=None, lock=lock, lock_info={"run_id": "run-2"}, lock_wait_s=wait_s)


def test_guard_overhead_is_small(tmp_path: Path) -> None:
    """Not a timing claim (see benchmarks/): the guard imports nothing of the project."""
    out = subprocess.run([PY, "-I", "-S", "-X", "importtime", str(REPO / "neuroflow_dagster/runtimes/guard.py"),
                          "--", "true"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "neuroflow" not in out.stderr and "dagster" not in out.stderr
