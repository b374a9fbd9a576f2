"""Per-session QC image of the stand-in reconstruction: FA with the mask contour, b0 with the atlas.

One small PNG (two rows of three orthogonal slices through the mask's centre) that
an operator can glance at in the Dagster UI to catch a failed mask, a misplaced
atlas or a nonsense FA map. Built on matplotlib's object API with the Agg canvas
(no pyplot global state, safe in worker processes without a display).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _slices(vol: np.ndarray, center: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices (voxel axes 2, 1, 0), transposed for display with origin=lower."""
    i, j, k = center
    return [vol[:, :, k].T, vol[:, j, :].T, vol[i, :, :].T]


def _aspects(zooms: Sequence[float]) -> list[float]:
    zx, zy, zz = (float(z) for z in zooms)
    return [zy / zx, zz / zx, zz / zy]


def write_qc_png(
    out_path: Path,
    *,
    fa: np.ndarray,
    mask: np.ndarray,
    b0: np.ndarray,
    dseg: np.ndarray | None = None,
    zooms: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
    dpi: int = 80,
) -> Path:
    """Write the QC PNG and return its path (parent folders are created).

    Top row: FA (0..1, grey) with the brain-mask contour in red. Bottom row: the b0
    reference (1st-99th percentile inside the mask) with the atlas labels overlaid.
    ~600x420 px, typically 60-150 KB.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.asarray(mask, dtype=bool)
    vox = np.argwhere(mask)
    center = [int(c) for c in (vox.mean(axis=0) if len(vox) else np.array(mask.shape) // 2)]
    inside = b0[mask] if mask.any() else b0.ravel()
    lo, hi = np.percentile(inside, [1, 99]) if inside.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0

    fig = Figure(figsize=(7.5, 5.2), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    names = ("axial", "coronal", "sagittal")
    for col, (fa_s, m_s, b0_s, asp) in enumerate(
        zip(_slices(fa, center), _slices(mask.astype(float), center), _slices(b0, center), _aspects(zooms), strict=True)
    ):
        ax = axes[0, col]
        ax.imshow(fa_s, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=asp, interpolation="nearest")
        if m_s.any() and not m_s.all() and min(m_s.shape) >= 2:  # contour needs a 2x2 grid (not 1-slice views)
            ax.contour(m_s, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"FA {names[col]}", fontsize=8)
        ax = axes[1, col]
        ax.imshow(b0_s, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=asp, interpolation="nearest")
        if dseg is not None:
            d_s = _slices(dseg, center)[col]
            ax.imshow(
                np.ma.masked_equal(d_s, 0),
                cmap="tab20",
                alpha=0.45,
                origin="lower",
                aspect=asp,
                interpolation="nearest",
            )
        ax.set_title(f"b0 + atlas {names[col]}" if dseg is not None else f"b0 {names[col]}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, format="png", dpi=dpi)
    return out_path
