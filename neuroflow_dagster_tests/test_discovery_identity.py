"""Participant/session labels and the ScanID registry (docs/domain-rules.md#identity)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from neuroflow_dagster.discovery.identity import (
    AssignRequest,
    IdentityError,
    Registry,
    RegistryError,
    is_valid_label,
    normalize_overrides,
    participant_label,
    retire,
    session_label,
)


@pytest.mark.parametrize(
    ("code", "label"),
    [
        ("75", "0075"),
        ("CLM_L_01", "CLML01"),
        ("  7-5 ", "0075"),
        ("12345", "12345"),
        ("a|b,c/d\\e f", "abcdef"),
        ("Jürgen-1", "Jrgen1"),  # ASCII only: BIDS labels are [a-zA-Z0-9]+
    ],
)
def test_participant_label_cleans_and_pads(code: str, label: str) -> None:
    assert participant_label(code) == label
    assert is_valid_label(label)


@pytest.mark.parametrize("code", ["", "___", " - ", "ü"])
def test_participant_label_empty_after_cleaning_is_refused(code: str) -> None:
    with pytest.raises(IdentityError, match="no letters or digits"):
        participant_label(code)


def test_session_label_ordinals() -> None:
    assert [session_label(i) for i in (1, 2, 10, 99, 100)] == ["01", "02", "10", "99", "100"]
    with pytest.raises(IdentityError):
        session_label(0)


@pytest.mark.parametrize("bad", ["a|b", "a,b", "a/b", "", "sub 1", "x\\y"])
def test_invalid_labels(bad: str) -> None:
    assert not is_valid_label(bad)


def test_ordinals_per_subject_in_arrival_order_and_persisted(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    a = reg.assign("20240115_1430", "75", acq_time="2024-01-15T14:30:00", dicom_path="/in/20240115_1430")
    b = reg.assign("20240110_0900", "CLM_L_01")
    c = reg.assign("20240101_0800", "075")  # same participant 0075, older scan, arrives later -> 02
    assert (a.entry.participant_id, a.entry.session_id, a.is_new_subject, a.is_new_session) == (
        "0075",
        "01",
        True,
        True,
    )
    assert (b.entry.participant_id, b.entry.session_id, b.is_new_subject) == ("CLML01", "01", True)
    assert (c.entry.participant_id, c.entry.session_id, c.is_new_subject) == ("0075", "02", False)

    again = Registry(tmp_path)  # a new process reads the file
    assert again.lookup("20240115_1430") == a.entry
    assert again.get("0075", "02").scan_id == "20240101_0800"
    assert again.get("0075", "03") is None
    assert [e.scan_id for e in again.sessions_of("0075")] == ["20240115_1430", "20240101_0800"]
    assert [e.scan_id for e in again.all()] == ["20240115_1430", "20240101_0800", "20240110_0900"]
    assert again.lookup("20240115_1430").recruitment_id == "75"
    assert again.lookup("20240115_1430").dicom_path == "/in/20240115_1430"


def test_never_reassigned_even_if_mapping_changes(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    first = reg.assign("S1", "75").entry
    mtime = reg.path.stat().st_mtime_ns
    again = Registry(tmp_path).assign("S1", "99")
    assert again.entry == first
    assert not again.is_new_session
    assert again.conflict and "never reassigned" in again.conflict and "'99'" in again.conflict
    assert reg.path.stat().st_mtime_ns == mtime  # nothing was rewritten
    assert Registry(tmp_path).sessions_of("0099") == []


def test_odd_scan_ids_round_trip(tmp_path: Path) -> None:
    odd = ["with space", "ü-ñîçø∂é", "pipe|and,comma", "tab\there", 'quote"d', "new\nline"]
    reg = Registry(tmp_path)
    for i, scan in enumerate(odd):
        reg.assign(scan, f"S{i}")
    reread = Registry(tmp_path)
    assert sorted(e.scan_id for e in reread.all()) == sorted(odd)
    for e in reread.all():
        assert is_valid_label(e.participant_id) and is_valid_label(e.session_id)


def test_assign_many_is_one_write_in_given_order(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    results = reg.assign_many([AssignRequest("B", "1"), AssignRequest("A", "1"), AssignRequest("C", "2")])
    assert [(r.entry.scan_id, r.entry.session_id) for r in results] == [("B", "01"), ("A", "02"), ("C", "01")]
    assert [r.is_new_subject for r in results] == [True, False, True]
    with pytest.raises(IdentityError):
        reg.assign_many([AssignRequest("D", "__")])
    assert reg.lookup("D") is None


def test_dry_run_registry_writes_nothing_but_gives_the_same_labels(tmp_path: Path) -> None:
    Registry(tmp_path).assign("S1", "75")
    dry = Registry(tmp_path, persist=False)
    assert dry.assign("S2", "75").entry.session_id == "02"
    assert dry.lookup("S2") is not None
    assert Registry(tmp_path).lookup("S2") is None
    assert Registry(tmp_path).assign("S2", "75").entry.session_id == "02"


def test_other_writer_is_seen_before_assigning(tmp_path: Path) -> None:
    mine = Registry(tmp_path)
    mine.assign("S1", "75")
    Registry(tmp_path).assign("S2", "75")  # another process
    assert mine.assign("S3", "75").entry.session_id == "03"


def _assign_in_child(args: tuple[str, int]) -> list[str]:
    state_dir, worker = args
    reg = Registry(Path(state_dir))
    return [reg.assign(f"w{worker}-{i}", "75").entry.session_id for i in range(10)]


def test_concurrent_processes_never_share_an_ordinal(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        pool.map(_assign_in_child, [(str(tmp_path), w) for w in range(3)])
    sessions = [e.session_id for e in Registry(tmp_path).sessions_of("0075")]
    assert sorted(sessions) == [f"{i:02d}" for i in range(1, 31)]


def test_corrupt_registry_is_named(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.assign("S1", "75")
    text = reg.path.read_text().replace("\t01\t", "\t0|1\t")
    reg.path.write_text(text)
    with pytest.raises(RegistryError, match=r"registry.tsv: row 2 has invalid labels"):
        Registry(tmp_path)
    reg.path.write_text("foo\tbar\n")
    with pytest.raises(RegistryError, match="unexpected header"):
        Registry(tmp_path)


def test_duplicate_binding_in_file_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.assign("S1", "75")
    lines = reg.path.read_text().splitlines()
    lines.append(lines[1].replace("S1", "S2", 1))
    reg.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RegistryError, match="bound to both"):
        Registry(tmp_path)


def test_write_is_atomic_no_temp_files_left(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for i in range(5):
        reg.assign(f"S{i}", "75")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("registry.tsv", "registry.tsv.lock")]
    assert leftovers == []


# --------------------------------------------------------------------------- two people, one label


def write_legacy_registry(state_dir: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """A registry.tsv as the versions before label ownership wrote it (7 columns, no status)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lines = ["scan_id\tparticipant_id\tsession_id\trecruitment_id\tacq_time\tdicom_path\tregistered_at"]
    lines += [
        f"{scan}\t{label}\t{ses}\t{code}\t\t/in/{scan}\t2024-01-01T00:00:00+00:00" for scan, label, ses, code in rows
    ]
    path = state_dir / "registry.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("first", "second", "label"),
    [
        ("CLM_L_01", "CLML01", "CLML01"),
        ("ab-1", "ab1", "ab1"),
        ("ab1", "AB1", "ab1"),  # differ only in case: one folder on a case-insensitive file system
        ("7-5", "75", "0075"),
        ("Jürgen-1", "Jörgen-1", "Jrgen1"),
        ("S 1", "S1", "S1"),
    ],
)
def test_a_second_code_for_a_label_is_refused_never_merged(tmp_path: Path, first: str, second: str, label: str) -> None:
    reg = Registry(tmp_path)
    a = reg.assign("SCAN_A", first)
    assert a.entry is not None and a.entry.participant_id == label
    b = reg.assign("SCAN_B", second)
    assert Registry(tmp_path).lookup("SCAN_B") is None  # not registered: held by discovery
    assert b.entry is None and not b.is_new_session
    assert repr(first) in b.refused and repr(second) in b.refused and label in b.refused
    assert "mapping.label_overrides" in b.refused
    # The owner keeps getting sessions.
    assert reg.assign("SCAN_C", first).entry.session_id == "02"


def test_same_person_numeric_codes_and_the_padding_rule(tmp_path: Path) -> None:
    """Purely numeric codes are numbers (75 = 075 = 0075 = 00075); codes with letters are never padded."""
    assert [participant_label(c) for c in ("75", "075", "0075", "00075", "0", "12345", "012345")] == [
        "0075",
        "0075",
        "0075",
        "0075",
        "0000",
        "12345",
        "12345",
    ]
    assert [participant_label(c) for c in ("BAD", "b1", "A-7")] == ["BAD", "b1", "A7"]
    reg = Registry(tmp_path)
    got = [reg.assign(f"S{i}", code).entry for i, code in enumerate(["75", "0075", " 075 ", "00075"])]
    assert [(e.participant_id, e.session_id) for e in got] == [
        ("0075", "01"),
        ("0075", "02"),
        ("0075", "03"),
        ("0075", "04"),
    ]
    assert Registry(tmp_path).problems() == []


def test_label_override_separates_two_codes(tmp_path: Path) -> None:
    overrides = normalize_overrides({"CLML01": "CLML01B"})
    reg = Registry(tmp_path)
    a = reg.assign("S1", "CLM_L_01", overrides=overrides)
    b = reg.assign("S2", "CLML01", overrides=overrides)
    assert (a.entry.participant_id, b.entry.participant_id) == ("CLML01", "CLML01B")
    assert b.is_new_subject and b.entry.session_id == "01"
    # An override onto a label another code owns is refused like any other collision.
    c = reg.assign("S3", "XYZ", overrides=normalize_overrides({"XYZ": "clml01"}))
    assert c.entry is None and "'CLM_L_01'" in c.refused


def test_legacy_registry_loads_and_a_merged_pair_is_reported_and_frozen(tmp_path: Path) -> None:
    write_legacy_registry(
        tmp_path,
        [
            ("S1", "CLML01", "01", "CLM_L_01"),
            ("S2", "CLML01", "02", "CLML01"),  # merged by the old code
            ("S3", "0BAD", "01", "BAD"),  # padded by the old rule
            ("S4", "ab1", "01", "ab1"),
            ("S5", "AB1", "01", "AB1"),  # case-only twins
        ],
    )
    reg = Registry(tmp_path)
    assert len(reg) == 5 and reg.lookup("S2").recruitment_id == "CLML01"
    problems = {p.kind: p for p in reg.problems()}
    assert set(problems) == {"merged", "case_collision"}
    merged = problems["merged"].message
    assert "sub-CLML01" in merged and "'CLM_L_01'" in merged and "'CLML01'" in merged and "'S2'" in merged
    assert reg.blocked_labels().keys() == {"CLML01"}
    assert "sub-AB1" in problems["case_collision"].message and "sub-ab1" in problems["case_collision"].message
    # Neither code of the merged pair gets a new session there until it is resolved.
    for code in ("CLM_L_01", "CLML01"):
        refused = reg.assign(f"NEW_{code}", code)
        assert refused.entry is None and "sub-CLML01" in refused.refused
    # A code keeps the label it was registered under: BAD stays 0BAD, never split into BAD.
    assert reg.assign("S6", "BAD").entry.participant_id == "0BAD"
    # Written back with the status columns; still the same content.
    assert Registry(tmp_path).lookup("S3").participant_id == "0BAD"
    assert reg.path.read_text().splitlines()[0].endswith("\tstatus\tnote")


def test_retired_binding_keeps_its_labels_and_frees_the_scan_id(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.assign("S1", "A1")
    old = reg.assign("S2", "A1").entry
    reg.replace_entries([(old, retire(old, "2024-01-01 root: belongs to B2"))])
    again = Registry(tmp_path)
    assert again.lookup("S2") is None and [e.scan_id for e in again.sessions_of("A1")] == ["S1"]
    assert again.retired_entry("A1", "02").note.endswith("belongs to B2")
    assert again.assign("S2", "B2").entry.participant_id == "B2"
    assert again.assign("S3", "A1").entry.session_id == "03"  # ses-02 of A1 is never given again
    with pytest.raises(RegistryError, match=r"changed while re-keying|no longer"):
        reg.replace_entries([(old, retire(old, "twice"))])


def test_registry_with_a_scan_id_active_twice_is_refused(tmp_path: Path) -> None:
    write_legacy_registry(tmp_path, [("S1", "A", "01", "A"), ("S1", "B", "01", "B")])
    with pytest.raises(RegistryError, match=r"rows 2 and 3 both bind ScanID 'S1'"):
        Registry(tmp_path)
