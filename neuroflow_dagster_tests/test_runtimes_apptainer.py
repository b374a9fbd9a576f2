"""Apptainer runtime, with a fake ``apptainer`` executable first on PATH.

There is no Apptainer/Singularity on the test machines. ``fakes/fake_apptainer.py`` is copied
into a temporary bin folder as ``apptainer``: it parses the ``exec`` options like the real
binary, rejects unknown flags, missing images and missing bind sources, records what it
parsed, and runs the command locally with container paths mapped back through the binds and a
clean environment. So these tests check the exact command line, that the binds really cover
the paths the tool uses, and our process handling around it. What they cannot check: real
isolation (read-only binds, cgroup limits) and real image contents.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuroflow_dagster.config import QsiprepConfig, StageConfig
from neuroflow_dagster.runtimes import ToolRunError, get_runtime
from neuroflow_dagster.runtimes.apptainer import ApptainerRuntime, apptainer_exec_argv
from neuroflow_dagster.tools.spec import Mount, ToolSpec
from neuroflow_dagster_tests.fakes.process_tree import kill_leftovers, read_pids, wait_dead

PY = sys.executable
FAKES = Path(__file__).parent / "fakes"


@pytest.fixture(autouse=True)
def _no_leftover_processes(tmp_path: Path) -> Iterator[None]:
    yield
    for pidfile in tmp_path.rglob("pids"):
        kill_leftovers(pidfile)


@pytest.fixture
def fake_apptainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Installs the fake as `apptainer` first on PATH; returns the file its invocations go to."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "apptainer"
    exe.write_text(f"#!{PY}\n" + (FAKES / "fake_apptainer.py").read_text())
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    invocations = tmp_path / "apptainer-invocations.jsonl"
    monkeypatch.setenv("FAKE_APPTAINER_LOG", str(invocations))
    monkeypatch.setenv("NF_HOST_ONLY", "must-not-leak")
    return invocations


def test_exact_exec_command_for_a_qsiprep_like_spec(tmp_path: Path) -> None:
    spec = ToolSpec(
        tool="qsiprep",
        argv=("qsiprep", "/data/bids", "/out", "participant", "--participant-label", "0075",
              "--fs-license-file", "/opt/freesurfer/license.txt", "-w", "/work"),
        output_dir=tmp_path / "out",
        image="/images/qsiprep-1.1.1.sif",
        mounts=(Mount(tmp_path / "bids", "/data/bids", True), Mount(tmp_path / "out", "/out", False),
                Mount(tmp_path / "work", "/work", False),
                Mount(tmp_path / "license.txt", "/opt/freesurfer/license.txt", True)),
        env={"TEMPLATEFLOW_HOME": "/work/templateflow", "OMP_NUM_THREADS": "8"},
        workdir=Path("/work"),
    )
    stage = QsiprepConfig(runtime="apptainer", cpus=8, memory_mb=16000)
    assert apptainer_exec_argv(spec, stage, "singularity") == [
        "singularity", "exec", "--cleanenv", "--cpus", "8", "--memory", "16000M",
        "--bind", f"{tmp_path}/bids:/data/bids:ro", "--bind", f"{tmp_path}/out:/out:rw",
        "--bind", f"{tmp_path}/work:/work:rw", "--bind", f"{tmp_path}/license.txt:/opt/freesurfer/license.txt:ro",
        "--env", "TEMPLATEFLOW_HOME=/work/templateflow", "--env", "OMP_NUM_THREADS=8", "--pwd", "/work",
        "/images/qsiprep-1.1.1.sif",
        "qsiprep", "/data/bids", "/out", "participant", "--participant-label", "0075",
        "--fs-license-file", "/opt/freesurfer/license.txt", "-w", "/work",
    ]
    no_limits = apptainer_exec_argv(spec, StageConfig(), image="docker://pennlinc/qsiprep:1.1.1")
    assert "--cpus" not in no_limits and "--memory" not in no_limits
    assert no_limits[no_limits.index("--pwd") + 2] == "docker://pennlinc/qsiprep:1.1.1"


def _tool_case(tmp_path: Path, *extra: str, image: str | None = None) -> ToolSpec:
    """A tool that reads an input through a read-only bind and writes through a read-write one."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("payload")
    (tmp_path / "out").mkdir()
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "tool.py").write_text(
        "import os, sys\n"
        "data = open(sys.argv[1]).read()\n"
        "open(sys.argv[2], 'w').write(data.upper())\n"
        "print('cwd', os.getcwd())\n"
        "print('FOO', os.environ.get('FOO'), 'HOST', os.environ.get('NF_HOST_ONLY'))\n"
        "print(*sys.argv[3:])\n"
    )
    sif = tmp_path / "tool.sif"
    sif.write_bytes(b"SIF-test-image")
    return ToolSpec(
        tool="copytool",
        argv=(PY, "/code/tool.py", "/data/in/x.txt", "/out/y.txt", *extra),
        output_dir=tmp_path / "out",
        image=image or str(sif),
        mounts=(Mount(tmp_path / "in", "/data/in", True), Mount(tmp_path / "out", "/out", False),
                Mount(tmp_path / "code", "/code", True)),
        env={"FOO": "bar"},
        workdir=Path("/out"),
    )


def test_run_through_apptainer_records_command_digest_and_output(fake_apptainer: Path, tmp_path: Path) -> None:
    spec = _tool_case(tmp_path)
    lines: list[str] = []
    stage = StageConfig(runtime="apptainer", user="4242:4242")
    record = get_runtime(stage).run(spec, log_path=tmp_path / "logs" / "copy.log", log=lines.append)
    assert (tmp_path / "out" / "y.txt").read_text() == "PAYLOAD"  # the binds really mapped the paths
    assert f"cwd {tmp_path / 'out'}" in lines  # --pwd
    assert "FOO bar HOST None" in lines  # --env passed, host environment cleaned
    assert record.runtime == "apptainer" and record.exit_code == 0 and record.image == str(tmp_path / "tool.sif")
    assert record.image_digest == "sha256:" + hashlib.sha256(b"SIF-test-image").hexdigest()
    assert shlex.split(record.command) == apptainer_exec_argv(spec, stage, str(tmp_path / "bin" / "apptainer"))
    assert record.extra["executable"] == str(tmp_path / "bin" / "apptainer")
    (parsed,) = [json.loads(line) for line in fake_apptainer.read_text().splitlines()]
    assert parsed["cleanenv"] is True and parsed["env"] == {"FOO": "bar"} and parsed["pwd"] == "/out"
    assert parsed["binds"] == [[str(tmp_path / "in"), "/data/in", "ro"], [str(tmp_path / "out"), "/out", "rw"],
                               [str(tmp_path / "code"), "/code", "ro"]]
    assert "user 4242:4242 is ignored" in (tmp_path / "logs" / "copy.log").read_text()


def test_templateflow_home_reaches_the_tool_through_apptainer(fake_apptainer: Path, tmp_path: Path) -> None:
    """The QSIPrep spec's TemplateFlow bind and --env, through the fake apptainer (which maps container paths
    in argv back through the binds and passes only --env variables): the path TEMPLATEFLOW_HOME names is
    covered by a read-only bind of the site's folder."""
    from neuroflow_dagster.config import NeuroflowConfig
    from neuroflow_dagster.tools import qsiprep

    tf = tmp_path / "templateflow"
    (tf / "tpl-X").mkdir(parents=True)
    (tf / "tpl-X" / "tpl-X_T1w.nii.gz").write_text("template")
    sif = tmp_path / "qsiprep-1.1.1.sif"
    sif.write_bytes(b"SIF")
    license_file = tmp_path / "license.txt"
    license_file.write_text("x\n")
    paths = {k: str(tmp_path / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}
    config = NeuroflowConfig.model_validate({"paths": {**paths, "templateflow_home": str(tf)}, "pipelines": {
        "qsiprep": {"runtime": "apptainer", "image": str(sif), "output_resolution": 2,
                    "fs_license": str(license_file)}}})
    (tmp_path / "bids_root").mkdir()
    built = qsiprep.build_spec(config, "0075", ["01"])
    assert f"{tf}:/templateflow:ro" in apptainer_exec_argv(built, config.pipelines.qsiprep)
    template = f"{built.env['TEMPLATEFLOW_HOME']}/tpl-X/tpl-X_T1w.nii.gz"
    spec = ToolSpec(tool="qsiprep", argv=("cat", template), output_dir=tmp_path / "derivatives", image=str(sif),
                    mounts=built.mounts, env=built.env, workdir=built.workdir)
    lines: list[str] = []
    record = get_runtime(config.pipelines.qsiprep).run(spec, log_path=tmp_path / "run.log", log=lines.append)
    assert record.exit_code == 0 and "template" in lines
    (call,) = [json.loads(line) for line in fake_apptainer.read_text().splitlines()]
    assert call["env"]["TEMPLATEFLOW_HOME"] == "/templateflow" and call["cleanenv"]
    assert [str(tf), "/templateflow", "ro"] in call["binds"]


def test_failing_tool_inside_apptainer_is_classified(fake_apptainer: Path, tmp_path: Path) -> None:
    spec = _tool_case(tmp_path)
    spec = ToolSpec(**{**spec.__dict__, "argv": (PY, "-c", "print('MemoryError'); raise SystemExit(1)")})
    with pytest.raises(ToolRunError) as info:
        ApptainerRuntime().run(spec, log_path=tmp_path / "run.log")
    assert info.value.failure_class == "resource" and info.value.record.exit_code == 1


@pytest.mark.parametrize(("image", "needle"), [
    ("{tmp}/missing.sif", "image file {tmp}/missing.sif does not exist"),
    ("docker://pennlinc/qsiprep", "has no tag"),
    ("docker://pennlinc/qsiprep:latest", "'latest'"),
    ("library://lab/qsiprep:1.0", "only a .sif file or a docker:// URI"),
    ("{tmp}/image.img", "neither a .sif file nor a docker:// URI"),
])
def test_bad_images_are_configuration_failures(fake_apptainer: Path, tmp_path: Path, image: str,
                                               needle: str) -> None:
    spec = _tool_case(tmp_path, image=image.format(tmp=tmp_path))
    with pytest.raises(ToolRunError) as info:
        ApptainerRuntime().run(spec, log_path=tmp_path / "run.log")
    assert info.value.failure_class == "configuration"
    assert needle.format(tmp=tmp_path) in str(info.value)
    assert not fake_apptainer.exists()  # refused before apptainer was started


def test_pinned_docker_uri_is_passed_through(fake_apptainer: Path, tmp_path: Path) -> None:
    uri = "docker://pennlinc/qsiprep@sha256:" + "1" * 64
    record = ApptainerRuntime(hash_image=True).run(_tool_case(tmp_path, image=uri), log_path=tmp_path / "r.log")
    assert record.image == uri and record.image_digest == "sha256:" + "1" * 64
    assert json.loads(fake_apptainer.read_text())["image"] == uri


def test_missing_bind_source_and_missing_executable(fake_apptainer: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _tool_case(tmp_path)
    broken = ToolSpec(**{**spec.__dict__, "mounts": (*spec.mounts, Mount(tmp_path / "nope", "/nope", True))})
    with pytest.raises(ToolRunError) as info:
        ApptainerRuntime().run(broken, log_path=tmp_path / "a.log")
    assert info.value.failure_class == "configuration" and str(tmp_path / "nope") in str(info.value)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(ToolRunError) as info:
        ApptainerRuntime().run(spec, log_path=tmp_path / "b.log")
    assert info.value.failure_class == "configuration"
    assert "executable not found: apptainer or singularity" in str(info.value)


def test_env_values_with_commas_are_refused(fake_apptainer: Path, tmp_path: Path) -> None:
    spec = _tool_case(tmp_path)
    spec = ToolSpec(**{**spec.__dict__, "env": {"LIST": "a,b"}})
    with pytest.raises(ToolRunError, match="contains ','") as info:
        ApptainerRuntime().run(spec, log_path=tmp_path / "a.log")
    assert info.value.failure_class == "configuration"


def test_hard_timeout_kills_the_tree_behind_apptainer(fake_apptainer: Path, tmp_path: Path) -> None:
    spec = _tool_case(tmp_path)
    pidfile = tmp_path / "out" / "pids"
    # The tree writes its pids through the container path of the rw bind.
    spec = ToolSpec(**{**spec.__dict__, "argv": (PY, str(FAKES / "process_tree.py"), "/out/pids")})
    with pytest.raises(ToolRunError) as info:
        ApptainerRuntime(kill_grace_s=1).run(spec, log_path=tmp_path / "run.log", timeout_s=1.5)
    assert info.value.failure_class == "resource" and info.value.record.extra["timed_out"] is True
    assert wait_dead(read_pids(pidfile, timeout=0), timeout=3)
