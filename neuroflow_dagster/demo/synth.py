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
S0 (1000 in the cylinder, 600 outside) is multiplied by a smooth linear
receive-coil field (``RECEIVE_GRADIENT_PER_MM``, +-16 % across the cylinder), as
real images are never flat: without it every voxel of the cylinder would carry
the same signal and image-QC correlations inside the brain mask would measure
noise only. The field cancels in every diffusion ratio (FA, MD, directions).
Everything, including UIDs, is a function of ``seed``.

The diffusion scheme is configurable (``write_session``): number and placement
of b=0 volumes (leading or interleaved, nominal b of 0 or e.g. 5), one or more
shells, several runs of the same series, another matrix, more noise and
slice signal dropouts (a poor-quality session that image QC must catch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

FIBER_DIRECTION_LPS = np.array([0.6, 0.64, 0.48])  # unit vector, patient LPS frame
FIBER_EVALS = (1.7e-3, 0.3e-3, 0.3e-3)
TISSUE_DIFFUSIVITY = 0.9e-3
CYLINDER_RADIUS_VOXELS = 5.0
# Linear receive-coil sensitivity (fraction per mm, patient LPS): S0 *= 1 + RECEIVE_GRADIENT_PER_MM @ position.
RECEIVE_GRADIENT_PER_MM = np.array([0.008, 0.006, 0.008])
# A slice hit by bulk motion during the diffusion gradients keeps this fraction of its signal.
DROPOUT_SIGNAL_FRACTION = 0.2
B0_PLACEMENTS = ("leading", "interleaved")
# write_session arguments of a session that image QC must flag (the demo's DEMO_03; measured values
# in docs/stand-ins.md): noise 60 on S0 ~1000, every other slice of three DW volumes lost to motion.
POOR_QUALITY: dict[str, Any] = {"noise_sd": 60.0, "dropout_volumes": (3, 7, 11)}


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
    kind: str  # "anat" | "dwi" (diffusion EPI, b-values in the headers) | "epi" (spin-echo EPI, no diffusion tags)
    orientation: tuple[float, ...]  # ImageOrientationPatient
    rows: int = 16
    columns: int = 16
    slices: int = 8
    spacing_mm: float = 2.0
    repetition_time_ms: float = 3000.0
    echo_time_ms: float = 90.0
    scanning_sequence: str = "EP"
    acquisition_type: str = "2D"
    # Phase-encoding polarity along the column axis, as Siemens XA records it (private tag (0021,111C)):
    # True for these axial slices' A>>P, which dcm2niix writes as PhaseEncodingDirection "j-" (the real
    # Prisma series dMRI_mb3_AP_1.5 reads "j-" too); False for P>>A ("j").
    phase_positive: bool = True
    # Whether the EPI series carries those vendor tags at all: without them dcm2niix writes no
    # PhaseEncodingDirection (as for much Philips data) and no TotalReadoutTime.
    polarity_tags: bool = True
    protocol_name: str | None = None  # ProtocolName when it differs from the description (GE: the exam's)


AXIAL = _AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # ImageOrientationPatient of axial slices
SAGITTAL = _SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
EPI_KINDS = ("dwi", "epi")

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
        phase_positive=False,
    ),
    "adc": SeriesPlan("ep2d_diff_DTI_AP_ADC", ("DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"), "anat", _AXIAL),
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
    s0: np.ndarray | None = None  # noise-free b=0 signal, (slices, rows, columns) like the pixel data
    runs: int = 1  # the series was acquired this many times (same scheme; run-01, run-02, ... in BIDS)


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


def dwi_scheme(
    n_b0: int = 1,
    n_directions: int = 12,
    shells: Sequence[float] = (1000.0,),
    b0_placement: str = "leading",
    b0_bvalue: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """b-values and LPS unit gradients (zeros for b=0) of one diffusion series, volume by volume.

    Each shell gets ``n_directions`` directions (shells in order). ``leading``: all
    b=0 volumes first; ``interleaved``: one first, the others spread evenly among
    the diffusion-weighted volumes (as "b0 every N volumes" protocols do).
    ``b0_bvalue`` is the nominal b of the b=0 volumes (Siemens writes e.g. 5).
    """
    if n_b0 < 0:
        raise ValueError(f"n_b0 must be >= 0, got {n_b0}")
    if b0_placement not in B0_PLACEMENTS:
        raise ValueError(f"b0_placement {b0_placement!r}: use one of {', '.join(B0_PLACEMENTS)}")
    if not shells or any(b <= 0 for b in shells):
        raise ValueError(f"shells must be positive b-values, got {list(shells)}")
    dirs = hemisphere_directions(n_directions)
    dw_bvals = np.concatenate([np.full(n_directions, float(b)) for b in shells])
    dw_bvecs = np.concatenate([dirs for _ in shells])
    n_dw = len(dw_bvals)
    if b0_placement == "leading" or n_b0 <= 1:
        b0_before = [0] * n_b0  # insert every b0 before DW volume 0
    else:
        step = n_dw / n_b0
        b0_before = [round(i * step) for i in range(n_b0)]
    bvals: list[float] = []
    bvecs: list[np.ndarray] = []
    for k in range(n_dw + 1):
        for _ in range(b0_before.count(k)):
            bvals.append(float(b0_bvalue))
            bvecs.append(np.zeros(3))
        if k < n_dw:
            bvals.append(float(dw_bvals[k]))
            bvecs.append(dw_bvecs[k])
    return np.array(bvals), np.array(bvecs)


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
    k, r, c = np.meshgrid(np.arange(plan.slices), np.arange(plan.rows), np.arange(plan.columns), indexing="ij")
    return corner + s * (c[..., None] * row_dir + r[..., None] * col_dir + k[..., None] * normal)


def _fiber_tensor() -> np.ndarray:
    d = FIBER_DIRECTION_LPS / np.linalg.norm(FIBER_DIRECTION_LPS)
    helper = np.array([0.0, 0.0, 1.0]) if abs(d[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e2 = np.cross(d, helper)
    e2 /= np.linalg.norm(e2)
    e3 = np.cross(d, e2)
    basis = np.stack([d, e2, e3], axis=1)
    return basis @ np.diag(FIBER_EVALS) @ basis.T


def phantom_s0(plan: SeriesPlan) -> np.ndarray:
    """Noise-free b=0 signal (slices, rows, columns): cylinder 1000, tissue 600, times the receive field."""
    pos = _positions(plan)
    inside = np.hypot(pos[..., 0], pos[..., 1]) <= CYLINDER_RADIUS_VOXELS * plan.spacing_mm
    return np.where(inside, 1000.0, 600.0) * (1.0 + pos @ RECEIVE_GRADIENT_PER_MM)


def _dwi_volumes(
    plan: SeriesPlan,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    rng: np.random.Generator,
    noise_sd: float = 1.0,
    dropout_volumes: Sequence[int] = (),
) -> np.ndarray:
    """Signal (volumes, slices, rows, columns) of the cylinder phantom, S = S0 exp(-b g^T D g).

    Gaussian noise of ``noise_sd``; in each of ``dropout_volumes`` every other slice
    keeps only DROPOUT_SIGNAL_FRACTION of its signal (motion during the diffusion
    gradients, with interleaved slice order).
    """
    pos = _positions(plan)
    radius = np.hypot(pos[..., 0], pos[..., 1])
    inside = radius <= CYLINDER_RADIUS_VOXELS * plan.spacing_mm
    tensor = _fiber_tensor()
    adc_fiber = np.einsum("vi,ij,vj->v", bvecs, tensor, bvecs)
    s0 = phantom_s0(plan)
    out = np.empty((len(bvals), *inside.shape))
    for v, (b, adc) in enumerate(zip(bvals, adc_fiber, strict=True)):
        out[v] = np.where(inside, s0 * math.exp(-b * adc), s0 * math.exp(-b * TISSUE_DIFFUSIVITY))
    for v in dropout_volumes:
        if not 0 <= v < len(bvals):
            raise ValueError(f"dropout volume {v} is outside the series (0..{len(bvals) - 1})")
        out[v, 1::2] *= DROPOUT_SIGNAL_FRACTION
    out += rng.normal(0.0, noise_sd, size=out.shape)
    return np.clip(np.rint(out), 0, 4095)


def _anat_volume(plan: SeriesPlan, rng: np.random.Generator) -> np.ndarray:
    """An ellipsoid 'head' with a brighter core: enough contrast to look like an image."""
    pos = _positions(plan)
    half = np.array([plan.columns, plan.rows, plan.slices]).max() * plan.spacing_mm / 2
    rr = np.sqrt((pos**2).sum(axis=-1)) / half
    vol = np.where(rr < 0.9, 400.0, 20.0) + np.where(rr < 0.5, 300.0, 0.0)
    vol += rng.normal(0.0, 5.0, size=vol.shape)
    return np.clip(np.rint(vol), 0, 4095)[None]


def _base_dataset(seed: int, session: SynthSession, plan: SeriesPlan, series_uid: str, number: int) -> Dataset:
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
    ds.ProtocolName = plan.protocol_name or plan.description
    ds.FrameOfReferenceUID = _uid(seed, "frame")
    ds.ImageType = list(plan.image_type)
    ds.ScanningSequence = plan.scanning_sequence
    ds.SequenceVariant = "SK\\SP"
    epi = plan.kind in EPI_KINDS
    ds.ScanOptions = "PFP\\FS" if epi else ""
    ds.MRAcquisitionType = plan.acquisition_type
    ds.SequenceName = {"dwi": "ep_b", "epi": "epse2d1_90"}.get(plan.kind, "tfl3d1_16ns")
    ds.RepetitionTime = plan.repetition_time_ms
    ds.EchoTime = plan.echo_time_ms
    ds.FlipAngle = 90 if epi else 9
    ds.ImagingFrequency = 123.25
    ds.ImagedNucleus = "1H"
    ds.EchoTrainLength = plan.rows if epi else 1
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
    if plan.kind in EPI_KINDS and plan.polarity_tags:
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
                if np.any(bvecs[v]):  # a b=5 "b0" has no gradient direction either
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
    shells: Sequence[float] | None = None,
    b0_placement: str = "leading",
    b0_bvalue: float = 0.0,
    dwi_runs: int = 1,
    matrix: tuple[int, int, int] | None = None,
    noise_sd: float = 1.0,
    dropout_volumes: Sequence[int] = (),
    study_uid: str | None = None,
) -> SynthSession:
    """Write one synthetic session folder (created if needed) and return what it contains.

    ``series`` picks kinds from ``SERIES`` (order = acquisition order). The
    "dwi" kind is the tensor phantom with ``n_b0`` b=0 volumes and
    ``n_directions`` volumes per shell (``shells``, default ``(bvalue,)``), the
    b=0 volumes ``leading`` or ``interleaved`` at nominal b ``b0_bvalue``;
    it is written ``dwi_runs`` times (separate series, same scheme);
    "dwi_b0_pa" is a short reverse-phase-encoding b=0 series (a field map);
    "adc" a derived map that the heuristic must skip. ``matrix`` = (columns,
    rows, slices) of the diffusion series and field map. ``noise_sd`` and
    ``dropout_volumes`` (see ``_dwi_volumes``) make a poor-quality session. ``patient_id``/``study_uid``
    put the series in an existing study (a synthetic T1w beside a real scanner series).
    Same arguments -> byte-identical files and UIDs.
    """
    unknown = [s for s in series if s not in SERIES]
    if unknown:
        raise ValueError(f"unknown synthetic series {unknown}; known: {sorted(SERIES)}")
    if dwi_runs < 1:
        raise ValueError(f"dwi_runs must be >= 1, got {dwi_runs}")
    if matrix is not None and (len(matrix) != 3 or min(matrix) < 1):
        raise ValueError(f"matrix must be (columns, rows, slices) >= 1, got {matrix}")
    if noise_sd < 0:
        raise ValueError(f"noise_sd must be >= 0, got {noise_sd}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    acquired = acquired or datetime(2024, 1, 15, 14, 30) + timedelta(days=seed)
    session = SynthSession(
        folder=folder,
        study_uid=study_uid or _uid(seed, "study"),
        patient_id=patient_id or f"SYNTH{seed:04d}",
        acquired=acquired,
    )
    written: dict[str, WrittenSeries] = {}
    truth: DwiTruth | None = None
    start = acquired
    number = 0
    for kind in series:
        plan = SERIES[kind]
        if matrix is not None and kind in ("dwi", "dwi_b0_pa"):
            plan = replace(plan, columns=matrix[0], rows=matrix[1], slices=matrix[2])
        if kind == "dwi":
            bvals, bvecs = dwi_scheme(n_b0, n_directions, tuple(shells or (bvalue,)), b0_placement, b0_bvalue)
            for run in range(dwi_runs):
                number += 1
                volumes = _dwi_volumes(plan, bvals, bvecs, rng, noise_sd, dropout_volumes)
                # The first run keeps the single-run UIDs and file names, so default sessions stay as they were.
                key = kind if run == 0 else f"{kind}_run{run + 1}"
                written[key] = _write_series(folder, seed, session, key, plan, number, start, volumes, bvals, bvecs)
                start += timedelta(minutes=5)
            truth = DwiTruth(
                bvals,
                bvecs,
                FIBER_DIRECTION_LPS.copy(),
                FIBER_EVALS,
                TRUE_FA,
                (plan.columns, plan.rows, plan.slices),
                phantom_s0(plan),
                dwi_runs,
            )
            continue
        number += 1
        if kind == "dwi_b0_pa":
            bvals = np.zeros(1)
            bvecs = np.zeros((1, 3))
            volumes = _dwi_volumes(plan, bvals, bvecs, rng, noise_sd)
            written[kind] = _write_series(folder, seed, session, kind, plan, number, start, volumes, bvals, bvecs)
        else:
            volumes = _anat_volume(plan, rng)
            written[kind] = _write_series(folder, seed, session, kind, plan, number, start, volumes)
        start += timedelta(minutes=5)
    return SynthSession(session.folder, session.study_uid, session.patient_id, acquired, written, truth)


@dataclass(frozen=True)
class ProtocolSeries:
    """One series of a site's protocol for ``write_protocol``: its plan (name, ImageType, geometry, polarity)
    and what it holds.

    ``kind`` "dwi": ``n_b0`` b=0 volumes then ``n_directions`` per shell of ``shells`` (``n_directions`` 0:
    a b=0-only series); "epi": ``volumes`` spin-echo b=0 volumes without diffusion tags; "anat": one volume.
    ``copy``: another reconstruction of the previous series (Siemens ND/NORM): same acquisition time and
    pixels, its own SeriesInstanceUID and number.
    """

    key: str  # unique in the session: UIDs and file names derive from it
    plan: SeriesPlan
    n_b0: int = 1
    n_directions: int = 0
    shells: tuple[float, ...] = (1000.0,)
    volumes: int = 1
    copy: bool = False


def write_protocol(
    folder: str | Path,
    series: Sequence[ProtocolSeries],
    *,
    seed: int = 0,
    patient_id: str | None = None,
    acquired: datetime | None = None,
    start_number: int = 1,
) -> SynthSession:
    """Write one session of arbitrary series (names, ImageTypes, geometry and polarity as a site's scanner
    writes them), two minutes apart; same arguments -> byte-identical files. The tensor phantom fills the
    diffusion series, the ellipsoid head the anatomy (``write_session`` is the demo's fixed menu).
    ``start_number``: SeriesNumber of the first series (to add series to a session already written)."""
    keys = [s.key for s in series]
    if len(set(keys)) != len(keys):
        raise ValueError(f"series keys must be unique, got {keys}")
    if series and series[0].copy:
        raise ValueError("the first series cannot be a copy of a previous one")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    acquired = acquired or datetime(2024, 1, 15, 14, 30) + timedelta(days=seed)
    session = SynthSession(folder, _uid(seed, "study"), patient_id or f"SYNTH{seed:04d}", acquired)
    written: dict[str, WrittenSeries] = {}
    start = acquired
    previous: tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None = None
    for number, item in enumerate(series, start=start_number):
        plan = item.plan
        if item.copy and previous is not None:
            volumes, bvals, bvecs = previous
            start -= timedelta(minutes=2)
        elif plan.kind == "dwi":
            if item.n_directions:
                bvals, bvecs = dwi_scheme(item.n_b0, item.n_directions, item.shells)
            else:
                bvals, bvecs = np.zeros(item.n_b0), np.zeros((item.n_b0, 3))
            volumes = _dwi_volumes(plan, bvals, bvecs, rng)
        elif plan.kind == "epi":
            bvals, bvecs = None, None
            volumes = _dwi_volumes(plan, np.zeros(item.volumes), np.zeros((item.volumes, 3)), rng)
        else:
            bvals, bvecs = None, None
            volumes = _anat_volume(plan, rng)
        previous = (volumes, bvals, bvecs)
        written[item.key] = _write_series(folder, seed, session, item.key, plan, number, start, volumes, bvals, bvecs)
        start += timedelta(minutes=2)
    return SynthSession(folder, session.study_uid, session.patient_id, acquired, written, None)


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
