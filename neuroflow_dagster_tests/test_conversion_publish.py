"""Publishing staged sessions into bids_root: atomic, recoverable, and consistent under concurrency.

Most tests use small hand-made staged sessions (the publisher only moves files and edits tables);
the last one publishes sessions converted by the real HeudiConv and runs the real validator on the
resulting bids_root.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest

from neuroflow_dagster.bids import dataset, validator
from neuroflow_dagster.demo import synth


def stage_session(work: Path, participant: str, session: str, content: str = "v1") -> Path:
    """A staged dir shaped like HeudiConv's output (session folder, scans.tsv, .heudiconv cache)."""
    staging = dataset.new_staging_dir(work, participant, session)
    ses = staging / f"sub-{participant}" / f"ses-{session}"
    (ses / "anat").mkdir(parents=True)
    (ses / "anat" / f"sub-{participant}_ses-{session}_T1w.nii.gz").write_text(content)
    (ses / "anat" / f"sub-{participant}_ses-{session}_T1w.json").write_text("{}")
    (ses / f"sub-{participant}_ses-{session}_scans.tsv").write_text(
        "filename\tacq_time\toperator\trandstr\n"
        f"anat/sub-{participant}_ses-{session}_T1w.nii.gz\t2024-01-15T14:35:00\tn/a\tabc\n"
    )
    (staging / ".heudiconv" / participant / f"ses-{session}" / "info").mkdir(parents=True)
    (staging / "README").write_text("TODO")
    return staging


def t1_content(bids: Path, participant: str, session: str) -> str:
    return (
        bids / f"sub-{participant}" / f"ses-{session}" / "anat" / f"sub-{participant}_ses-{session}_T1w.nii.gz"
    ).read_text()


def hidden_leftovers(bids: Path) -> list[str]:
    return sorted(str(p.relative_to(bids)) for p in bids.rglob(".*") if p.name != ".bidsignore")


def test_publish_moves_the_session_and_writes_top_level_files(tmp_path: Path) -> None:
    work, bids = tmp_path / "work", tmp_path / "bids"
    staging = stage_session(work, "0075", "01")
    result = dataset.publish_session(
        staging, bids, "0075", "01", lock_dir=work, recruitment_id="75", scan_id="20240115_1430"
    )
    assert result.session_dir == bids / "sub-0075" / "ses-01"
    assert result.method == "rename" and not result.replaced_previous
    assert result.files == (
        "sub-0075/ses-01/anat/sub-0075_ses-01_T1w.json",
        "sub-0075/ses-01/anat/sub-0075_ses-01_T1w.nii.gz",
        "sub-0075/ses-01/sub-0075_ses-01_scans.tsv",
    )
    assert result.suffixes == {"T1w"}
    assert not (staging / "sub-0075" / "ses-01").exists()  # moved, not copied
    assert t1_content(bids, "0075", "01") == "v1"
    # Only the session is published: no .heudiconv cache, no HeudiConv README with TODOs.
    assert not (bids / ".heudiconv").exists() and "TODO" not in (bids / "README").read_text()
    desc = (bids / "dataset_description.json").read_text()
    assert '"BIDSVersion": "1.10.0"' in desc and '"GeneratedBy"' in desc and '"Name"' in desc
    assert (bids / "participants.tsv").read_text() == "participant_id\trecruitment_id\nsub-0075\t75\n"
    assert (bids / "sub-0075" / "sub-0075_sessions.tsv").read_text() == (
        "session_id\tacq_time\tscan_id\nses-01\t2024-01-15T14:35:00\t20240115_1430\n"
    )
    assert set(__import__("json").loads((bids / "participants.json").read_text())) == {
        "participant_id",
        "recruitment_id",
    }
    assert (bids / "sessions.json").is_file() and (bids / "scans.json").is_file()
    # The lock lives in work_dir, never in bids_root.
    assert list(work.glob("bids-root-*.lock")) and not list(bids.rglob("*.lock"))


def test_republish_replaces_the_old_version_and_rows_stay_unique_and_sorted(tmp_path: Path) -> None:
    work, bids = tmp_path / "work", tmp_path / "bids"
    for participant, session, rid in [("B2", "02", "b"), ("A1", "01", "a"), ("B2", "01", "b")]:
        dataset.publish_session(
            stage_session(work, participant, session), bids, participant, session, lock_dir=work, recruitment_id=rid
        )
    result = dataset.publish_session(
        stage_session(work, "B2", "02", content="v2"),
        bids,
        "B2",
        "02",
        lock_dir=work,
        participants_row={"recruitment_id": "b-new", "sex": "F"},
        sessions_row={"scan_id": "20240301_0900"},
        acq_time="2024-03-01T09:00:00",
    )
    assert result.replaced_previous and t1_content(bids, "B2", "02") == "v2"
    assert (bids / "participants.tsv").read_text() == (
        "participant_id\trecruitment_id\tsex\nsub-A1\ta\tn/a\nsub-B2\tb-new\tF\n"
    )
    assert (bids / "sub-B2" / "sub-B2_sessions.tsv").read_text() == (
        "session_id\tacq_time\tscan_id\nses-01\t2024-01-15T14:35:00\tn/a\nses-02\t2024-03-01T09:00:00\t20240301_0900\n"
    )
    assert "sex" in (bids / "participants.json").read_text()
    assert hidden_leftovers(bids) == []


def test_failure_after_the_swap_restores_the_old_session_and_tables(tmp_path: Path, monkeypatch) -> None:
    work, bids = tmp_path / "work", tmp_path / "bids"
    dataset.publish_session(stage_session(work, "01", "1"), bids, "01", "1", lock_dir=work, recruitment_id="x")
    tables = {p: p.read_text() for p in [bids / "participants.tsv", bids / "sub-01" / "sub-01_sessions.tsv"]}

    def boom(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataset, "upsert_session", boom)  # fails after participants.tsv was rewritten
    staging = stage_session(work, "01", "1", content="v2")
    with pytest.raises(dataset.PublishError, match="No space left"):
        dataset.publish_session(staging, bids, "01", "1", lock_dir=work, recruitment_id="changed")
    assert t1_content(bids, "01", "1") == "v1"
    assert {p: p.read_text() for p in tables} == tables
    assert hidden_leftovers(bids) == []
    # The new version went back to staging, so a retry can publish it.
    assert (staging / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz").read_text() == "v2"


def test_failed_first_publish_leaves_no_partial_session(tmp_path: Path, monkeypatch) -> None:
    work, bids = tmp_path / "work", tmp_path / "bids"
    monkeypatch.setattr(dataset, "upsert_participant", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(dataset.PublishError):
        dataset.publish_session(stage_session(work, "01", "1"), bids, "01", "1", lock_dir=work)
    assert not (bids / "sub-01").exists()  # not even an empty participant folder
    assert not (bids / "participants.tsv").exists()
    assert hidden_leftovers(bids) == []


def test_other_filesystem_copies_next_to_the_destination_then_renames(tmp_path: Path, monkeypatch) -> None:
    work, bids = tmp_path / "work", tmp_path / "bids"
    dataset.publish_session(stage_session(work, "01", "1"), bids, "01", "1", lock_dir=work)
    monkeypatch.setattr(dataset, "_same_filesystem", lambda a, b: False)
    seen: list[str] = []
    real_copy2 = shutil.copy2

    def copy_then_fail(src, dst, **kw):
        seen.append(str(Path(dst).relative_to(bids)))
        if len(seen) == 2:
            raise OSError(5, "Input/output error")
        return real_copy2(src, dst, **kw)

    monkeypatch.setattr(shutil, "copy2", copy_then_fail)
    with pytest.raises(dataset.PublishError, match="Input/output error"):
        dataset.publish_session(stage_session(work, "01", "1", "v2"), bids, "01", "1", lock_dir=work)
    assert seen[0].startswith("sub-01/.ses-1.incoming-")  # the copy goes to a hidden dir beside ses-1
    assert t1_content(bids, "01", "1") == "v1" and hidden_leftovers(bids) == []

    monkeypatch.setattr(shutil, "copy2", real_copy2)
    staging = stage_session(work, "01", "1", "v3")
    result = dataset.publish_session(staging, bids, "01", "1", lock_dir=work)
    assert result.method == "copy+rename" and result.replaced_previous
    assert t1_content(bids, "01", "1") == "v3" and hidden_leftovers(bids) == []


def test_crash_between_the_two_renames_is_repaired_by_the_next_publish(tmp_path: Path) -> None:
    work, bids = tmp_path / "work", tmp_path / "bids"
    dataset.publish_session(stage_session(work, "01", "1"), bids, "01", "1", lock_dir=work)
    # What a kill -9 after "rename old aside" leaves: no ses-1, the old version hidden, a stale copy.
    os.rename(bids / "sub-01" / "ses-1", bids / "sub-01" / ".ses-1.old-deadbeef")
    (bids / "sub-01" / ".ses-1.incoming-cafe").mkdir()
    with dataset.bids_root_lock(bids, work):
        done = dataset.recover_session(bids, "01", "1")
    assert done == ["restored ses-1 from .ses-1.old-deadbeef", "removed .ses-1.incoming-cafe"]
    assert t1_content(bids, "01", "1") == "v1" and hidden_leftovers(bids) == []

    os.rename(bids / "sub-01" / "ses-1", bids / "sub-01" / ".ses-1.old-feed")
    result = dataset.publish_session(stage_session(work, "01", "1", "v2"), bids, "01", "1", lock_dir=work)
    assert result.recovered == ("restored ses-1 from .ses-1.old-feed",) and result.replaced_previous
    assert t1_content(bids, "01", "1") == "v2" and hidden_leftovers(bids) == []


def test_publish_refuses_an_empty_staging(tmp_path: Path) -> None:
    staging = dataset.new_staging_dir(tmp_path / "work", "01", "1")
    with pytest.raises(dataset.PublishError, match="missing or empty"):
        dataset.publish_session(staging, tmp_path / "bids", "01", "1", lock_dir=tmp_path / "work")


# --------------------------------------------------------------------------- concurrency

N_PROCESSES = 4
PER_PROCESS = 6
PARTICIPANTS = ("A", "B", "C")


def _worker(index: int, work: str, bids: str, slow_s: float) -> None:
    """One conversion process: publishes its own sessions, all sharing participants and tables."""
    if slow_s:  # widen the read -> write window of every table update, to make races certain
        real_read = dataset.read_tsv

        def slow_read(path):
            out = real_read(path)
            time.sleep(slow_s)
            return out

        dataset.read_tsv = slow_read
    for k in range(PER_PROCESS):
        number = index * PER_PROCESS + k + 1
        participant = PARTICIPANTS[number % len(PARTICIPANTS)]
        session = f"{number:02d}"
        staging = stage_session(Path(work), participant, session)
        dataset.publish_session(
            staging, bids, participant, session, lock_dir=work, recruitment_id=participant.lower(), scan_id=session
        )


def _run_processes(work: Path, bids: Path, slow_s: float) -> None:
    ctx = multiprocessing.get_context("fork")  # children inherit the (possibly patched) module state
    procs = [ctx.Process(target=_worker, args=(i, str(work), str(bids), slow_s)) for i in range(N_PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


def _expected_sessions() -> dict[str, list[str]]:
    expected: dict[str, list[str]] = {p: [] for p in PARTICIPANTS}
    for number in range(1, N_PROCESSES * PER_PROCESS + 1):
        expected[PARTICIPANTS[number % len(PARTICIPANTS)]].append(f"ses-{number:02d}")
    return expected


def test_concurrent_processes_keep_the_tables_consistent(tmp_path: Path) -> None:
    work, bids = tmp_path / "work", tmp_path / "bids"
    started = time.monotonic()
    _run_processes(work, bids, slow_s=0.01)
    assert time.monotonic() - started < 30
    _, rows = dataset.read_tsv(bids / "participants.tsv")
    assert [(r["participant_id"], r["recruitment_id"]) for r in rows] == [
        ("sub-A", "a"),
        ("sub-B", "b"),
        ("sub-C", "c"),
    ]
    for participant, sessions in _expected_sessions().items():
        columns, rows = dataset.read_tsv(bids / f"sub-{participant}" / f"sub-{participant}_sessions.tsv")
        assert columns == ["session_id", "acq_time", "scan_id"]
        assert [r["session_id"] for r in rows] == sorted(sessions)
        assert all((bids / f"sub-{participant}" / s).is_dir() for s in sessions)
    assert hidden_leftovers(bids) == []  # no temp tables, no incoming/old dirs


def test_without_the_lock_the_same_workload_loses_updates(tmp_path: Path, monkeypatch) -> None:
    """Control for the test above: it can fail. With the lock disabled, rows are lost."""
    import contextlib

    monkeypatch.setattr(dataset, "bids_root_lock", lambda *a, **k: contextlib.nullcontext())
    work, bids = tmp_path / "work", tmp_path / "bids"
    # A wider read -> write window than above: each process then spends most of its time inside it,
    # so unlocked updates collide on a quiet machine too (at 0.01 s a quiet machine once lost none).
    _run_processes(work, bids, slow_s=0.2)
    found = 0
    for participant in PARTICIPANTS:
        _, rows = dataset.read_tsv(bids / f"sub-{participant}" / f"sub-{participant}_sessions.tsv")
        found += len(rows)
    assert found < N_PROCESSES * PER_PROCESS


# --------------------------------------------------------------------------- real conversion -> bids_root


@pytest.mark.slow
def test_published_real_conversions_form_a_valid_bids_dataset(make_config, tmp_path: Path, convert) -> None:
    config = make_config()
    bids, work = config.paths.bids_root, config.paths.work_dir
    for seed, participant, session, scan_id in [
        (1, "DEMO01", "01", "20240115_1430"),
        (2, "DEMO01", "02", "20240301_0900"),
    ]:
        dicom = synth.write_session(tmp_path / "dicom" / scan_id, seed=seed).folder
        staging = dataset.new_staging_dir(work, participant, session)
        convert(config, dicom, staging, participant, session)
        assert validator.validate_session(staging, participant, session).passed
        result = dataset.publish_session(
            staging, bids, participant, session, lock_dir=work, recruitment_id="DEMO_01", scan_id=scan_id
        )
        assert result.suffixes == {"T1w", "dwi"}
    report = validator.validate_dataset(bids)
    assert report.passed, report.summary()
    assert report.summary_counts["sessions"] == ["01", "02"]
    codes = {i.code for i in report.warnings}
    assert "README_FILE_SMALL" not in codes and "TSV_ADDITIONAL_COLUMNS_UNDEFINED" not in codes
    _, rows = dataset.read_tsv(bids / "sub-DEMO01" / "sub-DEMO01_sessions.tsv")
    assert [(r["session_id"], r["acq_time"]) for r in rows] == [
        ("ses-01", "2024-01-16T14:30:00"),
        ("ses-02", "2024-01-17T14:30:00"),
    ]
