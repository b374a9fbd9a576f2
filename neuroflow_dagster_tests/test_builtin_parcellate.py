"""The QSIParc stand-in: real ``parcellate`` on the recon stand-in's outputs of a known phantom.

Phantom (see test_builtin_recon): left half prolate tensor (FA ~0.80, MD ~0.77e-3),
right half isotropic (FA 0, MD 0.8e-3); atlas label 7 = left half, 9 = right half.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuroflow_dagster.tools.builtin import parcellate, recon
from neuroflow_dagster.tools.builtin.common import run_cli
from neuroflow_dagster_tests.test_builtin_recon import (
    ISO,
    PROLATE,
    gradient_scheme,
    phantom,
    true_fa,
    two_halves_atlas,
    write_qsiprep_session,
)

STEM = "sub-01_ses-01_atlas-TwoHalves_software-SS3TAutoTrack_space-ACPC_model-tensor_param-{}_diffmap"


def make_recon(root: Path, iso: np.ndarray = ISO) -> Path:
    bvals, bvecs = gradient_scheme(30)
    data, mask = phantom(bvals, bvecs, snr=None, iso=iso)
    write_qsiprep_session(root / "qsiprep", "01", "01", data, bvals, bvecs, mask)
    atlas_file, labels_file = two_halves_atlas(root)
    recon.run_recon(root / "qsiprep", root / "qsirecon", "01", "01", root / "work", "ss3t_fod_autotrack",
                    atlas_file=atlas_file, atlas_labels=labels_file)
    return root / "qsirecon"


@pytest.fixture(scope="module")
def recon_dir(tmp_path_factory) -> Path:
    return make_recon(tmp_path_factory.mktemp("parc"))


def read(out: Path, param: str) -> pd.DataFrame:
    return pd.read_csv(out / "sub-01/ses-01/dwi/atlas-TwoHalves" / f"{STEM.format(param)}.tsv", sep="\t")


def test_parcellate_cli_writes_qsiparc_layout_with_gm_proxy(recon_dir, tmp_path):
    out = tmp_path / "qsiparc"
    cmd = [sys.executable, "-m", "neuroflow_dagster.tools.builtin.parcellate", "--qsirecon-dir", str(recon_dir),
           "--output-dir", str(out), "--participant-label", "01", "--session-label", "01", "--mask", "gm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for param in ("fa", "md", "ad", "rd"):
        assert (out / "sub-01/ses-01/dwi/atlas-TwoHalves" / f"{STEM.format(param)}.json").is_file()
    fa = read(out, "fa")
    assert list(fa["index"]) == [7, 9] and list(fa["hemisphere"]) == ["L", "R"]
    assert {"mean", "median", "std", "voxel_count", "scalar"} <= set(fa.columns)
    # GM proxy (FA < 0.2, MD < 1.5e-3) keeps the isotropic right half only
    left, right = fa.iloc[0], fa.iloc[1]
    assert left["voxel_count"] == 0 and np.isnan(left["mean"])
    assert right["voxel_count"] == 256 and right["mean"] < 0.05
    side = json.loads((out / "sub-01/ses-01/dwi/atlas-TwoHalves" / f"{STEM.format('fa')}.json").read_text())
    assert side["processing"]["mask"]["applied"].startswith("subject-space GM proxy")
    assert side["generated_by"]["Name"] == "neuroflow-dagster builtin stand-in for QSIParc"
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Name"] == "neuroflow-dagster builtin stand-in for QSIParc"


def test_parcellate_one_row_per_region_and_sane_means(recon_dir, tmp_path):
    res = parcellate.run_parcellate(recon_dir, tmp_path / "p", "01", "01", mask="none")
    assert res.n_regions == {"TwoHalves": 2} and len(res.tables) == 7  # tensor fa, md, ad, rd + GQI gfa, iso, qa
    fa, md = read(tmp_path / "p", "fa"), read(tmp_path / "p", "md")
    assert len(fa) == 2 and list(fa["label"]) == ["Left_Half", "Right_Half"]
    assert list(fa["voxel_count"]) == [256, 256]
    assert fa["mean"].iloc[0] == pytest.approx(true_fa(PROLATE), abs=0.01)
    assert fa["mean"].iloc[1] < 0.01
    assert md["mean"].iloc[0] == pytest.approx(PROLATE.mean(), rel=0.02)
    assert md["mean"].iloc[1] == pytest.approx(ISO.mean(), rel=0.02)
    assert set(fa["scalar"]) == {"fa"}


def test_parcellate_wm_proxy_and_mask_file(recon_dir, tmp_path):
    parcellate.run_parcellate(recon_dir, tmp_path / "wm", "01", "01", mask="wm")
    fa = read(tmp_path / "wm", "fa")
    assert list(fa["voxel_count"]) == [256, 0]
    # an explicit NIfTI mask is applied as given (parcellate resamples it nearest-neighbour)
    import nibabel as nib

    fa_img = nib.load(next(recon_dir.glob("derivatives/qsirecon-*/sub-01/ses-01/dwi/*param-fa_dwimap.nii.gz")))
    m = np.zeros(fa_img.shape, dtype=np.uint8)
    m[2:4, 2:10, 2:10] = 1  # 2 x 8 x 8 voxels of the left half
    nib.save(nib.Nifti1Image(m, fa_img.affine), tmp_path / "roi.nii.gz")
    parcellate.run_parcellate(recon_dir, tmp_path / "roi", "01", "01", mask=str(tmp_path / "roi.nii.gz"))
    assert list(read(tmp_path / "roi", "fa")["voxel_count"]) == [128, 0]


def test_parcellate_gm_proxy_falls_back_when_it_selects_nothing(tmp_path, capsys):
    recon_dir = make_recon(tmp_path, iso=np.array([3e-3, 3e-3, 3e-3]))  # CSF-like right half
    res = parcellate.run_parcellate(recon_dir, tmp_path / "p", "01", "01", mask="gm")
    assert res.mask["applied"] == "none (fallback)"
    assert "selected no atlas voxel" in capsys.readouterr().out
    assert list(read(tmp_path / "p", "fa")["voxel_count"]) == [256, 256]


def test_parcellate_errors(recon_dir, tmp_path, capsys):
    base = ["--output-dir", str(tmp_path / "o"), "--participant-label", "01"]
    assert run_cli(parcellate.main, ["--qsirecon-dir", str(recon_dir), *base, "--session-label", "02"]) == 2
    assert capsys.readouterr().err.startswith("validation error: missing required file ")
    argv = ["--qsirecon-dir", str(recon_dir), *base, "--session-label", "01", "--mask", "/nope/mask.nii.gz"]
    assert run_cli(parcellate.main, argv) == 3
    assert capsys.readouterr().err.startswith("configuration error: --mask '/nope/mask.nii.gz'")


def test_parcellate_rerun_removes_stale_tables(recon_dir, tmp_path):
    parcellate.run_parcellate(recon_dir, tmp_path / "p", "01", "01", mask="none")
    stale = tmp_path / "p/sub-01/ses-01/dwi/atlas-Old/old_diffmap.tsv"
    stale.parent.mkdir(parents=True)
    stale.write_text("x")
    parcellate.run_parcellate(recon_dir, tmp_path / "p", "01", "01", mask="none")
    assert not stale.exists() and len(list((tmp_path / "p").rglob("*_diffmap.tsv"))) == 7
