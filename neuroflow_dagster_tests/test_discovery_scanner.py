"""Folder listing, signatures, the stability walk and header-only reads, on real files.

Header reads are checked on real scanner DICOM shipped inside installed packages (heudiconv's Siemens
Prisma DWI, pydicom's test files) as well as on the synthetic files of ``discovery_fixtures``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import heudiconv
import pytest
from pydicom.data import get_testdata_file

from neuroflow_dagster.discovery.scanner import (
    IncomingFolderError,
    file_fingerprint,
    is_dicom_candidate,
    list_session_folders,
    read_headers,
    scan_incoming,
    stat_walk,
    tree_signature,
)
from neuroflow_dagster_tests.discovery_fixtures import (
    make_session,
    set_tree_mtime,
    write_corrupt,
    write_dicom,
)

HEUDICONV_DWI = Path(heudiconv.__file__).parent / "tests" / "data" / "b0dwiForFmap"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("IM0001.dcm", True),
        ("IM0001.DCM", True),
        ("MR.IMA", True),
        ("IM0001", True),
        ("1.3.12.2.1107.5.2.43.66012.2024011514301234567", True),  # UID-named, "suffix" all digits
        ("notes.txt", False),
        ("scan.nii.gz", False),
        ("archive.zip", False),
        (".hidden.dcm", False),
        ("DICOMDIR", False),
    ],
)
def test_dicom_candidates(name: str, expected: bool) -> None:
    assert is_dicom_candidate(name) is expected


def test_flat_listing_skips_hidden_and_files(tmp_path: Path) -> None:
    for name in ("20240115_1430", "b c", ".partial", "ü|,x"):
        (tmp_path / name).mkdir()
    (tmp_path / "stray.dcm").write_bytes(b"x")
    found = list_session_folders(tmp_path)
    assert [f.scan_id for f in found] == ["20240115_1430", "b c", "ü|,x"]
    assert found[0].path == tmp_path / "20240115_1430"


@pytest.mark.parametrize("participant_first", [True, False])
def test_subject_session_listing(tmp_path: Path, participant_first: bool) -> None:
    outer, inner = ("sub75", "ses1") if participant_first else ("ses1", "sub75")
    (tmp_path / outer / inner).mkdir(parents=True)
    (tmp_path / outer / ".tmp").mkdir()
    (tmp_path / ".trash" / "x").mkdir(parents=True)
    [folder] = list_session_folders(tmp_path, "subject_session", participant_first)
    assert folder.scan_id == f"{outer}/{inner}"
    assert (folder.subject_folder, folder.session_folder) == ("sub75", "ses1")


def test_missing_root_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(IncomingFolderError, match="does-not-exist"):
        list_session_folders(tmp_path / "does-not-exist")


@pytest.mark.parametrize("leaf_skip", [True, False])
def test_signature_matches_walk_and_sees_nested_changes(tmp_path: Path, leaf_skip: bool) -> None:
    folder = make_session(tmp_path, "S1", [("T1", 3), ("DWI", 2)])
    walk = stat_walk(folder)
    assert walk.signature.leaf_skip  # st_nlink is reliable on this machine's file system
    sig = tree_signature(folder, leaf_skip=leaf_skip)
    assert sig.value[1:] == walk.signature.value[1:] and sig.n_dirs == 3
    assert walk.n_files == 5 and len(walk.candidates) == 5
    assert walk.n_stat == 3 + 5  # every dir and every file

    # A file added deep inside changes the signature (its series folder's mtime and ctime).
    write_dicom(folder / "002_DWI" / "extra.dcm", series_uid="1.2.3")
    assert tree_signature(folder, leaf_skip=leaf_skip) != sig
    # So does a file removed, and a new series folder.
    sig = tree_signature(folder, leaf_skip=leaf_skip)
    (folder / "001_T1" / "s001_i0001.dcm").unlink()
    assert tree_signature(folder, leaf_skip=leaf_skip) != sig
    sig = tree_signature(folder, leaf_skip=leaf_skip)
    make_session(folder, "003_FLAIR", [("FLAIR", 1)], nested=False)
    assert tree_signature(folder, leaf_skip=leaf_skip).n_dirs == 4
    # Hidden folders are not part of it.
    (folder / "002_DWI" / ".cache").mkdir()
    assert tree_signature(folder, leaf_skip=leaf_skip).n_dirs == 4


def test_leaf_skip_lists_no_leaf_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_session(tmp_path, "S1", [("T1", 3), ("DWI", 2)])
    listed: list[str] = []
    real_scandir = os.scandir

    def spy(path):  # type: ignore[no-untyped-def]
        listed.append(os.path.basename(path))
        return real_scandir(path)

    monkeypatch.setattr("neuroflow_dagster.discovery.scanner.os.scandir", spy)
    tree_signature(folder, leaf_skip=True)
    assert listed == ["S1"]  # the two series folders (st_nlink 2) were only stat'ed
    listed.clear()
    tree_signature(folder, leaf_skip=False)
    assert sorted(listed) == ["001_T1", "002_DWI", "S1"]


def test_unreliable_nlink_means_full_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """btrfs (and some network file systems) report st_nlink 1 for folders: never skip there."""
    folder = make_session(tmp_path, "S1", [("T1", 3)])
    real_stat = os.stat

    class NoLinks:
        def __init__(self, st: os.stat_result) -> None:
            self._st = st

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return 1 if name == "st_nlink" else getattr(self._st, name)

    def fake_stat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        st = real_stat(path, *args, **kwargs)
        return NoLinks(st) if stat.S_ISDIR(st.st_mode) else st

    monkeypatch.setattr("neuroflow_dagster.discovery.scanner.os.stat", fake_stat)
    walk = stat_walk(folder)
    assert not walk.signature.leaf_skip and walk.signature.value.startswith("F")
    assert tree_signature(folder, leaf_skip=False) == walk.signature


def test_signature_unchanged_when_nothing_changes(tmp_path: Path) -> None:
    folder = make_session(tmp_path, "S1", [("T1", 3)])
    assert tree_signature(folder, leaf_skip=True) == tree_signature(folder, leaf_skip=True)
    (folder / "001_T1" / "s001_i0001.dcm").read_bytes()  # reading does not change anything
    assert tree_signature(folder, leaf_skip=True) == stat_walk(folder).signature


def test_stability_uses_ctime_so_preserved_mtimes_still_look_fresh(tmp_path: Path) -> None:
    """`cp -rp` keeps a year-old mtime, but the copy's ctime is now: the folder must not look stable."""
    source = make_session(tmp_path / "src", "S1", [("T1", 3)])
    year_ago = time.time() - 365 * 86400
    set_tree_mtime(source, year_ago)
    copy = tmp_path / "incoming" / "S1"
    copy.parent.mkdir()
    before = time.time()
    subprocess.run(["cp", "-rp", str(source), str(copy)], check=True)
    assert abs((copy / "001_T1" / "s001_i0001.dcm").stat().st_mtime - year_ago) < 1  # mtime preserved
    walk = stat_walk(copy)
    assert walk.latest_change >= before - 1


def test_walk_counts_hidden_files_for_stability_but_not_as_dicom(tmp_path: Path) -> None:
    folder = make_session(tmp_path, "S1", [("T1", 2)], nested=False)
    set_tree_mtime(folder, time.time() - 3600)
    rsync_tmp = folder / ".s001_i0003.dcm.Ab12Cd"
    rsync_tmp.write_bytes(b"partial")
    walk = stat_walk(folder)
    assert walk.n_files == 3
    assert rsync_tmp not in walk.candidates and len(walk.candidates) == 2


def test_headers_of_real_siemens_dwi(tmp_path: Path) -> None:
    session = tmp_path / "S1"
    shutil.copytree(HEUDICONV_DWI, session)
    summary = read_headers(stat_walk(session).candidates, session)
    assert summary.n_dicom == 3 and summary.n_unreadable == 0
    [series] = summary.series
    assert series.description == "dMRI_mb3_AP_1.5"
    assert series.n_files == 3 and series.series_number == 28
    assert "DIFFUSION" in series.image_type and series.modality == "MR"
    assert summary.acquisition == "2018-08-10T12:08:25"


def test_headers_of_pydicom_test_files(tmp_path: Path) -> None:
    for name in ("MR_small.dcm", "MR_small_implicit.dcm", "ExplVR_LitEndNoMeta.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / name)
    summary = read_headers(sorted(tmp_path.iterdir()), tmp_path)
    # Two encodings of one MR series plus a preamble-less RT plan: all three are DICOM.
    assert summary.n_dicom == 3 and summary.n_unreadable == 0
    by_uid = {s.uid: (s.n_files, s.modality, s.description) for s in summary.series}
    assert by_uid == {
        "1.3.6.1.4.1.5962.1.3.4.1.20040826185059.5457": (2, "MR", "Unknown"),
        "1.2.333.4444.5.6.7.8.99": (1, "RTPLAN", "Unknown"),
    }


def test_unreadable_files_are_counted_and_named(tmp_path: Path) -> None:
    write_dicom(tmp_path / "ok1.dcm", series_uid="1.2.3", description="T1")
    write_dicom(tmp_path / "ok2.dcm", series_uid="1.2.3", description="T1")
    write_dicom(tmp_path / "nodesc.dcm", series_uid="1.2.4", description=None)
    write_corrupt(tmp_path / "garbage.dcm")
    write_corrupt(tmp_path / "cut.dcm", kind="truncated")
    (tmp_path / "empty").write_bytes(b"")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.dcm")
    files = [p for p in sorted(tmp_path.iterdir()) if p.name != "dangling.dcm"]
    files.append(tmp_path / "dangling.dcm")
    summary = read_headers(files, tmp_path)
    assert summary.n_dicom == 3
    assert summary.n_unreadable == 4
    assert {s.description: s.n_files for s in summary.series} == {"T1": 2, "Unknown": 1}
    names = [e.split(":")[0] for e in summary.unreadable_examples]
    assert sorted(names) == ["cut.dcm", "dangling.dcm", "empty", "garbage.dcm"]
    assert any("cannot read" in e for e in summary.unreadable_examples if e.startswith("dangling"))


def test_listing_names_every_entry_that_is_not_a_session_folder(tmp_path: Path) -> None:
    (tmp_path / "S1").mkdir()
    os.symlink("S1", tmp_path / "LINK_TO_S1")  # a symlink to a folder is a folder
    os.symlink("LOOP", tmp_path / "LOOP")
    os.symlink("missing", tmp_path / "DANGLING")
    (tmp_path / "notes.txt").write_text("x")
    os.symlink("notes.txt", tmp_path / "LINK_TO_FILE")
    (tmp_path / ".hidden").mkdir()
    listing = scan_incoming(tmp_path)
    assert [f.scan_id for f in listing.folders] == ["LINK_TO_S1", "S1"]
    assert {p.scan_id: (p.reason, p.message) for p in listing.problems} == {
        "DANGLING": ("unreadable", "a symbolic link to 'missing', which does not exist"),
        "LINK_TO_FILE": ("not_a_folder", "a symbolic link to the file 'notes.txt', not a folder"),
        "LOOP": ("unreadable", "cannot be read: a symbolic link loop (ELOOP)"),
        "notes.txt": ("not_a_folder", "a file, not a session folder (an archive to unpack? move it out of the way)"),
    }
    # The old entry point still lists the folders (the landed code raised for the whole tree here).
    assert [f.scan_id for f in list_session_folders(tmp_path)] == ["LINK_TO_S1", "S1"]


def test_fingerprint_sees_rewrites_in_place_but_not_metadata_or_hidden_files(tmp_path: Path) -> None:
    folder = make_session(tmp_path, "S1", [("T1", 4), ("DWI", 3)])
    walk = stat_walk(folder)
    fp = file_fingerprint(folder)
    assert (fp.value, fp.n_files, fp.errors) == (walk.fingerprint, 7, [])
    victim = folder / "002_DWI" / "s002_i0001.dcm"
    victim.chmod(0o600)  # permissions, owner: not content
    (folder / "002_DWI" / ".DS_Store").write_bytes(b"finder")
    assert file_fingerprint(folder).value == fp.value
    mtime_ns = victim.stat().st_mtime_ns
    with open(victim, "r+b") as fh:  # same name, inode and size; new bytes
        fh.write(b"X")
    assert file_fingerprint(folder).value != fp.value
    os.utime(victim, ns=(mtime_ns, mtime_ns))  # the only rewrite it cannot see: time set back on purpose
    assert file_fingerprint(folder).value == fp.value
