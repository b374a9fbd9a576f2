"""The slurm runtime's plain parts, no cluster needed: config, the sbatch line, parsing, job records.

What Slurm itself does with them is test_runtimes_slurm.py (a real cluster).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from neuroflow_dagster.config import ConfigError, NeuroflowConfig, SlurmConfig, StageConfig, load_config
from neuroflow_dagster.runtimes.jobs import JobRecord, JobRecordError, JobStore
from neuroflow_dagster.runtimes.slurm import (
    WRAPPER,
    fingerprint,
    inner_argv,
    job_name,
    job_resources,
    parse_duration_s,
    parse_exit,
    parse_key_values,
    parse_size_kb,
    poll_interval,
    sbatch_argv,
)
from neuroflow_dagster.tools import qsiparc, qsiprep, qsirecon
from neuroflow_dagster.tools.spec import Mount, ToolSpec


def test_runtime_slurm_keeps_what_the_stage_ran_inside_the_job(make_config) -> None:
    config: NeuroflowConfig = make_config(pipelines={
        "bids_conversion": {"runtime": "slurm"},
        "qsiprep": {"runtime": "slurm"},
        "qsirecon": {"runtime": "slurm", "slurm": {"inside": "local"}},
        "qsiparc": {"runtime": "builtin"},
    })
    assert config.pipelines.bids_conversion.tool_runtime == "local"  # HeudiConv from the venv, in the job
    assert config.pipelines.qsiprep.tool_runtime == "builtin"  # the stand-in, as without slurm
    assert config.pipelines.qsirecon.tool_runtime == "local"
    assert config.pipelines.qsiparc.tool_runtime == "builtin"
    spec = qsiprep.build_spec(config, "S1", ["1"])
    assert spec.stand_in and spec.argv[1:3] == ("-m", qsiprep.STAND_IN)


def test_one_environment_variable_moves_a_stage_onto_slurm(tmp_path: Path) -> None:
    (tmp_path / "neuroflow.yaml").write_text(
        "paths: {dicom_incoming: in, bids_root: b, derivatives: d, work_dir: w, log_dir: l}\n")
    config = load_config(tmp_path / "neuroflow.yaml", environ={
        "NEUROFLOW_PIPELINES__QSIPREP__RUNTIME": "slurm",
        "NEUROFLOW_PIPELINES__QSIPREP__SLURM__PARTITION": "short"})
    assert config.pipelines.qsiprep.runtime == "slurm" and config.pipelines.qsiprep.slurm.partition == "short"


@pytest.mark.parametrize(("arg", "reason"), [
    ("--output=/tmp/x", "set by neuroflow"),
    ("-o", "set by neuroflow"),
    ("--time=10", "slurm.time_limit_minutes"),
    ("--mem=4G", "slurm.mem_mb"),
    ("--account=lab", "slurm.account"),
    ("--wrap=echo hi", "batch script"),
    ("constraint=avx2", "starting with '-'"),
    ("--comment=a\nb", "starting with '-'"),
])
def test_sbatch_options_neuroflow_owns_are_refused_with_the_key(tmp_path: Path, arg: str, reason: str) -> None:
    (tmp_path / "neuroflow.yaml").write_text(
        "paths: {dicom_incoming: in, bids_root: b, derivatives: d, work_dir: w, log_dir: l}\n"
        f"pipelines: {{qsiprep: {{runtime: slurm, slurm: {{extra_args: [{json.dumps(arg)}]}}}}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "neuroflow.yaml", environ={})
    assert "pipelines.qsiprep.slurm.extra_args" in str(info.value) and reason in str(info.value)


@pytest.mark.parametrize("bind", ["relative:/x", "/a:/b:rx", "/a,/b", "/a:"])
def test_bad_binds_are_refused(bind: str) -> None:
    with pytest.raises(ValueError, match="binds"):
        SlurmConfig(binds=[bind])


def test_sbatch_argv_from_the_stage(tmp_path: Path) -> None:
    st = StageConfig(runtime="slurm", timeout_minutes=90.5, cpus=2.5, memory_mb=8000,
                     slurm=SlurmConfig(partition="short", account="lab", qos="normal",
                                       extra_args=["--constraint=avx2", "--gres=gpu:1"]))
    argv = sbatch_argv(st, name="nf-qsiprep-S1", output=tmp_path / "o.out", workdir=tmp_path,
                       script=tmp_path / "s.sh", timeout_s=None, job_args=["py", "-I", "w.py", "j.json"])
    assert argv == ["sbatch", "--parsable", "--job-name=nf-qsiprep-S1", f"--output={tmp_path}/o.out",
                    "--open-mode=append", f"--chdir={tmp_path}", "--no-requeue", "--time=91", "--mem=8000M",
                    "--cpus-per-task=3", "--partition=short", "--account=lab", "--qos=normal",
                    "--constraint=avx2", "--gres=gpu:1", f"{tmp_path}/s.sh", "py", "-I", "w.py", "j.json"]
    # slurm's own keys win over the stage's; an explicit timeout (seconds) sets --time when no key does.
    st2 = StageConfig(runtime="slurm", memory_mb=8000, slurm=SlurmConfig(mem_mb=500, cpus=1, time_limit_minutes=5))
    argv2 = sbatch_argv(st2, name="n", output=tmp_path / "o", workdir=tmp_path, script=tmp_path / "s",
                        timeout_s=7200, job_args=[])
    assert "--time=5" in argv2 and "--mem=500M" in argv2 and "--cpus-per-task=1" in argv2
    argv3 = sbatch_argv(StageConfig(runtime="slurm"), name="n", output=tmp_path / "o", workdir=tmp_path,
                        script=tmp_path / "s", timeout_s=61, job_args=[])
    assert "--time=2" in argv3 and not any(a.startswith(("--mem", "--cpus")) for a in argv3)


def test_sbatch_cpus_and_memory_default_to_the_tools_own_settings(make_config, tmp_path: Path) -> None:
    """One source of truth: the job asks for what the tool is told (--nprocs, --mem-mb as its spec carries
    them), memory plus max(1024 MB, 25 %); explicit slurm keys, then the stage's cpus/memory_mb, win."""
    config: NeuroflowConfig = make_config(pipelines={
        "bids_conversion": {"runtime": "slurm"},
        "qsiprep": {"runtime": "slurm", "nprocs": 6, "mem_mb": 12000},
        "qsirecon": {"runtime": "slurm", "nprocs": 2, "mem_mb": 2000},
        "qsiparc": {"runtime": "slurm", "n_jobs": 3},
    })

    def resources(stage: StageConfig, spec: ToolSpec | None = None) -> list[str]:
        argv = sbatch_argv(stage, name="n", output=tmp_path / "o", workdir=tmp_path, script=tmp_path / "s",
                           timeout_s=None, job_args=[], nprocs=spec.nprocs if spec else None,
                           mem_mb=spec.mem_mb if spec else None)
        return [a for a in argv if a.startswith(("--mem", "--cpus"))]

    prep = qsiprep.build_spec(config, "S1", ["1"])  # the stand-in inside the job, told --nprocs 6
    assert "--nprocs" in prep.argv and prep.argv[prep.argv.index("--nprocs") + 1] == "6"
    assert resources(config.pipelines.qsiprep, prep) == ["--mem=15000M", "--cpus-per-task=6"]
    plan = qsirecon.ReconPlan("S1", "1", (), "single_shell", config.pipelines.qsirecon.recon_specs.single_shell)
    recon = qsirecon.build_spec(config, "S1", "1", plan=plan)  # the session's spec, as the asset resolves it
    assert resources(config.pipelines.qsirecon, recon) == ["--mem=3024M", "--cpus-per-task=2"]  # +1024 at least
    parc = qsiparc.build_spec(config, "S1", "1")
    assert resources(config.pipelines.qsiparc, parc) == ["--cpus-per-task=3"]  # n_jobs; no memory setting
    assert resources(config.pipelines.bids_conversion) == []  # no such settings: the cluster's defaults
    explicit = config.pipelines.qsiprep.model_copy(update={"slurm": SlurmConfig(cpus=2, mem_mb=40000)})
    assert resources(explicit, prep) == ["--mem=40000M", "--cpus-per-task=2"]
    limits = config.pipelines.qsiprep.model_copy(update={"cpus": 4.5, "memory_mb": 9000})
    assert resources(limits, prep) == ["--mem=9000M", "--cpus-per-task=5"]
    assert job_resources(config.pipelines.qsiprep, 8, 16000) == (8, 20000)  # QSIPrep's defaults


def test_job_names_and_files_never_escape(tmp_path: Path) -> None:
    assert job_name("qsiprep", "../../etc|ses,1") == "nf-qsiprep-.._.._etc_ses_1"
    store = JobStore(tmp_path)
    for partition in ("../../x", "a|b", "a_b", "a,b", ""):
        path = store.path("qsiprep", partition)
        assert path.parent == tmp_path / "qsiprep" and path.name.endswith(".json")
    assert store.path("qsiprep", "a|b") != store.path("qsiprep", "a_b")  # no collision after cleaning
    with pytest.raises(ValueError):
        store.path("../evil", "x")


def test_job_records_round_trip_atomically_and_refuse_a_foreign_file(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    record = JobRecord(stage="qsiprep", partition="S1|1", runtime="slurm", status="submitted", job_id="42",
                       owner_run_id="r1", owner_root_run_id="r0", fingerprint="abc")
    path = store.save(record)
    loaded = store.load("qsiprep", "S1|1")
    assert loaded == record and not list(path.parent.glob(".*.tmp"))
    assert json.loads(path.read_text())["owner_host"]  # who owns it: run, root run, host, pid
    assert store.load("qsiprep", "other") is None and [r.job_id for r in store.all()] == ["42"]
    path.write_text(json.dumps({**json.loads(path.read_text()), "partition": "S2"}))
    with pytest.raises(JobRecordError, match="does not belong"):
        store.load("qsiprep", "S1|1")
    path.write_text("{not json")
    with pytest.raises(JobRecordError, match="unreadable"):
        store.load("qsiprep", "S1|1")


def test_inner_argv_local_and_apptainer(tmp_path: Path) -> None:
    spec = ToolSpec(tool="qsiprep", argv=("qsiprep", "/data", "/out"), output_dir=tmp_path,
                    mounts=(Mount(tmp_path / "bids", "/data", True), Mount(tmp_path / "out", "/out", False)),
                    env={"A": "1"}, workdir=Path("/work"), image=str(tmp_path / "q.sif"))
    local = StageConfig(runtime="slurm", slurm=SlurmConfig(inside="local"))
    assert inner_argv(spec, local, "local") == (["qsiprep", "/data", "/out"], {"A": "1"}, "/work")
    app = StageConfig(runtime="slurm", slurm=SlurmConfig(inside="apptainer", apptainer="/opt/bin/apptainer",
                                                         binds=["/scratch:/scratch:rw"]))
    argv, env, cwd = inner_argv(spec, app, "apptainer")
    assert argv == ["/opt/bin/apptainer", "exec", "--cleanenv", "--bind", f"{tmp_path}/bids:/data:ro",
                    "--bind", f"{tmp_path}/out:/out:rw", "--env", "A=1", "--pwd", "/work",
                    "--bind", "/scratch:/scratch:rw", str(tmp_path / "q.sif"), "qsiprep", "/data", "/out"]
    assert (env, cwd) == ({}, None)  # --cleanenv/--env and --pwd carry them


def test_templateflow_reaches_the_slurm_job(make_config, tmp_path: Path) -> None:
    """paths.templateflow_home in a job: exported as TEMPLATEFLOW_HOME for a tool run on the node, bound
    read-only and passed with --env for apptainer inside the job (where --cleanenv drops the job's env)."""
    tf = tmp_path / "templateflow"
    license_file = tmp_path / "license.txt"
    license_file.write_text("x\n")
    for inside in ("local", "apptainer"):
        config: NeuroflowConfig = make_config(pipelines={"qsiprep": {
            "runtime": "slurm", "output_resolution": 2, "fs_license": str(license_file),
            "image": str(tmp_path / "qsiprep-1.1.1.sif"), "slurm": {"inside": inside}}})
        config.paths.templateflow_home = tf
        spec = qsiprep.build_spec(config, "S1", ["1"])
        argv, env, _ = inner_argv(spec, config.pipelines.qsiprep, inside)
        if inside == "local":
            assert env["TEMPLATEFLOW_HOME"] == str(tf) and argv[0] == "qsiprep"
        else:
            assert env == {}
            assert argv[argv.index(f"{tf}:/templateflow:ro") - 1] == "--bind"
            assert argv[argv.index("TEMPLATEFLOW_HOME=/templateflow") - 1] == "--env"


def test_fingerprint_ignores_per_run_paths_only() -> None:
    base = fingerprint(["t", "a"], {"E": "1"}, "/w", ["sbatch", "--output=/l/1.out", "--chdir=/l", "--time=5"])
    assert base == fingerprint(["t", "a"], {"E": "1"}, "/w", ["sbatch", "--output=/l/2.out", "--chdir=/m",
                                                              "--time=5"])
    assert base != fingerprint(["t", "b"], {"E": "1"}, "/w", ["sbatch", "--output=/l/1.out", "--time=5"])
    assert base != fingerprint(["t", "a"], {"E": "1"}, "/w", ["sbatch", "--output=/l/1.out", "--time=6"])
    # Each attempt writes into its own staging folder: the same work otherwise.
    one, two = "/d/.neuroflow-staging/S1.1.aaaa", "/d/.neuroflow-staging/S1.2.bbbb"
    assert fingerprint(["t", "--out", one], {}, None, [], one) == fingerprint(["t", "--out", two], {}, None, [], two)
    assert fingerprint(["t", "--out", one], {}, None, [], one) != fingerprint(["t", "--out", "/d/x"], {}, None, [], two)


def test_polling_starts_fast_and_settles_at_poll_seconds() -> None:
    assert [poll_interval(10, t) for t in (0, 5, 20, 60, 100, 3600)] == [1.0, 1.0, 2.0, 6.0, 10, 10]
    assert poll_interval(0.5, 0) == 0.5 and poll_interval(0.5, 3600) == 0.5


def test_parsers() -> None:
    assert parse_exit("3:0") == 3 and parse_exit("0:9") == 137 and parse_exit("0:15") == 143
    assert parse_exit(None) is None and parse_exit("x") is None
    assert parse_size_kb("122360K") == 122360 and parse_size_kb("1.5G") == 1572864 and parse_size_kb("") is None
    assert parse_size_kb("2048") == 2
    assert parse_duration_s("00:01:05") == 65 and parse_duration_s("1-00:00:01") == 86401
    assert parse_duration_s("05:30") == 330 and parse_duration_s("UNLIMITED") is None
    values = parse_key_values("JobId=7 JobName=nf-x JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0 "
                              "NodeList=vm Tres=cpu=1,mem=1000M")
    assert values["JobState"] == "FAILED" and values["ExitCode"] == "3:0" and values["NodeList"] == "vm"


def test_the_job_wrapper_needs_only_the_standard_library() -> None:
    """It runs as `python -I slurm_job.py` on the node: no neuroflow (or third-party) import."""
    source = WRAPPER.read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports <= set(sys.stdlib_module_names) | {"__future__"}, imports
