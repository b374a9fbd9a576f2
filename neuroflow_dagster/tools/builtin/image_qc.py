"""Image QC of a DWI series the way QSIPrep reports it (DSI Studio's measures), for the QSIPrep stand-in.

QSIPrep runs DSI Studio's source-data QC on the raw series (``raw_*`` columns) and on
the series resampled to ACPC (``t1_*``) and writes both, with its motion summary, to
``*_space-ACPC_desc-image_qc.tsv``. DSI Studio cannot run here, so
:func:`series_qc` re-implements the measures from DSI Studio's source
(``src_data::quality_control_neighboring_dwi_corr``, ``dwi_contrast`` and
``get_bad_slices``), in numpy:

- ``neighbor_corr``: for every diffusion-weighted volume i, the volume j with the
  nearest q-vector (sqrt(b) g, +-g the same; identical q skipped); pairs with i > j
  are kept (as DSI Studio does); the mean Pearson correlation over all voxels.
  ``masked_neighbor_corr``: the same inside the brain mask. DSI Studio's guide:
  below ~0.4 a series is of low quality.
- ``dwi_contrast``: mean masked correlation with the nearest q-neighbour divided by
  the mean masked correlation with the most orthogonal direction.
- ``num_bad_slices``: (volume, slice) pairs, interior slices of every volume, whose
  summed absolute difference to both neighbouring slices exceeds twice the
  neighbours' difference to each other (a dropout or spike slice).
- dimensions, voxel sizes, ``max_b``, ``num_directions`` (diffusion-weighted volumes).

Differences, stated in docs/stand-ins.md: b-values <= 50 count as b=0 here (DSI
Studio counts b != 0 as diffusion-weighted), the mask is the stand-in's brain mask
(DSI Studio makes its own), data are float (DSI Studio's are 16-bit). Nothing that
needs a model fit or motion estimation is computed: ``coherence_index``, the motion
summary and ``t1_dice_distance`` are written as n/a.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroflow_dagster.tools.builtin.common import B0_THRESHOLD, generated_by, write_json_atomic, write_text_atomic
from neuroflow_dagster.tools.qc_table import DSI_STUDIO_MEASURES, MOTION_COLUMNS

NOT_MEASURED = ("coherence_index",)


def _qvectors(bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(bvals, 0.0, None))[:, None] * bvecs


def _nearest_neighbours(q: np.ndarray, dw: np.ndarray) -> dict[int, int]:
    """For each diffusion-weighted volume, its nearest other DW volume in q-space (+-q equal)."""
    idx = np.flatnonzero(dw)
    out: dict[int, int] = {}
    for i in idx:
        best, best_j = math.inf, -1
        for j in idx:
            if j == i or np.array_equal(q[i], q[j]):
                continue
            dist = min(float(np.linalg.norm(q[i] - q[j])), float(np.linalg.norm(q[i] + q[j])))
            if dist < best:
                best, best_j = dist, int(j)
        if best_j >= 0:
            out[int(i)] = best_j
    return out


def _most_orthogonal(q: np.ndarray, dw: np.ndarray) -> dict[int, int]:
    """DSI Studio's "contrast" partner: the DW volume whose q is closest to orthogonal to q_i."""
    idx = np.flatnonzero(dw)
    out: dict[int, int] = {}
    for i in idx:
        v1 = q[i]
        n2 = float(v1 @ v1)
        if n2 == 0.0:
            continue
        best, best_j = math.inf, -1
        for j in idx:
            if j == i or np.array_equal(q[i], q[j]):
                continue
            v2 = q[j]
            p2 = v2 - v1 * float(v1 @ v2) / n2
            length = float(np.linalg.norm(p2))
            if length == 0.0:
                continue
            dist = float(np.linalg.norm(v2 - p2 * (math.sqrt(n2) / length)))
            if dist < best:
                best, best_j = dist, int(j)
        if best_j >= 0:
            out[int(i)] = best_j
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64, copy=False)
    b = b.astype(np.float64, copy=False)
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else math.nan


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def bad_slices(data: np.ndarray) -> int:
    """DSI Studio's bad-slice count over every volume (slices along the third voxel axis)."""
    if data.shape[2] < 3:
        return 0
    d = data.astype(np.float32, copy=False)
    lower = np.abs(d[:, :, 1:-1] - d[:, :, :-2]).sum(axis=(0, 1))
    upper = np.abs(d[:, :, 1:-1] - d[:, :, 2:]).sum(axis=(0, 1))
    across = np.abs(d[:, :, 2:] - d[:, :, :-2]).sum(axis=(0, 1))
    return int(np.count_nonzero(lower + upper > 2.0 * across))


def series_qc(
    data: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray,
    zooms: Sequence[float],
    b0_threshold: float = B0_THRESHOLD,
) -> dict[str, float | None]:
    """DSI Studio's source-data QC measures of one 4D series (see the module docstring)."""
    dw = np.asarray(bvals) > b0_threshold
    q = _qvectors(np.asarray(bvals, dtype=float), np.asarray(bvecs, dtype=float))
    mask = np.asarray(mask, dtype=bool)
    flat = data.reshape(-1, data.shape[3])
    inside = flat[mask.reshape(-1)]
    neighbours = _nearest_neighbours(q, dw)
    pairs = [(i, j) for i, j in neighbours.items() if i > j]
    ndc = _mean([_corr(flat[:, i], flat[:, j]) for i, j in pairs]) if pairs else None
    masked = _mean([_corr(inside[:, i], inside[:, j]) for i, j in pairs]) if pairs and len(inside) > 1 else None
    contrast = None
    ortho = _most_orthogonal(q, dw)
    if neighbours and ortho and len(inside) > 1:
        near = _mean([_corr(inside[:, i], inside[:, j]) for i, j in neighbours.items()])
        far = _mean([_corr(inside[:, i], inside[:, j]) for i, j in ortho.items()])
        contrast = near / far if near is not None and far else None
    return {
        "dimension_x": float(data.shape[0]),
        "dimension_y": float(data.shape[1]),
        "dimension_z": float(data.shape[2]),
        "voxel_size_x": float(zooms[0]),
        "voxel_size_y": float(zooms[1]),
        "voxel_size_z": float(zooms[2]),
        "max_b": float(np.max(bvals)),
        "neighbor_corr": ndc,
        "masked_neighbor_corr": masked,
        "dwi_contrast": contrast,
        "num_bad_slices": float(bad_slices(data)),
        "num_directions": float(np.count_nonzero(dw)),
        "coherence_index": None,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else format(value, ".6g")
    return str(value)


def qc_row(
    raw: Mapping[str, float | None],
    processed: Mapping[str, float | None],
    file_name: str,
    entities: Mapping[str, str | None],
) -> dict[str, Any]:
    """One table row in QSIPrep 1.1.1's column order (raw_, t1_, motion, dice, bookkeeping)."""
    row: dict[str, Any] = {}
    for prefix, values in (("raw_", raw), ("t1_", processed)):
        for name in DSI_STUDIO_MEASURES:
            row[prefix + name] = values.get(name)
    for name in MOTION_COLUMNS:
        row[name] = None  # no motion was estimated
    row["t1_dice_distance"] = None  # no anatomical mask to compare with
    row["file_name"] = file_name
    for key in ("subject_id", "session_id", "task_id", "dir_id", "acq_id", "space_id", "rec_id", "run_id"):
        row[key] = entities.get(key)
    return row


def write_image_qc(path: Path, row: Mapping[str, Any], description: str) -> Path:
    """The TSV (header + one row, n/a for what was not measured) and a JSON sidecar naming the stand-in."""
    header = "\t".join(row)
    line = "\t".join(_cell(v) for v in row.values())
    write_text_atomic(path, header + "\n" + line + "\n")
    measured = [k for k, v in row.items() if v is not None and k not in ("file_name",) and not k.endswith("_id")]
    write_json_atomic(
        path.with_suffix(".json"),
        {
            "GeneratedBy": [generated_by("QSIPrep", description)],
            "StandIn": True,
            "Measured": measured,
            "NotMeasured": {
                **{f"{p}{m}": "needs DSI Studio's GQI fit" for p in ("raw_", "t1_") for m in NOT_MEASURED},
                **{m: "no head-motion estimation in the stand-in" for m in MOTION_COLUMNS},
                "t1_dice_distance": "no anatomical (T1w) brain mask in the stand-in",
            },
            "Definitions": "docs/stand-ins.md, section 'Image QC table'",
            "RawIs": "the session's DWI runs as loaded (merged, non-finite values set to 0), before denoising",
            "T1Is": "the stand-in's preprocessed (denoised) series, on the input grid (its 'space-ACPC')",
        },
    )
    return path
