"""Real human DWI end to end: heudiconv's Siemens Prisma DICOM -> dcm2niix -> QSIPrep stand-in -> QSIRecon stand-in.

``heudiconv/tests/data/b0dwiForFmap`` is 3 volumes (b=5, 5, 1500) with ONE diffusion
direction, 150x152x81 voxels: the stand-in QSIPrep must process it (that is also the
timing benchmark for a full-size volume), and the tensor model must refuse it with
exit 2 and a single "validation error:" line.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neuroflow_dagster.naming import qsirecon as names
from neuroflow_dagster.tools import qsirecon, shells
from neuroflow_dagster_tests.bids_files import write_t1w

DICOM_DIR = Path(importlib.util.find_spec("heudiconv").submodule_search_locations[0]) / "tests/data/b0dwiForFmap"
DCM2NIIX = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")


@pytest.fixture(scope="module")
def real_bids(tmp_path_factory) -> Path:
    if not DICOM_DIR.is_dir() or not Path(DCM2NIIX).exists():
        pytest.skip("heudiconv test DICOM or dcm2niix not installed")
    root = tmp_path_factory.mktemp("real")
    dwi = root / "bids" / "sub-0075" / "ses-01" / "dwi"
    dwi.mkdir(parents=True)
    subprocess.run([DCM2NIIX, "-z", "y", "-b", "y", "-f", "sub-0075_ses-01_dwi", "-o", str(dwi), str(DICOM_DIR)],
                   check=True, capture_output=True, timeout=60)
    write_t1w(root / "bids", "0075", "01")  # as the demo gives this series a synthetic T1w
    return root


def test_real_dwi_preproc_then_recon_refuses_one_direction(real_bids):
    root = real_bids
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "neuroflow_dagster.tools.builtin.preproc", "--bids-dir", str(root / "bids"),
         "--output-dir", str(root / "qsiprep"), "--participant-label", "0075", "--session-label", "01",
         "--work-dir", str(root / "work")], capture_output=True, text=True, timeout=180, check=False)
    preproc_s = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    d = root / "qsiprep/sub-0075/ses-01/dwi"
    dwi = nib.load(d / "sub-0075_ses-01_space-ACPC_desc-preproc_dwi.nii.gz")
    assert dwi.shape == (150, 152, 81, 3)
    mask = np.asarray(nib.load(d / "sub-0075_ses-01_space-ACPC_desc-brain_mask.nii.gz").dataobj) > 0
    brain_ml = mask.sum() * float(np.prod(dwi.header.get_zooms()[:3])) / 1000
    assert 800 < brain_ml < 2500, f"implausible brain mask volume {brain_ml:.0f} ml"
    side = json.loads((d / "sub-0075_ses-01_space-ACPC_desc-preproc_dwi.json").read_text())
    print(f"\npreproc on 150x152x81x3: {preproc_s:.1f} s wall ({proc.stdout.strip()}); mask {brain_ml:.0f} ml; "
          f"denoise {side['DenoiseMethod']}")

    # Its scheme (b=5, 5, 1500: one shell) takes the single-shell default, whose tensor export needs 6 directions.
    series = shells.session_series(d)
    assert [s.shells.describe() for s in series] == ["b=0 x2, b=1500 x1: single-shell"]
    spec = names.DEFAULT_SPECS[shells.session_scheme(series)]
    assert spec == "ss3t_fod_autotrack"
    t0 = time.perf_counter()
    rec = subprocess.run(
        [sys.executable, "-m", "neuroflow_dagster.tools.builtin.recon", "--qsiprep-dir", str(root / "qsiprep"),
         "--output-dir", str(root / "qsirecon"), "--participant-label", "0075", "--session-label", "01",
         "--work-dir", str(root / "work"), "--recon-spec", spec], capture_output=True, text=True, timeout=120,
        check=False)
    print(f"recon refusal: {time.perf_counter() - t0:.1f} s wall")
    assert rec.returncode == 2
    assert rec.stderr.strip().splitlines() == [
        "validation error: sub-0075 ses-01 has 1 diffusion direction(s); the tensor model needs at least 6 "
        "(sub-0075_ses-01_space-ACPC_desc-preproc_dwi.nii.gz)"
    ]
    # The check neuroflow runs before a run or a Slurm submission refuses it with the very same words.
    plan = qsirecon.ReconPlan("0075", "01", tuple(series), names.SINGLE_SHELL, spec)
    assert qsirecon.refusals(plan) == [rec.stderr.strip().removeprefix("validation error: ")]
