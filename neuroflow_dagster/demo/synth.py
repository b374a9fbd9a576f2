"""Synthetic MRI sessions as classic DICOM, with a diffusion phantom whose tensor is known.

Why: the real DICOM shipped in pip packages has either one diffusion
direction (HeudiConv's b0dwiForFmap) or zeroed pixels (nibabel's), so nothing
downstream of conversion (bval/bvec conventions, a DTI fit, QSIPrep-shaped
stand-ins) could be checked against a truth. This module writes, with
pydicom only and in well under a second, a session folder the way a scanner
export looks: one file per slice (per volume), classic MR Image Storage,
shared SeriesInstanceUID per series, increasing InstanceNumber, standard
diffusion tags (0018,9087) DiffusionBValue and (0018,9089)
DiffusionGradientOrientation in the patient (LPS) frame, PatientPosition HFS,
Manufacturer SIEMENS (with Manufacturer GE and only standard tags dcm2niix
flips the bvec x/y signs; enhanced multi-frame + SIEMENS writes no bval/bvec,
so neither is used here).

The phantom: a cylinder (axis along the patient z axis, radius 5 voxels) of a
single prolate tensor, eigenvalues (1.7, 0.3, 0.3) x 1e-3 mm^2/s (FA 0.799),
principal direction ``FIBER_DIRECTION_LPS`` (oblique on purpose, so any flip
of one axis is detectable), inside isotropic "tissue" (D = 0.9e-3, FA 0).
Everything, including UIDs, is a function of ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

FIBER_DIRECTION_LPS = np.array([0.6, 0.64, 0.48])  # unit vector, patient LPS frame
FIBER_EVALS = (1.7e-3, 0.3e-3, 0.3e-3)
TISSUE_DIFFUSIVITY = 0.9e-3
CYLINDER_RADIUS_VOXELS = 5.0


def fractional_anisotropy(evals: Sequence[float]) -> float:
    """FA of a tensor from its eigenvalues (the phantom's truth)."""
    ev = np.asarray(evals, dtype=float)
    md = ev.mean()
    return float(math.sqrt(1.5) * np.linalg.norm(ev - md) / np.linalg.norm(ev))


TRUE_FA = fractional_anisotropy(FIBER_EVALS)


@dataclass(frozen=True)
class SeriesPlan:
    """What one synthetic series looks like to a scanner export (and to the heuristic)."""

    description: str
    image_type: tuple[str, ...]
    kind: str  # "dwi" | "anat"
    orientation: tuple[float, ...]  # ImageOrientationPatient
    rows: int = 16
    columns: int = 16
    slices: int = 8
    spacing_mm: float = 2.0
    repetition_time_ms: float = 3000.0
    echo_time_ms: float = 90.0
    scanning_sequence: str = "EP"
    acquisition_type: str = "2D"
    phase_positive: bool = False  # phase encoding polarity along the column axis (AP: False, PA: True)


_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

# Series kinds write_session knows; the names are what HeudiConv's heuristic sees.
SERIES: dict[str, SeriesPlan] = {
    "localizer": SeriesPlan(
        "AAHead_Scout_32ch-head-coil",
        ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"),
        "anat",
        _SAGITTAL,
        rows=16,
        columns=16,
        slices=3,
        spacing_mm=4.0,
        repetition_time_ms=8.6,
        echo_time_ms=4.0,
        scanning_sequence="GR",
    ),
    "t1w": SeriesPlan(
        "T1_MPRAGE_SAG",
        ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"),
        "anat",
        _SAGITTAL,
        rows=24,
        columns=24,
        slices=8,
        spacing_mm=2.0,
        repetition_time_ms=2300.0,
        echo_time_ms=2.98,
        scanning_sequence="GR\\IR",
        acquisition_type="3D",
    ),
    "t2w": SeriesPlan(
        "t2_spc_sag_p2_iso",
        ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"),
        "anat",
        _SAGITTAL,
        rows=24,
        columns=24,
        slices=8,
        repetition_time_ms=3200.0,
        echo_time_ms=409.0,
        scanning_sequence="SE",
        acquisition_type="3D",
    ),
    "flair": SeriesPlan(
        "t2_FLAIR_ax",
        ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"),
        "anat",
        _AXIAL,
        rows=24,
        columns=24,
        slices=8,
        repetition_time_ms=9000.0,
        echo_time_ms=81.0,
        scanning_sequence="SE\\IR",
    ),
    "dwi": SeriesPlan("ep2d_diff_DTI_AP", ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND"), "dwi", _AXIAL),
    "dwi_b0_pa": SeriesPlan(
        "ep2d_diff_b0_PA",
        ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND"),
        "dwi",
        _AXIAL,
        phase_positive=True,
    ),
    "adc": SeriesPlan(
        "ep2d_diff_DTI_AP_ADC", ("DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"), "anat", _AXIAL
    ),
}
DEFAULT_SERIES = ("t1w", "dwi")


@dataclass(frozen=True)
class WrittenSeries:
    kind: str
    description: str
    series_uid: str
    series_number: int
    files: tuple[Path, ...]
    volumes: int


@dataclass(frozen=True)
class DwiTruth:
    """What the diffusion series encodes: per volume b-value and LPS unit gradient (zeros for b=0)."""

    bvals: np.ndarray
    bvecs_lps: np.ndarray
    fiber_direction_lps: np.ndarray
    fiber_evals: tuple[float, float, float]
    fa: float
    shape: tuple[int, int, int]  # columns (x), rows (y), slices (z), as dcm2niix writes them


@dataclass(frozen=True)
class SynthSession:
    folder: Path
    study_uid: str
    patient_id: str
    acquired: datetime
    series: dict[str, WrittenSeries] = field(default_factory=dict)
    dwi: DwiTruth | None = None

    @property
    def n_files(self) -> int:
        return sum(len(s.files) for s in self.series.values())


def hemisphere_directions(n: int) -> np.ndarray:
    """n well-spread unit vectors (Fibonacci spiral on the upper hemisphere); deterministic in n."""
    if n < 6:
        raise ValueError(f"a tensor needs at least 6 diffusion directions, got {n}")
    i = np.arange(n) + 0.5
    z = 1.0 - i / n  # (0, 1]: upper hemisphere
    r = np.sqrt(1.0 - z * z)
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=["neuroflow-synth", str(seed), *(str(p) for p in parts)])


def _geometry(plan: SeriesPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction, slice normal and first-slice corner (centred on the origin)."""
    row_dir = np.array(plan.orientation[:3])
    col_dir = np.array(plan.orientation[3:])
    normal = np.cross(row_dir, col_dir)
    s = plan.spacing_mm
    corner = -(row_dir * (plan.columns - 1) + col_dir * (plan.rows - 1) + normal * (plan.slices - 1)) * s / 2
    return row_dir, col_dir, normal, corner


def _positions(plan: SeriesPlan) -> np.ndarray:
    """Patient (LPS) coordinates of every voxel: array (slices, rows, columns, 3)."""
    row_dir, col_dir, normal, corner = _geometry(plan)
    s = plan.spacing_mm
    k, r, c = np.meshgrid(
        np.arange(plan.slices), np.arange(plan.rows), np.arange(plan.columns), indexing="ij"
    )
    return corner + s * (c[..., None] * row_dir + r[..., None] * col_dir + k[..., None] * normal)


def _fiber_tensor() -> np.ndarray:
    d = FIBER_DIRECTION_LPS / np.linalg.norm(FIBER_DIRECTION_LPS)
    helper = np.array([0.0, 0.0, 1.0]) if abs(d[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e2 = np.cross(d, helper)
    e2 /= np.linalg.norm(e2)
    e3 = np.cross(d, e2)
    basis = np.stack([d, e2, e3], axis=1)
    return basis @ np.diag(FIBER_EVALS) @ basis.T


def _dwi_volumes(
    plan: SeriesPlan, bvals: np.ndarray, bvecs: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Signal (volumes, slices, rows, columns) of the cylinder phantom, S = S0 exp(-b g^T D g)."""
    pos = _positions(plan)
    radius = np.hypot(pos[..., 0], pos[..., 1])
    inside = radius <= CYLINDER_RADIUS_VOXELS * plan.spacing_mm
    tensor = _fiber_tensor()
    adc_fiber = np.einsum("vi,ij,vj->v", bvecs, tensor, bvecs)
    s0 = np.where(inside, 1000.0, 600.0)
    out = np.empty((len(bvals), *inside.shape))
    for v, (b, adc) in enumerate(zip(bvals, adc_fiber, strict=True)):
        out[v] = np.where(inside, s0 * math.exp(-b * adc), s0 * math.exp(-b * TISSUE_DIFFUSIVITY))
    out += rng.normal(0.0, 1.0, size=out.shape)
    return np.clip(np.rint(out), 0, 4095)


def _anat_volume(plan: SeriesPlan, rng: np.random.Generator) -> np.ndarray:
    """An ellipsoid 'head' with a brighter core: enough contrast to look like an image."""
    pos = _positions(plan)
    half = np.array([plan.columns, plan.rows, plan.slices]).max() * plan.spacing_mm / 2
    rr = np.sqrt((pos**2).sum(axis=-1)) / half
    vol = np.where(rr < 0.9, 400.0, 20.0) + np.where(rr < 0.5, 300.0, 0.0)
    vol += rng.normal(0.0, 5.0, size=vol.shape)
    return np.clip(np.rint(vol), 0, 4095)[None]


def _base_dataset(
    seed: int, session: SynthSession, plan: SeriesPlan, series_uid: str, number: int
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "Prisma_fit"
    ds.InstitutionName = "Neuroflow Synthetic Brain Bank"
    ds.StationName = "SYNTH01"
    ds.DeviceSerialNumber = "0000"
    ds.SoftwareVersions = "syngo MR XA30"
    ds.MagneticFieldStrength = 3
    ds.PatientName = f"SYNTH^{session.patient_id}"
    ds.PatientID = session.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientAge = "070Y"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = session.study_uid
    ds.StudyID = "1"
    ds.StudyDescription = "NEUROFLOW^SYNTH"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = session.acquired.strftime("%Y%m%d")
    ds.StudyTime = session.acquired.strftime("%H%M%S")
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = plan.description
    ds.ProtocolName = plan.description
    ds.FrameOfReferenceUID = _uid(seed, "frame")
    ds.ImageType = list(plan.image_type)
    ds.ScanningSequence = plan.scanning_sequence
    ds.SequenceVariant = "SK\\SP"
    ds.ScanOptions = "PFP\\FS" if plan.kind == "dwi" else ""
    ds.MRAcquisitionType = plan.acquisition_type
    ds.SequenceName = "ep_b" if plan.kind == "dwi" else "tfl3d1_16ns"
    ds.RepetitionTime = plan.repetition_time_ms
    ds.EchoTime = plan.echo_time_ms
    ds.FlipAngle = 90 if plan.kind == "dwi" else 9
    ds.ImagingFrequency = 123.25
    ds.ImagedNucleus = "1H"
    ds.EchoTrainLength = plan.rows if plan.kind == "dwi" else 1
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.AcquisitionMatrix = [0, plan.columns, plan.rows, 0]
    ds.PixelBandwidth = 1500
    ds.SliceThickness = plan.spacing_mm
    ds.SpacingBetweenSlices = plan.spacing_mm
    ds.PixelSpacing = [plan.spacing_mm, plan.spacing_mm]
    ds.ImageOrientationPatient = list(plan.orientation)
    ds.Rows = plan.rows
    ds.Columns = plan.columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if plan.kind == "dwi":
        # Siemens XA private tags dcm2niix reads for PhaseEncodingDirection polarity and
        # TotalReadoutTime (the validator requires both on an _epi field map).
        ds.private_block(0x0021, "SIEMENS MR SDS 01", create=True)
        ds.add_new(0x0021111C, "IS", 1 if plan.phase_positive else 0)
        ds.add_new(0x00211153, "FD", 20.0)
    return ds


def _encode(ds: Dataset) -> dict[int, bytes]:
    """Each element of ``ds`` encoded once (explicit VR little endian), keyed by tag."""
    out: dict[int, bytes] = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_data_element(fp, elem)
        out[int(elem.tag)] = fp.getvalue()
    return out


def _file_bytes(shared: dict[int, bytes], own: Dataset) -> bytes:
    """A Part-10 file: preamble, 'DICM', file meta, then shared + own elements in tag order.

    Encoding the ~70 elements every slice shares once per series, instead of
    through ``save_as`` per file, is what keeps a session under a second.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = own.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    elements = {**shared, **_encode(own)}
    fp.write(b"".join(elements[tag] for tag in sorted(elements)))
    return fp.getvalue()


def _write_series(
    folder: Path,
    seed: int,
    session: SynthSession,
    kind: str,
    plan: SeriesPlan,
    number: int,
    start: datetime,
    volumes: np.ndarray,
    bvals: np.ndarray | None = None,
    bvecs: np.ndarray | None = None,
) -> WrittenSeries:
    series_uid = _uid(seed, "series", kind)
    shared = _encode(_base_dataset(seed, session, plan, series_uid, number))
    _row_dir, _col_dir, normal, corner = _geometry(plan)
    files: list[Path] = []
    instance = 0
    tr_s = plan.repetition_time_ms / 1000.0
    for v in range(volumes.shape[0]):
        when = start + timedelta(seconds=v * max(tr_s, 1.0))
        for k in range(plan.slices):
            instance += 1
            ds = Dataset()  # only what differs between files; everything else is in `shared`
            ds.SOPInstanceUID = _uid(seed, "sop", kind, instance)
            ds.InstanceNumber = instance
            ds.AcquisitionNumber = v + 1
            ds.SeriesDate = start.strftime("%Y%m%d")
            ds.AcquisitionDate = start.strftime("%Y%m%d")
            ds.ContentDate = start.strftime("%Y%m%d")
            ds.SeriesTime = start.strftime("%H%M%S.%f")
            ds.AcquisitionTime = when.strftime("%H%M%S.%f")
            ds.ContentTime = when.strftime("%H%M%S.%f")
            position = corner + normal * k * plan.spacing_mm
            ds.ImagePositionPatient = [round(float(x), 4) for x in position]
            ds.SliceLocation = round(float(position @ normal), 4)
            if bvals is not None and bvecs is not None:
                ds.add_new(0x00189087, "FD", float(bvals[v]))
                if bvals[v] > 0:
                    ds.add_new(0x00189075, "CS", "DIRECTIONAL")
                    ds.add_new(0x00189089, "FD", [float(x) for x in bvecs[v]])
                else:
                    ds.add_new(0x00189075, "CS", "NONE")
            ds.PixelData = volumes[v, k].astype("<u2").tobytes()
            ds["PixelData"].VR = "OW"
            path = folder / f"{number:03d}_{kind}_{instance:05d}.dcm"
            path.write_bytes(_file_bytes(shared, ds))
            files.append(path)
    return WrittenSeries(kind, plan.description, series_uid, number, tuple(files), volumes.shape[0])


def write_session(
    folder: str | Path,
    *,
    seed: int = 0,
    n_directions: int = 12,
    bvalue: float = 1000.0,
    n_b0: int = 1,
    series: Sequence[str] = DEFAULT_SERIES,
    patient_id: str | None = None,
    acquired: datetime | None = None,
) -> SynthSession:
    """Write one synthetic session folder (created if needed) and return what it contains.

    ``series`` picks kinds from ``SERIES`` (order = acquisition order). The
    "dwi" kind is the tensor phantom with ``n_b0`` b=0 volumes followed by
    ``n_directions`` volumes at ``bvalue``; "dwi_b0_pa" is a short
    reverse-phase-encoding b=0 series (a field map); "adc" a derived map that
    the heuristic must skip. Same seed -> byte-identical files and UIDs.
    """
    unknown = [s for s in series if s not in SERIES]
    if unknown:
        raise ValueError(f"unknown synthetic series {unknown}; known: {sorted(SERIES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    acquired = acquired or datetime(2024, 1, 15, 14, 30) + timedelta(days=seed)
    session = SynthSession(
        folder=folder,
        study_uid=_uid(seed, "study"),
        patient_id=patient_id or f"SYNTH{seed:04d}",
        acquired=acquired,
    )
    written: dict[str, WrittenSeries] = {}
    truth: DwiTruth | None = None
    start = acquired
    for number, kind in enumerate(series, start=1):
        plan = SERIES[kind]
        if kind == "dwi":
            bvals = np.concatenate([np.zeros(n_b0), np.full(n_directions, float(bvalue))])
            bvecs = np.concatenate([np.zeros((n_b0, 3)), hemisphere_directions(n_directions)])
            volumes = _dwi_volumes(plan, bvals, bvecs, rng)
            written[kind] = _write_series(
                folder, seed, session, kind, plan, number, start, volumes, bvals, bvecs
            )
            truth = DwiTruth(
                bvals,
                bvecs,
                FIBER_DIRECTION_LPS.copy(),
                FIBER_EVALS,
                TRUE_FA,
                (plan.columns, plan.rows, plan.slices),
            )
        elif kind == "dwi_b0_pa":
            bvals = np.zeros(1)
            bvecs = np.zeros((1, 3))
            volumes = _dwi_volumes(plan, bvals, bvecs, rng)
            written[kind] = _write_series(
                folder, seed, session, kind, plan, number, start, volumes, bvals, bvecs
            )
        else:
            volumes = _anat_volume(plan, rng)
            written[kind] = _write_series(folder, seed, session, kind, plan, number, start, volumes)
        start += timedelta(minutes=5)
    return SynthSession(session.folder, session.study_uid, session.patient_id, acquired, written, truth)


def write_corrupt_files(folder: str | Path, n: int, *, seed: int = 0) -> list[Path]:
    """Write ``n`` files that look like DICOM by name but are not (for robustness tests).

    Cycles through: empty file, random bytes, a DICOM preamble + 'DICM' magic
    followed by garbage (truncated header).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: list[Path] = []
    for i in range(n):
        path = folder / f"corrupt_{i:04d}.dcm"
        variant = i % 3
        if variant == 0:
            data = b""
        elif variant == 1:
            data = rng.integers(0, 256, size=512, dtype=np.uint8).tobytes()
        else:
            data = b"\x00" * 128 + b"DICM" + rng.integers(0, 256, size=37, dtype=np.uint8).tobytes()
        path.write_bytes(data)
        out.append(path)
    return out
