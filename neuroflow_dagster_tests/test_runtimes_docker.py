"""Docker runtime, tested at the nearest real boundary: docker-py's client API.

No Docker engine exists on the test machines. ``docker.client.from_env`` (what dagster-docker's
``PipesDockerClient`` calls) is replaced by ``fakes.fake_docker.FakeDockerClient``, whose
containers are local processes that receive exactly the injected environment. Everything above
that boundary is real: our runtime, dagster-docker's Pipes client, Dagster's Pipes session and a
real ``dagster.materialize`` run. What this cannot show: the engine's own behaviour (mount
remapping, user switching, cgroup limits, image pulls from a registry).
"""

from __future__ import annotations

import os
import shlex
import signal
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
from neuroflow_dagster.runtimes.docker import DockerRuntime, docker_run_argv, image_problem
from neuroflow_dagster.tools.spec import Mount, ToolSpec
from neuroflow_dagster_tests.fakes.fake_docker import FakeDockerClient
from neuroflow_dagster_tests.fakes.process_tree import kill_leftovers, pid_alive, read_pids, wait_dead

PY = sys.executable
FAKES = Path(__file__).parent / "fakes"
QSIPREP = "pennlinc/qsiprep:1.1.1"
TEST_IMAGE = "neuroflow/test-tool:1.0"
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(autouse=True)
def _no_leftover_processes(tmp_path: Path) -> Iterator[None]:
    """A failing test must not leave its `sleep 60` tree behind."""
    yield
    for pidfile in tmp_path.rglob("pids"):
        kill_leftovers(pidfile)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeDockerClient:
    """The fake engine, also returned by docker.client.from_env (the Pipes client's way in)."""
    image_bin = tmp_path / "image-bin"
    image_bin.mkdir()
    qsiprep = image_bin / "qsiprep"
    qsiprep.write_text(f"#!{PY}\nimport os, sys\nprint('qsiprep', *sys.argv[1:])\n"
                       "print('TEMPLATEFLOW_HOME=' + os.environ.get('TEMPLATEFLOW_HOME', '-'))\n")
    qsiprep.chmod(0o755)
    client = FakeDockerClient(
        local={QSIPREP: DIGEST, TEST_IMAGE: None},
        pullable={"neuroflow/pulled:2.0": DIGEST},
        image_path={QSIPREP: f"{image_bin}:/usr/bin:/bin"},
    )
    monkeypatch.setattr(docker.client, "from_env", lambda *a, **k: client)
    monkeypatch.setenv("NF_HOST_ONLY", "must-not-leak")
    return client


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


def test_exact_container_arguments_logs_digest_and_removal(fake: FakeDockerClient, tmp_path: Path) -> None:
    spec, stage = qsiprep_case(tmp_path)
    lines: list[str] = []
    log_path = tmp_path / "logs" / "qsiprep.log"
    record = DockerRuntime(stage).run(spec, log_path=log_path, log=lines.append)

    bids, out, work = tmp_path / "bids", tmp_path / "derivatives" / "qsiprep", tmp_path / "work"
    assert fake.containers.created == [{
        "image": QSIPREP,
        "command": ["/data/bids", "/out", "participant", "--participant-label", "0075", "--output-resolution",
                    "1.6", "--fs-license-file", "/opt/freesurfer/license.txt", "-w", "/work", "--nprocs", "8"],
        "detach": True,
        "environment": {"TEMPLATEFLOW_HOME": "/work/templateflow", "OMP_NUM_THREADS": "8"},
        "entrypoint": ["qsiprep"],
        "volumes": [f"{bids}:/data/bids:ro", f"{out}:/out:rw", f"{work}:/work:rw",
                    f"{tmp_path / 'license.txt'}:/opt/freesurfer/license.txt:ro"],
        "user": "1000:1000",
        "labels": {"org.neuroflow.tool": "qsiprep", "org.neuroflow.log": str(log_path)},
        "working_dir": "/work",
        "nano_cpus": 8_000_000_000,
        "mem_limit": "16000m",
    }]
    assert "qsiprep /data/bids /out participant --participant-label 0075" in "\n".join(lines)
    assert "TEMPLATEFLOW_HOME=/work/templateflow" in lines
    assert "TEMPLATEFLOW_HOME=/work/templateflow" in log_path.read_text()
    assert record.runtime == "docker" and record.image == QSIPREP and record.exit_code == 0
    assert record.image_digest == f"pennlinc/qsiprep@{DIGEST}"
    assert record.command == shlex.join(docker_run_argv(spec, stage))
    assert record.extra["container_removed"] is True
    assert [c.removed for c in fake.containers.all] == [True]


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


def test_unpinned_image_is_refused_before_anything_runs(fake: FakeDockerClient, tmp_path: Path) -> None:
    spec = ToolSpec(tool="qsiprep", argv=("qsiprep",), output_dir=tmp_path, image="pennlinc/qsiprep:latest")
    with pytest.raises(ToolRunError) as info:
        DockerRuntime().run(spec, log_path=tmp_path / "run.log")
    assert info.value.failure_class == "configuration" and "'latest'" in str(info.value)
    assert fake.containers.created == [] and (tmp_path / "run.log").is_file()


def test_missing_image_is_pulled_or_a_configuration_failure(fake: FakeDockerClient, tmp_path: Path) -> None:
    ok = ToolSpec(tool="t", argv=(PY, "-c", "print('pulled ran')"), output_dir=tmp_path, image="neuroflow/pulled:2.0")
    record = DockerRuntime().run(ok, log_path=tmp_path / "a.log")
    assert fake.images.pulled == ["neuroflow/pulled:2.0"] and "pulled ran" in record.log_tail
    assert record.image_digest == f"neuroflow/pulled@{DIGEST}"
    denied = ToolSpec(tool="t", argv=(PY,), output_dir=tmp_path, image="neuroflow/private:1.0")
    with pytest.raises(ToolRunError) as info:
        DockerRuntime().run(denied, log_path=tmp_path / "b.log")
    assert info.value.failure_class == "configuration"
    assert "image not found: neuroflow/private:1.0" in str(info.value) and "pull access denied" in str(info.value)


def test_nonzero_exit_is_classified_and_the_container_removed(fake: FakeDockerClient, tmp_path: Path) -> None:
    spec = ToolSpec(tool="qsirecon", argv=(PY, "-c", "print('OSError: [Errno 28] No space left on device'); "
                                                     "raise SystemExit(1)"),
                    output_dir=tmp_path, image=TEST_IMAGE)
    with pytest.raises(ToolRunError) as info:
        DockerRuntime(client=fake).run(spec, log_path=tmp_path / "run.log")
    err = info.value
    assert err.failure_class == "resource" and err.record.exit_code == 1
    assert "qsirecon failed with exit code 1" in str(err)
    assert err.record.image_digest == fake.images.get(TEST_IMAGE).id  # no RepoDigest: local image id
    assert fake.containers.all[0].removed and "No space left" in (tmp_path / "run.log").read_text()


def test_hard_timeout_stops_and_removes_the_container(fake: FakeDockerClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    spec = ToolSpec(tool="t", argv=(PY, str(FAKES / "process_tree.py"), str(pidfile)), output_dir=tmp_path,
                    image=TEST_IMAGE)
    with pytest.raises(ToolRunError) as info:
        DockerRuntime(kill_grace_s=1).run(spec, log_path=tmp_path / "run.log", timeout_s=1.5, soft_timeout_s=0.5)
    err = info.value
    assert err.failure_class == "resource" and err.record.extra["timed_out"] is True
    assert err.record.exit_code == 128 + signal.SIGTERM
    assert wait_dead(read_pids(pidfile, timeout=0), timeout=3)
    assert fake.containers.all[0].removed and fake.containers.all[0].stop_calls == [1]
    text = (tmp_path / "run.log").read_text()
    assert "WARNING soft timeout" in text and "hard timeout of 1.5 s reached" in text


def _interrupt_when(pidfile: Path, done: threading.Event) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not done.is_set():
            if pidfile.exists():
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_interrupt_stops_and_removes_the_container(fake: FakeDockerClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    spec = ToolSpec(tool="t", argv=(PY, str(FAKES / "process_tree.py"), str(pidfile)), output_dir=tmp_path,
                    image=TEST_IMAGE)
    done = threading.Event()
    _interrupt_when(pidfile, done)
    try:
        with pytest.raises(KeyboardInterrupt):
            DockerRuntime(kill_grace_s=1).run(spec, log_path=tmp_path / "run.log", timeout_s=60)
    finally:
        done.set()
    assert wait_dead(read_pids(pidfile, timeout=0), timeout=3)
    container = fake.containers.all[0]
    assert container.stop_calls and container.removed
    assert "interrupted by KeyboardInterrupt" in (tmp_path / "run.log").read_text()


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
                    image=TEST_IMAGE, env={"NF_SPEC_ENV": "from-spec"})


def test_pipes_run_in_a_real_materialization(fake: FakeDockerClient, tmp_path: Path) -> None:
    seen: dict[str, object] = {}
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([_pipes_asset(_pipes_spec(tmp_path, "ok"), tmp_path / "run.log", seen)],
                            instance=instance)
    assert result.success
    (materialization,) = result.asset_materializations_for_node("piped")
    assert materialization.metadata["volumes"].value == 3  # reported by the tool through Pipes
    assert materialization.metadata["exit_code"].value == 0
    env = fake.containers.created[0]["environment"]
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"} <= set(env) and env["NF_SPEC_ENV"] == "from-spec"
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any("hello from pipes" in m for m in messages)  # a Pipes log message
    assert any(m.endswith("plain output line") for m in messages)  # a plain line, via our `log`
    text = (tmp_path / "run.log").read_text()
    assert "NF_SPEC_ENV=from-spec HOST_ONLY=None" in text and "plain output line" in text
    assert fake.containers.all[0].removed


def test_pipes_failure_is_classified_and_the_container_removed(fake: FakeDockerClient, tmp_path: Path) -> None:
    seen: dict[str, object] = {}
    result = dg.materialize([_pipes_asset(_pipes_spec(tmp_path, "fail"), tmp_path / "run.log", seen)],
                            raise_on_error=False)
    assert not result.success
    err = seen["error"]
    assert isinstance(err, ToolRunError)
    assert err.failure_class == "resource" and err.record.exit_code == 1
    assert "No space left on device" in err.record.log_tail
    assert fake.containers.all[0].removed


def test_cancelling_a_real_pipes_run_stops_and_removes_the_container(fake: FakeDockerClient,
                                                                     tmp_path: Path) -> None:
    """SIGINT during dg.materialize: Dagster raises DagsterExecutionInterruptedError in the step,
    the Pipes client stops the container, our runtime removes it."""
    pidfile = tmp_path / "pids"
    done = threading.Event()
    _interrupt_when(pidfile, done)
    try:
        result = dg.materialize([_pipes_asset(_pipes_spec(tmp_path, "sleep", str(pidfile)), tmp_path / "run.log",
                                              {})], raise_on_error=False)
        assert not result.success
    except dg.DagsterExecutionInterruptedError:
        pass
    finally:
        done.set()
    pids = read_pids(pidfile, timeout=0)
    assert wait_dead(pids, timeout=15), [p for p in pids if pid_alive(p)]
    assert fake.containers.all[0].stop_calls and fake.containers.all[0].removed
    assert "interrupted by DagsterExecutionInterruptedError" in (tmp_path / "run.log").read_text()


def test_pipes_run_hard_timeout(fake: FakeDockerClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    seen: dict[str, object] = {}
    asset = _pipes_asset(_pipes_spec(tmp_path, "sleep", str(pidfile)), tmp_path / "run.log", seen, timeout_s=1.5)
    assert not dg.materialize([asset], raise_on_error=False).success
    err = seen["error"]
    assert isinstance(err, ToolRunError)
    assert err.failure_class == "resource" and err.record.extra["timed_out"] is True
    assert wait_dead(read_pids(pidfile, timeout=0), timeout=3)
    assert fake.containers.all[0].removed
