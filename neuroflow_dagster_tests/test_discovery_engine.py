"""Discovery ticks end to end on real folders and real (synthetic) DICOM, driven by ``now=``, no sleeping."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from neuroflow_dagster.discovery.engine import (
    decode_state,
    dry_run_discovery,
    encode_state,
    run_discovery,
)
from neuroflow_dagster.discovery.identity import Registry, is_valid_label
from neuroflow_dagster.discovery.mapping import MappingResult, cache_path
from neuroflow_dagster_tests.discovery_fixtures import (
    config_for,
    make_session,
    write_corrupt,
    write_dicom,
    write_mapping_csv,
)

MIN = 60.0


def mapped(*pairs: tuple[str, str]) -> MappingResult:
    return MappingResult(mapping=dict(pairs), source="test")


def by_scan(result) -> dict:
    return {r.scan_id: r for r in result.registrations}


def held(result) -> dict[str, str]:
    return {h.scan_id: h.reason for h in result.held}


@pytest.fixture
def cfg(tmp_path: Path):
    return config_for(tmp_path)


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    return tmp_path / "incoming"


def test_stability_wait_and_first_tick_on_old_data(tmp_path: Path, incoming: Path) -> None:
    config = config_for(tmp_path, discovery={"stability_wait_minutes": 180})
    make_session(incoming, "S1", [("T1", 12)])
    t0 = time.time()
    mapping = mapped(("S1", "75"))

    early = run_discovery(config, None, now=t0 + 60 * MIN, mapping_result=mapping)
    assert early.registrations == []
    assert held(early) == {"S1": "unstable"}
    assert "waiting for 180 min" in early.held[0].message
    assert early.new_state["f"] == {}  # unstable folders are not remembered: walked again next tick
    assert early.stats.header_files_read == 0

    # A file touched later restarts the clock (os.utime stands in for a copy still writing).
    f = incoming / "S1" / "001_T1" / "s001_i0001.dcm"
    os.utime(f, (t0 + 120 * MIN, t0 + 120 * MIN))
    still = run_discovery(config, early.new_state, now=t0 + 181 * MIN, mapping_result=mapping)
    assert held(still) == {"S1": "unstable"} and still.registrations == []

    done = run_discovery(config, still.new_state, now=t0 + 301 * MIN, mapping_result=mapping)
    assert [r.scan_id for r in done.registrations] == ["S1"]

    # Data copied long before the first deployment: registered on the very first tick, no extra wait.
    fresh = config_for(tmp_path / "other", discovery={"stability_wait_minutes": 180})
    make_session(tmp_path / "other" / "incoming", "OLD", [("T1", 12)])
    first = run_discovery(fresh, None, now=time.time() + 181 * MIN, mapping_result=mapped(("OLD", "1")))
    assert [r.scan_id for r in first.registrations] == ["OLD"]


def test_unchanged_folders_are_not_rewalked_or_reread(
    tmp_path: Path, incoming: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rewrite check (files rewritten in place) is off here: this pins the signature path alone.
    cfg = config_for(tmp_path, discovery={"rewrite_check_files_per_tick": 0})
    for name in ("S1", "S2", "S3"):
        make_session(incoming, name, [("T1", 6), ("DWI", 6)])
    mapping = mapped(("S1", "75"), ("S2", "75"), ("S3", "76"))
    first = run_discovery(cfg, None, mapping_result=mapping)
    assert first.stats.folders_walked == 3 and first.stats.header_files_read == 36
    labels = {r.scan_id: (r.participant_label, r.session_label) for r in first.registrations}

    listed: list[str] = []
    real_scandir = os.scandir

    def spy(path):  # type: ignore[no-untyped-def]
        listed.append(os.path.basename(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", spy)
    second = run_discovery(cfg, decode_state(encode_state(first.new_state)), mapping_result=mapping)
    monkeypatch.setattr(os, "scandir", real_scandir)
    # Only the incoming root and the session folders are listed; no series folder (no file) is.
    assert sorted(listed) == ["S1", "S2", "S3", "incoming"]
    assert second.registrations == [] and second.held == []
    s = second.stats
    assert (s.folders_seen, s.folders_skipped, s.folders_walked, s.files_stated, s.header_files_read) == (
        3,
        3,
        0,
        0,
        0,
    )
    assert s.dirs_signed == 9  # one stat per directory: the session folder and its two series folders

    # Files arriving in one series folder: only that folder is walked and read, and re-reported.
    write_dicom(incoming / "S2" / "002_DWI" / "late.dcm", series_uid="9.9.9", description="DWI")
    third = run_discovery(cfg, second.new_state, mapping_result=mapping)
    assert third.stats.folders_walked == 1 and third.stats.header_files_read == 13
    [again] = third.registrations
    assert again.scan_id == "S2" and (again.participant_label, again.session_label) == labels["S2"]
    assert not again.is_new_session and not again.is_new_subject and again.n_dicom == 13


def test_unmapped_is_held_cheaply_then_registered_when_mapped(cfg, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    make_session(incoming, "S2", [("T1", 12)])
    first = run_discovery(cfg, None, mapping_result=mapped(("S1", "75")))
    assert list(by_scan(first)) == ["S1"]
    assert held(first) == {"S2": "unmapped"}
    assert "not in the mapping" in first.held[0].message
    assert first.stats.header_files_read == 12  # the unmapped folder's headers were not read

    again = run_discovery(cfg, first.new_state, mapping_result=mapped(("S1", "75")))
    assert held(again) == {"S2": "unmapped"}
    assert again.stats.folders_walked == 0 and again.stats.header_files_read == 0

    now_mapped = run_discovery(cfg, again.new_state, mapping_result=mapped(("S1", "75"), ("S2", "75")))
    [reg] = now_mapped.registrations
    assert (reg.scan_id, reg.participant_label, reg.session_label) == ("S2", "0075", "02")
    assert reg.is_new_session and not reg.is_new_subject
    assert now_mapped.stats.folders_walked == 1 and now_mapped.stats.header_files_read == 12


def test_code_that_cleans_to_nothing_is_held_with_reason(cfg, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    result = run_discovery(cfg, None, mapping_result=mapped(("S1", "__")))
    assert held(result) == {"S1": "mapping_error"}  # the row is wrong, not missing
    assert "no letters or digits" in result.held[0].message


def test_invalid_session_rechecked_when_files_arrive(cfg, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 5)])
    mapping = mapped(("S1", "75"))
    first = run_discovery(cfg, None, mapping_result=mapping)
    [reg] = first.registrations
    assert not reg.protocol.valid and reg.protocol.message == "Session has 5 DICOM files (minimum: 10)"

    quiet = run_discovery(cfg, first.new_state, mapping_result=mapping)
    assert quiet.registrations == []

    make_session(incoming, "S1", [("FLAIR", 6)])  # a second series lands in the same folder
    fixed = run_discovery(cfg, quiet.new_state, mapping_result=mapping)
    [reg2] = fixed.registrations
    assert reg2.protocol.valid and reg2.protocol.message == "Session valid: 2 scan types found"
    assert (reg2.participant_label, reg2.session_label) == (reg.participant_label, reg.session_label)
    assert reg2.n_dicom == 11 and len(reg2.series) == 2


def test_corrupt_files_are_counted(cfg, incoming: Path) -> None:
    folder = make_session(incoming, "S1", [("T1", 12)])
    write_corrupt(folder / "001_T1" / "broken.dcm")
    write_corrupt(folder / "001_T1" / "cut.dcm", kind="truncated")
    (folder / "README.txt").write_text("not a candidate")
    [reg] = run_discovery(cfg, None, mapping_result=mapped(("S1", "75"))).registrations
    assert reg.n_dicom == 12 and reg.n_unreadable == 2
    assert sorted(e.split(":")[0] for e in reg.unreadable_examples) == ["001_T1/broken.dcm", "001_T1/cut.dcm"]
    assert reg.protocol.valid


def test_all_corrupt_folder_is_registered_with_failing_check(cfg, incoming: Path) -> None:
    folder = incoming / "S1"
    for i in range(3):
        write_corrupt(folder / f"f{i}.dcm")
    result = run_discovery(cfg, None, mapping_result=mapped(("S1", "75")))
    [reg] = result.registrations
    assert reg.n_dicom == 0 and reg.n_unreadable == 3 and reg.series == []
    assert not reg.protocol.valid
    assert reg.protocol.message == (
        "Session has 0 DICOM files (minimum: 10); 3 files are not readable DICOM (e.g. f0.dcm: not DICOM (no DICM "
        "preamble))"
    )


def test_empty_folder_is_held_until_files_arrive(cfg, incoming: Path) -> None:
    (incoming / "S1").mkdir()
    mapping = mapped(("S1", "75"))
    first = run_discovery(cfg, None, mapping_result=mapping)
    assert held(first) == {"S1": "no_dicom_yet"} and first.registrations == []
    second = run_discovery(cfg, first.new_state, mapping_result=mapping)
    assert held(second) == {"S1": "no_dicom_yet"} and second.stats.folders_walked == 0
    make_session(incoming, "S1", [("T1", 12)])
    third = run_discovery(cfg, second.new_state, mapping_result=mapping)
    assert [r.session_label for r in third.registrations] == ["01"]
    assert Registry(cfg.paths.state).lookup("S1") is not None


def test_hidden_folders_are_skipped(cfg, incoming: Path) -> None:
    make_session(incoming, ".S1.partial", [("T1", 12)])
    make_session(incoming, "S2", [("T1", 12)])
    make_session(incoming / "S2", ".thumbs", [("junk", 3)])
    result = run_discovery(cfg, None, mapping_result=mapped((".S1.partial", "75"), ("S2", "76")))
    assert list(by_scan(result)) == ["S2"] and result.held == []
    assert by_scan(result)["S2"].n_dicom == 12  # the hidden subfolder's files were not read
    assert result.stats.folders_seen == 1


def test_odd_folder_names_are_fine_as_scan_ids(tmp_path: Path, incoming: Path) -> None:
    odd = ["with space", "ünïcødé 扫描", "a|b", "c,d", "e;f'g\"h"]
    for name in odd:
        make_session(incoming, name, [("T1", 12)])
    csv_file = write_mapping_csv(tmp_path / "map.csv", {name: f"S-{i}" for i, name in enumerate(odd)})
    config = config_for(tmp_path, mapping={"csv_file": str(csv_file)})
    result = run_discovery(config, None)
    assert sorted(by_scan(result)) == sorted(odd)
    for reg in result.registrations:
        assert is_valid_label(reg.participant_label) and is_valid_label(reg.session_label)
    # The state survives the JSON cursor round trip and recognises every folder.
    state = decode_state(encode_state(result.new_state))
    again = run_discovery(config, state)
    assert again.registrations == [] and again.stats.folders_skipped == len(odd)
    assert Registry(config.paths.state).lookup("a|b").participant_id == "S2"  # letters: never zero-padded


def test_same_tick_ordinals_follow_acquisition_then_scan_id(cfg, incoming: Path) -> None:
    make_session(incoming, "A", [("T1", 12)], acq_date="20240120")
    make_session(incoming, "C", [("T1", 12)], acq_date="20240110")
    make_session(incoming, "B", [("T1", 12)], acq_date="20240110")
    make_session(incoming, "D", [("T1", 12)], acq_date="20240105")
    mapping = mapped(("A", "75"), ("B", "75"), ("C", "75"), ("D", "76"))
    result = run_discovery(cfg, None, mapping_result=mapping)
    got = {r.scan_id: (r.participant_label, r.session_label, r.is_new_subject) for r in result.registrations}
    assert got == {
        "B": ("0075", "01", True),
        "C": ("0075", "02", False),
        "A": ("0075", "03", False),
        "D": ("0076", "01", True),
    }
    assert by_scan(result)["B"].acquisition == "2024-01-10T14:30:00"


def test_labels_never_reassigned_and_mapping_change_is_held(cfg, incoming: Path) -> None:
    """A ScanID remapped after registration is held ("remapped"), every tick, until resolved."""
    make_session(incoming, "S1", [("T1", 12)])
    first = run_discovery(cfg, None, mapping_result=mapped(("S1", "75")))
    changed = run_discovery(cfg, first.new_state, mapping_result=mapped(("S1", "99")))
    assert changed.registrations == []
    [h] = changed.held
    assert (h.reason, h.registered, h.blocks) == ("remapped", "sub-0075 ses-01", True)
    assert "'S1'" in h.message and "sub-0075 ses-01" in h.message and "'99'" in h.message
    assert "participant label 0099" in h.message and "neuroflow rekey S1" in h.message
    quiet = run_discovery(cfg, changed.new_state, mapping_result=mapped(("S1", "99")))
    assert [x.reason for x in quiet.held] == ["remapped"] and quiet.stats.folders_walked == 0

    # Even when the folder changes, it is not re-reported under the old labels while in conflict.
    write_dicom(incoming / "S1" / "new.dcm", series_uid="7.7.7")
    reread = run_discovery(cfg, quiet.new_state, mapping_result=mapped(("S1", "99")))
    assert reread.registrations == [] and [x.reason for x in reread.held] == ["remapped"]
    assert Registry(cfg.paths.state).sessions_of("0099") == []
    # The mapping fixed back: the change is picked up under the registered labels.
    fixed = run_discovery(cfg, reread.new_state, mapping_result=mapped(("S1", "075")))
    [reg] = fixed.registrations
    assert (reg.participant_label, reg.session_label, reg.recruitment_id) == ("0075", "01", "75")
    assert fixed.held == []


def test_excluded_folders_are_held_never_registered(cfg, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    make_session(incoming, "S2", [("T1", 12)])
    result = run_discovery(cfg, None, mapping_result=mapped(("S1", "75"), ("S2", "75")), excluded={"S2"})
    assert list(by_scan(result)) == ["S1"]
    assert held(result) == {"S2": "excluded"}
    assert Registry(cfg.paths.state).lookup("S2") is None
    assert result.stats.folders_walked == 1


@pytest.mark.parametrize("participant_first", [True, False])
def test_subject_session_layout(tmp_path: Path, incoming: Path, participant_first: bool) -> None:
    config = config_for(tmp_path, discovery={"layout": "subject_session", "participant_first": participant_first})

    def leaf(subject: str, session: str) -> tuple[Path, str]:
        parts = (subject, session) if participant_first else (session, subject)
        return incoming / parts[0], parts[1]

    make_session(*leaf("CLM_L_01", "visit2"), [("T1", 12)], acq_date="20240301")
    make_session(*leaf("CLM_L_01", "visit1"), [("T1", 12)], acq_date="20240101")
    make_session(*leaf("75", "baseline"), [("T1", 12)])
    parent, name = leaf("75", "notes")
    (parent / name).mkdir(parents=True)
    (parent / name / "readme").write_text("no DICOM here")

    result = run_discovery(config, None)  # no mapping configured: the folder names the subject
    got = {(r.participant_label, r.session_label): (r.recruitment_id, r.mapping_source) for r in result.registrations}
    assert got == {
        ("CLML01", "01"): ("CLM_L_01", "folder"),
        ("CLML01", "02"): ("CLM_L_01", "folder"),
        ("0075", "01"): ("75", "folder"),
    }
    v1 = next(r for r in result.registrations if r.acquisition.startswith("2024-01-01"))
    assert v1.session_label == "01"
    assert v1.scan_id == ("CLM_L_01/visit1" if participant_first else "visit1/CLM_L_01")
    notes_id = "75/notes" if participant_first else "notes/75"
    assert held(result) == {notes_id: "no_dicom_yet"}
    assert "no readable DICOM among 1 files" in result.held[0].message
    assert result.warnings == []


def test_dry_run_writes_nothing_and_shows_the_labels(tmp_path: Path, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    csv_file = write_mapping_csv(tmp_path / "map.csv", {"S1": "75"})
    config = config_for(tmp_path, mapping={"csv_file": str(csv_file)})
    result = dry_run_discovery(config)
    [reg] = result.registrations
    assert (reg.participant_label, reg.session_label, reg.is_new_session) == ("0075", "01", True)
    assert not Registry(config.paths.state).path.exists()
    assert not cache_path(config).exists()

    run_discovery(config, None)
    make_session(incoming, "S2", [("T1", 12)])
    write_mapping_csv(tmp_path / "map.csv", {"S1": "75", "S2": "75"})
    preview = {r.scan_id: (r.session_label, r.is_new_session) for r in dry_run_discovery(config).registrations}
    assert preview == {"S1": ("01", False), "S2": ("02", True)}
    assert Registry(config.paths.state).lookup("S2") is None


def test_unavailable_mapping_holds_everything_and_says_why(tmp_path: Path, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    config = config_for(tmp_path, mapping={"csv_file": str(tmp_path / "gone.csv")})
    result = run_discovery(config, None)
    assert held(result) == {"S1": "unmapped"}
    assert "no mapping available" in result.held[0].message and "gone.csv" in result.held[0].message
    assert any("held as unmapped" in w for w in result.warnings)


def test_missing_incoming_keeps_the_state(cfg, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    first = run_discovery(cfg, None, mapping_result=mapped(("S1", "75")))
    incoming.rename(incoming.with_name("unmounted"))
    gone = run_discovery(cfg, first.new_state, mapping_result=mapped(("S1", "75")))
    assert gone.registrations == [] and gone.new_state == first.new_state
    assert "cannot list" in gone.warnings[0]


def test_removed_folder_leaves_the_state(cfg, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    make_session(incoming, "S2", [("T1", 12)])
    first = run_discovery(cfg, None, mapping_result=mapped(("S1", "75"), ("S2", "75")))
    (incoming / "S2").rename(incoming / ".S2.deleted")
    second = run_discovery(cfg, first.new_state, mapping_result=mapped(("S1", "75"), ("S2", "75")))
    # The registered folder's state is kept (it coming back unchanged changes nothing) and it is held.
    assert set(second.new_state["f"]) == {"S1", "S2"}
    assert held(second) == {"S2": "missing"}


def test_protocol_change_rechecks_registered_sessions(tmp_path: Path, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    config = config_for(tmp_path)
    first = run_discovery(config, None, mapping_result=mapped(("S1", "75")))
    assert first.registrations[0].protocol.valid
    stricter = config_for(tmp_path, protocol={"bids_conversion_min_files": 20})
    second = run_discovery(stricter, first.new_state, mapping_result=mapped(("S1", "75")))
    [reg] = second.registrations
    assert reg.protocol.message == "Session has 12 DICOM files (minimum: 20)"
    assert reg.session_label == "01" and not reg.is_new_session


def test_state_is_compact_json_and_bad_cursors_mean_full_scan(cfg, incoming: Path) -> None:
    make_session(incoming, "20240115_1430", [("T1", 12)])
    result = run_discovery(cfg, None, mapping_result=mapped(("20240115_1430", "75")))
    text = encode_state(result.new_state)
    assert json.loads(text) == result.new_state
    assert len(text) < 130
    assert decode_state(None) is None and decode_state("not json{") is None and decode_state("[1]") is None
    full = run_discovery(cfg, {"v": 999, "f": {}}, mapping_result=mapped(("20240115_1430", "75")))
    assert full.stats.folders_walked == 1 and len(full.registrations) == 1


def test_registry_lost_means_reregistration_from_scratch(cfg, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    first = run_discovery(cfg, None, mapping_result=mapped(("S1", "75")))
    Registry(cfg.paths.state).path.unlink()
    second = run_discovery(cfg, first.new_state, mapping_result=mapped(("S1", "75")))
    [reg] = second.registrations
    assert reg.is_new_session and Registry(cfg.paths.state).lookup("S1") is not None


def test_mapping_loaded_from_csv_when_not_given(tmp_path: Path, incoming: Path) -> None:
    make_session(incoming, "S1", [("T1", 12)])
    csv_file = write_mapping_csv(tmp_path / "map.csv", {"S1": "CLM_L_01"})
    config = config_for(tmp_path, mapping={"csv_file": str(csv_file)})
    result = run_discovery(config, None)
    [reg] = result.registrations
    assert reg.participant_label == "CLML01" and reg.recruitment_id == "CLM_L_01"
    assert reg.mapping_source == f"csv:{csv_file}" and result.mapping_source == f"csv:{csv_file}"
    csv_file.unlink()
    make_session(incoming, "S2", [("T1", 12)])
    later = run_discovery(config, result.new_state)
    assert any("cached mapping" in w for w in later.warnings)


def test_time_budget_defers_the_rest_to_later_ticks(cfg, incoming: Path) -> None:
    for name in ("S1", "S2", "S3"):
        make_session(incoming, name, [("T1", 12)])
    mapping = mapped(("S1", "75"), ("S2", "75"), ("S3", "75"))
    # Budget 0: one folder is still walked per tick (so a slow mapping cannot stall discovery).
    first = run_discovery(cfg, None, mapping_result=mapping, time_budget_s=0)
    assert [r.scan_id for r in first.registrations] == ["S1"]
    assert first.stats.folders_deferred == 2 and first.held == []
    assert "2 of 3 folders left for the next tick" in first.warnings[0]
    assert set(first.new_state["f"]) == {"S1"}
    rest = run_discovery(cfg, first.new_state, mapping_result=mapping)
    assert sorted(r.scan_id for r in rest.registrations) == ["S2", "S3"]
    assert [r.session_label for r in rest.registrations] == ["02", "03"]
    assert rest.stats.folders_deferred == 0 and rest.warnings == []
