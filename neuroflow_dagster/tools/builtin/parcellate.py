"""Builtin stand-in for QSIParc (session level): per-region tables with the real ``parcellate`` library.

QSIParc itself is installable but heavy (~1.4 GB with its plotting stack); its core
is ``parcellate.VolumetricParcellator``, which this stand-in calls the same way
(subject-space dseg + LUT, ``stat_tier="extended"``, no resampling of co-registered
inputs) and writes QSIParc 0.1.2's layout:

    O/sub-X/ses-Y/dwi/atlas-<A>/sub-X_ses-Y_atlas-<A>_software-<WF>_space-ACPC_model-<m>_param-<p>_diffmap.tsv
                                                                                   (+ .json sidecar)

Inputs are discovered as QSIParc does: dsegs in ``R/sub-X/ses-Y/dwi/*_seg-<A>_dseg.nii.gz``,
label tables in ``R/atlases/atlas-<A>/*_dseg.tsv``, scalar maps in
``R/derivatives/qsirecon-*/sub-X/ses-Y/dwi/*_space-ACPC_*_dwimap.nii.gz``.

``--mask`` (the predecessor's ``mask: gm``): parcellate's built-in ``gm``/``wm``/``brain``
masks are MNI152 templates, which do not apply to subject-space data. The stand-in
therefore uses a subject-space proxy: ``gm`` = FA < 0.2 and MD < 1.5e-3 mm^2/s (not
white matter, not CSF), ``wm`` = FA >= 0.2, ``brain``/``none`` = no extra mask (the
recon stand-in's dseg is already brain-masked); any other value is read as the path
of a NIfTI mask. What was applied is recorded in every sidecar.

    python -m neuroflow_dagster.tools.builtin.parcellate --qsirecon-dir R --output-dir O \
        --participant-label X --session-label Y [--mask gm] [--stat-tier extended]
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from neuroflow_dagster.tools.builtin.common import (
    AtomicDir,
    ConfigurationError,
    ValidationError,
    check_label,
    generated_by,
    main_entry,
    make_parser,
    strip_prefix,
    write_dataset_description,
    write_json_atomic,
)

STANDS_IN_FOR = "QSIParc"
STAT_TIERS = ("core", "extended", "diagnostic", "all")
GM_FA_MAX = 0.2
CSF_MD_MIN = 1.5e-3  # mm^2/s; GM/WM are ~0.7-0.9e-3, CSF ~3e-3
_ENTITY_RE = re.compile(r"(?P<key>[a-zA-Z]+)-(?P<val>[a-zA-Z0-9]+)")  # QSIParc's entity parser


@dataclass
class ParcResult:
    participant: str
    session: str
    tables: list[Path] = field(default_factory=list)
    n_regions: dict[str, int] = field(default_factory=dict)
    mask: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)


def parse_entities(filename: str) -> dict[str, str]:
    return {m.group("key"): m.group("val") for m in _ENTITY_RE.finditer(filename)}


def infer_hemisphere(name: str) -> str:
    """L / R / bilateral from common naming conventions (as QSIParc does)."""
    lower = name.lower()
    if lower.startswith(("lh_", "lh-", "lh.", "left_", "left-", "l_")) or lower.endswith(("_lh", "_left", "_l")):
        return "L"
    if lower.startswith(("rh_", "rh-", "rh.", "right_", "right-", "r_")) or lower.endswith(("_rh", "_right", "_r")):
        return "R"
    if "_lh_" in lower:
        return "L"
    if "_rh_" in lower:
        return "R"
    return "bilateral"


def diffmap_stem(participant: str, session: str, atlas: str, software: str, entities: dict[str, str]) -> str:
    """QSIParc 0.1.2's file stem: sub_ses_atlas_software_<source entities but sub/ses>_diffmap."""
    parts = [f"sub-{participant}", f"ses-{session}", f"atlas-{atlas}"]
    if software:
        parts.append(f"software-{software}")
    parts += [f"{k}-{v}" for k, v in entities.items() if k not in ("sub", "ses")]
    parts.append("diffmap")
    return "_".join(parts)


def discover(
    qsirecon_dir: Path, participant: str, session: str
) -> tuple[list[tuple[str, Path, Path | None]], list[tuple[Path, str, dict[str, str]]]]:
    """(atlas name, dseg, LUT or None) and (scalar map, software, entities) for one session."""
    ses_dir = qsirecon_dir / f"sub-{participant}" / f"ses-{session}" / "dwi"
    dsegs = []
    for path in sorted(ses_dir.glob("*_dseg.nii.gz")):
        atlas = parse_entities(path.name).get("seg")
        if not atlas:
            continue
        luts = sorted((qsirecon_dir / "atlases" / f"atlas-{atlas}").glob("*_dseg.tsv"))
        dsegs.append((atlas, path, luts[0] if luts else None))
    if not dsegs:
        raise ValidationError(
            f"missing required file {ses_dir}/*_seg-<atlas>_dseg.nii.gz (no atlas for "
            f"sub-{participant} ses-{session} in {qsirecon_dir})"
        )
    scalars = []
    for wf_dir in sorted((qsirecon_dir / "derivatives").glob("qsirecon-*")):
        software = wf_dir.name[len("qsirecon-") :].replace("_", "").replace("-", "")
        for path in sorted((wf_dir / f"sub-{participant}" / f"ses-{session}" / "dwi").glob("*_dwimap.nii.gz")):
            entities = parse_entities(path.name)
            if entities.get("space") == "ACPC":
                scalars.append((path, software, entities))
    if not scalars:
        raise ValidationError(
            f"missing required file {qsirecon_dir}/derivatives/qsirecon-*/sub-{participant}/ses-{session}/dwi/"
            "*_space-ACPC_*_dwimap.nii.gz (no scalar map)"
        )
    return dsegs, scalars


def load_lut(atlas: str, dseg_path: Path, lut_path: Path | None) -> tuple[pd.DataFrame, str]:
    """LUT as parcellate wants it (index, label) plus QSIParc's hemisphere column."""
    if lut_path is not None:
        df = pd.read_csv(lut_path, sep="\t")
        cols = {str(c).strip().lower(): c for c in df.columns}
        idx = next((cols[c] for c in ("index", "id", "region_id") if c in cols), df.columns[0])
        name = next(
            (cols[c] for c in ("label", "name", "region", "label_name", "region_name") if c in cols),
            df.columns[1] if len(df.columns) > 1 else df.columns[0],
        )
        lut = pd.DataFrame({"index": df[idx].astype(int), "label": df[name].astype(str)})
        source = str(lut_path)
    else:
        data = np.asarray(nib.load(dseg_path).dataobj).astype(np.int64)
        ids = [int(v) for v in np.unique(data) if v != 0]
        lut = pd.DataFrame({"index": ids, "label": [f"region_{i:04d}" for i in ids]})
        source = f"labels found in {dseg_path.name} (no atlases/atlas-{atlas}/*_dseg.tsv)"
    lut = lut[lut["index"] != 0].drop_duplicates("index").reset_index(drop=True)
    lut["hemisphere"] = [infer_hemisphere(n) for n in lut["label"]]
    return lut, source


def build_mask(
    mask_opt: str, scalars: list[tuple[Path, str, dict[str, str]]]
) -> tuple[nib.Nifti1Image | None, dict[str, Any]]:
    """Resolve --mask into a subject-space mask image (or None) and a description for the sidecars."""
    key = mask_opt.strip().lower()
    if key in ("none", "brain"):
        return None, {"requested": mask_opt, "applied": "none beyond the atlas (the dseg is brain-masked)"}
    if key in ("gm", "wm"):
        by_param = {e.get("param", "").lower(): p for p, _, e in scalars}
        if "fa" not in by_param or (key == "gm" and "md" not in by_param):
            need = "FA and MD maps" if key == "gm" else "an FA map"
            raise ValidationError(
                f"--mask {mask_opt} needs {need} (param-fa/param-md _dwimap) for the "
                "subject-space tissue proxy; none found"
            )
        fa_img = nib.load(by_param["fa"])
        fa = np.asarray(fa_img.dataobj, dtype=np.float32)
        if key == "wm":
            sel = fa >= GM_FA_MAX
            rule = f"FA >= {GM_FA_MAX}"
        else:
            md = np.asarray(nib.load(by_param["md"]).dataobj, dtype=np.float32)
            sel = (fa < GM_FA_MAX) & (md > 0) & (md < CSF_MD_MIN)
            rule = f"FA < {GM_FA_MAX} and 0 < MD < {CSF_MD_MIN} mm^2/s"
        img = nib.Nifti1Image(sel.astype(np.uint8), fa_img.affine)
        return img, {
            "requested": mask_opt,
            "applied": f"subject-space {key.upper()} proxy: {rule}",
            "why": "parcellate's gm/wm masks are MNI152 templates; stand-in data are in subject space",
            "n_voxels": int(sel.sum()),
        }
    path = Path(mask_opt)
    if not path.is_file():
        raise ConfigurationError(f"--mask {mask_opt!r} is neither gm, wm, brain, none nor an existing NIfTI file")
    img = nib.load(path)
    return img, {
        "requested": mask_opt,
        "applied": f"mask file {path} (voxels > 0)",
        "n_voxels": int((np.asarray(img.dataobj) > 0).sum()),
    }


def _fallback_if_empty(
    mask_img: nib.Nifti1Image, info: dict[str, Any], dsegs: list[tuple[str, Path, Path | None]]
) -> tuple[nib.Nifti1Image | None, dict[str, Any]]:
    """A tissue proxy that keeps no atlas voxel would turn every table into n/a: use no mask, say so.

    Only for the gm/wm proxies (a heuristic that may not fit the data); an explicit mask
    file is the operator's choice and is applied as given.
    """
    if not str(info.get("applied", "")).startswith("subject-space"):
        return mask_img, info
    sel = np.asarray(mask_img.dataobj) > 0
    for _, dseg_path, _ in dsegs:
        dseg = np.asarray(nib.load(dseg_path).dataobj)
        if dseg.shape == sel.shape and np.any(sel & (dseg > 0)):
            return mask_img, info
    note = f"{info['applied']} selected no atlas voxel; fell back to no extra mask"
    print(f"warning: --mask {info['requested']}: {note}", flush=True)
    return None, {**info, "applied": "none (fallback)", "fallback_reason": note}


def parcellate_map(
    scalar_path: Path, dseg_path: Path, lut: pd.DataFrame, mask: nib.Nifti1Image | None, stat_tier: str
) -> pd.DataFrame:
    """One scalar x one atlas -> one row per LUT region, via parcellate.VolumetricParcellator."""
    from parcellate import VolumetricParcellator

    scalar_img = nib.load(scalar_path)
    dseg_img = nib.load(dseg_path)
    if scalar_img.shape[:3] != dseg_img.shape[:3]:
        raise ValidationError(
            f"{scalar_path.name} has shape {scalar_img.shape[:3]} but {dseg_path.name} "
            f"{dseg_img.shape[:3]}; both must be on the session's DWI grid"
        )
    parcellator = VolumetricParcellator(
        atlas_img=dseg_img, lut=lut, mask=mask, stat_tier=stat_tier, resampling_target=None
    )
    with warnings.catch_warnings():
        # empty regions (e.g. all voxels outside the tissue proxy) give NaN statistics, by design
        warnings.simplefilter("ignore", RuntimeWarning)
        parcellator.fit(scalar_img)
        return parcellator.transform(scalar_img)


def run_parcellate(
    qsirecon_dir: Path, output_dir: Path, participant: str, session: str, mask: str = "gm", stat_tier: str = "extended"
) -> ParcResult:
    participant = check_label(strip_prefix(participant, "sub-"), "participant label")
    session = check_label(strip_prefix(session, "ses-"), "session label")
    if stat_tier not in STAT_TIERS:
        raise ConfigurationError(f"unknown stat tier {stat_tier!r}; choose one of {', '.join(STAT_TIERS)}")
    if not qsirecon_dir.is_dir():
        raise ValidationError(f"missing required folder {qsirecon_dir} (QSIRecon outputs)")
    t0 = time.perf_counter()
    dsegs, scalars = discover(qsirecon_dir, participant, session)
    mask_img, mask_info = build_mask(mask, scalars)
    if mask_img is not None:
        mask_img, mask_info = _fallback_if_empty(mask_img, mask_info, dsegs)
    res = ParcResult(participant, session, mask=mask_info)
    res.timings_s["discover"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    final = output_dir / f"sub-{participant}" / f"ses-{session}"
    with AtomicDir(final) as tmp:
        for atlas, dseg_path, lut_path in dsegs:
            lut, lut_source = load_lut(atlas, dseg_path, lut_path)
            res.n_regions[atlas] = len(lut)
            atlas_dir = tmp / "dwi" / f"atlas-{atlas}"
            atlas_dir.mkdir(parents=True)
            for scalar_path, software, entities in scalars:
                scalar_name = entities.get("param", entities.get("desc", scalar_path.name.split("_")[-1]))
                table = parcellate_map(scalar_path, dseg_path, lut, mask_img, stat_tier)
                table["scalar"] = scalar_name
                stem = diffmap_stem(participant, session, atlas, software, entities)
                table.to_csv(atlas_dir / f"{stem}.tsv", sep="\t", index=False, float_format="%.6g", na_rep="n/a")
                write_json_atomic(
                    atlas_dir / f"{stem}.json",
                    {
                        "subject": f"sub-{participant}",
                        "session": f"ses-{session}",
                        "atlas_name": atlas,
                        "atlas_dseg": str(dseg_path.resolve()),
                        "lut_file": str(lut_path.resolve()) if lut_path else None,
                        "lut_source": lut_source,
                        "scalar_name": scalar_name,
                        "source_file": str(scalar_path.resolve()),
                        "source_entities": entities,
                        "software": software or None,
                        "processing": {
                            "zero_is_missing": False,
                            "stat_tier": stat_tier,
                            "statistics": [
                                c for c in table.columns if c not in ("index", "label", "hemisphere", "scalar")
                            ],
                            "mask": mask_info,
                        },
                        "generated_by": {
                            **generated_by(STANDS_IN_FOR, "per-region statistics with parcellate"),
                            "timestamp": datetime.now(timezone.utc).isoformat(),
                        },
                    },
                )
                res.tables.append(final / "dwi" / f"atlas-{atlas}" / f"{stem}.tsv")
    write_dataset_description(
        output_dir,
        "neuroflow-dagster stand-in for QSIParc",
        STANDS_IN_FOR,
        "Per-region diffusion statistics with the parcellate library in QSIParc's layout; not QSIParc.",
    )
    res.timings_s["parcellate"] = time.perf_counter() - t0
    return res


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("neuroflow-builtin-parcellate", "Builtin stand-in for QSIParc (not QSIParc).")
    parser.add_argument("--qsirecon-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--participant-label", required=True)
    parser.add_argument("--session-label", required=True)
    parser.add_argument("--mask", default="gm")
    parser.add_argument("--stat-tier", default="extended", choices=STAT_TIERS)
    args = parser.parse_args(argv)
    res = run_parcellate(
        args.qsirecon_dir, args.output_dir, args.participant_label, args.session_label, args.mask, args.stat_tier
    )
    times = " ".join(f"{k}={v:.2f}s" for k, v in res.timings_s.items())
    print(
        f"sub-{res.participant} ses-{res.session}: {len(res.tables)} table(s), regions "
        f"{res.n_regions}, mask: {res.mask.get('applied')}; {times}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    main_entry(main)
