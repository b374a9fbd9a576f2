"""Builtin stand-in for QSIPrep (subject level): denoise, brain mask, b0 reference, image QC.

NOT QSIPrep. QSIPrep needs FSL/ANTs/AFNI/FreeSurfer inside its container, which
cannot run on these machines. This stand-in lets the platform run end to end:
it writes the files downstream steps read, in QSIPrep's layout, and says in every
dataset_description.json / sidecar / report that it is a stand-in.

What it does per listed session with DWI: load ``sub-X/ses-Y/dwi/*_dwi.nii[.gz]``
(runs on the first run's voxel grid are concatenated in name order, as QSIPrep
merges a session's runs; runs on another grid are skipped and listed; field maps
in ``fmap/`` are listed and not used), check the gradient table, median_otsu
brain mask on the mean b0, denoise (a chain of denoisers: the first that works is
used, every attempt is recorded), mean denoised b0 as the reference, and QSIPrep's
image QC table. Subject level: all sessions are (re)written in one run, and a
subject b0 template (mean of the intensity-normalised session references) is
written when the sessions share one voxel grid. No motion/eddy/distortion
correction, no ACPC reorientation, no resampling: "space-ACPC" files are on the
input grid.

Any acquisition BIDS allows either completes or is refused with one
``validation error:`` line (exit 2) naming the session, file and reason: no b=0
volume, a diffusion-weighted volume without a direction, b-values that do not
match the volumes, no signal at all. A denoiser that fails is never fatal.

It refuses first what the real QSIPrep refuses before it processes anything, in
QSIPrep's order and with QSIPrep's own words (1.1.1 to 26.1.1 alike):

- a DWI file that is not 4D (a one-volume series stored as 3D, a 5D file):
  ``DWI file not 4D: <file>`` (qsiprep/utils/bids.py, ``collect_data``; empty
  files are skipped there, as here);
- no image of the anatomical modality (``--anat-modality``, default T1w as in
  QSIPrep) in the given sessions - per session with ``--subject-anatomical-reference
  sessionwise``, where each session is its own group: ``No T1w images found for
  participant X. To bypass anatomical processing choose --anat-modality none``
  (qsiprep/workflows/base.py, ``init_single_subject_wf``).

The anatomical images themselves are not used (no anatomical processing here).

    python -m neuroflow_dagster.tools.builtin.preproc --bids-dir D --output-dir O \
        --participant-label X --session-label 01 [02 ...] --work-dir W [--nprocs N]
        [--denoise-method auto|dwidenoise|patch2self|nlmeans|mppca|none]
        [--anat-modality T1w|T2w|none] [--subject-anatomical-reference first-lex|unbiased|sessionwise]
"""

from __future__ import annotations

import hashlib
import html
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from neuroflow_dagster.tools.builtin.common import (
    B0_THRESHOLD,
    AtomicDir,
    ConfigurationError,
    ValidationError,
    bids_prefix,
    check_gradients,
    check_label,
    generated_by,
    load_gradients,
    main_entry,
    make_parser,
    strip_prefix,
    write_dataset_description,
    write_json_atomic,
    write_text_atomic,
)
from neuroflow_dagster.tools.builtin.image_qc import qc_row, series_qc, write_image_qc
from neuroflow_dagster.tools.qc_table import image_qc_name

STANDS_IN_FOR = "QSIPrep"
# QSIPrep's parser choices and defaults (qsiprep/cli/parser.py, 1.1.1 to 26.1.1).
ANAT_MODALITIES = ("T1w", "T2w", "none")
SUBJECT_ANATOMICAL_REFERENCES = ("first-lex", "unbiased", "sessionwise")
DENOISE_METHODS = ("auto", "dwidenoise", "patch2self", "nlmeans", "mppca", "none")
# patch2self regresses each volume on the others: with few DW volumes there is nothing to learn from.
PATCH2SELF_MIN_DW_VOLUMES = 6
# A denoised volume whose mean moved more than this (relative) is not a denoised version of its input.
MAX_MEAN_CHANGE = 0.25
# dipy's mppca loops over voxels in Python; beyond this estimate the fallback is not tried.
MPPCA_MAX_ESTIMATED_S = 300.0
MAX_REASON_CHARS = 300


@dataclass
class DenoiseAttempt:
    """One step of the denoising chain: what was tried and what came of it."""

    method: str
    outcome: str  # "used" | "failed" | "not applicable"
    reason: str


@dataclass
class SessionResult:
    session: str
    status: str  # "processed" | "skipped"
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    denoise_method: str = ""
    denoise_reason: str = ""
    denoise_attempts: list[DenoiseAttempt] = field(default_factory=list)
    runs_used: list[str] = field(default_factory=list)
    runs_skipped: list[str] = field(default_factory=list)
    fieldmaps_ignored: list[str] = field(default_factory=list)
    gradient_notes: list[str] = field(default_factory=list)
    shape: tuple[int, ...] = ()
    mask_voxels: int = 0
    image_qc: dict[str, float | None] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def denoise_summary(self) -> str:
        """e.g. ``mppca (patch2self failed: ValueError: ...)``: the method used and why others were not."""
        others = [f"{a.method} {a.outcome}: {a.reason}" for a in self.denoise_attempts if a.outcome != "used"]
        return self.denoise_method + (f" ({'; '.join(others)})" if others else "")


def preproc_outputs(participant: str, session: str) -> tuple[str, ...]:
    """Golden output patterns of one session, relative to the output dir."""
    p = bids_prefix(participant, session)
    d = f"sub-{participant}/ses-{session}/dwi"
    return (
        f"{d}/{p}_space-ACPC_desc-preproc_dwi.nii.gz",
        f"{d}/{p}_space-ACPC_desc-preproc_dwi.bval",
        f"{d}/{p}_space-ACPC_desc-preproc_dwi.bvec",
        f"{d}/{p}_space-ACPC_desc-brain_mask.nii.gz",
        f"{d}/{p}_space-ACPC_dwiref.nii.gz",
        f"{d}/{image_qc_name(participant, session)}",
    )


def _strip_nii(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _dwi_files(dwi_dir: Path) -> list[Path]:
    return sorted(dwi_dir.glob("*_dwi.nii.gz")) + sorted(dwi_dir.glob("*_dwi.nii"))


def check_qsiprep_inputs(
    bids_dir: Path, participant: str, sessions: Sequence[str], anat_modality: str, sessionwise: bool
) -> None:
    """Refuse what the real QSIPrep refuses before processing, in its order and words (module docstring).

    QSIPrep forms one processing group of all given sessions, or one per session with DWI when
    sessionwise; per group it collects the files (each DWI must be 4D), then wants DWI, then an
    image of the anatomical modality. The no-DWI case keeps this stand-in's own message below.
    """
    sub = bids_dir / f"sub-{participant}"
    with_dwi = [s for s in sessions if _dwi_files(sub / f"ses-{s}" / "dwi")]
    groups = [[s] for s in with_dwi] if sessionwise else [list(sessions)]
    for group in groups:
        for ses in group:
            for path in _dwi_files(sub / f"ses-{ses}" / "dwi"):
                if path.stat().st_size == 0:
                    continue  # QSIPrep skips empty files (its tests use them); reading it fails below
                try:
                    ndim = len(nib.load(path).shape)
                except Exception:  # unreadable: refused with the reason when the session is loaded
                    continue
                if ndim != 4:
                    # Word for word qsiprep/utils/bids.py collect_data (1.1.1, 26.0.0, 26.1.1).
                    raise ValidationError(f"DWI file not 4D: {path}")
        if not any(s in with_dwi for s in group):
            continue
        found = [p for s in group for p in sorted((sub / f"ses-{s}" / "anat").glob(f"*_{anat_modality}.nii*"))]
        if anat_modality != "none" and not found:
            # Word for word qsiprep/workflows/base.py init_single_subject_wf (1.1.1, 26.0.0, 26.1.1).
            raise ValidationError(
                f"No {anat_modality} images found for participant {participant}. "
                "To bypass anatomical processing choose --anat-modality none"
            )


def _load_session_dwi(
    dwi_dir: Path,
) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, list[Path], list[str], list[str]]:
    """Load and concatenate the session's DWI runs that share the first run's grid.

    Every run is 4D (check_qsiprep_inputs refused the others). Every run's gradient table is
    checked (:func:`check_gradients`); the notes are returned.
    """
    runs = _dwi_files(dwi_dir)
    if not runs:
        raise ValidationError(f"missing required file {dwi_dir}/*_dwi.nii.gz")
    ref_img: nib.Nifti1Image | None = None
    arrays, bvals_all, bvecs_all, used, skipped, notes = [], [], [], [], [], []
    for run in runs:
        stem = _strip_nii(run)
        bval, bvec = run.with_name(stem + ".bval"), run.with_name(stem + ".bvec")
        for needed in (bval, bvec):
            if not needed.is_file():
                raise ValidationError(f"missing required file {needed} (gradient table of {run.name})")
        try:
            img = nib.load(run)
            shape = img.shape
        except Exception as exc:  # nibabel's errors for truncated/foreign files vary by format
            raise ValidationError(f"cannot read {run}: {type(exc).__name__}: {exc}") from exc
        if len(shape) != 4:
            raise ValidationError(f"DWI file not 4D: {run}")
        if ref_img is None:
            ref_img = img
        elif shape[:3] != ref_img.shape[:3] or not np.allclose(img.affine, ref_img.affine, atol=1e-3):
            skipped.append(f"{run.name}: voxel grid differs from {used[0].name}")
            continue
        n_vol = shape[3]
        bvals, bvecs = load_gradients(bval, bvec, n_vol)
        bvals, bvecs, run_notes = check_gradients(bvals, bvecs, run.name)
        try:
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:
            raise ValidationError(f"cannot read the image data of {run}: {type(exc).__name__}: {exc}") from exc
        arrays.append(data)
        bvals_all.append(bvals)
        bvecs_all.append(bvecs)
        notes += run_notes
        used.append(run)
    assert ref_img is not None
    data = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=3)
    header = ref_img.header.copy()
    header.set_data_shape(data.shape)
    out = nib.Nifti1Image(data, ref_img.affine, header)
    return out, np.concatenate(bvals_all), np.concatenate(bvecs_all), used, skipped, notes


def mppca_patch_radius(shape: Sequence[int], max_radius: int = 3) -> np.ndarray | None:
    """Smallest patch (radius per axis, capped by the volume) holding more voxels than volumes; None if none fits.

    MP-PCA needs more samples per patch than volumes (dipy warns and denoises badly
    otherwise); an axis of size 1 gets radius 0, no axis a patch larger than itself.
    """
    n = int(shape[3]) if len(shape) > 3 else 1
    caps = np.array([(int(d) - 1) // 2 for d in shape[:3]])
    for r in range(1, max_radius + 1):
        radius = np.minimum(r, caps)
        if int(np.prod(2 * radius + 1)) - 1 >= n:
            return radius
    return None


def _mppca_problem(shape: Sequence[int], mask_voxels: int) -> str | None:
    radius = mppca_patch_radius(shape)
    n = int(shape[3])
    if radius is None:
        return (
            f"no patch of at most 7x7x7 voxels fits the {tuple(int(d) for d in shape[:3])} grid with more "
            f"voxels than the {n} volumes"
        )
    samples = int(np.prod(2 * radius + 1))
    estimate = mask_voxels * (2e-9 * (samples * n * n + n**3) + 5e-5)
    if estimate > MPPCA_MAX_ESTIMATED_S:
        return (
            f"dipy mppca over {mask_voxels} voxels x {n} volumes with {samples}-voxel patches would take "
            f"~{estimate / 60:.0f} min (limit {MPPCA_MAX_ESTIMATED_S / 60:.0f} min)"
        )
    return None


def denoise_candidates(requested: str, bvals: np.ndarray) -> list[tuple[str, str]]:
    """The denoising chain: (method, why) in the order they are tried; always ends with ``none``.

    ``auto``: MRtrix3 dwidenoise if on PATH (QSIPrep's default), then dipy patch2self
    (>= 6 DW volumes), dipy mppca (>= 6 DW volumes; small patch), per-volume nlmeans,
    none. An explicit method: that one, then none. Whether a candidate can run on
    this series is decided when it is tried (:func:`denoise_problem`).
    """
    if requested not in DENOISE_METHODS:
        raise ConfigurationError(f"unknown denoise method {requested!r}; choose one of {', '.join(DENOISE_METHODS)}")
    if requested == "none":
        return [("none", "requested")]
    if requested != "auto":
        if requested == "dwidenoise" and shutil.which("dwidenoise") is None:
            raise ConfigurationError("denoise method dwidenoise requested but MRtrix3 dwidenoise is not on PATH")
        return [(requested, "requested"), ("none", f"fallback: the requested {requested} could not be used")]
    n_dw = int(np.sum(bvals > B0_THRESHOLD))
    chain: list[tuple[str, str]] = []
    if shutil.which("dwidenoise") is not None:
        chain.append(("dwidenoise", "auto: MRtrix3 dwidenoise found on PATH (QSIPrep's default denoiser)"))
    if n_dw >= PATCH2SELF_MIN_DW_VOLUMES:
        why = "no dwidenoise on PATH" if not chain else "fallback after dwidenoise"
        chain.append(("patch2self", f"auto: {why}; {n_dw} DW volumes suit dipy patch2self"))
        chain.append(("mppca", "auto: fallback after patch2self; dipy MP-PCA with the smallest patch that fits"))
        chain.append(("nlmeans", "auto: fallback after mppca; per-volume non-local means"))
    else:
        chain.append(
            (
                "nlmeans",
                f"auto: only {n_dw} DW volume(s), too few for patch2self (and dipy mppca is "
                "too slow on a whole brain); per-volume non-local means",
            )
        )
    chain.append(("none", "auto: every denoiser above failed or could not be used; not denoised"))
    return chain


def choose_denoise_method(requested: str, bvals: np.ndarray) -> tuple[str, str]:
    """The first candidate of the chain (what ``auto`` resolves to when nothing fails)."""
    return denoise_candidates(requested, bvals)[0]


def denoise_problem(method: str, bvals: np.ndarray, shape: Sequence[int], mask_voxels: int) -> str | None:
    """Why ``method`` cannot run on this series (None if it can): tried in order, so reasons are recorded."""
    n_dw = int(np.sum(bvals > B0_THRESHOLD))
    if method == "patch2self":
        if n_dw < 2:
            return f"needs at least 2 diffusion-weighted volumes, the series has {n_dw}"
        if sum(1 for d in shape[:3] if d == 1) > 1:
            return f"dipy patch2self cannot take a grid with more than one axis of size 1 {tuple(shape[:3])}"
    if method == "mppca":
        if len(shape) < 4 or shape[3] < 2:
            return "needs at least 2 volumes"
        return _mppca_problem(shape, mask_voxels)
    return None


def _volume_digests(data: np.ndarray) -> list[bytes]:
    return [
        hashlib.blake2b(np.ascontiguousarray(data[..., v]).tobytes(), digest_size=16).digest()
        for v in range(data.shape[3])
    ]


def check_denoised(method: str, before: np.ndarray, after: np.ndarray) -> None:
    """Refuse a denoiser's output that cannot be right (raises ValueError; the chain then moves on).

    Same shape; finite; no volume that came back as an exact copy of ANOTHER volume whose
    input differed; no volume whose mean moved by more than MAX_MEAN_CHANGE. These are
    the signatures of dipy 1.12.1's patch2self bugs (dipy issue #3968, fixed after
    1.12.1): version 3 (the default) writes trailing volumes from a stale buffer and
    passes a lone b=0 through as volume 0; version 1 predicts from mean-centred
    regressors, shifting every volume by a constant.
    """
    if after.shape != before.shape:
        raise ValueError(f"{method} returned shape {after.shape} for input {before.shape}")
    non_finite = int(np.count_nonzero(~np.isfinite(after)))
    if non_finite:
        raise ValueError(f"{method} returned {non_finite} non-finite value(s)")
    d_in, d_out = _volume_digests(before), _volume_digests(after)
    first_in: dict[bytes, int] = {}
    for v, dig in enumerate(d_in):
        first_in.setdefault(dig, v)
    seen_out: dict[bytes, int] = {}
    for v, dig in enumerate(d_out):
        if dig in seen_out and d_in[seen_out[dig]] != d_in[v]:
            raise ValueError(
                f"{method} returned volume {v} identical to volume {seen_out[dig]} although their inputs differ"
            )
        seen_out.setdefault(dig, v)
        src = first_in.get(dig)
        if src is not None and d_in[src] != d_in[v]:
            raise ValueError(f"{method} returned input volume {src} in place of volume {v}")
    axes = tuple(range(before.ndim - 1))
    mean_in = before.mean(axis=axes, dtype=np.float64)
    mean_out = after.mean(axis=axes, dtype=np.float64)
    scale = float(np.abs(mean_in).max()) if mean_in.size else 0.0
    for v, (a, b) in enumerate(zip(mean_in, mean_out, strict=True)):
        if abs(a) > 1e-3 * scale and abs(b - a) > MAX_MEAN_CHANGE * abs(a):
            raise ValueError(f"{method} moved the mean of volume {v} from {a:.4g} to {b:.4g}")


def denoise(
    data: np.ndarray, bvals: np.ndarray, mask: np.ndarray, method: str, work: Path, affine: np.ndarray, nprocs: int
) -> np.ndarray:
    """Denoise a 4D series with one method; returns float32. Parameters chosen for speed (docs/stand-ins.md)."""
    if method == "none":
        return data
    if method == "dwidenoise":
        src, dst = work / "dwi_in.nii", work / "dwi_denoised.nii"
        nib.save(nib.Nifti1Image(data, affine), src)
        cmd = ["dwidenoise", str(src), str(dst), "-force", "-quiet", "-nthreads", str(nprocs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"dwidenoise failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return np.asarray(nib.load(dst).dataobj, dtype=np.float32)
    if method == "patch2self":
        from functools import partial

        import dipy.denoise.patch2self as p2s
        from dipy.denoise.patch2self import patch2self
        from tqdm import tqdm

        # dipy draws a progress bar even with verbose=False; it would fill the run's log tail.
        p2s.tqdm = partial(tqdm, disable=True)

        out = patch2self(
            data,
            bvals,
            model="ols",
            b0_threshold=B0_THRESHOLD,
            shift_intensity=True,
            clip_negative_vals=False,
            verbose=False,
        )
        return np.asarray(out, dtype=np.float32)
    if method == "nlmeans":
        from dipy.denoise.nlmeans import nlmeans
        from dipy.denoise.noise_estimate import estimate_sigma

        sigma = estimate_sigma(data)
        out = nlmeans(data, sigma=sigma, mask=mask, patch_radius=1, block_radius=1, rician=True)
        # nlmeans zeroes voxels outside the mask; keep the original signal there.
        out = np.where(mask[..., None], out, data)
        return np.asarray(out, dtype=np.float32)
    if method == "mppca":
        from dipy.denoise.localpca import mppca

        radius = mppca_patch_radius(data.shape)
        if radius is None:
            raise ValueError(f"no MP-PCA patch fits {data.shape}")
        with np.errstate(invalid="ignore", divide="ignore"):
            out = mppca(data, mask=mask, patch_radius=radius)
        # Outside the mask, and at mask voxels no patch centre reaches (the volume's border: 0/0), keep the input.
        out = np.where(mask[..., None] & np.isfinite(out), out, data)
        return np.asarray(out, dtype=np.float32)
    raise ConfigurationError(f"unknown denoise method {method!r}; choose one of {', '.join(DENOISE_METHODS)}")


def brain_mask(b0_mean: np.ndarray) -> np.ndarray:
    """median_otsu on the mean b0, with light settings (radius 1, two passes) to stay fast.

    dipy's default (radius 4, 4 passes) took ~70 s on a 150x152x81 volume; radius 1 x 2 ~2-3 s
    with a mask of near-identical size.
    """
    from dipy.segment.mask import median_otsu

    _, mask = median_otsu(b0_mean, median_radius=1, numpass=2)
    return mask.astype(bool)


def run_denoise_chain(
    data: np.ndarray, bvals: np.ndarray, mask: np.ndarray, requested: str, work: Path, affine: np.ndarray, nprocs: int
) -> tuple[np.ndarray, list[DenoiseAttempt]]:
    """Try the chain's denoisers in order; the first that runs and passes :func:`check_denoised` is used.

    A library error is recorded ("failed" + exception) and the next is tried; the chain
    ends with ``none`` (the data as loaded). MemoryError is not caught: it is a resource
    failure the runtime retries, not a reason to hand on undenoised data.
    """
    attempts: list[DenoiseAttempt] = []
    for method, why in denoise_candidates(requested, bvals):
        if method == "none":
            attempts.append(DenoiseAttempt("none", "used", why))
            return data, attempts
        problem = denoise_problem(method, bvals, data.shape, int(mask.sum()))
        if problem:
            attempts.append(DenoiseAttempt(method, "not applicable", problem))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # dipy's "few volumes" and numpy's 0/0 warnings; the check decides
                out = denoise(data, bvals, mask, method, work, affine, nprocs)
            check_denoised(method, data, out)
        except (MemoryError, ConfigurationError):
            raise
        except Exception as exc:
            text = " ".join(f"{type(exc).__name__}: {exc}".split())
            attempts.append(DenoiseAttempt(method, "failed", text[:MAX_REASON_CHARS]))
            continue
        attempts.append(DenoiseAttempt(method, "used", why))
        return out, attempts
    raise AssertionError("the denoising chain always ends with none")  # pragma: no cover


@contextmanager
def limited_threads(nprocs: int) -> Iterator[None]:
    """Hold numpy's BLAS/OpenMP pools to --nprocs: on a busy machine extra threads only spin.

    (Measured: dipy mppca on 16x16x8x65 took 40 s with the default pools at load 15, 0.8 s with one thread.)
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn (dipy's patch2self)
        yield
        return
    with threadpool_limits(limits=max(1, nprocs)):
        yield


def process_session(
    bids_dir: Path, out_dir: Path, participant: str, session: str, work_dir: Path, method: str, nprocs: int
) -> tuple[SessionResult, nib.Nifti1Image | None, np.ndarray | None]:
    res = SessionResult(session=session, status="processed")
    ses_dir = bids_dir / f"sub-{participant}" / f"ses-{session}"
    if not ses_dir.is_dir():
        raise ValidationError(f"missing required folder {ses_dir} (session listed for sub-{participant})")
    dwi_dir = ses_dir / "dwi"
    if not dwi_dir.is_dir() or not any(dwi_dir.glob("*_dwi.nii*")):
        res.status, res.reason = "skipped", f"no DWI in {dwi_dir}"
        return res, None, None
    # Reverse phase-encoded b=0 series (fmap/*_epi) would drive susceptibility distortion correction,
    # which the stand-in does not do: listed, never read.
    res.fieldmaps_ignored = (
        sorted(p.name for p in (ses_dir / "fmap").glob("*.nii*")) if (ses_dir / "fmap").is_dir() else []
    )
    where = f"sub-{participant} ses-{session}"

    t0 = time.perf_counter()
    img, bvals, bvecs, used, skipped, res.gradient_notes = _load_session_dwi(dwi_dir)
    data = np.asarray(img.dataobj, dtype=np.float32)
    non_finite = int(np.count_nonzero(~np.isfinite(data)))
    if non_finite:  # float NIfTIs from other converters may carry NaN; dipy's Otsu would crash on them
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    res.runs_used = [p.name for p in used]
    res.runs_skipped = skipped
    res.shape = tuple(int(s) for s in data.shape)
    b0 = bvals <= B0_THRESHOLD
    if not b0.any():
        raise ValidationError(
            f"{where} has no b=0 volume (b <= {B0_THRESHOLD:g}) in "
            f"{', '.join(res.runs_used)}; a b0 reference and brain mask cannot be made"
        )
    b0_mean = data[..., b0].mean(axis=3)
    if not np.any(b0_mean > 0):
        raise ValidationError(
            f"{where}: the b=0 volume(s) of {', '.join(res.runs_used)} hold no signal "
            "(all zero after non-finite values were set to 0)"
        )
    res.timings_s["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Otsu on a flat histogram divides by zero; harmless
        mask = brain_mask(b0_mean)
    if not mask.any():
        raise ValidationError(f"{where}: the brain mask of {res.runs_used[0]} is empty")
    res.mask_voxels = int(mask.sum())
    res.timings_s["mask"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sess_work = work_dir / f"sub-{participant}_ses-{session}"
    sess_work.mkdir(parents=True, exist_ok=True)
    den, res.denoise_attempts = run_denoise_chain(data, bvals, mask, method, sess_work, img.affine, nprocs)
    used_attempt = res.denoise_attempts[-1]
    res.denoise_method, res.denoise_reason = used_attempt.method, used_attempt.reason
    res.timings_s["denoise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    raw_qc = series_qc(data, bvals, bvecs, mask, zooms)
    processed_qc = series_qc(den, bvals, bvecs, mask, zooms)
    res.timings_s["qc"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = den[..., b0].mean(axis=3).astype(np.float32)
    prefix = bids_prefix(participant, session)
    header = img.header.copy()
    header.set_data_dtype(np.float32)
    final = out_dir / f"sub-{participant}" / f"ses-{session}"
    with AtomicDir(final) as tmp:
        d = tmp / "dwi"
        d.mkdir()
        stem = f"{prefix}_space-ACPC_desc-preproc_dwi"
        nib.save(nib.Nifti1Image(den, img.affine, header), d / f"{stem}.nii.gz")
        np.savetxt(d / f"{stem}.bval", bvals[None, :], fmt="%g")
        np.savetxt(d / f"{stem}.bvec", bvecs.T, fmt="%.6f")
        write_json_atomic(
            d / f"{stem}.json",
            {
                "GeneratedBy": [generated_by(STANDS_IN_FOR, "denoise + brain mask + b0 reference")],
                "StandIn": True,
                "Sources": [str(p) for p in used],
                "RunsSkipped": skipped,
                "FieldMapsIgnored": res.fieldmaps_ignored,
                "GradientNotes": res.gradient_notes,
                "DenoiseMethod": res.denoise_method,
                "DenoiseReason": res.denoise_reason,
                "DenoiseAttempts": [asdict(a) for a in res.denoise_attempts],
                "NonFiniteValuesZeroed": non_finite,
                "B0Threshold": B0_THRESHOLD,
                "NotDone": [
                    "head motion / eddy current correction",
                    "susceptibility distortion correction (field maps in fmap/ are not used)",
                    "ACPC reorientation and resampling (files are on the input grid)",
                    "b-vector rotation",
                ],
            },
        )
        mask_hdr = img.header.copy()
        mask_hdr.set_data_shape(mask.shape)
        mask_hdr.set_data_dtype(np.uint8)
        mask_img = nib.Nifti1Image(mask.astype(np.uint8), img.affine, mask_hdr)
        nib.save(mask_img, d / f"{prefix}_space-ACPC_desc-brain_mask.nii.gz")
        ref_hdr = img.header.copy()
        ref_hdr.set_data_shape(ref.shape)
        ref_hdr.set_data_dtype(np.float32)
        ref_img = nib.Nifti1Image(ref, img.affine, ref_hdr)
        nib.save(ref_img, d / f"{prefix}_space-ACPC_dwiref.nii.gz")
        row = qc_row(
            raw_qc,
            processed_qc,
            f"{stem}.nii.gz",
            {"subject_id": f"sub-{participant}", "session_id": f"ses-{session}", "space_id": "space-ACPC"},
        )
        write_image_qc(
            d / image_qc_name(participant, session),
            row,
            "image QC (DSI Studio's measures, re-implemented) of the raw and preprocessed series",
        )
    res.image_qc = {k: v for k, v in row.items() if not isinstance(v, str)}
    res.timings_s["write"] = time.perf_counter() - t0
    res.outputs = list(preproc_outputs(participant, session))
    return res, ref_img, mask


def write_b0_template(
    out_dir: Path, participant: str, refs: list[tuple[str, nib.Nifti1Image, np.ndarray]]
) -> tuple[Path | None, str]:
    """Subject-wide b0 template: mean of the sessions' references, each scaled by its in-mask median.

    Only when all sessions share a voxel grid (no registration here); otherwise nothing
    is written and the reason is returned for the report.
    """
    anat = out_dir / f"sub-{participant}" / "anat"
    if not refs:
        return None, "no session with DWI"
    first = refs[0][1]
    for ses, img, _ in refs[1:]:
        if img.shape != first.shape or not np.allclose(img.affine, first.affine, atol=1e-3):
            if anat.exists():
                shutil.rmtree(anat)  # a template from an earlier, different session set is stale
            return None, f"ses-{ses} is on a different voxel grid than ses-{refs[0][0]}; no template written"
    stack = []
    for _, img, mask in refs:
        data = np.asarray(img.dataobj, dtype=np.float32)
        scale = float(np.median(data[mask])) if mask.any() else 1.0
        stack.append(data / (scale if scale > 0 else 1.0))
    tpl = np.mean(stack, axis=0).astype(np.float32)
    with AtomicDir(anat) as tmp:
        path = tmp / f"sub-{participant}_space-ACPC_desc-b0template.nii.gz"
        nib.save(nib.Nifti1Image(tpl, first.affine, first.header), path)
    sessions = ", ".join(f"ses-{s}" for s, _, _ in refs)
    return anat / path.name, f"mean of {len(refs)} session reference(s): {sessions}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def write_report(
    out_dir: Path, participant: str, results: list[SessionResult], template_note: str, elapsed_s: float
) -> Path:
    rows = []
    for r in results:
        detail = (
            r.reason
            if r.status == "skipped"
            else (
                f"runs {', '.join(r.runs_used)}; shape {r.shape}; mask {r.mask_voxels} voxels; "
                f"denoise {r.denoise_method} ({r.denoise_reason})"
                + "".join(f"; {a.method} {a.outcome}: {a.reason}" for a in r.denoise_attempts if a.outcome != "used")
                + (f"; skipped runs: {'; '.join(r.runs_skipped)}" if r.runs_skipped else "")
                + (f"; field maps not used: {', '.join(r.fieldmaps_ignored)}" if r.fieldmaps_ignored else "")
                + "".join(f"; {note}" for note in r.gradient_notes)
                + f"; neighbouring-DWI correlation raw {_fmt(r.image_qc.get('raw_neighbor_corr'))} "
                f"(in mask {_fmt(r.image_qc.get('raw_masked_neighbor_corr'))}), "
                f"bad slices {_fmt(r.image_qc.get('raw_num_bad_slices'))}"
            )
        )
        rows.append(f"<tr><td>ses-{html.escape(r.session)}</td><td>{r.status}</td><td>{html.escape(detail)}</td></tr>")
    body = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>sub-{participant} - stand-in for QSIPrep</title></head>
<body>
<h1>sub-{html.escape(participant)}</h1>
<p><strong>This is NOT a QSIPrep report.</strong> These outputs were written by the
neuroflow-dagster builtin stand-in for QSIPrep: denoising, brain mask and b0 reference only;
no motion, eddy or distortion correction, no ACPC alignment, no anatomical processing.</p>
<table border="1"><tr><th>session</th><th>status</th><th>details</th></tr>
{"".join(rows)}
</table>
<p>Subject b0 template: {html.escape(template_note)}</p>
<p>Run time: {elapsed_s:.1f} s</p>
</body></html>
"""
    return write_text_atomic(out_dir / f"sub-{participant}.html", body)


def run_preproc(
    bids_dir: Path,
    output_dir: Path,
    participant: str,
    sessions: Sequence[str],
    work_dir: Path,
    nprocs: int = 1,
    denoise_method: str = "auto",
    anat_modality: str = "T1w",
    subject_anatomical_reference: str = "first-lex",
) -> list[SessionResult]:
    """Process every listed session of one subject; returns one result per session.

    ``anat_modality`` and ``subject_anatomical_reference`` default to QSIPrep's own defaults."""
    start = time.perf_counter()
    participant = check_label(strip_prefix(participant, "sub-"), "participant label")
    sessions = [check_label(strip_prefix(s, "ses-"), "session label") for s in sessions]
    if denoise_method not in DENOISE_METHODS:
        raise ConfigurationError(
            f"unknown denoise method {denoise_method!r}; choose one of {', '.join(DENOISE_METHODS)}"
        )
    if not (bids_dir / f"sub-{participant}").is_dir():
        raise ValidationError(f"missing required folder {bids_dir / f'sub-{participant}'}")
    if anat_modality not in ANAT_MODALITIES:
        raise ConfigurationError(f"unknown anatomical modality {anat_modality!r}; choose one of {ANAT_MODALITIES}")
    sessions = list(dict.fromkeys(sessions))
    check_qsiprep_inputs(
        bids_dir, participant, sessions, anat_modality, subject_anatomical_reference == "sessionwise"
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    results: list[SessionResult] = []
    refs: list[tuple[str, nib.Nifti1Image, np.ndarray]] = []
    for ses in sessions:
        with limited_threads(nprocs):
            res, ref, mask = process_session(bids_dir, output_dir, participant, ses, work_dir, denoise_method, nprocs)
        results.append(res)
        if ref is not None and mask is not None:
            refs.append((ses, ref, mask))
    if not refs:
        listed = ", ".join(f"ses-{s}" for s in sessions)
        raise ValidationError(
            f"missing required file: no DWI series in any listed session of "
            f"sub-{participant} ({listed}) under {bids_dir}"
        )
    _, template_note = write_b0_template(output_dir, participant, refs)
    write_dataset_description(
        output_dir,
        "neuroflow-dagster stand-in for QSIPrep",
        STANDS_IN_FOR,
        "Denoising, brain mask and b0 reference in QSIPrep's output layout; not QSIPrep.",
    )
    write_report(output_dir, participant, results, template_note, time.perf_counter() - start)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("neuroflow-builtin-preproc", "Builtin stand-in for QSIPrep (not QSIPrep).")
    parser.add_argument("--bids-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--participant-label", required=True)
    parser.add_argument("--session-label", nargs="+", required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--denoise-method", default="auto", choices=DENOISE_METHODS)
    parser.add_argument("--anat-modality", default="T1w", choices=ANAT_MODALITIES)
    parser.add_argument("--subject-anatomical-reference", default="first-lex", choices=SUBJECT_ANATOMICAL_REFERENCES)
    args = parser.parse_args(argv)
    if not args.bids_dir.is_dir():
        raise ValidationError(f"missing required folder {args.bids_dir} (BIDS dataset)")
    results = run_preproc(
        args.bids_dir,
        args.output_dir,
        args.participant_label,
        args.session_label,
        args.work_dir,
        max(1, args.nprocs),
        args.denoise_method,
        args.anat_modality,
        args.subject_anatomical_reference,
    )
    for r in results:
        if r.reason:
            print(f"ses-{r.session}: {r.status} ({r.reason})", flush=True)
            continue
        times = " ".join(f"{k}={v:.2f}s" for k, v in r.timings_s.items())
        qc = " ".join(
            f"{k}={_fmt(r.image_qc.get(k))}"
            for k in ("raw_neighbor_corr", "raw_masked_neighbor_corr", "raw_num_bad_slices")
        )
        print(f"ses-{r.session}: {r.status} denoise={r.denoise_summary()} {qc} {times}", flush=True)
        for note in r.gradient_notes:
            print(f"ses-{r.session}: note: {note}", flush=True)
    return 0


if __name__ == "__main__":
    main_entry(main)
