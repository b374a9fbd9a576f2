"""QC image of the recon stand-in: a real, small PNG for any volume size and voxel shape."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np

from neuroflow_dagster.tools.builtin.qc import write_qc_png


def _volumes(shape: tuple[int, int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = np.array(shape, dtype=float)[:, None, None, None] / 2
    r = np.sqrt((((grid - centre) / centre) ** 2).sum(axis=0))
    mask = r < 0.8
    b0 = np.where(mask, 1000 - 400 * r, 20) + rng.normal(0, 30, shape)  # noisy: worst case for PNG size
    fa = np.clip(np.where(mask, rng.random(shape), 0), 0, 1)
    dseg = np.where(mask, 1 + (grid[0] > shape[0] / 2) + 2 * (grid[2] > shape[2] / 2), 0).astype(int)
    return fa, mask, b0, dseg


def test_qc_png_full_size_volume_is_small_and_readable(tmp_path):
    fa, mask, b0, dseg = _volumes((150, 152, 81))
    out = write_qc_png(tmp_path / "sub" / "qc.png", fa=fa, mask=mask, b0=b0, dseg=dseg,
                       zooms=(1.5, 1.5, 1.5), title="sub-0075 ses-01 | stand-in")
    assert out == tmp_path / "sub" / "qc.png"
    img = mpimg.imread(out)
    assert img.shape[2] in (3, 4) and img.shape[0] >= 400 and img.shape[1] >= 600
    assert out.stat().st_size < 200_000
    # not a blank canvas: the slices put real contrast on it
    assert img[..., :3].std() > 0.1


def test_qc_png_without_atlas_and_with_anisotropic_voxels(tmp_path):
    fa, mask, b0, _ = _volumes((10, 12, 6), seed=1)
    out = write_qc_png(tmp_path / "qc.png", fa=fa, mask=mask, b0=b0, dseg=None, zooms=(2.0, 2.0, 4.0))
    assert mpimg.imread(out).ndim == 3
    empty = write_qc_png(tmp_path / "empty.png", fa=fa * 0, mask=np.zeros_like(mask), b0=b0 * 0)
    assert mpimg.imread(empty).ndim == 3  # an empty mask must not crash the QC step
