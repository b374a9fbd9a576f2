"""Build fake DICOM session trees for the discovery tests and the discovery benchmark.

Files are real (small) DICOM written by pydicom: Part 10 preamble + file meta, MR Image Storage, a 4x4
pixel array, and the header fields discovery reads. One dataset is serialised per series and its bytes
reused for the other files of that series (only SeriesInstanceUID matters to discovery), which keeps
building 100,000 files for the benchmark to seconds.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


@dataclass(frozen=True)
class SeriesSpec:
    description: str
    n_files: int
    number: int = 1


def dicom_bytes(
    *,
    series_uid: str,
    description: str | None = "T1_MPRAGE",
    series_number: int = 1,
    instance_number: int = 1,
    acq_date: str = "20240115",
    acq_time: str = "143000",
    modality: str = "MR",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    patient_id: str = "anon",
) -> bytes:
    """One small, valid DICOM file as bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    if description is not None:
        ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.PatientID = patient_id
    ds.StudyDate = acq_date
    ds.StudyTime = acq_time
    ds.AcquisitionDate = acq_date
    ds.AcquisitionTime = acq_time
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(16, dtype=np.uint16).reshape(4, 4).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_dicom(path: Path, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("series_uid", generate_uid())
    path.write_bytes(dicom_bytes(**kwargs))
    return path


def make_session(
    root: Path,
    name: str,
    series: Iterable[SeriesSpec | tuple[str, int]] = (("T1_MPRAGE", 12),),
    *,
    nested: bool = True,
    acq_date: str = "20240115",
    acq_time: str = "143000",
    suffix: str = ".dcm",
) -> Path:
    """A session folder ``root/name`` with one subfolder per series (``nested``) or all files flat."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(series, start=1):
        if isinstance(spec, tuple):
            spec = SeriesSpec(spec[0], spec[1], i)
        target = folder / f"{spec.number:03d}_{_safe(spec.description)}" if nested else folder
        target.mkdir(exist_ok=True)
        data = dicom_bytes(
            series_uid=generate_uid(),
            description=spec.description,
            series_number=spec.number,
            acq_date=acq_date,
            acq_time=acq_time,
        )
        for j in range(1, spec.n_files + 1):
            (target / f"s{spec.number:03d}_i{j:04d}{suffix}").write_bytes(data)
    return folder


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text) or "series"


def write_corrupt(path: Path, kind: str = "garbage") -> Path:
    """A file discovery must count as unreadable: random bytes, or a DICOM cut inside its header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        path.write_bytes(b"this is not a DICOM file\n" * 8)
    elif kind == "truncated":
        data = dicom_bytes(series_uid=generate_uid())
        path.write_bytes(data[:200])  # preamble + DICM + part of the file meta
    else:
        raise ValueError(kind)
    return path


def set_tree_mtime(folder: Path, when: float) -> None:
    """Set st_mtime of a folder, its subfolders and files (ctime stays the real creation time)."""
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            os.utime(Path(dirpath) / name, (when, when))
    for dirpath, dirnames, _ in os.walk(folder, topdown=False):
        for name in dirnames:
            os.utime(Path(dirpath) / name, (when, when))
    os.utime(folder, (when, when))


def config_for(tmp: Path, **sections: Any):
    """A NeuroflowConfig rooted in ``tmp`` (incoming, state, ...); ``sections`` are merged in."""
    from neuroflow_dagster.config import NeuroflowConfig

    data: dict[str, Any] = {
        "paths": {
            "dicom_incoming": str(tmp / "incoming"),
            "bids_root": str(tmp / "bids"),
            "derivatives": str(tmp / "derivatives"),
            "work_dir": str(tmp / "work"),
            "log_dir": str(tmp / "logs"),
        },
        "discovery": {"stability_wait_minutes": 0},
        "protocol": {"bids_conversion_min_files": 10},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    (tmp / "incoming").mkdir(parents=True, exist_ok=True)
    return NeuroflowConfig.model_validate(data)


def write_mapping_csv(
    path: Path, rows: dict[str, str], scan_col: str = "ScanID", subj_col: str = "SubjectCode"
) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([scan_col, subj_col])
        for scan, subj in rows.items():
            w.writerow([scan, subj])
    return path
