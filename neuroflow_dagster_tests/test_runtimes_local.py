"""Local and builtin runtimes: real processes, real signals, a real Dagster run being terminated."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.runtimes import (
    STAND_IN_IMAGE,
    BuiltinRuntime,
    LocalRuntime,
    ToolRunError,
    get_runtime,
    verify_outputs,
)
from neuroflow_dagster.tools.spec import ToolSpec
from neuroflow_dagster_tests.fakes.process_tree import kill_leftovers, pid_alive, read_pids, wait_dead

TREE = str(Path(__file__).parent / "fakes" / "process_tree.py")
PY = sys.executable


@pytest.fixture(autouse=True)
def _no_leftover_processes(tmp_path: Path) -> Iterator[None]:
    """A failing test must not leave its `sleep 60` tree behind."""
    yield
    for pidfile in tmp_path.rglob("pids"):
        kill_leftovers(pidfile)


def spec(tmp_path: Path, *argv: str, **kw: object) -> ToolSpec:
    return ToolSpec(tool=kw.pop("tool", "demo"), argv=tuple(argv), output_dir=tmp_path / "out", **kw)  # type: ignore[arg-type]


def test_echo_records_everything_and_streams_lines(tmp_path: Path) -> None:
    lines: list[str] = []
    s = spec(tmp_path, PY, "-c", "import os,sys; print('hello', os.environ['NF_X']); "
             "print('to stderr', file=sys.stderr); print(os.getcwd())",
             env={"NF_X": "42"}, workdir=tmp_path / "work")
    log_path = tmp_path / "logs" / "deep" / "run.log"
    before = time.time()
    record = LocalRuntime().run(s, log_path=log_path, log=lines.append)
    assert record.exit_code == 0 and record.runtime == "local" and record.image is None
    assert shlex.split(record.command) == list(s.argv)
    assert before <= record.started <= record.ended <= time.time()
    assert record.extra["executable"] == PY
    assert (tmp_path / "work").is_dir()  # workdir created and used as cwd
    assert {"hello 42", "to stderr", str(tmp_path / "work")} <= set(lines)
    text = log_path.read_text()
    assert "hello 42" in text and "to stderr" in text and "[neuroflow] running: " in text
    assert "hello 42" in record.log_tail
    assert record.output_dir == str(tmp_path / "out") and record.log_path == str(log_path)


def test_log_tail_keeps_the_last_fifty_lines_file_keeps_all(tmp_path: Path) -> None:
    s = spec(tmp_path, PY, "-c", "for i in range(300): print(f'line {i}')")
    record = LocalRuntime().run(s, log_path=tmp_path / "run.log")
    tail = record.log_tail.splitlines()
    assert len(tail) == 50
    assert "line 299" in tail and "line 260" in tail and "line 249" not in tail
    assert sum(1 for t in (tmp_path / "run.log").read_text().splitlines() if t.startswith("line ")) == 300


def test_failing_command_is_a_tool_failure_with_exit_code(tmp_path: Path) -> None:
    s = spec(tmp_path, PY, "-c", "print('computing'); raise SystemExit(3)", tool="qsiparc")
    with pytest.raises(ToolRunError) as info:
        LocalRuntime().run(s, log_path=tmp_path / "run.log")
    err = info.value
    assert err.failure_class == "tool"
    assert err.record.exit_code == 3 and err.record.ended is not None
    assert "qsiparc failed with exit code 3" in str(err) and str(tmp_path / "run.log") in str(err)
    assert "last output: computing" in str(err) and err.record.error == str(err)


def test_no_space_left_on_device_is_a_resource_failure(tmp_path: Path) -> None:
    s = spec(tmp_path, PY, "-c", "import sys; print(\"OSError: [Errno 28] No space left on device: '/work'\"); "
             "sys.exit(1)")
    with pytest.raises(ToolRunError) as info:
        LocalRuntime().run(s, log_path=tmp_path / "run.log")
    assert info.value.failure_class == "resource"


def test_missing_executable_is_a_configuration_failure(tmp_path: Path) -> None:
    s = spec(tmp_path, "neuroflow-no-such-tool-xyz", "--help")
    with pytest.raises(ToolRunError) as info:
        LocalRuntime().run(s, log_path=tmp_path / "run.log")
    assert info.value.failure_class == "configuration"
    assert "executable not found: neuroflow-no-such-tool-xyz" in str(info.value)
    assert (tmp_path / "run.log").is_file()


def test_hard_timeout_kills_the_whole_tree_even_if_it_ignores_sigterm(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    s = spec(tmp_path, PY, TREE, str(pidfile), "--ignore-term")
    t0 = time.monotonic()
    with pytest.raises(ToolRunError) as info:
        LocalRuntime(kill_grace_s=0.5).run(s, log_path=tmp_path / "run.log", timeout_s=1.5)
    elapsed = time.monotonic() - t0
    pids = read_pids(pidfile, timeout=0)
    assert wait_dead(pids, timeout=2), f"still alive: {[p for p in pids if pid_alive(p)]}"
    assert 1.5 <= elapsed < 6, elapsed
    err = info.value
    assert err.failure_class == "resource"  # a time budget exceeded: see docs/runtimes.md
    assert err.record.extra["timed_out"] is True and err.record.exit_code == -signal.SIGKILL
    assert "exceeded its hard timeout of 1.5 s" in str(err)
    assert "hard timeout of 1.5 s reached" in (tmp_path / "run.log").read_text()


def test_soft_timeout_warns_but_lets_the_run_finish(tmp_path: Path) -> None:
    lines: list[str] = []
    s = spec(tmp_path, PY, "-c", "import time; time.sleep(1.2); print('done')")
    record = LocalRuntime().run(s, log_path=tmp_path / "run.log", soft_timeout_s=0.3, timeout_s=30, log=lines.append)
    assert record.exit_code == 0
    warning = next(line for line in lines if "soft timeout" in line)
    assert warning.startswith("[neuroflow] WARNING soft timeout") and "not stopped" in warning
    assert lines.index(warning) < lines.index("done")
    assert "WARNING soft timeout" in (tmp_path / "run.log").read_text()


def test_timeouts_default_to_the_stage_config(tmp_path: Path) -> None:
    stage = NeuroflowConfig.model_validate(
        {"paths": {k: str(tmp_path / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir",
                                                  "log_dir")},
         "pipelines": {"qsiparc": {"runtime": "local", "timeout_minutes": 0.02}}}
    ).pipelines.qsiparc
    pidfile = tmp_path / "pids"
    with pytest.raises(ToolRunError) as info:
        get_runtime(stage, kill_grace_s=0.5).run(spec(tmp_path, PY, TREE, str(pidfile)), log_path=tmp_path / "r.log")
    assert info.value.record.extra["timeout_s"] == pytest.approx(1.2)
    assert wait_dead(read_pids(pidfile, timeout=0))


def test_background_children_do_not_outlive_a_successful_run(tmp_path: Path) -> None:
    """A tool that exits 0 but leaves a daemon behind (output closed): the group is cleaned up."""
    child = ("import subprocess, sys; p = subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL, "
             "stderr=subprocess.DEVNULL); print(p.pid)")
    record = LocalRuntime(kill_grace_s=1).run(spec(tmp_path, PY, "-c", child), log_path=tmp_path / "run.log")
    assert record.exit_code == 0
    orphan = int(record.log_tail.splitlines()[2])
    assert wait_dead([orphan], timeout=3)
    assert "still running after exit: stopping them" in record.log_tail


def test_keyboard_interrupt_in_the_parent_terminates_the_child_tree(tmp_path: Path) -> None:
    """Cancellation inside this process: SIGINT -> KeyboardInterrupt while the runtime waits."""
    pidfile = tmp_path / "pids"
    finished = threading.Event()

    def interrupt_when_started() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not finished.is_set():
            if pidfile.exists():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            LocalRuntime(kill_grace_s=1).run(spec(tmp_path, PY, TREE, str(pidfile)), log_path=tmp_path / "run.log",
                                             timeout_s=30)
    finally:
        finished.set()
    pids = read_pids(pidfile, timeout=0)
    assert wait_dead(pids, timeout=2), f"still alive: {[p for p in pids if pid_alive(p)]}"
    assert "interrupted by KeyboardInterrupt" in (tmp_path / "run.log").read_text()


DAGSTER_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import dagster as dg

    from neuroflow_dagster.runtimes.local import LocalRuntime
    from neuroflow_dagster.tools.spec import ToolSpec

    tmp, tree = Path(sys.argv[1]), sys.argv[2]

    @dg.asset
    def long_tool(context):
        spec = ToolSpec(tool="sleeper", argv=(sys.executable, tree, str(tmp / "pids")), output_dir=tmp)
        LocalRuntime(kill_grace_s=2).run(spec, log_path=tmp / "run.log", timeout_s=120, log=context.log.info)

    result = dg.materialize([long_tool], raise_on_error=False)
    print("run finished, success =", result.success, flush=True)
    """
)


def test_terminating_a_real_dagster_run_stops_the_tool_tree(tmp_path: Path) -> None:
    """The real boundary: Dagster turns SIGTERM into DagsterExecutionInterruptedError in the step;
    the runtime must stop the tool's process group before that error propagates."""
    script = tmp_path / "run_asset.py"
    script.write_text(DAGSTER_SCRIPT)
    parent = subprocess.Popen([PY, str(script), str(tmp_path), TREE], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        pids = read_pids(tmp_path / "pids", timeout=45)
        assert all(pid_alive(p) for p in pids)
        parent.send_signal(signal.SIGTERM)
        out, _ = parent.communicate(timeout=30)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert wait_dead(pids, timeout=5), f"still alive: {[p for p in pids if pid_alive(p)]}\n{out}"
    assert "success = False" in out
    assert "interrupted by DagsterExecutionInterruptedError" in (tmp_path / "run.log").read_text()


def test_builtin_records_the_stand_in_and_refuses_real_tool_specs(tmp_path: Path) -> None:
    s = spec(tmp_path, PY, "-c", "print('stand-in ran')", stand_in=True)
    record = BuiltinRuntime().run(s, log_path=tmp_path / "a.log")
    assert record.runtime == "builtin" and record.image == STAND_IN_IMAGE == "builtin stand-in (not the real tool)"
    assert record.extra["stand_in"] is True
    # a stand-in run on the local runtime is still labelled as a stand-in
    assert LocalRuntime().run(s, log_path=tmp_path / "b.log").image == STAND_IN_IMAGE
    with pytest.raises(ToolRunError) as info:
        BuiltinRuntime().run(spec(tmp_path, PY, "-c", "print(1)"), log_path=tmp_path / "c.log")
    assert info.value.failure_class == "configuration" and "stand_in=False" in str(info.value)
    assert (tmp_path / "c.log").is_file()


def test_get_runtime_by_stage_field(tmp_path: Path) -> None:
    from neuroflow_dagster.runtimes.apptainer import ApptainerRuntime
    from neuroflow_dagster.runtimes.docker import DockerRuntime

    cfg = NeuroflowConfig.model_validate(
        {"paths": {k: str(tmp_path / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir",
                                                  "log_dir")},
         "pipelines": {"bids_conversion": {"runtime": "docker"}, "qsiprep": {"runtime": "apptainer"},
                       "qsirecon": {"runtime": "builtin"}, "qsiparc": {"runtime": "local"}}}
    )
    kinds = {name: type(get_runtime(cfg.stage(name))) for name in
             ("bids_conversion", "qsiprep", "qsirecon", "qsiparc")}
    assert kinds == {"bids_conversion": DockerRuntime, "qsiprep": ApptainerRuntime,
                     "qsirecon": BuiltinRuntime, "qsiparc": LocalRuntime}
    assert get_runtime(cfg.stage("qsiprep")).stage is cfg.pipelines.qsiprep
    with pytest.raises(ValueError, match="unknown runtime 'k8s'"):
        get_runtime(type("S", (), {"runtime": "k8s"})())


def test_verify_outputs_turns_a_silent_exit_zero_into_a_failure(tmp_path: Path) -> None:
    s = spec(tmp_path, PY, "-c", "pass", outputs=("sub-*/dwi/*_dwi.nii.gz",))
    record = LocalRuntime().run(s, log_path=tmp_path / "run.log")
    with pytest.raises(ToolRunError) as info:
        verify_outputs(s, record)
    assert info.value.failure_class == "tool" and "sub-*/dwi/*_dwi.nii.gz" in str(info.value)
    (tmp_path / "out" / "sub-01" / "dwi").mkdir(parents=True)
    (tmp_path / "out" / "sub-01" / "dwi" / "sub-01_dwi.nii.gz").write_bytes(b"x")
    assert verify_outputs(s, record) is record
