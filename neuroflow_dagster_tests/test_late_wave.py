"""A late wave is safe: QSIPrep never replaces a subject's output under a reader, and runs clean up.

Real parts: the project's automation sensors on a temporary Dagster instance with real runs (created,
queued, ended); the readers-writer lock between real processes (a reader in another process, killed
with SIGKILL to prove the kernel releases a dead holder's lock); real in-process materializations
through `execute_spec` (staging, publish, work-folder reclaim); the real `disk_guard` sensor pruning
real folders on disk against real run records; the `neuroflow status` command. The daemon itself runs
the late-session scenario end to end in test_daemon_e2e.py (and the work folders are reclaimed there).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.automation import QC, Cursor, QsiprepStage, run_stage_tick
from neuroflow_dagster.defs.execution import execute_spec, output_lock, reading_outputs, staging_for
from neuroflow_dagster.naming.locks import readers_lock, work_lock
from neuroflow_dagster.rwlock import LockBusy, ReadersWriterLock
from neuroflow_dagster.stages import stage
from neuroflow_dagster.tools import layout
from neuroflow_dagster.tools.publish import STAGING
from neuroflow_dagster.tools.spec import ToolSpec
from neuroflow_dagster_tests.test_automation import BIDS, QSIPARC, QSIPREP, QSIRECON, Harness
from neuroflow_dagster_tests.test_automation import harness as harness  # the fixture, re-exported
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

PY = sys.executable


# --------------------------------------------------------------------------- the automation


def recon_run(h: Harness, partition: str, status: dg.DagsterRunStatus) -> dg.DagsterRun:
    """A reconstruction run as the recon sensor (or the UI) creates it: QC + recon + parcellation of one
    session; creating it writes its planned events. It stays in `status` until the test ends it."""
    job = h.defs.resolve_implicit_global_asset_job_def()
    return h.instance.create_run_for_job(
        job,
        asset_selection=frozenset({QC, QSIRECON, QSIPARC}),
        tags={"dagster/partition": partition, "neuroflow/stage": "qsirecon"},
        status=status,
    )


def test_a_late_session_waits_for_its_siblings_reconstruction(harness: Harness) -> None:
    """QSIPrep of a subject is not requested while a reconstruction run of one of its sessions is queued
    or running (it reads the output QSIPrep would replace); the run's end requests it."""
    h = harness
    h.tick()
    h.arrive("A", "01")
    h.arrive("A", "02")
    h.tick()
    h.done(BIDS, "01|A")
    h.done(BIDS, "02|A")
    assert h.tick() == {"qsiprep_subject": {"A"}}
    h.done(QSIPREP, "A")
    assert h.tick() == {"qsirecon_session": {"01|A", "02|A"}}
    for key in ("01|A", "02|A"):  # the sensor's requests are handled by runs the daemon creates
        h.done(QSIRECON, key)
        h.done(QSIPARC, key)
    running = recon_run(h, "02|A", dg.DagsterRunStatus.STARTED)  # e.g. an operator reprocesses 02

    h.arrive("A", "03")  # the late session
    assert h.tick() == {"bids_session": {"03|A"}}
    h.done(BIDS, "03|A")
    assert h.tick() == {}  # converted, but 02's reconstruction still reads A's QSIPrep output
    # The sensor's tick log says why (a "hold" line, at info level), naming the session.
    [decision] = run_stage_tick(QsiprepStage(h.config), h.instance, Cursor()).decisions
    assert decision.action == "none" and decision.notable
    assert decision.reason.startswith("waiting for the reconstruction of 02|A (queued or running) to end")
    queued = recon_run(h, "01|A", dg.DagsterRunStatus.NOT_STARTED)  # created, not started (as queued)
    h.instance.report_run_failed(running)  # 02's run ends; 01's is still queued
    assert h.tick() == {}
    h.instance.report_run_canceled(queued)
    assert h.tick() == {"qsiprep_subject": {"A"}}
    assert h.tick() == {}
    h.done(QSIPREP, "A")
    assert h.tick() == {"qsirecon_session": {"01|A", "02|A", "03|A"}}


# --------------------------------------------------------------------------- the lock between processes

READER = """
import sys, time
from pathlib import Path
from neuroflow_dagster.rwlock import ReadersWriterLock
lock = ReadersWriterLock(Path(sys.argv[1]))
with lock.{mode}({{"run_id": sys.argv[2], "stage": "qsirecon", "partition": "01|A"}}, 30):
    print("held", flush=True)
    if len(sys.argv) > 4:  # hold until this file appears, then `hold` seconds more
        while not Path(sys.argv[4]).exists():
            time.sleep(0.05)
    time.sleep(float(sys.argv[3]))
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Any]:
    """Start a process that takes the lock (shared or exclusive) and keeps it for `hold` seconds."""
    started: list[subprocess.Popen[str]] = []

    def start(
        lock: Path, run_id: str, hold: float = 60, mode: str = "shared", after: Path | None = None
    ) -> subprocess.Popen[str]:
        argv = [PY, "-c", READER.format(mode=mode), str(lock), run_id, str(hold)] + ([str(after)] if after else [])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_writer_waits_for_a_reader_in_another_process_and_a_dead_reader_releases(
    tmp_path: Path, holder: Any
) -> None:
    lock = ReadersWriterLock(tmp_path / "locks" / "readers" / "qsiprep" / "sub-A.lock")
    reader = holder(lock.path, "aaaaaaaa-reader")
    with lock.shared({"run_id": "bbbbbbbb-second"}, 1):  # readers share it
        pass
    started = time.monotonic()
    with pytest.raises(LockBusy) as busy:
        with lock.exclusive({"run_id": "writer"}, 1.0):
            pytest.fail("published under a reader")
    assert 1.0 <= time.monotonic() - started < 10
    assert [h.info["run_id"] for h in busy.value.holders] == ["aaaaaaaa-reader"]
    assert "qsirecon 01|A run aaaaaaaa (pid" in str(busy.value)
    assert [h.info["pid"] for h in lock.readers()] == [reader.pid]

    reader.send_signal(signal.SIGKILL)  # no chance to unlock or tidy up: the kernel drops its flock
    reader.wait()
    assert [p.name for p in lock.readers_dir.glob("*.json")] != []  # its file is still there...
    with lock.exclusive({"run_id": "writer"}, 5.0) as got:
        assert got.waited_s < 5
    assert list(lock.readers_dir.iterdir()) == []  # ...and went with the first look at it


def test_a_writer_that_waited_says_for_whom_and_a_reader_waits_for_a_writer(tmp_path: Path, holder: Any) -> None:
    lock = ReadersWriterLock(tmp_path / "sub-A.lock")
    holder(lock.path, "cccccccc-reader", hold=1.5)
    lines: list[str] = []
    with lock.exclusive({"run_id": "writer"}, 30, log=lines.append) as got:
        assert 1.0 <= got.waited_s < 30
        assert [h.info["run_id"] for h in got.waited_for] == ["cccccccc-reader"]
    assert lines and "held by: qsirecon 01|A run cccccccc" in lines[0]

    writer = holder(lock.path, "dddddddd-writer", hold=60, mode="exclusive")
    with pytest.raises(LockBusy) as busy:
        with lock.shared({"run_id": "reader"}, 0.5):
            pytest.fail("read while a publish swaps")
    assert [h.info["run_id"] for h in busy.value.holders] == ["dddddddd-writer"]
    writer.kill()
    writer.wait()
    with lock.shared({"run_id": "reader"}, 5) as got:
        assert got.waited_s < 5


# --------------------------------------------------------------------------- publish and reclaim in a run

WRITE_OUTPUTS = (
    "import pathlib, sys\n"
    "out, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
    "(out / 'sub-A').mkdir(parents=True, exist_ok=True)\n"
    "(out / 'sub-A' / 'new.txt').write_text(sys.argv[3])\n"
    "(work / 'cache').mkdir(parents=True, exist_ok=True)\n"
    "(work / 'cache' / 'node.bin').write_bytes(b'x' * 300000)\n"
    "pathlib.Path(sys.argv[4]).touch()\n"
)


def qsiprep_like(config: NeuroflowConfig, content: str) -> dg.AssetsDefinition:
    """A stand-in QSIPrep step with the real stage name, staging, publication and work folder."""
    target = layout.qsiprep_dir(config)
    work = layout.work_dir(config, "qsiprep", "A")

    @dg.asset(name="qsiprep_subject", partitions_def=dg.StaticPartitionsDefinition(["A"]))
    def prep(context) -> dg.MaterializeResult:  # unannotated: Dagster checks the annotation
        staging = staging_for(context, target)
        work.mkdir(parents=True, exist_ok=True)
        done = config.paths.work_dir / "tool-done"
        spec = ToolSpec(tool="qsiprep", argv=(PY, "-c", WRITE_OUTPUTS, str(staging), str(work), content, str(done)),
                        output_dir=staging, outputs=("sub-A/new.txt",), scratch_dir=work,
                        **layout.publish_plan(staging, target, ["sub-A"]))  # fmt: skip
        from neuroflow_dagster.defs.execution import record_metadata

        record = execute_spec(context, config, "qsiprep", spec)
        return dg.MaterializeResult(metadata=record_metadata(record, spec))

    return prep


def failure_of(result: dg.ExecuteInProcessResult) -> Any:
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return failure.step_failure_data.user_failure_data


def test_qsiprep_publishes_only_once_its_readers_are_gone_and_reclaims_its_work_folder(
    tmp_path: Path, holder: Any
) -> None:
    config = make_workspace(tmp_path / "ws", overrides={
        "pipelines": {"qsiprep": {"runtime": "local", "publish_wait_minutes": 0.03, "retry": {"max_retries": 0}}},
    })  # fmt: skip
    target = layout.qsiprep_dir(config)
    (target / "sub-A").mkdir(parents=True)
    (target / "sub-A" / "old.txt").write_text("read by a reconstruction")
    work = layout.work_dir(config, "qsiprep", "A")
    lock = readers_lock(config.paths.state, "qsiprep", "A")
    assert lock == output_lock(config, stage("qsiprep"), "A").path

    reader = holder(lock, "eeeeeeee-recon")
    failed = dg.materialize([qsiprep_like(config, "wave 2")], partition_key="A", raise_on_error=False)
    assert not failed.success
    user = failure_of(failed)
    assert user.metadata["neuroflow/failure_class"].value == "transient"
    assert "not published: the runs reading the previous output did not end" in user.description
    assert "qsirecon 01|A run eeeeeeee" in user.description
    assert sorted(p.name for p in (target / "sub-A").iterdir()) == ["old.txt"]  # untouched under the reader
    assert (work / "cache" / "node.bin").is_file()  # a failed run's work folder stays for debugging
    assert len(list((target / STAGING).glob("A.*"))) == 1  # and so do its complete, unpublished outputs

    reader.kill()  # the reader's worker dies: its lock goes with it
    reader.wait()
    # Another reader, which ends by itself 2 s after the tool finished (while the publish waits).
    (config.paths.work_dir / "tool-done").unlink()
    holder(lock, "ffffffff-recon", hold=2, after=config.paths.work_dir / "tool-done")
    config = make_workspace(tmp_path / "ws", overrides={"pipelines": {"qsiprep": {"runtime": "local",
                                                                                  "publish_wait_minutes": 1}}})
    done = dg.materialize([qsiprep_like(config, "wave 2")], partition_key="A")
    meta = {k: getattr(v, "value", v) for k, v in done.asset_materializations_for_node("qsiprep_subject")[0]
            .metadata.items()}  # fmt: skip
    assert 0.5 <= meta["publish_waited_s"] < 60
    assert "qsirecon 01|A run ffffffff" in meta["publish_waited_for"]
    assert sorted(p.name for p in (target / "sub-A").iterdir()) == ["new.txt"]
    assert not work.exists()  # reclaimed after the publish...
    assert meta["work_dir_reclaimed"] == str(work) and meta["work_dir_freed_bytes"] >= 300000  # ...and measured
    assert list((target / STAGING).glob("A.*")) == []  # the failed attempt's leftovers went with the success


def test_a_reader_step_does_not_start_while_a_publish_holds_the_output(tmp_path: Path, holder: Any) -> None:
    """A reconstruction (or QC) step waits for a publish in progress, then fails transient, retried."""
    config = make_workspace(tmp_path / "ws", overrides={"pipelines": {"qsiprep": {"publish_wait_minutes": 0.01}}})
    writer = holder(readers_lock(config.paths.state, "qsiprep", "A"), "12345678-prep", mode="exclusive")
    retry = config.pipelines.qsirecon.retry.model_copy(update={"max_retries": 0})

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["01|A"]))
    def recon(context) -> None:  # unannotated: Dagster checks the annotation
        with reading_outputs(context, config, "qsirecon", [stage("qsiprep")], "A", retry):
            pytest.fail("read while the output is being replaced")

    result = dg.materialize([recon], partition_key="01|A", raise_on_error=False)
    user = failure_of(result)
    assert user.metadata["neuroflow/failure_class"].value == "transient"
    assert "not started: the qsiprep output of sub-A is being replaced" in user.description
    assert "run 12345678" in user.description
    writer.kill()
    writer.wait()

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["01|A"]), name="recon")
    def recon_again(context) -> None:  # unannotated: Dagster checks the annotation
        with reading_outputs(context, config, "qsirecon", [stage("qsiprep")], "A", retry) as waited:
            assert waited == {}
            assert [h.info["run_id"] for h in output_lock(config, stage("qsiprep"), "A").readers()] == [context.run_id]

    assert dg.materialize([recon_again], partition_key="01|A").success


# --------------------------------------------------------------------------- retention


def old(path: Path, days: float) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "partial.nii").write_bytes(b"y" * 50000)
    when = time.time() - days * 86400
    os.utime(path, (when, when))
    return path


def staging(config: NeuroflowConfig, root: Path, partition: str, run: str, days: float) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() - days * 86400))
    return old(root / STAGING / f"{partition.replace('|', '_')}.{stamp}.{run}", days)


def test_failed_runs_folders_are_pruned_by_count_and_age_never_a_live_runs(tmp_path: Path, holder: Any) -> None:
    from neuroflow_dagster.defs.leftovers import live_runs
    from neuroflow_dagster.retention import find_leftovers, prune_pass, read_report
    from neuroflow_dagster.runtimes.jobs import JobRecord, JobStore

    config = make_workspace(tmp_path / "ws", overrides={"disk": {"keep_failed_runs": {"count": 2, "days": 10}}})
    prep, recon = layout.qsiprep_dir(config), layout.qsirecon_dir(config)
    # Four failed attempts at A's QSIPrep: the newest two are kept; one of a live run on top.
    a = [staging(config, prep, "A", f"a000000{n}", days=5 - n) for n in range(4)]
    live_a = staging(config, prep, "A", "1111aaaa", days=30)  # old, but its run has not started yet
    # B's recon: an old failure is pruned by age, unless a Slurm job still writes into it.
    b_old = staging(config, recon, "01|B", "b0000000", days=20)
    b_adopted = staging(config, recon, "01|B", "b0000001", days=19)
    JobStore(config.paths.state / "jobs").save(JobRecord(stage="qsirecon", partition="01|B", runtime="slurm",
                                                          status="submitted", output_dir=str(b_adopted)))  # fmt: skip
    # Work folders: one per partition; C's is old and free, D's old but its tool is alive (work lock held).
    work = config.paths.work_dir
    c_work, d_work = old(work / "qsiprep" / "sub-C", 12), old(work / "qsirecon" / "sub-D_ses-01", 12)
    e_work = old(work / "qsiprep" / "sub-E", 1)
    conversion = old(work / "bids_staging" / "sub-F_ses-01_c0ffee00", 11)  # a dead worker's conversion
    published = old(prep / "sub-A", 40)  # published outputs are never candidates, however old
    (work / "qsiprep" / "sub-C_bids_filter.json").write_text("{}")
    holder(work_lock(config.paths.state, "qsirecon", "01|D"), "dead-beef", mode="exclusive")

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("subjects", ["A"])
        instance.add_dynamic_partitions("session_labels", ["01"])
        job = make_defs(config).resolve_implicit_global_asset_job_def()
        run = instance.create_run_for_job(job, run_id="1111aaaa-0000-4000-8000-000000000000",
                                          asset_selection=frozenset({QSIPREP}), tags={"dagster/partition": "A"},
                                          status=dg.DagsterRunStatus.NOT_STARTED)  # fmt: skip
        active = live_runs(instance)
        assert ("qsiprep", "A") in active.partitions and run.run_id in active.run_ids
        assert len(find_leftovers(config)) == 11
        lines: list[str] = []
        result = prune_pass(config, lambda: active, log=lines.append)

    gone = {a[0], a[1], b_old, c_work, conversion}
    assert {p for p in gone if p.exists()} == set()
    kept = {a[2], a[3], live_a, b_adopted, d_work, e_work, published}
    assert {p for p in kept if not p.exists()} == set()
    assert (work / "qsiprep" / "sub-C_bids_filter.json").is_file()
    assert result.live == 1 and len(result.pruned) == 5
    assert sorted(r["path"] for r in result.kept) == sorted(str(p) for p in (a[2], a[3], b_adopted, d_work, e_work))
    assert any("a Slurm job still writes into it" in s for s in result.skipped)
    assert any("holds its work lock" in s for s in result.skipped)
    assert any(f"pruned staging folder {a[0]} of qsiprep A" in line and "(disk.keep_failed_runs.count)" in line
               for line in lines)  # fmt: skip
    report = read_report(config)
    assert report["pruned_total"]["folders"] == 5 and report["pruned_total"]["bytes"] >= 5 * 50000
    assert all(isinstance(r["bytes"], int) and r["bytes"] >= 50000 for r in report["kept"])


def make_defs(config: NeuroflowConfig) -> dg.Definitions:
    from neuroflow_dagster.definitions import build_definitions

    return build_definitions(config)


def test_the_disk_guard_prunes_after_the_run_ends_and_status_shows_what_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real disk_guard sensor against real run records; `neuroflow status` reads its report."""
    from neuroflow_dagster import cli
    from neuroflow_dagster.defs.diskguard import SENSOR_NAME

    config = make_workspace(tmp_path / "ws", overrides={"disk": {"keep_failed_runs": {"count": 0, "days": 14}}})
    defs = make_defs(config)
    sensor = next(s for s in defs.sensors or [] if s.name == SENSOR_NAME)
    argv = ["--config", str(config.source), "status", "--dagster-home", str(tmp_path / "home")]
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        assert cli.main(argv) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[-2].startswith("failed-run folders: not looked at yet")
        assert out[-1].startswith("disk guard: ")

        instance.add_dynamic_partitions("subjects", ["A"])
        instance.add_dynamic_partitions("session_labels", ["01"])
        run = instance.create_run_for_job(defs.resolve_implicit_global_asset_job_def(),
                                          asset_selection=frozenset({QSIRECON}), tags={"dagster/partition": "01|A"},
                                          status=dg.DagsterRunStatus.STARTED)  # fmt: skip
        folder = staging(config, layout.qsirecon_dir(config), "01|A", run.run_id[:8], days=0)
        work = old(config.paths.work_dir / "qsirecon" / "sub-A_ses-01", 0)
        sensor(dg.build_sensor_context(instance=instance))
        assert folder.is_dir() and work.is_dir()  # count 0, but the run is still going
        assert cli.main([*argv, "--format", "json"]) == 0
        view = json.loads(capsys.readouterr().out)["failed_runs_kept"]
        assert view["count"] == 0 and view["message"].startswith("failed-run folders kept: none")

        instance.report_run_failed(run)
        kept_config = make_workspace(tmp_path / "ws", overrides={"disk": {"keep_failed_runs": {"days": 14}}})
        kept_sensor = next(s for s in make_defs(kept_config).sensors or [] if s.name == SENSOR_NAME)
        kept_sensor(dg.build_sensor_context(instance=instance))  # count 3: both kept now the run is over
        assert cli.main(argv) == 0
        line = capsys.readouterr().out.splitlines()[-2]
        assert line.startswith("failed-run folders kept: 2 (")
        assert "oldest " in line and "kept the newest 3 per stage and partition for 14 days" in line

        make_workspace(tmp_path / "ws", overrides={"disk": {"keep_failed_runs": {"count": 0, "days": 14}}})
        sensor(dg.build_sensor_context(instance=instance))
        assert not folder.exists() and not work.exists()
        assert cli.main(argv) == 0
        assert capsys.readouterr().out.splitlines()[-2].startswith("failed-run folders kept: none")


def test_the_real_qc_and_recon_steps_wait_for_a_qsiprep_publish(tmp_path: Path, holder: Any) -> None:
    """The project's own `image_qc_session` and `qsirecon_session` take the shared lock before they read
    QSIPrep's output: while a publish (another process) holds it they do not start, and fail transient."""
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster_tests.test_qc_gate import write_session

    config = make_workspace(tmp_path / "ws", overrides={"pipelines": {
        "qsiprep": {"publish_wait_minutes": 0.01}, "qsirecon": {"retry": {"max_retries": 0}}}})  # fmt: skip
    Registry(config.paths.state).assign("SCAN_A", "75")
    write_session(config, "0075", "01", 0.95, 0)
    dwi = config.paths.bids_root / "sub-0075" / "ses-01" / "dwi"
    dwi.mkdir(parents=True)
    (dwi / "sub-0075_ses-01_dwi.nii.gz").write_bytes(b"")
    writer = holder(readers_lock(config.paths.state, "qsiprep", "0075"), "abcdef12-prep", mode="exclusive")
    defs = make_defs(config)
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("subjects", ["0075"])
        instance.add_dynamic_partitions("session_labels", ["01"])
        for asset in (QC, QSIRECON):
            result = job.execute_in_process(instance=instance, asset_selection=[asset], partition_key="01|0075",
                                            raise_on_error=False)  # fmt: skip
            user = failure_of(result)
            assert user.metadata["neuroflow/failure_class"].value == "transient", user.description
            assert "not started: the qsiprep output of sub-0075 is being replaced" in user.description
            assert "run abcdef12" in user.description
        writer.kill()
        writer.wait()
        done = job.execute_in_process(instance=instance, asset_selection=[QC], partition_key="01|0075")
        assert done.success
