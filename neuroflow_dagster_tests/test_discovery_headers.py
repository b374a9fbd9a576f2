"""The lean header reader against pydicom, field by field, on every real DICOM file we have.

Real files: pydicom's own test and character-set data, HeudiConv's and nibabel's test data (real
scanner exports: Siemens, GE, Philips; implicit and explicit VR; compressed transfer syntaxes; big
endian and deflated ones the lean reader hands back to pydicom), plus this project's synthetic
sessions. For each file the lean reader either declines (None: pydicom reads it) or must give
exactly what discovery would take from pydicom.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from neuroflow_dagster.discovery import headers, scanner
from neuroflow_dagster.discovery.scanner import HEADER_TAGS

SITE = Path(pytest.importorskip("pydicom").__file__).resolve().parent.parent
SOURCES = [
    SITE / "pydicom" / "data",
    SITE / "heudiconv" / "tests" / "data",
    SITE / "nibabel" / "nicom" / "tests" / "data",
    SITE / "nibabel" / "tests" / "data",
    SITE / "nipype" / "testing" / "data",
]


def pydicom_fields(path: Path) -> dict[str, object] | None:
    """What discovery takes from pydicom for one file (None: pydicom cannot read it as Part 10)."""
    import pydicom

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except Exception:  # not readable as Part 10 (or corrupt): not a comparison case
            return None
    return derived(ds)


def derived(ds: object) -> dict[str, object]:
    get = ds.get  # type: ignore[attr-defined]
    return {
        "uid": scanner._text(get("SeriesInstanceUID")),
        "description": scanner._text(get("SeriesDescription")),
        "number": scanner._series_number(get("SeriesNumber")),
        "image_type": scanner._text(get("ImageType")),
        "modality": scanner._text(get("Modality")),
        "acquisition": scanner._acquisition(ds),
    }


def real_files() -> list[Path]:
    found = []
    for root in SOURCES:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix.lower() not in {".py", ".pyc", ".gz", ".bz2", ".txt", ".json", ".nii"}:
                with path.open("rb") as fh:
                    head = fh.read(132)
                if head[128:132] == b"DICM":
                    found.append(path)
    return found


FILES = real_files()


def test_there_are_many_real_files_to_compare() -> None:
    assert len(FILES) >= 80, FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SITE)))
def test_lean_reader_agrees_with_pydicom(path: Path) -> None:
    expected = pydicom_fields(path)
    lean = headers.read_header_fields(path)
    if lean is None:
        return  # declined: discovery reads this file with pydicom
    assert expected is not None, "pydicom cannot read it, the lean reader did"
    assert derived(lean) == expected


def test_most_real_files_take_the_lean_path() -> None:
    """Declining everything would pass the comparison above: the lean path must actually be used."""
    lean = [p for p in FILES if headers.read_header_fields(p) is not None]
    assert len(lean) >= 0.8 * len(FILES), sorted(set(FILES) - set(lean))


def test_synthetic_session_agrees(tmp_path: Path) -> None:
    from neuroflow_dagster.demo import synth

    session = synth.write_session(tmp_path / "s", seed=3, n_directions=6)
    files = sorted(p for p in session.folder.rglob("*") if p.is_file())
    assert files
    for path in files:
        lean = headers.read_header_fields(path)
        assert lean is not None, path
        assert derived(lean) == pydicom_fields(path)


def test_declines_what_it_does_not_handle(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.write_bytes(b"\x08\x00\x60\x00\x02\x00\x00\x00MR")  # implicit VR dataset without preamble
    assert headers.read_header_fields(bare) is None
    truncated = tmp_path / "truncated.dcm"
    source = next(p for p in FILES if headers.read_header_fields(p) is not None)
    data = source.read_bytes()
    truncated.write_bytes(data[:200])
    assert headers.read_header_fields(truncated) is None
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert headers.read_header_fields(empty) is None


def test_read_headers_gives_the_same_summary_either_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scanner's session summary is identical with the lean reader and with pydicom alone."""
    from neuroflow_dagster.demo import synth

    synth.write_session(tmp_path / "s", seed=5, n_directions=6)
    files = sorted(p for p in (tmp_path / "s").rglob("*") if p.is_file())
    (tmp_path / "s" / "junk.dcm").write_bytes(b"not dicom")
    files.append(tmp_path / "s" / "junk.dcm")
    to_pydicom: list[str] = []
    original = scanner._pydicom_dataset

    def counted(path: Path) -> object:
        to_pydicom.append(path.name)
        return original(path)

    monkeypatch.setattr(scanner, "_pydicom_dataset", counted)
    lean = scanner.read_headers(files, root=tmp_path / "s")
    assert to_pydicom == ["junk.dcm"]  # every real file took the lean path
    monkeypatch.setattr(scanner, "read_header_fields", lambda path: None)
    plain = scanner.read_headers(files, root=tmp_path / "s")
    assert len(to_pydicom) == 1 + len(files)
    assert lean == plain
    assert lean.n_dicom == len(files) - 1 and lean.n_unreadable == 1
