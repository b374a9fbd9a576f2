"""The slurm runtime against a real Slurm cluster the tests start (engines/slurm_cluster.py).

Real parts: munged, slurmctld, slurmd, slurmdbd + MariaDB (accounting), sbatch/squeue/sacct/
scontrol/scancel, the jobs' processes, our runtime and job records, a real ``dagster.materialize``.
One node with 2 CPUs, DefMemPerCPU=1000, OverMemoryKill, MinJobAge=300 (engines/slurm_cluster.py).
Nothing is faked; the cluster that cannot start fails the tests (the fixtures raise).

The time-limit kill costs about a minute (Slurm's limit is in whole minutes and is checked every
30 s), so its job is submitted by a module fixture right after the side-by-side test and runs
while the other tests use the second CPU; the last test collects it.
"""

from __future__ import annotations

import json
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
from typing import Any

import dagster as dg
import pytest

from neuroflow_dagster.config import NeuroflowConfig, SlurmConfig, StageConfig
from neuroflow_dagster.defs.execution import execute_spec, staging_for
from neuroflow_dagster.runtimes import ToolRunError, get_runtime
from neuroflow_dagster.runtimes.jobs import JobStore
from neuroflow_dagster.runtimes.slurm import SlurmCLI, SlurmRuntime
from neuroflow_dagster.tools import publish
from neuroflow_dagster.tools.spec import Mount, ToolSpec
from neuroflow_dagster_tests.engines.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slow
PY = sys.executable


# --------------------------------------------------------------------------- helpers


def stage(**slurm: Any) -> StageConfig:
    timeout = slurm.pop("timeout_minutes", 10)
    slurm.setdefault("poll_seconds", 0.5)
    return StageConfig(runtime="slurm", timeout_minutes=timeout, slurm=SlurmConfig(**slurm))


def runtime(cluster: SlurmCluster, st: StageConfig, root: Path, partition: str, *, stage_name: str = "qsiprep",
            run_id: str = "run-a", root_run_id: str | None = None) -> SlurmRuntime:
    rt = get_runtime(st, stage_name=stage_name, partition=partition, run_id=run_id, root_run_id=root_run_id,
                     jobs=JobStore(root / "state" / "jobs"), cli=SlurmCLI(env=cluster.env))
    assert isinstance(rt, SlurmRuntime)
    return rt


def py_spec(root: Path, code: str, tool: str = "tool", **kw: Any) -> ToolSpec:
    return ToolSpec(tool=tool, argv=(PY, "-c", textwrap.dedent(code)), output_dir=root / "out",
                    workdir=root / "work", **kw)


def sacct_jobs(cluster: SlurmCluster, name: str, at_least: int = 1) -> list[dict[str, str]]:
    """Accounting's jobs named ``name``; waits (30 s at most) for ``at_least``: slurmdbd hears of them late."""
    keys = ["id", "name", "state", "exit", "start", "end", "timelimit", "reqmem", "cpus", "partition", "qos",
            "account"]
    deadline = time.monotonic() + 30
    while True:
        out = cluster.client("sacct", "-X", "-n", "-P", "-S", "2020-01-01", "--name", name, "-o",
                             "JobIDRaw,JobName,State,ExitCode,Start,End,TimeLimitRaw,ReqMem,AllocCPUS,Partition,QOS,Account")
        jobs = [dict(zip(keys, line.split("|"), strict=False)) for line in out.stdout.splitlines() if line.strip()]
        if len(jobs) >= at_least or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def wait_until(what: str, predicate: Any, timeout: float = 120.0, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_state(cluster: SlurmCluster, job_id: str) -> str:
    out = cluster.client("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T", check=False)
    return out.stdout.strip()


# --------------------------------------------------------------------------- side by side (first: both CPUs)


def test_two_stages_run_side_by_side(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Two stages' jobs at once on the 2-CPU node (DefMemPerCPU keeps a job from taking the node)."""
    results: dict[str, Any] = {}

    def one(stage_name: str) -> None:
        rt = runtime(slurm, stage(), tmp_path / stage_name, "side", stage_name=stage_name)
        spec = py_spec(tmp_path / stage_name, "import time; print('START=%f' % time.time(), flush=True); "
                                              "time.sleep(6); print('END=%f' % time.time())")
        try:
            results[stage_name] = rt.run(spec, log_path=tmp_path / stage_name / "run.log")
        except BaseException as exc:  # reported by the assertion below
            results[stage_name] = exc

    threads = [threading.Thread(target=one, args=(name,)) for name in ("qsiprep", "qsirecon")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    spans = {}
    for name in ("qsiprep", "qsirecon"):
        record = results[name]
        assert not isinstance(record, BaseException), record
        assert record.extra["slurm_state"] == "COMPLETED"
        text = (tmp_path / name / "run.log").read_text()
        start = float(text.split("\nSTART=", 1)[1].split()[0])
        end = float(text.split("\nEND=", 1)[1].split()[0])
        spans[name] = (start, end)
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1 and b0 < a1, f"the two jobs did not overlap: {spans}"


# --------------------------------------------------------------------------- the time limit (in the background)


@pytest.fixture(scope="module")
def time_limit_job(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Submits a job that outlives its 1-minute limit; the result is collected by the last test."""
    root = tmp_path_factory.mktemp("time-limit")
    outcome: dict[str, Any] = {"root": root}

    def run() -> None:
        rt = runtime(slurm, stage(time_limit_minutes=1, poll_seconds=2), root, "time-limit")
        spec = py_spec(root, f"import os, time; open({str(root / 'pid')!r}, 'w').write(str(os.getpid())); "
                             "print('sleeping', flush=True); time.sleep(600)")
        started = time.monotonic()
        try:
            outcome["record"] = rt.run(spec, log_path=root / "run.log")
        except BaseException as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True, name="time-limit-job")
    thread.start()
    outcome["thread"] = thread
    yield outcome
    thread.join(timeout=5)


def test_time_limit_job_is_submitted(time_limit_job: dict[str, Any]) -> None:
    """Starts the background job now (the tests in between use the other CPU)."""
    wait_until("the time-limit job's tool to start", lambda: (time_limit_job["root"] / "pid").exists(), 120)


# --------------------------------------------------------------------------- one CPU each, while it runs


def test_success_records_the_job_and_streams_its_output(slurm: SlurmCluster, tmp_path: Path) -> None:
    st = stage(partition="debug", account="root", qos="normal", mem_mb=300, cpus=1, time_limit_minutes=7,
               extra_args=["--comment=neuroflow-test"])
    rt = runtime(slurm, st, tmp_path, "sub-01|ses-1")
    spec = py_spec(tmp_path, """
        import os, time
        print('hello from', os.environ['NF_SPEC_ENV'], 'in', os.getcwd(), flush=True)
        time.sleep(3)
        x = bytearray(60 * 1024 * 1024)
        x[::4096] = b'x' * len(x[::4096])
        print('bye', flush=True)
        time.sleep(1)
        """, env={"NF_SPEC_ENV": "spec-env"})
    lines: list[str] = []
    seen_while_running: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("hello") and not seen_while_running:  # the job is still running at this moment
            job_id = next(x.split()[4] for x in lines if x.startswith("[neuroflow] submitted slurm job"))
            seen_while_running.append(job_state(slurm, job_id))

    record = rt.run(spec, log_path=tmp_path / "logs" / "run.log", log=log)

    assert record.runtime == "slurm" and record.exit_code == 0 and record.error is None
    extra = record.extra
    assert extra["slurm_state"] == "COMPLETED" and extra["slurm_exit_code"] == "0:0"
    assert extra["slurm_state_source"] == "sacct" and extra["slurm_node"] == slurm.node
    assert extra["slurm_elapsed_s"] >= 2 and extra["slurm_max_rss_mb"] >= 60
    assert f"hello from spec-env in {tmp_path / 'work'}" in lines  # env and cwd of the spec, in the job
    assert seen_while_running == ["RUNNING"]  # output arrives while the job runs, not after
    text = (tmp_path / "logs" / "run.log").read_text()
    assert "hello from spec-env" in text and "bye" in text and "ended COMPLETED (exit 0:0, from sacct)" in text
    (job,) = sacct_jobs(slurm, "nf-qsiprep-sub-01_ses-1")
    assert job["id"] == extra["slurm_job_id"] and job["state"] == "COMPLETED"
    assert (job["timelimit"], job["reqmem"], job["cpus"], job["partition"], job["qos"], job["account"]) == \
        ("7", "300M", "1", "debug", "normal", "root")
    shown = slurm.client("scontrol", "show", "job", "-o", job["id"]).stdout
    assert " Comment=neuroflow-test " in shown  # an extra_args option reached sbatch
    stored = JobStore(tmp_path / "state" / "jobs").load("qsiprep", "sub-01|ses-1")
    assert stored is not None and stored.status == "finished" and stored.job_id == job["id"]
    assert stored.final == {"state": "COMPLETED", "exit_code": 0, "source": "sacct"}
    assert stored.owner_run_id == "run-a" and stored.runtime == "slurm"


def test_nonzero_exit_is_a_tool_failure(slurm: SlurmCluster, tmp_path: Path) -> None:
    rt = runtime(slurm, stage(), tmp_path, "exit-3")
    with pytest.raises(ToolRunError) as info:
        rt.run(py_spec(tmp_path, "print('something went wrong'); raise SystemExit(3)"),
               log_path=tmp_path / "run.log")
    err = info.value
    assert err.failure_class == "tool" and err.record.exit_code == 3
    assert err.record.extra["slurm_state"] == "FAILED" and err.record.extra["slurm_exit_code"] == "3:0"
    assert "failed with exit code 3" in str(err) and "something went wrong" in str(err)


def test_over_memory_kill_is_a_resource_failure(slurm: SlurmCluster, tmp_path: Path) -> None:
    rt = runtime(slurm, stage(mem_mb=100), tmp_path, "oom")
    spec = py_spec(tmp_path, """
        import time
        x = bytearray(700 * 1024 * 1024)
        x[::4096] = b'x' * len(x[::4096])
        time.sleep(10)
        print('survived')
        """)
    with pytest.raises(ToolRunError) as info:
        rt.run(spec, log_path=tmp_path / "run.log")
    err = info.value
    assert err.failure_class == "resource" and err.record.extra["oom_killed"] is True
    assert err.record.extra["slurm_state"] in ("FAILED", "OUT_OF_MEMORY")
    assert err.record.extra["slurm_max_rss_mb"] > 100
    assert "exceeded its memory limit" in str(err)
    assert "exceeded memory limit" in (tmp_path / "run.log").read_text()  # slurmstepd's own words
    assert "survived" not in (tmp_path / "run.log").read_text().splitlines()


def test_inside_apptainer_the_job_runs_apptainer_exec_with_the_binds(slurm: SlurmCluster, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`slurm.inside: apptainer` on a real job. Apptainer itself is not packaged for this Debian: the
    job runs fakes/fake_apptainer.py (the apptainer tests' fake), which maps container paths back
    through the binds, so a wrong bind breaks the run."""
    fake = tmp_path / "bin" / "apptainer"
    fake.parent.mkdir()
    fake.write_text(f"#!{PY}\n" + (Path(__file__).parent / "fakes" / "fake_apptainer.py").read_text())
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_APPTAINER_LOG", str(tmp_path / "apptainer.jsonl"))  # reaches the job (--export)
    monkeypatch.setenv("NF_HOST_ONLY", "must-not-leak")
    for name in ("in", "out", "code"):
        (tmp_path / name).mkdir()
    (tmp_path / "in" / "x.txt").write_text("payload")
    (tmp_path / "code" / "tool.py").write_text(
        "import os, sys\nopen(sys.argv[2], 'w').write(open(sys.argv[1]).read().upper())\n"
        "print('FOO', os.environ.get('FOO'), 'HOST', os.environ.get('NF_HOST_ONLY'), 'cwd', os.getcwd())\n")
    sif = tmp_path / "tool.sif"
    sif.write_bytes(b"SIF")
    spec = ToolSpec(tool="copytool", argv=(PY, "/code/tool.py", "/data/in/x.txt", "/out/y.txt"),
                    output_dir=tmp_path / "out", image=str(sif), env={"FOO": "bar"}, workdir=Path("/out"),
                    mounts=(Mount(tmp_path / "in", "/data/in", True), Mount(tmp_path / "out", "/out", False),
                            Mount(tmp_path / "code", "/code", True)))
    st = stage(inside="apptainer", apptainer=str(fake), binds=[f"{tmp_path}:/scratch:rw"])
    record = runtime(slurm, st, tmp_path, "apptainer").run(spec, log_path=tmp_path / "run.log")
    assert (tmp_path / "out" / "y.txt").read_text() == "PAYLOAD"  # the binds mapped the paths in the job
    assert f"FOO bar HOST None cwd {tmp_path / 'out'}" in (tmp_path / "run.log").read_text().splitlines()
    assert record.extra["slurm_inside"] == "apptainer" and record.image == str(sif)
    assert shlex.split(record.command)[:3] == [str(fake), "exec", "--cleanenv"]
    (parsed,) = [json.loads(line) for line in (tmp_path / "apptainer.jsonl").read_text().splitlines()]
    assert parsed["binds"][-1] == [str(tmp_path), "/scratch", "rw"] and parsed["env"] == {"FOO": "bar"}


def test_sbatch_refusal_is_a_configuration_failure(slurm: SlurmCluster, tmp_path: Path) -> None:
    rt = runtime(slurm, stage(partition="no-such-partition"), tmp_path, "bad-partition")
    with pytest.raises(ToolRunError) as info:
        rt.run(py_spec(tmp_path, "print('never')"), log_path=tmp_path / "run.log")
    assert info.value.failure_class == "configuration"
    assert "sbatch refused the job" in str(info.value) and "partition" in str(info.value).lower()
    stored = JobStore(tmp_path / "state" / "jobs").load("qsiprep", "bad-partition")
    assert stored is not None and stored.status == "finished" and stored.job_id is None


def _interrupt_when(predicate: Any, done: threading.Event) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not done.is_set():
            if predicate():
                time.sleep(0.3)
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_cancelling_the_run_cancels_the_job(slurm: SlurmCluster, tmp_path: Path) -> None:
    """An interrupt in the waiting worker (what Dagster raises when a run is terminated) -> scancel."""
    pidfile = tmp_path / "pid"
    rt = runtime(slurm, stage(), tmp_path, "cancel")
    spec = py_spec(tmp_path, f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
                             "print('working', flush=True); time.sleep(300)")
    done = threading.Event()
    _interrupt_when(pidfile.exists, done)
    try:
        with pytest.raises(KeyboardInterrupt):
            rt.run(spec, log_path=tmp_path / "run.log")
    finally:
        done.set()
    pid = int(pidfile.read_text())
    wait_until("the tool process to be gone", lambda: not pid_alive(pid), 30)
    # slurmdbd hears of the end asynchronously
    (job,) = wait_until("sacct to record the cancellation", lambda: [
        j for j in sacct_jobs(slurm, "nf-qsiprep-cancel") if j["state"].startswith("CANCELLED")], 30)
    text = (tmp_path / "run.log").read_text()
    assert f"interrupted by KeyboardInterrupt: cancelling slurm job {job['id']}" in text
    stored = JobStore(tmp_path / "state" / "jobs").load("qsiprep", "cancel")
    assert stored is not None and stored.status == "finished"  # the next run submits afresh


WORKER = """
import sys
import time
from pathlib import Path
from neuroflow_dagster.config import SlurmConfig, StageConfig
from neuroflow_dagster.runtimes.jobs import JobStore
from neuroflow_dagster.runtimes.slurm import SlurmRuntime
from neuroflow_dagster.tools.spec import ToolSpec
root = Path(sys.argv[1])
st = StageConfig(runtime="slurm", timeout_minutes=10, slurm=SlurmConfig(poll_seconds=0.5))
rt = SlurmRuntime(st, stage_name="qsiprep", partition=sys.argv[2], run_id="run-1", root_run_id="run-1",
                  jobs=JobStore(root / "state" / "jobs"))
code = "import time; print('first half', flush=True); time.sleep(float(sys.argv[1])); print('second half')"
spec = ToolSpec(tool="tool", argv=(sys.executable, "-c", "import sys; " + code, sys.argv[3]),
                output_dir=root / "out", workdir=root / "work")
rt.run(spec, log_path=root / f"worker-{time.time_ns()}.log")  # one log per run, as in Dagster
"""


def _worker_spec(root: Path, sleep_s: str) -> ToolSpec:
    """The same spec the worker script builds (same fingerprint), for the run that takes over."""
    code = "import time; print('first half', flush=True); time.sleep(float(sys.argv[1])); print('second half')"
    return ToolSpec(tool="tool", argv=(PY, "-c", "import sys; " + code, sleep_s), output_dir=root / "out",
                    workdir=root / "work")


def _start_worker(slurm: SlurmCluster, root: Path, partition: str, sleep_s: str) -> tuple[subprocess.Popen[bytes],
                                                                                         str]:
    """A run worker in its own process; returns it and the job id once the job runs."""
    script = root / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.Popen([PY, str(script), str(root), partition, sleep_s], env={**os.environ, **slurm.env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = JobStore(root / "state" / "jobs")

    def running() -> str | None:
        record = store.load("qsiprep", partition)
        if record is not None and record.job_id and job_state(slurm, record.job_id) == "RUNNING":
            return record.job_id
        return None

    return proc, wait_until("the worker's job to run", running, 120)


def test_a_restarted_worker_reattaches_instead_of_submitting_again(slurm: SlurmCluster, tmp_path: Path) -> None:
    proc, job_id = _start_worker(slurm, tmp_path, "reattach", "6")
    os.killpg(proc.pid, signal.SIGKILL)  # the run worker dies hard: no scancel, the job runs on
    proc.wait(timeout=10)
    assert job_state(slurm, job_id) == "RUNNING"

    # Dagster's run retry: a new run (run-2) in the same chain (root run-1), same partition.
    rt = runtime(slurm, stage(), tmp_path, "reattach", run_id="run-2", root_run_id="run-1")
    record = rt.run(_worker_spec(tmp_path, "6"), log_path=tmp_path / "retry.log")

    assert record.extra["slurm_job_id"] == job_id and record.extra["slurm_reattached"] is True
    assert record.extra["slurm_state"] == "COMPLETED"
    assert [j["id"] for j in sacct_jobs(slurm, "nf-qsiprep-reattach")] == [job_id]  # no second job
    text = (tmp_path / "retry.log").read_text()
    assert f"re-attaching to slurm job {job_id}" in text and "submitted by run run-1" in text
    assert "first half" in text and "second half" in text  # the whole output, also from before the restart
    stored = JobStore(tmp_path / "state" / "jobs").load("qsiprep", "reattach")
    assert stored is not None and stored.owner_run_id == "run-2" and stored.collected_by == "run-2"


def test_a_job_that_ended_unwatched_is_adopted_by_its_retry_only(slurm: SlurmCluster, tmp_path: Path) -> None:
    proc, job_id = _start_worker(slurm, tmp_path, "adopt", "0.5")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    wait_until("the job to end", lambda: job_state(slurm, job_id) == "COMPLETED", 60)

    # A run of another chain (an independent re-materialization) must not take that result: it submits.
    other = runtime(slurm, stage(), tmp_path, "adopt", run_id="run-x", root_run_id="run-x")
    record = other.run(_worker_spec(tmp_path, "0.5"), log_path=tmp_path / "other.log")
    assert record.extra["slurm_job_id"] != job_id and "slurm_reattached" not in record.extra

    # Start again, and this time the retry of the dead worker's run comes: it adopts, no new job.
    proc, job_id = _start_worker(slurm, tmp_path, "adopt", "0.5")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    wait_until("the job to end", lambda: job_state(slurm, job_id) == "COMPLETED", 60)
    retry = runtime(slurm, stage(), tmp_path, "adopt", run_id="run-2", root_run_id="run-1")
    record = retry.run(_worker_spec(tmp_path, "0.5"), log_path=tmp_path / "retry.log")
    assert record.extra["slurm_job_id"] == job_id and record.extra["slurm_reattached"] is True
    assert len(sacct_jobs(slurm, "nf-qsiprep-adopt", at_least=3)) == 3  # worker, other run, worker: none for the retry
    assert (tmp_path / "retry.log").read_text().splitlines().count("second half") == 1  # its output, once


def test_job_metadata_reaches_a_real_materialization(slurm: SlurmCluster, tmp_path: Path,
                                                     make_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """execute_spec inside dagster.materialize: the asset's metadata carries the job's facts."""
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    config: NeuroflowConfig = make_config(pipelines={"qsiparc": {"runtime": "slurm", "slurm": {"poll_seconds": 0.5}}})
    out = tmp_path / "derivatives" / "x"
    spec = ToolSpec(tool="qsiparc", argv=(PY, "-c", f"import pathlib; p = pathlib.Path({str(out)!r}); "
                                                    "p.mkdir(parents=True); (p / 'table.tsv').write_text('a\\n'); "
                                                    "print('parcellated')"),
                    output_dir=out, outputs=("table.tsv",), stand_in=True)

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["sub-1_ses-1"]))
    def parc(context):  # unannotated: a string annotation in a local def is unresolvable
        record = execute_spec(context, config, "qsiparc", spec)
        from neuroflow_dagster.defs.execution import record_metadata

        return dg.MaterializeResult(metadata=record_metadata(record, spec))

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([parc], partition_key="sub-1_ses-1", instance=instance)
    assert result.success
    (mat,) = result.asset_materializations_for_node("parc")
    meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    assert meta["runtime"] == "slurm" and meta["slurm/state"] == "COMPLETED" and meta["slurm/exit_code"] == "0:0"
    assert meta["slurm/node"] == slurm.node and meta["slurm/job_id"].isdigit()
    assert isinstance(meta["slurm/elapsed_s"], float) and meta["slurm/max_rss_mb"] > 0
    messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert any(m.endswith("parcellated") for m in messages)  # the job's output reached the run's log
    stored = JobStore(config.paths.state / "jobs").load("qsiparc", "sub-1_ses-1")
    assert stored is not None and stored.owner_run_id == result.run_id and stored.status == "finished"


STAGED_WORKER = """
import sys
from pathlib import Path
from neuroflow_dagster.config import QsiparcConfig, SlurmConfig
from neuroflow_dagster.runtimes.jobs import JobStore
from neuroflow_dagster.runtimes.slurm import SlurmRuntime
sys.path.insert(0, sys.argv[4])  # the repository: the spec comes from the test module itself
from neuroflow_dagster_tests.test_runtimes_slurm import staged_spec
state, staging, final = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
st = QsiparcConfig(runtime="slurm", slurm=SlurmConfig(poll_seconds=0.5))
rt = SlurmRuntime(st, stage_name="qsiparc", partition="sub-2_ses-1", run_id="dead-run", root_run_id="dead-run",
                  jobs=JobStore(state / "jobs"))
rt.run(staged_spec(staging, final), log_path=staging.parent.parent / "worker.log")
"""


def staged_spec(staging: Path, final: Path) -> ToolSpec:
    """A session stage's spec as the assets build it: outputs into the run's staging folder, published after."""
    code = ("import pathlib, sys, time; out = pathlib.Path(sys.argv[1]); print('parcellating', flush=True); "
            "time.sleep(6); (out / 'sub-1').mkdir(parents=True, exist_ok=True); "
            "(out / 'sub-1' / 'table.tsv').write_text('region\\tvalue\\n'); print('parcellated')")
    return ToolSpec(tool="qsiparc", argv=(PY, "-c", code, str(staging)), output_dir=staging,
                    outputs=("sub-1/table.tsv",), stand_in=True, publish_to=final, publish_units=("sub-1",))


def test_a_retry_in_dagster_adopts_the_running_job_and_publishes_its_staged_outputs(
        slurm: SlurmCluster, tmp_path: Path, make_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path: a worker (run "dead-run") submits, writing into its own staging folder, and is
    killed; the next run's execute_spec, with a fresh staging folder of its own, waits on that job
    (no second job), then verifies and publishes from the job's staging folder."""
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    config: NeuroflowConfig = make_config(pipelines={"qsiparc": {"runtime": "slurm", "slurm": {"poll_seconds": 0.5}}})
    final = tmp_path / "derivatives" / "qsiparc"
    first = publish.staging_dir(final, "sub-2_ses-1", "dead-run")
    script = tmp_path / "worker.py"
    script.write_text(STAGED_WORKER)
    with open(tmp_path / "worker.err", "wb") as err:
        proc = subprocess.Popen([PY, str(script), str(config.paths.state), str(first), str(final),
                                 str(Path(__file__).resolve().parents[1])], env={**os.environ, **slurm.env},
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    store = JobStore(config.paths.state / "jobs")

    def running() -> str | None:
        record = store.load("qsiparc", "sub-2_ses-1")
        ok = record is not None and record.job_id and job_state(slurm, record.job_id) == "RUNNING"
        return record.job_id if ok else None  # type: ignore[union-attr]

    try:
        job_id = wait_until("the first worker's job to run", running, 120)
    except AssertionError:
        raise AssertionError((tmp_path / "worker.err").read_text()[-3000:]) from None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)

    seen: dict[str, Path] = {}

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["sub-2_ses-1"]))
    def parc(context):  # unannotated: a string annotation in a local def is unresolvable
        seen["staging"] = staging_for(context, final)
        record = execute_spec(context, config, "qsiparc", staged_spec(seen["staging"], final))
        return dg.MaterializeResult(metadata={"job": record.extra["slurm_job_id"]})

    result = dg.materialize([parc], partition_key="sub-2_ses-1", instance=dg.DagsterInstance.ephemeral())
    assert result.success
    assert (final / "sub-1" / "table.tsv").read_text() == "region\tvalue\n"  # published from the job's folder
    (mat,) = result.asset_materializations_for_node("parc")
    assert mat.metadata["job"].value == job_id
    assert [j["id"] for j in sacct_jobs(slurm, "nf-qsiparc-sub-2_ses-1")] == [job_id]  # no second job
    assert not seen["staging"].exists() and not first.exists()  # no staging folder left behind


# --------------------------------------------------------------------------- without accounting


def test_without_accounting_failures_stay_failures(slurm_no_accounting: SlurmCluster, tmp_path: Path) -> None:
    """sacct is disabled: the controller's record decides; a hard kill is never read as success."""
    cluster = slurm_no_accounting
    assert "disabled" in cluster.client("sacct", "-j", "1", check=False).stderr.lower()
    ok = runtime(cluster, stage(), tmp_path / "ok", "ok").run(py_spec(tmp_path / "ok", "print('fine')"),
                                                              log_path=tmp_path / "ok.log")
    assert ok.extra["slurm_state"] == "COMPLETED" and ok.extra["slurm_state_source"] == "scontrol"
    assert ok.extra["slurm_max_rss_mb"] > 0  # from the job's result file when sacct cannot say
    with pytest.raises(ToolRunError) as info:
        runtime(cluster, stage(), tmp_path / "exit", "exit").run(
            py_spec(tmp_path / "exit", "raise SystemExit(3)"), log_path=tmp_path / "exit.log")
    assert info.value.failure_class == "tool" and info.value.record.extra["slurm_exit_code"] == "3:0"
    # The whole job killed hard (wrapper first, then the tool): no result file, no exit code of its own.
    hard = "import os, signal; os.kill(os.getppid(), signal.SIGKILL); os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(ToolRunError) as info:
        runtime(cluster, stage(), tmp_path / "hard", "hard").run(py_spec(tmp_path / "hard", hard),
                                                                  log_path=tmp_path / "hard.log")
    assert info.value.record.extra["slurm_state"] != "COMPLETED"
    assert info.value.record.extra["slurm_state_source"] == "scontrol"
    assert info.value.failure_class == "resource"  # SIGKILL, no other evidence: what the OOM killer does


def test_without_accounting_a_forgotten_job_reads_the_jobcomp_file_then_the_result_file(
        slurm_no_accounting: SlurmCluster, tmp_path: Path) -> None:
    """After MinJobAge the controller forgets a job; jobcomp and the job's result file still know."""
    cluster = slurm_no_accounting
    cli = SlurmCLI(env=cluster.env)
    rt = runtime(cluster, stage(), tmp_path, "fallback")
    with pytest.raises(ToolRunError):
        rt.run(py_spec(tmp_path, "raise SystemExit(5)"), log_path=tmp_path / "run.log")
    job = JobStore(tmp_path / "state" / "jobs").load("qsiprep", "fallback")
    assert job is not None and job.job_id is not None
    from_jobcomp = cli.jobcomp(job.job_id)
    assert from_jobcomp is not None and (from_jobcomp.state, from_jobcomp.exit_code) == ("FAILED", 5)

    # A job id the controller never knew (purged), with and without a result file.
    job.job_id = "999999"
    assert cli.controller("999999") is None and cli.jobcomp("999999") is None
    state = rt.final_state(job)
    assert (state.state, state.exit_code, state.source) == ("FAILED", 5, "job result file")
    Path(job.result_path).write_text(json.dumps({"exit_code": 0, "node": "n1", "max_rss_kb": 2048}))
    assert rt.final_state(job).state == "COMPLETED"  # positive evidence of success
    Path(job.result_path).unlink()
    state = rt.final_state(job)
    assert state.state == "UNKNOWN"
    with pytest.raises(ToolRunError) as info:  # no witness at all: a failure, retried as transient
        rt._finish(job, state, rt_record(tmp_path), _sink(tmp_path))
    assert info.value.failure_class == "transient" and "not recorded anywhere" in str(info.value)


def rt_record(root: Path) -> Any:
    from neuroflow_dagster.runtimes.local import new_record

    return new_record(py_spec(root, "pass"), runtime="slurm", command=["x"], log_path=root / "x.log", image=None)


def _sink(root: Path) -> Any:
    from neuroflow_dagster.runtimes.local import LogSink

    return LogSink(root / "x.log", None)


# --------------------------------------------------------------------------- the time limit, collected last


def test_time_limit_kill_is_a_resource_failure(slurm: SlurmCluster, time_limit_job: dict[str, Any]) -> None:
    thread: threading.Thread = time_limit_job["thread"]
    thread.join(timeout=300)
    assert not thread.is_alive(), "the time-limit job was still being waited on after 5 minutes"
    err = time_limit_job.get("error")
    assert isinstance(err, ToolRunError), time_limit_job
    assert err.failure_class == "resource" and err.record.extra["timed_out"] is True
    assert err.record.extra["slurm_state"] == "TIMEOUT" and "exceeded its time limit" in str(err)
    pid = int((time_limit_job["root"] / "pid").read_text())
    assert not pid_alive(pid)
    print(f"time-limit job: {time_limit_job['seconds']:.0f} s from submit to the TIMEOUT verdict")
