"""The real BIDS validator on converted sessions: pass, fail with the error code, and crashes that are
never a pass. The crash cases use stand-in executables because the real validator cannot be made to
crash on demand; everything else runs the real bids-validator-deno."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from neuroflow_dagster.bids import validator
from neuroflow_dagster.demo import synth

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory, convert) -> Path:
    """A synthetic T1w + DWI session converted once by the real HeudiConv (and curated); tests work on copies."""
    from neuroflow_dagster.config import NeuroflowConfig

    root = tmp_path_factory.mktemp("val")
    session = synth.write_session(root / "dicom" / "s1", seed=11)
    config = NeuroflowConfig.model_validate(
        {"paths": {k: str(root / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}}
    )
    staging = root / "stage"
    convert(config, session.folder, staging, "01", "1")
    return staging


@pytest.fixture
def staged(converted: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "stage"
    shutil.copytree(converted, copy)
    for p in copy.rglob("*"):  # HeudiConv leaves converted files read-only
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return copy


def test_converted_session_passes(staged: Path) -> None:
    report = validator.validate_session(staged, "01", "1")
    assert report.passed and report.errors == []
    assert report.command[0].endswith("bids-validator-deno")
    assert report.command[1:4] == ["--format", "json", "--outfile"]
    assert 0 < report.duration_s < 60
    assert report.summary().startswith("BIDS valid: 0 error")
    meta = report.as_metadata()
    assert meta["error_codes"] == "none" and meta["n_errors"] == 0
    json.dumps(meta)  # JSON-able


def test_missing_bvec_fails_with_its_code(staged: Path) -> None:
    dwi = staged / "sub-01" / "ses-1" / "dwi"
    (dwi / "sub-01_ses-1_dir-AP_dwi.bvec").unlink()
    report = validator.validate_session(staged, "01", "1")
    assert not report.passed
    assert report.exit_code == validator.EXIT_ISSUES
    assert "DWI_MISSING_BVEC" in report.error_codes
    issue = next(i for i in report.errors if i.code == "DWI_MISSING_BVEC")
    assert issue.files == ("/sub-01/ses-1/dwi/sub-01_ses-1_dir-AP_dwi.nii.gz",)
    assert "DWI_MISSING_BVEC" in report.summary()


def test_non_bids_file_name_fails(staged: Path) -> None:
    anat = staged / "sub-01" / "ses-1" / "anat"
    for f in anat.glob("sub-01_ses-1_T1w.*"):
        f.rename(anat / f.name.replace("_T1w", "_T1weighted"))
    report = validator.validate_session(staged, "01", "1")
    assert not report.passed
    assert "NOT_INCLUDED" in report.error_codes
    issue = next(i for i in report.errors if i.code == "NOT_INCLUDED")
    assert issue.count == 2 and all("T1weighted" in f for f in issue.files)


def test_empty_session_is_not_a_pass(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    (stage / "sub-01" / "ses-1").mkdir(parents=True)
    report = validator.validate_session(stage, "01", "1")  # also writes the missing dataset_description
    assert (stage / "dataset_description.json").is_file()
    assert not report.passed and report.error_codes == [validator.SESSION_EMPTY]


def test_staged_dir_without_dataset_description_gets_a_minimal_one(staged: Path) -> None:
    (staged / "dataset_description.json").unlink()
    report = validator.validate_session(staged, "01", "1")
    assert report.passed, report.summary()


def _fake_validator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    script = tmp_path / "fake-bids-validator"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    monkeypatch.setattr(validator, "find_executable", lambda: str(script))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("echo 'error: Uncaught (in promise) NotFound' >&2; exit 1", "crashed on .*exit code 1.*Uncaught"),
        ("exit 0", "no readable JSON report"),
        ('echo "{not json" > "$4"; exit 0', "no readable JSON report"),
        ('echo \'{"issues": {"issues": []}}\' > "$4"; exit 16', "reported no error"),
        ("sleep 5", "did not finish within"),
    ],
)
def test_validator_crash_is_an_error_not_a_pass(
    staged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, message: str
) -> None:
    _fake_validator(tmp_path, monkeypatch, body)
    with pytest.raises(validator.ValidatorError, match=message):
        validator.validate_dataset(staged, timeout_s=1.0)


def test_missing_dataset_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(validator.ValidatorError, match="not a folder"):
        validator.validate_dataset(tmp_path / "nope")


def test_parse_issues_groups_by_code_and_caps_examples() -> None:
    raw = {
        "issues": {
            "issues": [
                *({"code": "X", "severity": "error", "location": f"/f{i}"} for i in range(8)),
                {"code": "K", "subCode": "EchoTime", "severity": "warning", "location": "/a"},
                {"code": "K", "subCode": "FlipAngle", "severity": "warning", "location": "/a"},
                {"code": "M", "severity": "error", "affects": ["/dataset_description.json"]},
            ],
            "codeMessages": {"X": "an X happened"},
        }
    }
    errors, warnings = validator.parse_issues(raw)
    assert [(i.code, i.count) for i in errors] == [("X", 8), ("M", 1)]
    assert errors[0].files == tuple(f"/f{i}" for i in range(5)) and errors[0].message == "an X happened"
    assert errors[1].files == ("/dataset_description.json",)
    assert sorted((i.code, i.sub_code) for i in warnings) == [("K", "EchoTime"), ("K", "FlipAngle")]
    with pytest.raises(validator.ValidatorError):
        validator.parse_issues({"summary": {}})
