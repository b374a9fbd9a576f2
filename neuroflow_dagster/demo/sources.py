"""Real scanner DICOM that ships inside installed pip packages, laid out as session folders.

Why: no network here, yet the conversion must be shown on real scanner
output, not only on our own synthetic files. Two packages carry some:

* ``heudiconv/tests/data/b0dwiForFmap``: Siemens Prisma, real human brain
  DWI, 3 mosaic files (b = 5, 5, 1500), one direction, 11.8 MB;
* ``nibabel/nicom/tests/data``: Siemens DWI b0 and b1000 (one series, two
  mosaic files, pixels zeroed) and a Philips enhanced multi-frame MPRAGE
  (176 frames, pixels zeroed); gzip-compressed, decompressed on copy.

Files are copied (never linked, never written in site-packages), so a demo
or test session folder can be deleted or modified freely.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom


class SourceNotAvailable(FileNotFoundError):
    """The package that carries these files is not installed (or ships without its test data)."""


@dataclass(frozen=True)
class RealSource:
    package: str
    subdir: str
    files: tuple[str, ...]  # glob patterns inside subdir; *.gz are decompressed on copy
    description: str


SOURCES: dict[str, RealSource] = {
    "b0dwiForFmap": RealSource(
        "heudiconv",
        "tests/data/b0dwiForFmap",
        ("*.dcm",),
        "Siemens Prisma real brain DWI, 3 volumes (b=5,5,1500), one direction (series dMRI_mb3_AP_1.5)",
    ),
    "nibabel_dwi": RealSource(
        "nibabel",
        "nicom/tests/data",
        ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz"),
        "Siemens DWI b0 + b1000, one series (CBU_DTI_64D_1A), mosaic, pixels zeroed",
    ),
    "nibabel_mprage": RealSource(
        "nibabel",
        "nicom/tests/data",
        ("philips_mprage.dcm.gz",),
        "Philips enhanced multi-frame T1 MPRAGE (series MPRAGE_S2), 176 frames, pixels zeroed",
    ),
}
# Composite sessions: several sources in one folder (different StudyInstanceUIDs, as real exports can be).
COMPOSITES: dict[str, tuple[str, ...]] = {"nibabel": ("nibabel_dwi", "nibabel_mprage")}


def package_dir(package: str) -> Path:
    """Installed location of a package, without importing it (importing nibabel/heudiconv is slow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceNotAvailable(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def source_files(which: str) -> list[Path]:
    """The files of a named source, in a stable order; raises SourceNotAvailable if absent."""
    if which not in SOURCES:
        raise KeyError(f"unknown real DICOM source {which!r}; known: {sorted([*SOURCES, *COMPOSITES])}")
    src = SOURCES[which]
    folder = package_dir(src.package) / src.subdir
    files = sorted({p for pattern in src.files for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise SourceNotAvailable(f"{folder} has no {', '.join(src.files)} (package without test data?)")
    return files


def available() -> dict[str, str]:
    """Names of the sources usable on this machine -> description."""
    out: dict[str, str] = {}
    for name, src in SOURCES.items():
        try:
            source_files(name)
        except SourceNotAvailable:
            continue
        out[name] = src.description
    for name, parts in COMPOSITES.items():
        if all(p in out for p in parts):
            out[name] = " + ".join(out[p] for p in parts)
    return out


def copy_real_session(dest: str | os.PathLike[str], which: str = "b0dwiForFmap") -> list[Path]:
    """Copy (decompressing .gz) a real source, or a composite of several, into ``dest``; return the files.

    ``dest`` is created; existing files with the same names are replaced.
    Names are prefixed with the source name so composites never collide.
    """
    names = COMPOSITES.get(which, (which,))
    out_dir = Path(dest)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in names:
        for path in source_files(name):
            if path.suffix == ".gz":
                target = out_dir / f"{name}_{path.name[: -len('.gz')]}"
                with gzip.open(path, "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            else:
                target = out_dir / f"{name}_{path.name}"
                shutil.copyfile(path, target)
            written.append(target)
    return written


@dataclass(frozen=True)
class Study:
    """Who and when a real series belongs to, so that synthetic series can join its session."""

    patient_id: str
    study_uid: str
    acquired: datetime


def study_of(path: str | os.PathLike[str]) -> Study:
    """PatientID, StudyInstanceUID and acquisition time of a DICOM file (header only)."""
    head = pydicom.dcmread(path, stop_before_pixels=True,
                           specific_tags=["PatientID", "StudyInstanceUID", "AcquisitionDate", "AcquisitionTime"])
    when = datetime.strptime(f"{head.AcquisitionDate}{str(head.AcquisitionTime)[:6]}", "%Y%m%d%H%M%S")
    return Study(str(head.PatientID), str(head.StudyInstanceUID), when)
