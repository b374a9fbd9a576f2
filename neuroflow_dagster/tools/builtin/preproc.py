"""Builtin stand-in for QSIPrep (subject level): denoise, brain mask, b0 reference.

NOT QSIPrep. QSIPrep needs FSL/ANTs/AFNI/FreeSurfer inside its container, which
cannot run on these machines. This stand-in lets the platform run end to end:
it writes the files downstream steps read, in QSIPrep's layout, and says in every
dataset_description.json / sidecar / report that it is a stand-in.

What it does per listed session with DWI: load ``sub-X/ses-Y/dwi/*_dwi.nii.gz``
(runs on the first run's voxel grid are concatenated in name order, as QSIPrep
merges a session's runs; runs on another grid are skipped and listed), denoise,
median_otsu brain mask on the mean b0, mean denoised b0 as the reference. Subject
level: all sessions are (re)written in one run, and a subject b0 template (mean of
the intensity-normalised session references) is written when the sessions share
one voxel grid. No motion/eddy/distortion correction, no ACPC reorientation, no
resampling: "space-ACPC" files are on the input grid.

    python -m neuroflow_dagster.tools.builtin.preproc --bids-dir D --output-dir O \
        --participant-label X --session-label 01 [02 ...] --work-dir W [--nprocs N]
        [--denoise-method auto|dwidenoise|patch2self|nlmeans|mppca|none]
"""

from __future__ import annotations

import html
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from neuroflow_dagster.tools.builtin.common import (
    B0_THRESHOLD,
    AtomicDir,
    ConfigurationError,
    ValidationError,
    bids_prefix,
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

STANDS_IN_FOR = "QSIPrep"
DENOISE_METHODS = ("auto", "dwidenoise", "patch2self", "nlmeans", "mppca", "none")
# patch2self regresses each volume on the others: with few DW volumes there is nothing to learn from.
PATCH2SELF_MIN_DW_VOLUMES = 6


@dataclass
class SessionResult:
    session: str
    status: str  # "processed" | "skipped"
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    denoise_method: str = ""
    denoise_reason: str = ""
    runs_used: list[str] = field(default_factory=list)
    runs_skipped: list[str] = field(default_factory=list)
    shape: tuple[int, ...] = ()
    mask_voxels: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)


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
    )


def _strip_nii(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _load_session_dwi(dwi_dir: Path) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, list[Path], list[str]]:
    """Load and concatenate the session's DWI runs that share the first run's grid."""
    runs = sorted(dwi_dir.glob("*_dwi.nii.gz")) + sorted(dwi_dir.glob("*_dwi.nii"))
    if not runs:
        raise ValidationError(f"missing required file {dwi_dir}/*_dwi.nii.gz")
    ref_img: nib.Nifti1Image | None = None
    arrays, bvals_all, bvecs_all, used, skipped = [], [], [], [], []
    for run in runs:
        stem = _strip_nii(run)
        bval, bvec = run.with_name(stem + ".bval"), run.with_name(stem + ".bvec")
        for needed in (bval, bvec):
            if not needed.is_file():
                raise ValidationError(f"missing required file {needed} (gradient table of {run.name})")
        img = nib.load(run)
        if img.ndim != 4:
            raise ValidationError(f"{run} is {img.ndim}D; a DWI series must be 4D")
        if ref_img is None:
            ref_img = img
        elif img.shape[:3] != ref_img.shape[:3] or not np.allclose(img.affine, ref_img.affine, atol=1e-3):
            skipped.append(f"{run.name}: voxel grid differs from {used[0].name}")
            continue
        bvals, bvecs = load_gradients(bval, bvec, img.shape[3])
        arrays.append(np.asarray(img.dataobj, dtype=np.float32))
        bvals_all.append(bvals)
        bvecs_all.append(bvecs)
        used.append(run)
    assert ref_img is not None
    data = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=3)
    out = nib.Nifti1Image(data, ref_img.affine, ref_img.header)
    return out, np.concatenate(bvals_all), np.concatenate(bvecs_all), used, skipped


def choose_denoise_method(requested: str, bvals: np.ndarray) -> tuple[str, str]:
    """Resolve ``auto``; explicit choices that cannot work are configuration errors."""
    n_dw = int(np.sum(bvals > B0_THRESHOLD))
    have_mrtrix = shutil.which("dwidenoise") is not None
    if requested == "auto":
        if have_mrtrix:
            return "dwidenoise", "auto: MRtrix3 dwidenoise found on PATH (QSIPrep's default denoiser)"
        if n_dw >= PATCH2SELF_MIN_DW_VOLUMES:
            return "patch2self", f"auto: no dwidenoise on PATH; {n_dw} DW volumes suit dipy patch2self"
        return "nlmeans", (
            f"auto: no dwidenoise on PATH; only {n_dw} DW volume(s), too few for patch2self "
            "(and dipy mppca is too slow on a whole brain); per-volume non-local means"
        )
    if requested == "dwidenoise" and not have_mrtrix:
        raise ConfigurationError("denoise method dwidenoise requested but MRtrix3 dwidenoise is not on PATH")
    if requested == "patch2self" and n_dw < 2:
        raise ConfigurationError(f"denoise method patch2self needs at least 2 DW volumes, the series has {n_dw}")
    return requested, "requested"


def denoise(data: np.ndarray, bvals: np.ndarray, mask: np.ndarray, method: str, work: Path,
            affine: np.ndarray, nprocs: int) -> np.ndarray:
    """Denoise a 4D series; returns float32. Parameters chosen for speed (see docs/stand-ins.md)."""
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

        out = patch2self(data, bvals, model="ols", b0_threshold=B0_THRESHOLD, shift_intensity=True,
                         clip_negative_vals=False, verbose=False)
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

        out = mppca(data, mask=mask, patch_radius=1)
        out = np.where(mask[..., None], out, data)
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


def process_session(bids_dir: Path, out_dir: Path, participant: str, session: str, work_dir: Path,
                    method: str, nprocs: int) -> tuple[SessionResult, nib.Nifti1Image | None, np.ndarray | None]:
    res = SessionResult(session=session, status="processed")
    ses_dir = bids_dir / f"sub-{participant}" / f"ses-{session}"
    if not ses_dir.is_dir():
        raise ValidationError(f"missing required folder {ses_dir} (session listed for sub-{participant})")
    dwi_dir = ses_dir / "dwi"
    if not dwi_dir.is_dir() or not any(dwi_dir.glob("*_dwi.nii*")):
        res.status, res.reason = "skipped", f"no DWI in {dwi_dir}"
        return res, None, None

    t0 = time.perf_counter()
    img, bvals, bvecs, used, skipped = _load_session_dwi(dwi_dir)
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
            f"sub-{participant} ses-{session} has no b=0 volume (b <= {B0_THRESHOLD:g}) in "
            f"{', '.join(res.runs_used)}; a b0 reference and brain mask cannot be made"
        )
    res.timings_s["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mask = brain_mask(data[..., b0].mean(axis=3))
    if not mask.any():
        raise ValidationError(f"sub-{participant} ses-{session}: the brain mask of {res.runs_used[0]} is empty")
    res.mask_voxels = int(mask.sum())
    res.timings_s["mask"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    res.denoise_method, res.denoise_reason = choose_denoise_method(method, bvals)
    sess_work = work_dir / f"sub-{participant}_ses-{session}"
    sess_work.mkdir(parents=True, exist_ok=True)
    den = denoise(data, bvals, mask, res.denoise_method, sess_work, img.affine, nprocs)
    res.timings_s["denoise"] = time.perf_counter() - t0

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
        write_json_atomic(d / f"{stem}.json", {
            "GeneratedBy": [generated_by(STANDS_IN_FOR, "denoise + brain mask + b0 reference")],
            "StandIn": True,
            "Sources": [str(p) for p in used],
            "RunsSkipped": skipped,
            "DenoiseMethod": res.denoise_method,
            "DenoiseReason": res.denoise_reason,
            "NonFiniteValuesZeroed": non_finite,
            "B0Threshold": B0_THRESHOLD,
            "NotDone": ["head motion / eddy current correction", "susceptibility distortion correction",
                        "ACPC reorientation and resampling (files are on the input grid)",
                        "b-vector rotation"],
        })
        mask_hdr = img.header.copy()
        mask_hdr.set_data_dtype(np.uint8)
        mask_img = nib.Nifti1Image(mask.astype(np.uint8), img.affine, mask_hdr)
        nib.save(mask_img, d / f"{prefix}_space-ACPC_desc-brain_mask.nii.gz")
        ref_hdr = img.header.copy()
        ref_hdr.set_data_dtype(np.float32)
        ref_img = nib.Nifti1Image(ref, img.affine, ref_hdr)
        nib.save(ref_img, d / f"{prefix}_space-ACPC_dwiref.nii.gz")
    res.timings_s["write"] = time.perf_counter() - t0
    res.outputs = list(preproc_outputs(participant, session))
    return res, ref_img, mask


def write_b0_template(out_dir: Path, participant: str,
                      refs: list[tuple[str, nib.Nifti1Image, np.ndarray]]) -> tuple[Path | None, str]:
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


def write_report(out_dir: Path, participant: str, results: list[SessionResult], template_note: str,
                 elapsed_s: float) -> Path:
    rows = []
    for r in results:
        detail = r.reason if r.status == "skipped" else (
            f"runs {', '.join(r.runs_used)}; shape {r.shape}; mask {r.mask_voxels} voxels; "
            f"denoise {r.denoise_method} ({r.denoise_reason})"
            + (f"; skipped runs: {'; '.join(r.runs_skipped)}" if r.runs_skipped else "")
        )
        rows.append(f"<tr><td>ses-{html.escape(r.session)}</td><td>{r.status}</td>"
                    f"<td>{html.escape(detail)}</td></tr>")
    body = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>sub-{participant} - stand-in for QSIPrep</title></head>
<body>
<h1>sub-{html.escape(participant)}</h1>
<p><strong>This is NOT a QSIPrep report.</strong> These outputs were written by the
neuroflow-dagster builtin stand-in for QSIPrep: denoising, brain mask and b0 reference only;
no motion, eddy or distortion correction, no ACPC alignment, no anatomical processing.</p>
<table border="1"><tr><th>session</th><th>status</th><th>details</th></tr>
{''.join(rows)}
</table>
<p>Subject b0 template: {html.escape(template_note)}</p>
<p>Run time: {elapsed_s:.1f} s</p>
</body></html>
"""
    return write_text_atomic(out_dir / f"sub-{participant}.html", body)


def run_preproc(bids_dir: Path, output_dir: Path, participant: str, sessions: Sequence[str], work_dir: Path,
                nprocs: int = 1, denoise_method: str = "auto") -> list[SessionResult]:
    """Process every listed session of one subject; returns one result per session."""
    start = time.perf_counter()
    participant = check_label(strip_prefix(participant, "sub-"), "participant label")
    sessions = [check_label(strip_prefix(s, "ses-"), "session label") for s in sessions]
    if denoise_method not in DENOISE_METHODS:
        raise ConfigurationError(f"unknown denoise method {denoise_method!r}; choose one of "
                                 f"{', '.join(DENOISE_METHODS)}")
    if not (bids_dir / f"sub-{participant}").is_dir():
        raise ValidationError(f"missing required folder {bids_dir / f'sub-{participant}'}")
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    results: list[SessionResult] = []
    refs: list[tuple[str, nib.Nifti1Image, np.ndarray]] = []
    for ses in dict.fromkeys(sessions):  # de-duplicate, keep order
        res, ref, mask = process_session(bids_dir, output_dir, participant, ses, work_dir, denoise_method,
                                         nprocs)
        results.append(res)
        if ref is not None and mask is not None:
            refs.append((ses, ref, mask))
    if not refs:
        listed = ", ".join(f"ses-{s}" for s in sessions)
        raise ValidationError(f"missing required file: no DWI series in any listed session of "
                              f"sub-{participant} ({listed}) under {bids_dir}")
    _, template_note = write_b0_template(output_dir, participant, refs)
    write_dataset_description(
        output_dir, "neuroflow-dagster stand-in for QSIPrep", STANDS_IN_FOR,
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
    args = parser.parse_args(argv)
    if not args.bids_dir.is_dir():
        raise ValidationError(f"missing required folder {args.bids_dir} (BIDS dataset)")
    results = run_preproc(args.bids_dir, args.output_dir, args.participant_label, args.session_label,
                          args.work_dir, max(1, args.nprocs), args.denoise_method)
    for r in results:
        extra = f" ({r.reason})" if r.reason else f" denoise={r.denoise_method} " + " ".join(
            f"{k}={v:.2f}s" for k, v in r.timings_s.items())
        print(f"ses-{r.session}: {r.status}{extra}", flush=True)
    return 0


if __name__ == "__main__":
    main_entry(main)
