"""Discovery under faults and real-world input: one bad entry never stops a tick, two people never
become one subject, malformed mapping rows are named, vanished and rewritten folders are noticed.

Engine-level: real folders, real (synthetic) DICOM, real symlink loops, real permission bits, driven by
``now=`` instead of sleeping. Root ignores file modes, so the permission tests run the tick in a forked
child that has dropped to uid/gid 65534 (``as_unprivileged``): the kernel's own permission check, as an
unprivileged sensor process would meet it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from neuroflow_dagster.discovery.engine import run_discovery
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.discovery.mapping import MappingResult
from neuroflow_dagster.discovery.scanner import tree_signature
from neuroflow_dagster_tests.discovery_fixtures import (
    config_for,
    dicom_bytes,
    make_session,
    write_mapping_csv,
)

T = TypeVar("T")
NOBODY = 65534
DAY = 86400.0


def mapped(*pairs: tuple[str, str]) -> MappingResult:
    return MappingResult(mapping=dict(pairs), source="test")


def held(result: Any) -> dict[str, str]:
    return {h.scan_id: h.reason for h in result.held}


def message(result: Any, scan_id: str) -> str:
    return next(h.message for h in result.held if h.scan_id == scan_id)


def registered(result: Any) -> dict[str, tuple[str, str]]:
    return {r.scan_id: (r.participant_label, r.session_label) for r in result.registrations}


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    return tmp_path / "incoming"


@pytest.fixture
def cfg(tmp_path: Path) -> Any:
    return config_for(tmp_path)


# --------------------------------------------------------------------------- unprivileged runs


def as_unprivileged(fn: Callable[[], T]) -> T:
    """``fn()`` with real permission checks: in a forked child as uid/gid 65534 when we are root."""
    if os.geteuid() != 0:
        return fn()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload = pickle.dumps(("ok", fn()))
        except BaseException as exc:
            payload = pickle.dumps(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        with os.fdopen(write_end, "wb") as fh:
            fh.write(payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status != "ok":
        raise AssertionError(f"unprivileged child failed: {value}")
    return value


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp tree the unprivileged child can use (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="nf-integrity-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for dirpath, dirnames, _ in os.walk(base):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
        shutil.rmtree(base, ignore_errors=True)


def give_to_nobody(base: Path) -> None:
    if os.geteuid() != 0:
        return
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), NOBODY, NOBODY)
    os.lchown(base, NOBODY, NOBODY)


# --------------------------------------------------------------------------- 3. one bad entry


def test_symlink_loop_dangling_link_file_and_bad_name_are_held_alone(
    cfg: Any, incoming: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    make_session(incoming, "S2", [("T1", 12)])
    make_session(incoming, "GONE", [("T1", 12)])
    os.symlink("LOOP", incoming / "LOOP")  # ln -s LOOP incoming/LOOP
    os.symlink("/nonexistent/share/S9", incoming / "DANGLING")
    (incoming / "S3.zip").write_bytes(b"PK\x03\x04")
    os.mkdir(os.fsencode(incoming) + b"/BAD\xffNAME")
    make_session(incoming / os.fsdecode(b"BAD\xffNAME"), "001", [("T1", 3)])

    # A folder that vanishes between the listing and its walk is simply gone: not held, nothing stops.
    import neuroflow_dagster.discovery.engine as engine_module

    real_walk = engine_module.stat_walk

    def vanishing_walk(path: Path) -> Any:
        if path.name == "GONE":
            shutil.rmtree(path)
        return real_walk(path)

    monkeypatch.setattr(engine_module, "stat_walk", vanishing_walk)
    mapping = mapped(("S1", "75"), ("S2", "76"), ("GONE", "77"), ("LOOP", "78"), ("DANGLING", "79"))
    first = run_discovery(cfg, None, mapping_result=mapping)
    assert registered(first) == {"S1": ("0075", "01"), "S2": ("0076", "01")}
    assert held(first) == {
        "LOOP": "unreadable",
        "DANGLING": "unreadable",
        "S3.zip": "not_a_folder",
        "BAD\ufffdNAME": "unreadable",
    }
    assert "a symbolic link loop (ELOOP)" in message(first, "LOOP")
    assert "'/nonexistent/share/S9', which does not exist" in message(first, "DANGLING")
    assert "a file, not a session folder" in message(first, "S3.zip")
    assert "not valid UTF-8" in message(first, "BAD\ufffdNAME")
    assert not any("nothing scanned" in w for w in first.warnings)
    assert Registry(cfg.paths.state).lookup("GONE") is None

    # The next tick: the good folders are skipped cheaply, the bad entries are still named.
    make_session(incoming, "S4", [("T1", 12)])
    second = run_discovery(cfg, first.new_state, mapping_result=mapped(*mapping.mapping.items(), ("S4", "80")))
    assert registered(second) == {"S4": ("0080", "01")}
    assert set(held(second)) == {"LOOP", "DANGLING", "S3.zip", "BAD\ufffdNAME"}
    assert second.stats.folders_skipped == 2


def test_symlink_loop_inside_a_session_holds_that_session(cfg: Any, incoming: Path) -> None:
    folder = make_session(incoming, "S1", [("T1", 12)])
    os.symlink("x", folder / "001_T1" / "x")
    make_session(incoming, "S2", [("T1", 12)])
    result = run_discovery(cfg, None, mapping_result=mapped(("S1", "75"), ("S2", "76")))
    assert registered(result) == {"S2": ("0076", "01")}
    assert held(result) == {"S1": "unreadable"}
    assert "001_T1/x: a symbolic link loop" in message(result, "S1")


@pytest.mark.parametrize("participant_first", [True, False])
def test_subject_session_layout_bad_entries_one_level_down(
    tmp_path: Path, incoming: Path, participant_first: bool
) -> None:
    config = config_for(tmp_path, discovery={"layout": "subject_session", "participant_first": participant_first})
    outer, inner = ("SUBJ1", "v1") if participant_first else ("v1", "SUBJ1")
    make_session(incoming / outer, inner, [("T1", 12)])
    os.symlink("TOP", incoming / "TOP")  # a loop where subject folders are expected
    os.symlink("LOOP", incoming / outer / "LOOP")  # a loop next to the session folders
    (incoming / outer / "notes.txt").write_text("visit notes")
    result = run_discovery(config, None)
    assert registered(result) == {f"{outer}/{inner}": ("SUBJ1", "01")}
    assert held(result) == {
        "TOP": "unreadable",
        f"{outer}/LOOP": "unreadable",
        f"{outer}/notes.txt": "not_a_folder",
    }
    assert "sessions under it are not scanned" in message(result, "TOP")


def test_permission_denied_folders_are_held_alone(shared_tmp: Path) -> None:
    config = config_for(shared_tmp)
    incoming = shared_tmp / "incoming"
    make_session(incoming, "S1", [("T1", 12)])
    make_session(incoming, "S2", [("T1", 12)])
    s3 = make_session(incoming, "S3", [("T1", 6), ("DWI", 6)])
    mapping = mapped(("S1", "75"), ("S2", "76"), ("S3", "77"))
    run_discovery(config, None, mapping_result=mapped(), time_budget_s=None)  # imports, before forking
    shutil.rmtree(config.paths.state, ignore_errors=True)
    give_to_nobody(shared_tmp)
    (incoming / "S2").chmod(0)
    (s3 / "002_DWI").chmod(0)

    first = as_unprivileged(lambda: run_discovery(config, None, mapping_result=mapping))
    assert registered(first) == {"S1": ("0075", "01")}
    assert held(first) == {"S2": "unreadable", "S3": "unreadable"}
    assert "permission denied (EACCES)" in message(first, "S2")
    assert "002_DWI/: permission denied (EACCES)" in message(first, "S3")

    # A registered folder that becomes unreadable keeps its registration and state, and says so.
    (incoming / "S1" / "001_T1").chmod(0)
    second = as_unprivileged(lambda: run_discovery(config, first.new_state, mapping_result=mapping))
    assert held(second) == {"S1": "unreadable", "S2": "unreadable", "S3": "unreadable"}
    h = next(h for h in second.held if h.scan_id == "S1")
    assert h.registered == "sub-0075 ses-01" and "registered session kept as it was" in h.message
    assert second.new_state["f"]["S1"] == first.new_state["f"]["S1"]

    # Readable again: S2 and S3 are registered, S1 (unchanged content) is not re-reported.
    for path in (incoming / "S1" / "001_T1", incoming / "S2", s3 / "002_DWI"):
        path.chmod(0o755)
    third = as_unprivileged(lambda: run_discovery(config, second.new_state, mapping_result=mapping))
    assert sorted(registered(third)) == ["S2", "S3"] and third.held == []


def test_incoming_root_that_cannot_be_listed_says_so_and_keeps_the_state(cfg: Any, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    first = run_discovery(cfg, None, mapping_result=mapped(("S1", "75")))
    incoming.rename(incoming.with_name("unmounted"))
    os.symlink("incoming", incoming)  # the mount point became a loop
    gone = run_discovery(cfg, first.new_state, mapping_result=mapped(("S1", "75")))
    assert gone.new_state["f"] == first.new_state["f"] and gone.registrations == []
    [problem] = [p for p in gone.problems if p.kind == "incoming"]
    assert "cannot list: a symbolic link loop" in problem.message and "nothing scanned this tick" in problem.message


# --------------------------------------------------------------------------- 3. vanished folders


def test_registered_folder_that_vanishes_is_reported_and_may_come_back(
    cfg: Any, incoming: Path, tmp_path: Path
) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    make_session(incoming, "S2", [("T1", 12)])
    make_session(incoming, "S3", [("T1", 12)])
    mapping = mapped(("S1", "75"), ("S2", "75"), ("S3", "76"))
    first = run_discovery(cfg, None, mapping_result=mapping)
    away = tmp_path / "elsewhere"
    away.mkdir()
    (incoming / "S2").rename(away / "S2")
    (incoming / "S3").rename(away / "S3")

    gone = run_discovery(cfg, first.new_state, mapping_result=mapping, excluded={"S3"})
    assert held(gone) == {"S2": "missing"}  # an excluded session may be deleted on purpose (consent)
    h = gone.held[0]
    assert h.registered == "sub-0075 ses-02" and str(incoming) in h.message and "every output are kept" in h.message
    assert Registry(cfg.paths.state).lookup("S2") is not None  # never forgotten
    again = run_discovery(cfg, gone.new_state, mapping_result=mapping, excluded={"S3"})
    assert held(again) == {"S2": "missing"}

    # Back unchanged: nothing happens (no new report, no re-conversion).
    (away / "S2").rename(incoming / "S2")
    back = run_discovery(cfg, again.new_state, mapping_result=mapping, excluded={"S3"})
    assert back.registrations == [] and back.held == [] and back.stats.header_files_read == 0

    # Gone again, changed while away, back: re-reported under its registered labels.
    (incoming / "S2").rename(away / "S2")
    away_tick = run_discovery(cfg, back.new_state, mapping_result=mapping, excluded={"S3"})
    (away / "S2" / "001_T1" / "late.dcm").write_bytes(dicom_bytes(series_uid="1.2.3.4"))
    (away / "S2").rename(incoming / "S2")
    changed = run_discovery(cfg, away_tick.new_state, mapping_result=mapping, excluded={"S3"})
    assert registered(changed) == {"S2": ("0075", "02")}
    assert changed.registrations[0].n_dicom == 13


# --------------------------------------------------------------------------- 3. rewritten in place


def _rewrite_in_place(path: Path, **kwargs: Any) -> None:
    """Same name, same inode, new content (a PACS re-send); the folder's times do not change."""
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.write(dicom_bytes(**kwargs))


def test_file_rewritten_in_place_is_detected_and_rereported(tmp_path: Path, incoming: Path) -> None:
    config = config_for(tmp_path, discovery={"stability_wait_minutes": 30})
    folder = make_session(incoming, "S1", [("T1", 12)])
    make_session(incoming, "S2", [("T1", 12)])
    mapping = mapped(("S1", "75"), ("S2", "76"))
    t0 = time.time() + 3600
    first = run_discovery(config, None, now=t0, mapping_result=mapping)
    assert sorted(registered(first)) == ["S1", "S2"]
    signature = tree_signature(folder, leaf_skip=True).value

    victim = folder / "001_T1" / "s001_i0001.dcm"
    _rewrite_in_place(victim, series_uid="1.2.840.99", description="T1_resent")
    assert tree_signature(folder, leaf_skip=True).value == signature  # invisible to the directory times
    now = time.time()
    seen = run_discovery(config, first.new_state, now=now + 60, mapping_result=mapping)
    assert held(seen) == {"S1": "unstable"}  # waits out the stability rule like any change
    assert seen.stats.folders_rewrite_checked == 2 and seen.stats.folders_rewritten == 1
    assert "files rewritten in place" in message(seen, "S1")
    assert any("'S1': files were rewritten in place" in w for w in seen.warnings)

    stable = run_discovery(config, seen.new_state, now=now + 31 * 60, mapping_result=mapping)
    [reg] = stable.registrations
    assert (reg.scan_id, reg.participant_label, reg.session_label, reg.is_new_session) == ("S1", "0075", "01", False)
    assert [s[0] for s in reg.series] == ["T1", "T1_resent"]
    quiet = run_discovery(config, stable.new_state, now=now + 32 * 60, mapping_result=mapping)
    assert quiet.registrations == [] and quiet.held == [] and quiet.stats.folders_rewritten == 0


def test_rewrite_check_is_bounded_round_robin_and_recent_first(tmp_path: Path, incoming: Path) -> None:
    config = config_for(tmp_path, discovery={"rewrite_check_files_per_tick": 10, "rewrite_check_recent_days": 7})
    names = [f"S{i}" for i in range(6)]
    for name in names:
        make_session(incoming, name, [("T1", 5)], nested=False)
    mapping = mapped(*[(n, str(70 + i)) for i, n in enumerate(names)])
    now = time.time() + 3600
    state = run_discovery(config, None, now=now, mapping_result=mapping).new_state
    checked: list[int] = []
    for tick in range(3):
        result = run_discovery(config, state, now=now + tick, mapping_result=mapping)
        checked.append(result.stats.folders_rewrite_checked)
        assert result.stats.files_stated == 10 and result.registrations == []
        state = result.new_state
    assert checked == [2, 2, 2]  # 10 file stats per tick: every folder once in three ticks
    assert state["rr"] == {"r": "S5"}

    # A month later every folder is "old"; one new, recent folder gets half the budget each tick.
    make_session(incoming, "NEW", [("T1", 5)], nested=False)
    later = now + 30 * DAY
    state = run_discovery(
        config, state, now=later, mapping_result=mapped(*mapping.mapping.items(), ("NEW", "99"))
    ).new_state
    result = run_discovery(
        config, state, now=later + 60, mapping_result=mapped(*mapping.mapping.items(), ("NEW", "99"))
    )
    assert result.stats.folders_rewrite_checked == 2 and set(result.new_state["rr"]) == {"r", "o"}
    assert result.new_state["rr"]["r"] == "NEW"


def test_state_of_an_older_version_gets_fingerprints_without_rereporting(cfg: Any, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    first = run_discovery(cfg, None, mapping_result=mapped(("S1", "75")))
    v1 = {"v": 1, "k": first.new_state["k"], "f": {"S1": ["R", first.new_state["f"]["S1"][1], "99"]}}
    second = run_discovery(cfg, v1, mapping_result=mapped(("S1", "75")))
    assert second.registrations == [] and second.held == []
    assert second.new_state["f"]["S1"][2] == first.new_state["f"]["S1"][2]  # fingerprint filled in


# --------------------------------------------------------------------------- 1. two people, one label


def test_second_code_for_an_owned_label_is_held_until_given_its_own_label(tmp_path: Path, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    make_session(incoming, "S2", [("T1", 12)])
    csv_file = write_mapping_csv(tmp_path / "map.csv", {"S1": "CLM_L_01"})
    config = config_for(tmp_path, mapping={"csv_file": str(csv_file)})
    first = run_discovery(config, None)
    assert registered(first) == {"S1": ("CLML01", "01")}
    write_mapping_csv(csv_file, {"S1": "CLM_L_01", "S2": "CLML01"})
    second = run_discovery(config, first.new_state)
    assert second.registrations == [] and held(second) == {"S2": "identity_conflict"}
    text = message(second, "S2")
    assert "'CLML01'" in text and "'CLM_L_01'" in text and "participant label CLML01" in text
    assert f"row 3 of csv:{csv_file}" in text and "mapping.label_overrides" in text
    third = run_discovery(config, second.new_state)
    assert held(third) == {"S2": "identity_conflict"} and third.stats.folders_walked == 0

    config = config_for(tmp_path, mapping={"csv_file": str(csv_file), "label_overrides": {"CLML01": "CLML01B"}})
    fixed = run_discovery(config, third.new_state)
    assert registered(fixed) == {"S2": ("CLML01B", "01")} and fixed.held == []


def test_two_codes_in_one_tick_first_arrival_owns_the_label(cfg: Any, incoming: Path) -> None:
    make_session(incoming, "LATER", [("T1", 12)], acq_date="20240301")
    make_session(incoming, "EARLY", [("T1", 12)], acq_date="20240101")
    result = run_discovery(cfg, None, mapping_result=mapped(("LATER", "ab-1"), ("EARLY", "ab1")))
    assert registered(result) == {"EARLY": ("ab1", "01")}
    assert held(result) == {"LATER": "identity_conflict"}
    assert result.new_state["f"]["LATER"][0] == "U"
    again = run_discovery(cfg, result.new_state, mapping_result=mapped(("LATER", "ab-1"), ("EARLY", "ab1")))
    assert held(again) == {"LATER": "identity_conflict"} and again.stats.header_files_read == 0


def test_subject_session_layout_folders_that_clean_to_one_label(tmp_path: Path, incoming: Path) -> None:
    config = config_for(tmp_path, discovery={"layout": "subject_session"})
    make_session(incoming / "CLM_L_01", "v1", [("T1", 12)], acq_date="20240101")
    make_session(incoming / "CLML01", "v1", [("T1", 12)], acq_date="20240201")
    result = run_discovery(config, None)
    assert registered(result) == {"CLM_L_01/v1": ("CLML01", "01")}
    assert held(result) == {"CLML01/v1": "identity_conflict"}
    assert "subject folder 'CLML01'" in message(result, "CLML01/v1")


def test_legacy_merged_registry_is_reported_every_tick(cfg: Any, incoming: Path) -> None:
    from neuroflow_dagster_tests.test_discovery_identity import write_legacy_registry

    write_legacy_registry(cfg.paths.state, [("S1", "CLML01", "01", "CLM_L_01"), ("S2", "CLML01", "02", "CLML01")])
    make_session(incoming, "S1", [("T1", 12)])
    make_session(incoming, "S2", [("T1", 12)])
    make_session(incoming, "S3", [("T1", 12)])
    mapping = mapped(("S1", "CLM_L_01"), ("S2", "CLML01"), ("S3", "CLM_L_01"))
    result = run_discovery(cfg, None, mapping_result=mapping)
    assert held(result) == {"S3": "identity_conflict"}  # no third session joins a merged subject
    [problem] = result.problems
    assert problem.kind == "registry" and "sub-CLML01 holds sessions of 2 SubjectCodes" in problem.message
    assert sorted(registered(result)) == ["S1", "S2"]  # the old ones keep their labels
    assert [p.kind for p in run_discovery(cfg, result.new_state, mapping_result=mapping).problems] == ["registry"]


# --------------------------------------------------------------------------- 2. mapping errors


def test_duplicate_and_blank_mapping_rows_hold_with_row_numbers(tmp_path: Path, incoming: Path) -> None:
    for name in ("S1", "S2", "S3", "S4"):
        make_session(incoming, name, [("T1", 12)])
    csv_file = tmp_path / "map.csv"
    csv_file.write_text("ScanID,SubjectCode\nS1,A1\nS2,B1\nS1,C1\nS3,\nS4,D1\nS4,D1\n,E1\n", encoding="utf-8")
    config = config_for(tmp_path, mapping={"csv_file": str(csv_file)})
    result = run_discovery(config, None)
    assert registered(result) == {"S2": ("B1", "01"), "S4": ("D1", "01")}
    assert held(result) == {"S1": "mapping_error", "S3": "mapping_error"}
    assert "row 2 (SubjectCode 'A1') and row 4 (SubjectCode 'C1')" in message(result, "S1")
    assert "row 5 of mapping CSV" in message(result, "S3") and "empty SubjectCode" in message(result, "S3")
    assert [p.message for p in result.problems] == [
        f"row 8 of mapping CSV {csv_file}: SubjectCode 'E1' but an empty ScanID"
    ]
    assert any("'S4' is listed in rows 6, 7" in n and "harmless" in n for n in result.notes)

    # The sheet fixed: S1 is registered under the code it now names.
    csv_file.write_text("ScanID,SubjectCode\nS1,A1\nS2,B1\nS3,F1\nS4,D1\n", encoding="utf-8")
    fixed = run_discovery(config, result.new_state)
    assert registered(fixed) == {"S1": ("A1", "01"), "S3": ("F1", "01")} and fixed.held == []


def test_registered_scan_id_that_becomes_ambiguous_is_held_and_blocked(tmp_path: Path, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    csv_file = write_mapping_csv(tmp_path / "map.csv", {"S1": "A1"})
    config = config_for(tmp_path, mapping={"csv_file": str(csv_file)})
    first = run_discovery(config, None)
    csv_file.write_text("ScanID,SubjectCode\nS1,A1\nS1,B1\n", encoding="utf-8")
    second = run_discovery(config, first.new_state)
    [h] = second.held
    assert (h.reason, h.blocks, h.registered) == ("remapped", True, "sub-A1 ses-01")
    assert "no longer says so clearly" in h.message and "row 3 (SubjectCode 'B1')" in h.message


def test_override_for_a_registered_code_holds_its_sessions_as_remapped(tmp_path: Path, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    first = run_discovery(config_for(tmp_path), None, mapping_result=mapped(("S1", "CLML01")))
    config = config_for(tmp_path, mapping={"label_overrides": {"CLML01": "CLML01B"}})
    second = run_discovery(config, first.new_state, mapping_result=mapped(("S1", "CLML01")))
    [h] = second.held
    assert h.reason == "remapped" and "mapping.label_overrides now gives that code the label CLML01B" in h.message
