"""Docker runtime on a real Docker engine the tests start (Debian's dockerd 20.10, engines/docker_engine.py).

Real parts: dockerd and its containerd/runc, cgroup limits (v1 here), user switching, bind mounts,
docker-py, dagster-docker's ``PipesDockerClient``, Dagster's Pipes session and real
``dagster.materialize`` runs. The image is built locally (busybox imported with ``docker import``:
no registry is reachable); where a tool needs Python (Pipes), the host's interpreter and this
project's venv are bind-mounted read-only at their own paths.

What the real engine cannot show here is a pull from a registry (none is reachable): that one
test keeps ``fakes/fake_docker.FakeDockerClient`` (the digest recorded from a pulled image's
RepoDigests). Every test checks that no container of ours is left behind.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import docker.client
import pytest

from neuroflow_dagster.config import QsiprepConfig, StageConfig
from neuroflow_dagster.runtimes import ToolRunError, get_runtime
from neuroflow_dagster.runtimes.docker import LABEL_TOOL, DockerRuntime, docker_run_argv, image_problem
from neuroflow_dagster.tools.spec import Mount, ToolSpec
from neuroflow_dagster_tests.engines.docker_engine import IMAGE, DockerEngine, python_mounts
from neuroflow_dagster_tests.fakes.fake_docker import FakeDockerClient

PY = sys.executable
FAKES = Path(__file__).parent / "fakes"
QSIPREP = "pennlinc/qsiprep:1.1.1"
DIGEST = "sha256:" + "ab" * 32


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def engine(docker_engine: DockerEngine, monkeypatch: pytest.MonkeyPatch) -> Iterator[DockerEngine]:
    """The session's engine, reachable through DOCKER_HOST (how the Pipes client finds it); checks
    afterwards that no container of ours is left and no process runs in one."""
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    monkeypatch.setenv("NF_HOST_ONLY", "must-not-leak")
    client = docker_engine.client()
    before = {c.id for c in client.containers.list(all=True)}
    yield docker_engine
    left = [c for c in client.containers.list(all=True, filters={"label": LABEL_TOOL}) if c.id not in before]
    for container in left:
        container.remove(force=True)
    assert not left, f"containers left behind: {[c.name for c in left]}"


def container_processes(container_id: str) -> list[int]:
    """Host pids still in the container's cgroup (cgroup v1 and v2 both name the container id)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if container_id in (entry / "cgroup").read_text():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def python_spec_mounts() -> tuple[Mount, ...]:
    return tuple(Mount(Path(b.split(":")[0]), b.split(":")[1], True) for b in python_mounts())


def busybox(tool: str, script: str, tmp_path: Path, **kw: object) -> ToolSpec:
    return ToolSpec(tool=tool, argv=("sh", "-c", script), output_dir=tmp_path, image=IMAGE, **kw)  # type: ignore[arg-type]


def _interrupt_when(predicate: object, done: threading.Event) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not done.is_set():
            if predicate():  # type: ignore[operator]
                time.sleep(0.3)
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------- plain path (no Dagster context)


def test_user_mounts_limits_env_and_workdir_reach_the_container(engine: DockerEngine, tmp_path: Path) -> None:
    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    for folder in (bids, out, work):
        folder.mkdir()
    (bids / "dataset_description.json").write_text("{}")
    for folder in (out, work):
        os.chown(folder, 1000, 1000)  # the operator's folders, as the deploy doc sets them up
    script = """
        echo "uid=$(id -u) gid=$(id -g) cwd=$(pwd)"
        echo "spec=$NF_SPEC_ENV host=${NF_HOST_ONLY:-unset}"
        cat /data/bids/dataset_description.json >/dev/null && echo "input readable"
        touch /data/bids/new 2>/dev/null && echo "INPUT WRITTEN" || echo "input read-only"
        echo result > /out/result.txt && echo "output written"
        echo "mem=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max)"
        echo "cpu=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cat /sys/fs/cgroup/cpu.max)"
        """
    spec = busybox("qsiprep", script, out, mounts=(Mount(bids, "/data/bids", True), Mount(out, "/out", False),
                                                   Mount(work, "/work", False)),
                   env={"NF_SPEC_ENV": "from-spec"}, workdir=Path("/work"))
    stage = QsiprepConfig(runtime="docker", cpus=1.5, memory_mb=64, user="1000:1000")
    lines: list[str] = []
    record = DockerRuntime(stage).run(spec, log_path=tmp_path / "logs" / "run.log", log=lines.append)

    assert "uid=1000 gid=1000 cwd=/work" in lines
    assert "spec=from-spec host=unset" in lines  # the spec's env, never the worker's
    assert {"input readable", "input read-only", "output written"} <= set(lines) and "INPUT WRITTEN" not in lines
    assert f"mem={64 * 1024 * 1024}" in lines and "cpu=150000" in lines  # memory_mb and cpus as cgroup limits
    result = out / "result.txt"
    assert (result.stat().st_uid, result.stat().st_gid) == (1000, 1000)  # owned by the configured user
    assert not (bids / "new").exists()
    assert record.exit_code == 0 and record.image == IMAGE
    image_id = engine.client().images.get(IMAGE).id
    assert record.image_digest == image_id  # a local image has no RepoDigest: its id
    assert record.command == shlex.join(docker_run_argv(spec, stage))
    assert record.extra["container_removed"] is True
    assert not container_processes(record.extra["container_id"])


def test_templateflow_home_is_readable_and_read_only_in_the_container(engine: DockerEngine, tmp_path: Path) -> None:
    """paths.templateflow_home as the QSIPrep spec binds and names it, in a real container: the tool finds
    the site's templates under $TEMPLATEFLOW_HOME and cannot write there (no download into the site's copy)."""
    from neuroflow_dagster.config import NeuroflowConfig
    from neuroflow_dagster.tools import qsiprep

    tf = tmp_path / "templateflow"
    (tf / "tpl-MNI152NLin2009cAsym").mkdir(parents=True)
    (tf / "tpl-MNI152NLin2009cAsym" / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz").write_text("template")
    license_file = tmp_path / "license.txt"
    license_file.write_text("x\n")
    paths = {k: str(tmp_path / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}
    config = NeuroflowConfig.model_validate({"paths": {**paths, "templateflow_home": str(tf)}, "pipelines": {
        "qsiprep": {"runtime": "docker", "output_resolution": 2, "fs_license": str(license_file)}}})
    (tmp_path / "bids_root").mkdir()
    qsiprep_spec = qsiprep.build_spec(config, "0075", ["01"])
    script = """
        cat "$TEMPLATEFLOW_HOME/tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"; echo
        touch "$TEMPLATEFLOW_HOME/new" 2>/dev/null && echo "TEMPLATEFLOW WRITTEN" || echo "templateflow read-only"
        echo "home=$TEMPLATEFLOW_HOME"
        """
    spec = busybox("qsiprep", script, tmp_path / "derivatives", mounts=qsiprep_spec.mounts, env=qsiprep_spec.env,
                   workdir=qsiprep_spec.workdir)
    lines: list[str] = []
    DockerRuntime(config.pipelines.qsiprep).run(spec, log_path=tmp_path / "logs" / "run.log", log=lines.append)
    assert {"template", "templateflow read-only", "home=/templateflow"} <= set(lines), lines
    assert not (tf / "new").exists()


def test_nonzero_exit_is_classified_and_the_container_removed(engine: DockerEngine, tmp_path: Path) -> None:
    spec = busybox("qsirecon", "echo 'OSError: [Errno 28] No space left on device'; exit 3", tmp_path)
    with pytest.raises(ToolRunError) as info:
        DockerRuntime().run(spec, log_path=tmp_path / "run.log")
    err = info.value
    assert err.failure_class == "resource" and err.record.exit_code == 3
    assert "qsirecon failed with exit code 3" in str(err) and "No space left" in err.record.log_tail
    plain = busybox("t", "echo something broke; exit 2", tmp_path)
    with pytest.raises(ToolRunError) as info:
        DockerRuntime().run(plain, log_path=tmp_path / "run2.log")
    assert info.value.failure_class == "tool" and info.value.record.exit_code == 2
    assert info.value.record.extra["container_removed"] is True


def test_oom_kill_is_a_resource_failure(engine: DockerEngine, tmp_path: Path) -> None:
    """memory_mb as the container's limit: the kernel's OOM killer ends the tool (137, State.OOMKilled)."""
    code = ("import time; print('a network timeout, retrying', flush=True); x = bytearray(300 * 1024 * 1024); "
            "x[::4096] = b'x' * len(x[::4096]); time.sleep(5); print('survived')")
    spec = ToolSpec(tool="qsiprep", argv=(PY, "-c", code), output_dir=tmp_path, image=IMAGE,
                    mounts=python_spec_mounts())
    with pytest.raises(ToolRunError) as info:
        DockerRuntime(StageConfig(runtime="docker", memory_mb=48)).run(spec, log_path=tmp_path / "run.log")
    err = info.value
    assert err.record.exit_code == 137 and err.record.extra["oom_killed"] is True
    # The engine's word wins over the tool's last lines ("timeout" alone would read as transient).
    assert err.failure_class == "resource" and "out-of-memory killer" in str(err) and "memory_mb 48" in str(err)
    assert "survived" not in err.record.log_tail.splitlines()


def test_hard_timeout_stops_and_removes_the_container(engine: DockerEngine, tmp_path: Path) -> None:
    # PID 1 of a container ignores SIGTERM unless it handles it: only the SIGKILL after the grace ends it.
    spec = busybox("t", "echo started; sleep 120", tmp_path)
    started = time.monotonic()
    with pytest.raises(ToolRunError) as info:
        DockerRuntime(kill_grace_s=1).run(spec, log_path=tmp_path / "run.log", timeout_s=2, soft_timeout_s=0.5)
    err = info.value
    assert time.monotonic() - started < 60
    assert err.failure_class == "resource" and err.record.extra["timed_out"] is True
    assert err.record.exit_code == 137  # SIGKILL after `docker stop`'s grace
    assert err.record.extra["container_removed"] is True
    assert not container_processes(err.record.extra["container_id"])
    text = (tmp_path / "run.log").read_text()
    assert "WARNING soft timeout" in text and "hard timeout of 2.0 s reached" in text


def test_interrupt_stops_and_removes_the_container(engine: DockerEngine, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    tmp_path.chmod(0o777)
    spec = busybox("t", "touch /host/started; trap 'echo got TERM; exit 143' TERM; sleep 120 & wait", tmp_path,
                   mounts=(Mount(tmp_path, "/host", False),))
    done = threading.Event()
    _interrupt_when(marker.exists, done)
    try:
        with pytest.raises(KeyboardInterrupt):
            DockerRuntime(kill_grace_s=5).run(spec, log_path=tmp_path / "run.log", timeout_s=60)
    finally:
        done.set()
    text = (tmp_path / "run.log").read_text()
    assert "interrupted by KeyboardInterrupt" in text and "got TERM" in text  # stopped with SIGTERM first
    ours = engine.client().containers.list(all=True, filters={"label": LABEL_TOOL})
    assert ours == []


WORKER = """
import sys
from pathlib import Path
from neuroflow_dagster.runtimes.docker import DockerRuntime
from neuroflow_dagster.tools.spec import Mount, ToolSpec
tmp = Path(sys.argv[1])
spec = ToolSpec(tool="orphan", argv=("sh", "-c", "touch /host/started; sleep 300"), output_dir=tmp,
                image=sys.argv[2], mounts=(Mount(tmp, "/host", False),))
DockerRuntime(kill_grace_s=2).run(spec, log_path=tmp / "run.log", timeout_s=600)
"""


def test_a_sigkilled_worker_does_not_leave_its_container_running(engine: DockerEngine, tmp_path: Path) -> None:
    """dockerd, not the worker, runs the container: the worker's dead man's switch removes it."""
    tmp_path.chmod(0o777)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    worker = subprocess.Popen([PY, str(script), str(tmp_path), IMAGE], env=dict(os.environ, DOCKER_HOST=engine.host))
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "started").exists(), (tmp_path / "run.log").read_text()
        assert engine.client().containers.list(filters={"label": f"{LABEL_TOOL}=orphan"})
        worker.kill()
        worker.wait(timeout=10)
        deadline = time.monotonic() + 60
        while engine.client().containers.list(all=True, filters={"label": f"{LABEL_TOOL}=orphan"}):
            assert time.monotonic() < deadline, "the container outlived its worker"
            time.sleep(0.5)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert "the run worker is gone: running its cleanup" in (tmp_path / "run.log").read_text()


def test_unpinned_image_is_refused_before_anything_runs(engine: DockerEngine, tmp_path: Path) -> None:
    spec = ToolSpec(tool="qsiprep", argv=("qsiprep",), output_dir=tmp_path, image="pennlinc/qsiprep:latest")
    count = len(engine.client().containers.list(all=True))
    with pytest.raises(ToolRunError) as info:
        DockerRuntime().run(spec, log_path=tmp_path / "run.log")
    assert info.value.failure_class == "configuration" and "'latest'" in str(info.value)
    assert len(engine.client().containers.list(all=True)) == count and (tmp_path / "run.log").is_file()


def test_engine_refusals_are_configuration_failures(engine: DockerEngine, tmp_path: Path) -> None:
    """Found on the real engine: a 400 from the engine, and an absent image with no registry reachable,
    were both classified "tool" with a raw HTTP message; they are the operator's to fix."""
    too_many = StageConfig(runtime="docker", cpus=float(os.cpu_count() or 1) + 64)
    with pytest.raises(ToolRunError) as info:
        DockerRuntime(too_many).run(busybox("t", "true", tmp_path), log_path=tmp_path / "cpus.log")
    assert info.value.failure_class == "configuration"
    assert "refused the container" in str(info.value) and "CPUs" in str(info.value)
    absent = ToolSpec(tool="t", argv=("true",), output_dir=tmp_path, image="neuroflow/not-here:1.0")
    with pytest.raises(ToolRunError) as info:
        DockerRuntime().run(absent, log_path=tmp_path / "absent.log")
    assert info.value.failure_class == "configuration"
    assert "image not found: neuroflow/not-here:1.0 is not on this Docker host" in str(info.value)


def test_missing_image_is_pulled_from_a_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No registry is reachable here: the pull and the RepoDigest it brings are shown with the fake client."""
    fake = FakeDockerClient(local={}, pullable={"neuroflow/pulled:2.0": DIGEST})
    monkeypatch.setattr(docker.client, "from_env", lambda *a, **k: fake)
    ok = ToolSpec(tool="t", argv=(PY, "-c", "print('pulled ran')"), output_dir=tmp_path, image="neuroflow/pulled:2.0")
    record = DockerRuntime().run(ok, log_path=tmp_path / "a.log")
    assert fake.images.pulled == ["neuroflow/pulled:2.0"] and "pulled ran" in record.log_tail
    assert record.image_digest == f"neuroflow/pulled@{DIGEST}"


# --------------------------------------------------------------------------- pure helpers


def qsiprep_case(tmp_path: Path) -> tuple[ToolSpec, QsiprepConfig]:
    bids, out, work = tmp_path / "bids", tmp_path / "derivatives" / "qsiprep", tmp_path / "work"
    license_file = tmp_path / "license.txt"
    spec = ToolSpec(
        tool="qsiprep",
        argv=("qsiprep", "/data/bids", "/out", "participant", "--participant-label", "0075",
              "--output-resolution", "1.6", "--fs-license-file", "/opt/freesurfer/license.txt",
              "-w", "/work", "--nprocs", "8"),
        output_dir=out,
        image=QSIPREP,
        mounts=(Mount(bids, "/data/bids", True), Mount(out, "/out", False), Mount(work, "/work", False),
                Mount(license_file, "/opt/freesurfer/license.txt", True)),
        env={"TEMPLATEFLOW_HOME": "/work/templateflow", "OMP_NUM_THREADS": "8"},
        workdir=Path("/work"),
    )
    return spec, QsiprepConfig(runtime="docker", cpus=8, memory_mb=16000, user="1000:1000")


def test_docker_run_argv_for_the_record(tmp_path: Path) -> None:
    spec, stage = qsiprep_case(tmp_path)
    assert docker_run_argv(spec, stage) == [
        "docker", "run", "--rm", "--user", "1000:1000", "--cpus", "8", "--memory", "16000m",
        "-v", f"{tmp_path}/bids:/data/bids:ro", "-v", f"{tmp_path}/derivatives/qsiprep:/out:rw",
        "-v", f"{tmp_path}/work:/work:rw", "-v", f"{tmp_path}/license.txt:/opt/freesurfer/license.txt:ro",
        "-e", "TEMPLATEFLOW_HOME=/work/templateflow", "-e", "OMP_NUM_THREADS=8", "-w", "/work",
        "--label", "org.neuroflow.tool=qsiprep",
        "--entrypoint", "qsiprep", QSIPREP, "/data/bids", "/out", "participant", "--participant-label", "0075",
        "--output-resolution", "1.6", "--fs-license-file", "/opt/freesurfer/license.txt", "-w", "/work",
        "--nprocs", "8",
    ]
    # Without a configured user the worker's own uid:gid, so outputs are not owned by root.
    assert docker_run_argv(spec, StageConfig())[3:5] == ["--user", f"{os.getuid()}:{os.getgid()}"]


@pytest.mark.parametrize(("image", "ok"), [
    ("pennlinc/qsiprep:1.1.1", True),
    ("localhost:5000/lab/qsiprep:1.1.1", True),
    ("pennlinc/qsiprep@sha256:" + "0" * 64, True),
    ("pennlinc/qsiprep", False),
    ("pennlinc/qsiprep:latest", False),
    ("localhost:5000/qsiprep", False),
    (None, False),
])
def test_only_pinned_images_are_accepted(image: str | None, ok: bool) -> None:
    assert (image_problem(image) is None) is ok


# --------------------------------------------------------------------------- real Dagster + Pipes


def _pipes_asset(spec: ToolSpec, log_path: Path, seen: dict[str, object], timeout_s: float = 60
                 ) -> dg.AssetsDefinition:
    @dg.asset(name="piped")
    def piped(context):  # unannotated: a string annotation in a local def is unresolvable
        try:
            record, invocation = get_runtime(StageConfig(runtime="docker"), kill_grace_s=1).run_with_pipes(
                spec, context=context, log_path=log_path, log=context.log.info, timeout_s=timeout_s)
        except ToolRunError as err:
            seen["error"] = err
            raise
        seen["record"] = record
        reported = invocation.get_materialize_result()
        return dg.MaterializeResult(metadata={**reported.metadata, "command": record.command,
                                              "exit_code": record.exit_code})

    return piped


def _pipes_spec(tmp_path: Path, *args: str) -> ToolSpec:
    return ToolSpec(tool="pipes-tool", argv=(PY, str(FAKES / "pipes_tool.py"), *args), output_dir=tmp_path,
                    image=IMAGE, env={"NF_SPEC_ENV": "from-spec"},
                    mounts=(*python_spec_mounts(), Mount(tmp_path, str(tmp_path), False)))


def test_pipes_messages_reach_a_real_materialization(engine: DockerEngine, tmp_path: Path) -> None:
    seen: dict[str, object] = {}
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([_pipes_asset(_pipes_spec(tmp_path, "ok"), tmp_path / "run.log", seen)],
                            instance=instance)
    assert result.success
    (materialization,) = result.asset_materializations_for_node("piped")
    assert materialization.metadata["volumes"].value == 3  # reported by the tool through Pipes
    assert materialization.metadata["exit_code"].value == 0
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("hello from pipes" in m for m in messages)  # a Pipes log message
    assert any(m.endswith("plain output line") for m in messages)  # a plain line, via our `log`
    text = (tmp_path / "run.log").read_text()
    assert "NF_SPEC_ENV=from-spec HOST_ONLY=None" in text and "plain output line" in text
    record = seen["record"]
    assert record.extra["container_removed"] is True  # type: ignore[attr-defined]


def test_pipes_failure_is_classified_and_the_container_removed(engine: DockerEngine, tmp_path: Path) -> None:
    seen: dict[str, object] = {}
    result = dg.materialize([_pipes_asset(_pipes_spec(tmp_path, "fail"), tmp_path / "run.log", seen)],
                            raise_on_error=False)
    assert not result.success
    err = seen["error"]
    assert isinstance(err, ToolRunError)
    assert err.failure_class == "resource" and err.record.exit_code == 1
    assert "No space left on device" in err.record.log_tail and err.record.extra["container_removed"] is True


def test_cancelling_a_real_pipes_run_stops_and_removes_the_container(engine: DockerEngine, tmp_path: Path) -> None:
    """SIGINT during dg.materialize: Dagster raises DagsterExecutionInterruptedError in the step,
    the Pipes client stops the container, our runtime removes it."""
    pidfile = tmp_path / "pids"
    done = threading.Event()
    _interrupt_when(pidfile.exists, done)
    try:
        result = dg.materialize([_pipes_asset(_pipes_spec(tmp_path, "sleep", str(pidfile)), tmp_path / "run.log",
                                              {})], raise_on_error=False)
        assert not result.success
    except dg.DagsterExecutionInterruptedError:
        pass
    finally:
        done.set()
    assert "interrupted by DagsterExecutionInterruptedError" in (tmp_path / "run.log").read_text()
    assert engine.client().containers.list(all=True, filters={"label": LABEL_TOOL}) == []


def test_pipes_run_hard_timeout(engine: DockerEngine, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    seen: dict[str, object] = {}
    asset = _pipes_asset(_pipes_spec(tmp_path, "sleep", str(pidfile)), tmp_path / "run.log", seen, timeout_s=3)
    assert not dg.materialize([asset], raise_on_error=False).success
    err = seen["error"]
    assert isinstance(err, ToolRunError)
    assert err.failure_class == "resource" and err.record.extra["timed_out"] is True
    assert err.record.extra["container_removed"] is True
    assert not container_processes(err.record.extra["container_id"])
