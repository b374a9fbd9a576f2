"""Builtin stand-in for QSIRecon (session level): the scalar maps of the default recon specs and an atlas in
subject space.

NOT QSIRecon (container only). Reads the QSIPrep-layout outputs of one session and, for ``--recon-spec``
(one of the specs neuroflow chooses by default per shell scheme, naming/qsirecon.py), writes in QSIRecon
1.x's layout (the one QSIParc discovers):

- ``ss3t_fod_autotrack`` / ``dsi_studio_gqi`` (``derivatives/qsirecon-SS3TAutoTrack`` / ``-DSIStudio``):
  ``model-tensor_param-{fa,md,ad,rd}`` (dipy WLS tensor inside the brain mask; MD/AD/RD in mm^2/s when b
  is in s/mm^2) and ``model-gqi_param-{gfa,iso,qa}`` (dipy's GQI ODF, see :func:`fit_gqi`), the scalar maps
  DSI Studio's export writes - not its other tensor maps, FODs, bundles, tractography or connectivity;
- ``dipy_dki`` (``derivatives/qsirecon-DKI``): dipy's DiffusionKurtosisModel fitted exactly as QSIRecon's
  KurtosisReconstruction does, ``model-dki_param-{ad,ak,kfa,linearity,md,mk,mkt,planarity,rd,rk,sphericity}``
  and ``model-tensor_param-fa`` (QSIRecon 1.1.1's golden list; not the wmti maps);
- ``O/sub-X/ses-Y/dwi/sub-X_ses-Y_space-ACPC_seg-<Atlas>_dseg.nii.gz`` (atlas on the DWI grid, brain-masked)
  and ``O/atlases/atlas-<Atlas>/atlas-<Atlas>_dseg.tsv`` (columns ``index``, ``label``);
- ``O/sub-X/ses-Y/figures/sub-X_ses-Y_desc-qc_dwi.png`` (QC image, see qc.py).

It refuses what QSIRecon refuses, with the same reason (tools/shells.py): dipy's DKI on fewer than 3
b-values, a tensor export without 6 directions or a b=0 volume.

The atlas is ``--atlas-file`` (a label image assumed to be in the subject's space
already; it is only resampled, nearest neighbour, to the DWI grid) with its
``--atlas-labels`` table, or, without one, the data-driven demo atlas
``DemoQuantileGrid`` (12 regions; see :func:`demo_atlas`), which has no anatomical meaning.

    python -m neuroflow_dagster.tools.builtin.recon --qsiprep-dir Q --output-dir O \
        --participant-label X --session-label Y --work-dir W --recon-spec SPEC
        [--atlas-file F --atlas-labels L]
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from neuroflow_dagster.naming import qsirecon as names
from neuroflow_dagster.tools import shells
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
    require_file,
    strip_prefix,
    write_dataset_description,
    write_json_atomic,
    write_text_atomic,
)

STANDS_IN_FOR = "QSIRecon"
DEMO_ATLAS = "DemoQuantileGrid"
TENSOR_PARAMS = ("fa", "md", "ad", "rd")
GQI_PARAMS = ("gfa", "iso", "qa")
DKI_PARAMS = ("ad", "ak", "kfa", "linearity", "md", "mk", "mkt", "planarity", "rd", "rk", "sphericity")
# QSIRecon 1.1.1's KurtosisReconstruction clips the kurtosis maps to [-3/7, 10].
KURTOSIS_CLIP = (-0.42857142857142855, 10.0)
# DSI Studio's default GQI diffusion sampling length ratio.
GQI_SAMPLING_LENGTH = 1.25


@dataclass(frozen=True)
class StandInSpec:
    """What the stand-in writes for one recon spec: the workflow folder and its (model, param) maps."""

    suffix: str
    maps: tuple[tuple[str, str], ...]
    description: str


_SCALAR_EXPORT = tuple(("tensor", p) for p in TENSOR_PARAMS) + tuple(("gqi", p) for p in GQI_PARAMS)
STAND_IN_SPECS = {
    "ss3t_fod_autotrack": StandInSpec("SS3TAutoTrack", _SCALAR_EXPORT,
                                      "tensor (dipy WLS) and GQI (dipy) scalar maps, as DSI Studio's export of "
                                      "ss3t_fod_autotrack names them; no SS3T FODs, no bundles"),
    "dsi_studio_gqi": StandInSpec("DSIStudio", _SCALAR_EXPORT,
                                  "tensor (dipy WLS) and GQI (dipy) scalar maps, as DSI Studio's export of "
                                  "dsi_studio_gqi names them; no tractography, no connectivity"),
    "dipy_dki": StandInSpec("DKI", (*(("dki", p) for p in DKI_PARAMS), ("tensor", "fa")),
                            "dipy DiffusionKurtosisModel fitted as QSIRecon's dipy_dki does"),
}


@dataclass
class ReconResult:
    participant: str
    session: str
    spec: str
    atlas: str
    n_regions: int
    n_directions: int
    mask_voxels: int
    maps: dict[str, Path] = field(default_factory=dict)  # "<model>-<param>" -> file
    dseg: Path | None = None
    lut: Path | None = None
    qc_png: Path | None = None
    fa_mean: float = float("nan")
    timings_s: dict[str, float] = field(default_factory=dict)


def stand_in_spec(spec: str) -> StandInSpec:
    try:
        return STAND_IN_SPECS[spec]
    except KeyError:
        raise ConfigurationError(
            f"--recon-spec {spec}: the stand-in writes the maps of {', '.join(sorted(STAND_IN_SPECS))} only; "
            "run the real QSIRecon for other specs"
        ) from None


def recon_outputs(participant: str, session: str, spec: str, atlas: str = DEMO_ATLAS) -> tuple[str, ...]:
    """Golden output patterns of one session, relative to the output dir."""
    p = bids_prefix(participant, session)
    info = stand_in_spec(spec)
    wf = f"derivatives/qsirecon-{info.suffix}/sub-{participant}/ses-{session}/dwi"
    maps = tuple(f"{wf}/{p}_space-ACPC_model-{m}_param-{k}_dwimap.nii.gz" for m, k in info.maps)
    return (
        *maps,
        f"sub-{participant}/ses-{session}/dwi/{p}_space-ACPC_seg-{atlas}_dseg.nii.gz",
        f"atlases/atlas-{atlas}/atlas-{atlas}_dseg.tsv",
        f"sub-{participant}/ses-{session}/figures/{p}_desc-qc_dwi.png",
    )


def atlas_name_from_file(path: Path) -> str:
    """``atlas-AAL116_dseg.nii.gz`` -> ``AAL116``; else the file stem with non-alphanumerics removed."""
    match = re.search(r"(?:^|_)atlas-([A-Za-z0-9]+)", path.name)
    if match:
        return match.group(1)
    stem = path.name.split(".")[0]
    name = re.sub(r"[^A-Za-z0-9]", "", stem)
    if not name:
        raise ConfigurationError(f"cannot derive an atlas name from {path}")
    return name


def read_label_table(path: Path) -> pd.DataFrame:
    """Atlas label table -> DataFrame(index:int, label:str), background removed.

    Accepts a BIDS/QSIRecon TSV with a header (index + label/name columns) or a
    FreeSurfer-style LUT (``index name [R G B A]`` per line).
    """
    try:
        df = pd.read_csv(path, sep="\t")
    except Exception as exc:
        raise ConfigurationError(f"cannot read atlas labels {path}: {exc}") from exc
    cols = {str(c).strip().lower(): c for c in df.columns}
    idx_col = next((cols[c] for c in ("index", "id", "region_id", "label_id") if c in cols), None)
    name_col = next((cols[c] for c in ("label", "name", "region", "label_name", "region_name") if c in cols), None)
    if idx_col is None or name_col is None or name_col == idx_col:
        rows = []
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and not line.lstrip().startswith("#") and parts[0].isdigit():
                rows.append((int(parts[0]), parts[1]))
        if not rows:
            raise ConfigurationError(f"atlas labels {path} has neither index/label columns nor 'index name' lines")
        out = pd.DataFrame(rows, columns=["index", "label"])
    else:
        out = pd.DataFrame({"index": df[idx_col].astype(int), "label": df[name_col].astype(str)})
    out = out[out["index"] != 0].drop_duplicates("index").sort_values("index").reset_index(drop=True)
    if out.empty:
        raise ConfigurationError(f"atlas labels {path} lists no region (only background)")
    return out


def resample_atlas(atlas_img: nib.Nifti1Image, ref: nib.Nifti1Image) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto the reference grid (world coordinates)."""
    from nibabel.processing import resample_from_to

    data = np.asarray(atlas_img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        atlas_img = nib.Nifti1Image(data[..., 0], atlas_img.affine)
    elif data.ndim != 3:
        raise ConfigurationError(f"atlas image must be a 3D label image, got shape {data.shape}")
    out = resample_from_to(atlas_img, (ref.shape[:3], ref.affine), order=0, mode="constant", cval=0)
    return np.rint(np.asarray(out.dataobj)).astype(np.int32)


def _split_by_rank(idx: np.ndarray, values: np.ndarray, parts: int) -> list[np.ndarray]:
    """Split voxel indices into ``parts`` equal-count groups ordered by ``values`` (stable, deterministic)."""
    order = idx[np.argsort(values[idx], kind="stable")]
    return [chunk for chunk in np.array_split(order, parts)]


def demo_atlas(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    """Deterministic 12-region demo parcellation of the brain mask by position.

    World (RAS) coordinates of the mask voxels are split by rank: left/right halves
    along x, then posterior/middle/anterior thirds along y within each half, then
    inferior/superior halves along z within each third. Regions have (near) equal
    voxel counts. A stand-in for a real atlas so the parcellation step has something
    to work on; it has NO anatomical meaning (names only describe position).
    """
    vox = np.argwhere(mask)
    if len(vox) < 12:
        raise ValidationError(f"the brain mask has {len(vox)} voxel(s); the demo atlas needs at least 12")
    world = nib.affines.apply_affine(affine, vox)
    labels = np.zeros(mask.shape, dtype=np.int32)
    rows = []
    all_idx = np.arange(len(vox))
    hemis = _split_by_rank(all_idx, world[:, 0], 2)  # RAS: smaller x is left
    for h, (hemi_name, hemi_idx) in enumerate(zip(("Left", "Right"), hemis, strict=True)):
        thirds = _split_by_rank(hemi_idx, world[:, 1], 3)
        for a, (ap_name, ap_idx) in enumerate(zip(("Posterior", "Middle", "Anterior"), thirds, strict=True)):
            halves = _split_by_rank(ap_idx, world[:, 2], 2)
            for s, (is_name, is_idx) in enumerate(zip(("Inferior", "Superior"), halves, strict=True)):
                index = 1 + h * 6 + a * 2 + s
                v = vox[is_idx]
                labels[v[:, 0], v[:, 1], v[:, 2]] = index
                rows.append((index, f"{hemi_name}_{ap_name}_{is_name}"))
    return labels, pd.DataFrame(rows, columns=["index", "label"])


def _clean(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32, finite, 0 outside the mask."""
    out = np.nan_to_num(np.asarray(arr, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    out[~mask] = 0.0
    return out


def fit_tensor(data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """dipy WLS tensor fit inside the mask; maps are 0 outside it, FA clipped to [0, 1]."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=B0_THRESHOLD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = TensorModel(gtab, fit_method="WLS").fit(data, mask=mask)
        maps = {"fa": fit.fa, "md": fit.md, "ad": fit.ad, "rd": fit.rd}
    out = {}
    for key, arr in maps.items():
        arr = _clean(arr, mask)
        out[f"tensor-{key}"] = np.clip(arr, 0.0, 1.0) if key == "fa" else np.clip(arr, 0.0, None)
    return out


def fit_gqi(data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray,
            chunk: int = 20_000) -> dict[str, np.ndarray]:
    """GQI scalars from dipy's GeneralizedQSamplingModel ('standard', DSI Studio's sampling length 1.25) on
    dipy's 362-direction sphere, computed as one matrix product per chunk of voxels: ``gfa`` (dipy's gfa
    of the ODF), ``iso`` (the ODF's minimum) and ``qa`` (its maximum minus the minimum, the first peak's
    anisotropic part), the last two divided by the 99th percentile of the ODF maximum in the mask. DSI
    Studio normalises its QA and ISO its own way: compare within the stand-in only."""
    from dipy.core.gradients import gradient_table
    from dipy.data import default_sphere
    from dipy.reconst.gqi import GeneralizedQSamplingModel
    from dipy.reconst.odf import gfa

    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=B0_THRESHOLD)
    model = GeneralizedQSamplingModel(gtab, method="standard", sampling_length=GQI_SAMPLING_LENGTH)
    voxels = data[mask].astype(np.float64)
    model.fit(voxels[0]).odf(default_sphere)  # dipy builds (and caches) the q-space to ODF matrix
    kernel = model.cache_get("gqi_vector", key=default_sphere)
    values = {k: np.zeros(len(voxels)) for k in ("gfa", "min", "max")}
    for start in range(0, len(voxels), chunk):
        odf = voxels[start : start + chunk] @ kernel
        part = slice(start, start + len(odf))
        values["gfa"][part] = np.nan_to_num(gfa(odf))
        values["min"][part] = odf.min(axis=1)
        values["max"][part] = odf.max(axis=1)
    scale = float(np.percentile(values["max"], 99)) or 1.0
    out = {}
    scaled = {"gfa": values["gfa"], "iso": values["min"] / scale, "qa": (values["max"] - values["min"]) / scale}
    for key, vec in scaled.items():
        arr = np.zeros(mask.shape, dtype=np.float32)
        arr[mask] = vec
        out[f"gqi-{key}"] = _clean(arr, mask)
    return out


def fit_dki(data: np.ndarray, series: shells.Series, mask: np.ndarray) -> dict[str, np.ndarray]:
    """dipy's DKI as QSIRecon 1.1.1's KurtosisReconstruction runs it: the gradient table read as QSIRecon
    reads it, DiffusionKurtosisModel(gtab) (WLS), fit in the mask, kurtosis maps clipped to [-3/7, 10]."""
    from dipy.reconst import dki

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = dki.DiffusionKurtosisModel(shells.qsirecon_gtab(series)).fit(data, mask=mask)
        out = {f"dki-{k}": _clean(getattr(fit, k), mask)
               for k in ("ad", "kfa", "linearity", "md", "planarity", "rd", "sphericity")}
        low, high = KURTOSIS_CLIP
        out.update({f"dki-{k}": _clean(getattr(fit, k)(min_kurtosis=low, max_kurtosis=high), mask)
                    for k in ("ak", "mk", "mkt", "rk")})
        out["tensor-fa"] = np.clip(_clean(fit.fa, mask), 0.0, 1.0)
    return out


def run_recon(
    qsiprep_dir: Path,
    output_dir: Path,
    participant: str,
    session: str,
    work_dir: Path,
    recon_spec: str,
    atlas_file: Path | None = None,
    atlas_labels: Path | None = None,
) -> ReconResult:
    participant = check_label(strip_prefix(participant, "sub-"), "participant label")
    session = check_label(strip_prefix(session, "ses-"), "session label")
    info = stand_in_spec(recon_spec)
    if (atlas_file is None) != (atlas_labels is None):
        raise ConfigurationError("--atlas-file and --atlas-labels must be given together")
    if atlas_file is not None and not atlas_file.is_file():
        raise ConfigurationError(f"atlas file not found: {atlas_file}")
    if atlas_labels is not None and not atlas_labels.is_file():
        raise ConfigurationError(f"atlas labels file not found: {atlas_labels}")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    p = bids_prefix(participant, session)
    src = qsiprep_dir / f"sub-{participant}" / f"ses-{session}" / "dwi"
    dwi_path = require_file(src / f"{p}_space-ACPC_desc-preproc_dwi.nii.gz")
    bval_path = require_file(src / f"{p}_space-ACPC_desc-preproc_dwi.bval")
    bvec_path = require_file(src / f"{p}_space-ACPC_desc-preproc_dwi.bvec")
    mask_path = require_file(src / f"{p}_space-ACPC_desc-brain_mask.nii.gz")
    ref_path = src / f"{p}_space-ACPC_dwiref.nii.gz"

    img = nib.load(dwi_path)
    if img.ndim != 4:
        raise ValidationError(f"{dwi_path} is {img.ndim}D; a DWI series must be 4D")
    bvals, bvecs = load_gradients(bval_path, bvec_path, img.shape[3])
    # Refuses tables no model can use; non-unit directions (dipy's gradient_table would raise) are normalised.
    bvals, bvecs, gradient_notes = check_gradients(bvals, bvecs, bval_path.name)
    for note in gradient_notes:
        print(f"note: {note}", flush=True)
    # What QSIRecon's fits of this spec refuse, with the same reason (the check neuroflow runs before a run).
    try:
        series = shells.read_series(bval_path)
    except shells.GradientError as exc:
        raise ValidationError(str(exc)) from exc
    refused = shells.model_refusals(recon_spec, [(m, {}) for m in names.BUILTIN_SPECS[recon_spec].models],
                                    [series], f"sub-{participant} ses-{session}")
    if refused:
        raise ValidationError(refused[0])
    n_dirs = shells.count_directions(bvals, bvecs)
    mask_img = nib.load(mask_path)
    mask = np.asarray(mask_img.dataobj) > 0
    if mask.shape != img.shape[:3]:
        raise ValidationError(f"{mask_path} has shape {mask.shape}, the DWI {dwi_path.name} {img.shape[:3]}")
    if not mask.any():
        raise ValidationError(f"the brain mask {mask_path} is empty")
    data = np.asarray(img.dataobj, dtype=np.float32)
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if recon_spec == "dipy_dki":
        maps = fit_dki(data, series, mask)
    else:
        maps = {**fit_tensor(data, bvals, bvecs, mask), **fit_gqi(data, bvals, bvecs, mask)}
    timings["fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if atlas_file is not None and atlas_labels is not None:
        atlas_name = atlas_name_from_file(atlas_file)
        lut = read_label_table(atlas_labels)
        dseg = resample_atlas(nib.load(atlas_file), img)
        dseg[~mask] = 0
        if not np.isin(dseg, lut["index"].to_numpy()).any():
            raise ConfigurationError(
                f"atlas {atlas_file} shares no labelled voxel with the brain mask of sub-{participant} "
                f"ses-{session} (is it in the subject's space?)"
            )
        atlas_source = str(atlas_file)
    else:
        atlas_name = DEMO_ATLAS
        dseg, lut = demo_atlas(mask, img.affine)
        atlas_source = "data-driven demo parcellation (no anatomical meaning)"
    timings["atlas"] = time.perf_counter() - t0

    if ref_path.is_file():
        b0 = np.asarray(nib.load(ref_path).dataobj, dtype=np.float32)
    else:
        b0 = data[..., bvals <= B0_THRESHOLD].mean(axis=3)

    t0 = time.perf_counter()
    result = ReconResult(participant, session, recon_spec, atlas_name, len(lut), n_dirs, int(mask.sum()))
    wf_root = output_dir / "derivatives" / f"qsirecon-{info.suffix}"
    wf_final = wf_root / f"sub-{participant}" / f"ses-{session}"
    seg_final = output_dir / f"sub-{participant}" / f"ses-{session}"
    desc = f"{recon_spec}: {info.description}; an atlas on the DWI grid, in QSIRecon's layout; not QSIRecon."
    with AtomicDir(seg_final) as seg_tmp, AtomicDir(wf_final) as wf_tmp:
        (wf_tmp / "dwi").mkdir()
        hdr = img.header.copy()
        hdr.set_data_dtype(np.float32)
        for model, param in info.maps:
            name = f"{p}_space-ACPC_model-{model}_param-{param}_dwimap"
            nib.save(nib.Nifti1Image(maps[f"{model}-{param}"], img.affine, hdr), wf_tmp / "dwi" / f"{name}.nii.gz")
            write_json_atomic(
                wf_tmp / "dwi" / f"{name}.json",
                {
                    "GeneratedBy": [generated_by(STANDS_IN_FOR, desc)],
                    "Model": model,
                    "Parameter": param.upper(),
                    "ReconSpec": recon_spec,
                    "Units": "mm^2/s (b-values in s/mm^2)" if param in ("md", "ad", "rd") else "unitless",
                    "Sources": [str(dwi_path), str(mask_path)],
                },
            )
            result.maps[f"{model}-{param}"] = wf_final / "dwi" / f"{name}.nii.gz"
        (seg_tmp / "dwi").mkdir()
        seg_hdr = img.header.copy()
        seg_hdr.set_data_dtype(np.int32)
        seg_name = f"{p}_space-ACPC_seg-{atlas_name}_dseg.nii.gz"
        nib.save(nib.Nifti1Image(dseg.astype(np.int32), img.affine, seg_hdr), seg_tmp / "dwi" / seg_name)
        result.dseg = seg_final / "dwi" / seg_name

        from neuroflow_dagster.tools.builtin.qc import write_qc_png

        png_name = f"{p}_desc-qc_dwi.png"
        write_qc_png(
            seg_tmp / "figures" / png_name,
            fa=maps["tensor-fa"],
            mask=mask,
            b0=b0,
            dseg=dseg,
            zooms=img.header.get_zooms()[:3],
            title=f"sub-{participant} ses-{session} | stand-in for QSIRecon {recon_spec} | atlas {atlas_name}",
        )
        result.qc_png = seg_final / "figures" / png_name

    lut_path = output_dir / "atlases" / f"atlas-{atlas_name}" / f"atlas-{atlas_name}_dseg.tsv"
    write_text_atomic(lut_path, lut[["index", "label"]].to_csv(sep="\t", index=False))
    write_json_atomic(
        lut_path.with_suffix(".json"),
        {
            "GeneratedBy": [generated_by(STANDS_IN_FOR, desc)],
            "Source": atlas_source,
            "SpaceNote": "labels resampled (nearest neighbour) to each session's DWI grid and brain-masked",
        },
    )
    result.lut = lut_path
    for root, name in (
        (output_dir, "neuroflow-dagster stand-in for QSIRecon"),
        (wf_root, f"neuroflow-dagster stand-in for QSIRecon ({recon_spec})"),
    ):
        write_dataset_description(root, name, STANDS_IN_FOR, desc)
    timings["write"] = time.perf_counter() - t0
    result.timings_s = timings
    result.fa_mean = float(maps["tensor-fa"][mask].mean())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("neuroflow-builtin-recon", "Builtin stand-in for QSIRecon (not QSIRecon).")
    parser.add_argument("--qsiprep-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--participant-label", required=True)
    parser.add_argument("--session-label", required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--recon-spec", required=True)
    parser.add_argument("--atlas-file", type=Path)
    parser.add_argument("--atlas-labels", type=Path)
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    res = run_recon(
        args.qsiprep_dir,
        args.output_dir,
        args.participant_label,
        args.session_label,
        args.work_dir,
        args.recon_spec,
        args.atlas_file,
        args.atlas_labels,
    )
    times = " ".join(f"{k}={v:.2f}s" for k, v in res.timings_s.items())
    print(
        f"sub-{res.participant} ses-{res.session}: {res.spec}, {res.n_directions} directions, mask "
        f"{res.mask_voxels} voxels, mean FA {res.fa_mean:.3f}, atlas {res.atlas} ({res.n_regions} regions); {times}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    main_entry(main)
