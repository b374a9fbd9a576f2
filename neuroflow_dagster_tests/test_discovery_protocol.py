"""Protocol rules and the three messages (docs/domain-rules.md#protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroflow_dagster.config import ProtocolConfig
from neuroflow_dagster.discovery.protocol import SeriesInfo, check_protocol

# The example protocol of docs/domain-rules.md#protocol.
EXAMPLE = ProtocolConfig.model_validate(
    {
        "required_scans": [
            {
                "name": "T1w",
                "series_description_pattern": ".*T1.*MPRAGE.*|.*MPRAGE.*T1.*",
                "min_files": 170,
                "max_files": 220,
            },
            {"name": "FLAIR", "series_description_pattern": ".*FLAIR.*", "min_files": 40},
        ],
        "optional_scans": [
            {"name": "T2w", "series_description_pattern": ".*T2.*"},
            {"name": "DWI", "series_description_pattern": ".*DTI.*|.*DWI.*|.*diffusion.*", "min_files": 60},
        ],
    }
)


def s(description: str, n: int, uid: str | None = None) -> SeriesInfo:
    return SeriesInfo(uid=uid or f"1.2.{abs(hash(description)) % 10**8}", description=description, n_files=n)


def test_all_required_present_is_valid_and_counts_scan_types() -> None:
    series = [s("t1_mprage_sag", 176), s("FLAIR_ax", 48), s("ep2d_diffusion_64dir", 65), s("localizer", 3)]
    result = check_protocol(series, EXAMPLE)
    assert result.valid
    assert result.message == "Session valid: 3 scan types found"  # T1w, FLAIR, DWI (T2w absent)
    by_name = {m.name: m for m in result.matches}
    assert by_name["T1w"].satisfied and by_name["T1w"].matched_series == ["t1_mprage_sag"]
    assert not by_name["T2w"].satisfied and not by_name["T2w"].required
    assert result.n_dicom == 176 + 48 + 65 + 3


def test_missing_required_scans_message_lists_names_in_config_order() -> None:
    result = check_protocol([s("localizer", 3), s("DTI_30", 61)], EXAMPLE)
    assert not result.valid
    assert result.message == "Missing required scans: T1w, FLAIR"
    assert result.missing == ["T1w", "FLAIR"]


def test_file_count_out_of_range_does_not_satisfy() -> None:
    too_many = check_protocol([s("T1_MPRAGE", 300), s("FLAIR", 40)], EXAMPLE)
    assert too_many.message == "Missing required scans: T1w"
    detail = next(m for m in too_many.matches if m.name == "T1w").detail
    assert "300" in detail and "170-220" in detail
    too_few = check_protocol([s("T1_MPRAGE", 200), s("FLAIR", 39)], EXAMPLE)
    assert too_few.message == "Missing required scans: FLAIR"
    # A second, complete repeat of the series satisfies the rule.
    repeated = check_protocol([s("T1_MPRAGE", 20, "1"), s("T1_MPRAGE", 176, "2"), s("FLAIR", 40)], EXAMPLE)
    assert repeated.valid


def test_patterns_are_case_insensitive_and_anchored_at_start() -> None:
    proto = ProtocolConfig.model_validate({"required_scans": [{"name": "DWI", "series_description_pattern": "dwi"}]})
    assert check_protocol([s("DWI_b1000", 1)], proto).valid
    assert check_protocol([s("dWi", 1)], proto).valid
    # re.match: "dwi" must be at the start, so "ep2d_dwi" does not match.
    assert check_protocol([s("ep2d_dwi", 1)], proto).message == "Missing required scans: DWI"


def test_no_required_scans_uses_file_minimum() -> None:
    proto = ProtocolConfig(bids_conversion_min_files=10)
    few = check_protocol([s("anything", 4), s("other", 5)], proto)
    assert not few.valid and few.message == "Session has 9 DICOM files (minimum: 10)"
    enough = check_protocol([s("anything", 4), s("other", 6)], proto)
    assert enough.valid and enough.message == "Session valid: 2 scan types found"


def test_zero_dicom_is_never_valid() -> None:
    assert check_protocol([], ProtocolConfig(bids_conversion_min_files=0)).message == (
        "Session has 0 DICOM files (minimum: 0)"
    )
    zero_min = ProtocolConfig.model_validate(
        {"required_scans": [{"name": "Any", "series_description_pattern": ".*", "min_files": 0}]}
    )
    result = check_protocol([], zero_min)
    assert not result.valid and result.message == "Missing required scans: Any"


def test_unknown_description_default_matches_only_broad_rules() -> None:
    proto = ProtocolConfig.model_validate({"required_scans": [{"name": "T1w", "series_description_pattern": "T1"}]})
    assert check_protocol([SeriesInfo(uid="1", n_files=5)], proto).message == "Missing required scans: T1w"


def test_a_failure_counts_the_files_that_are_not_readable_dicom(tmp_path: Path, make_config: Any) -> None:
    """The demo's corrupt session: 12 files, none readable DICOM. The verdict says so, read from the real
    files by the real header reader, not "0 DICOM files" as if the folder were empty."""
    from neuroflow_dagster.demo.synth import write_corrupt_files
    from neuroflow_dagster.discovery.status_report import recheck_protocol

    folder = tmp_path / "dicom" / "20240305_0800"
    write_corrupt_files(folder, 12)
    result = recheck_protocol(make_config(), folder)
    assert not result.valid
    assert result.message.startswith("Session has 0 DICOM files (minimum: 10); 12 files are not readable DICOM (e.g. ")
    assert "corrupt_0000.dcm" in result.message
    one = check_protocol([s("T1", 3)], ProtocolConfig(bids_conversion_min_files=10), 3, 1, ["x.dcm: corrupt"])
    assert one.message == "Session has 3 DICOM files (minimum: 10); 1 file is not readable DICOM (e.g. x.dcm: corrupt)"
    assert check_protocol([s("T1", 12)], ProtocolConfig(bids_conversion_min_files=10), 12, 5).valid
