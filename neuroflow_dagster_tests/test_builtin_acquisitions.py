"""Common diffusion acquisitions, scanner to parcellation: synthetic DICOM -> real HeudiConv + dcm2niix -> stand-ins.

Issue 10: a session with two b=0 volumes and twelve directions crashed the QSIPrep
stand-in (dipy patch2self) and the subject never progressed. This matrix runs the
acquisition shapes a scanner produces through the real conversion with the shipped
heuristic, then preproc -> recon -> parcellate: 1-4 b=0 volumes leading and
interleaved (at b=0 and at Siemens' b=5), 6/12/30/64 directions, two shells, two DWI
runs in one session, odd and small matrices, a single-slice series, a reverse
phase-encoded b=0 in fmap/, and a poor-quality session (heavy noise, slice dropouts)
that must complete with low image-QC values. Every case completes; each stand-in runs
in-process through ``run_cli`` (exit codes as the CLI maps them; an unexpected
exception fails the test with its traceback). The last test runs the real preproc CLI
once over all of them as the sessions of one subject. Pathological data (NaN, broken
gradient tables, 3D/5D images...) are NIfTI-level cases in test_builtin_robustness.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.demo import synth
from neuroflow_dagster.tools import heudiconv, shells
from neuroflow_dagster.tools.builtin import parcellate, preproc, recon
from neuroflow_dagster.tools.builtin.common import run_cli
from neuroflow_dagster.tools.qc_table import find_image_qc, read_image_qc
from neuroflow_dagster_tests.test_builtin_recon import default_spec

pytestmark = pytest.mark.slow

SUBJECT = "matrix"
# name: synth.write_session arguments (series default: T1w + DWI)
CASES: dict[str, dict[str, Any]] = {
    "b0x1_dirs6": {"n_b0": 1, "n_directions": 6},
    "b0x2_dirs12_issue10": {"n_b0": 2, "n_directions": 12},
    "b0x1_dirs12": {"n_b0": 1, "n_directions": 12},
    "b0x3_dirs30_interleaved": {"n_b0": 3, "n_directions": 30, "b0_placement": "interleaved"},
    "b0x4_dirs64_interleaved": {"n_b0": 4, "n_directions": 64, "b0_placement": "interleaved"},
    "b0x2_at_b5_interleaved": {"n_b0": 2, "n_directions": 12, "b0_bvalue": 5.0, "b0_placement": "interleaved"},
    "two_shells_b1000_b2000": {"n_b0": 2, "n_directions": 12, "shells": (1000.0, 2000.0)},
    "two_dwi_runs": {"n_b0": 1, "n_directions": 12, "dwi_runs": 2},
    "odd_matrix_7x9x5": {"n_b0": 1, "n_directions": 12, "matrix": (7, 9, 5)},
    "small_matrix_5x5x3": {"n_b0": 2, "n_directions": 6, "matrix": (5, 5, 3)},
    "single_slice_16x16x1": {"n_b0": 1, "n_directions": 12, "matrix": (16, 16, 1)},
    "reverse_pe_b0_in_fmap": {"n_b0": 1, "n_directions": 12, "series": ("t1w", "dwi", "dwi_b0_pa")},
    "poor_quality": {"n_b0": 2, "n_directions": 12, **synth.POOR_QUALITY},  # the demo's DEMO_03
}
LABELS = {name: f"{i:02d}" for i, name in enumerate(CASES, start=1)}


def n_dw_volumes(kw: dict[str, Any]) -> int:
    return kw.get("n_directions", 12) * len(kw.get("shells", (1,))) * kw.get("dwi_runs", 1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converts each case on first use (real HeudiConv + dcm2niix), one session label per case."""
    root = tmp_path_factory.mktemp("acq")
    config = NeuroflowConfig.model_validate(
        {"paths": {k: str(root / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}})
    done: dict[str, tuple[Path, synth.SynthSession]] = {}

    def get(name: str) -> tuple[Path, synth.SynthSession]:
        if name not in done:
            kw = {"series": ("t1w", "dwi"), **CASES[name]}
            session = synth.write_session(root / "dicom" / name, seed=10 + len(done), **kw)
            staging = root / "stage" / name
            spec = heudiconv.build_spec(config, dicom_dir=session.folder, participant=SUBJECT,
                                        session=LABELS[name], staging_dir=staging)
            staging.mkdir(parents=True)
            proc = subprocess.run(list(spec.argv), env={**os.environ, **spec.env}, cwd=staging,
                                  capture_output=True, text=True, timeout=300, check=False)
            assert proc.returncode == 0, f"heudiconv failed on {name}: {(proc.stdout + proc.stderr)[-3000:]}"
            done[name] = (staging, session)
        return done[name]

    return get


def run_stand_ins(bids: Path, out: Path, session: str, capsys) -> dict[str, tuple[int, str, str]]:
    """preproc, then recon with the spec neuroflow chooses for the shells preproc wrote, then parcellate."""
    results = {}
    code = run_cli(preproc.main, ["--bids-dir", str(bids), "--output-dir", str(out / "qsiprep"),
                                  "--participant-label", SUBJECT, "--session-label", session,
                                  "--work-dir", str(out / "work")])
    captured = capsys.readouterr()
    results["preproc"] = (code, captured.out, captured.err)
    if code:
        return results
    spec = default_spec(out / "qsiprep", SUBJECT, session)
    steps = (
        ("recon", recon.main, ["--qsiprep-dir", str(out / "qsiprep"), "--output-dir", str(out / "qsirecon"),
                               "--participant-label", SUBJECT, "--session-label", session,
                               "--work-dir", str(out / "work"), "--recon-spec", spec]),
        ("parcellate", parcellate.main, ["--qsirecon-dir", str(out / "qsirecon"), "--output-dir",
                                         str(out / "qsiparc"), "--participant-label", SUBJECT,
                                         "--session-label", session]),
    )
    for name, main, argv in steps:
        code = run_cli(main, argv)
        captured = capsys.readouterr()
        results[name] = (code, captured.out, captured.err)
        if code:
            break
    return results


def fa_in_cylinder(fa_path: Path, mask_path: Path) -> float:
    """Median FA over brain-mask voxels well inside the phantom's fibre cylinder (patient x^2 + y^2 < 8^2 mm)."""
    img = nib.load(fa_path)
    ijk = np.indices(img.shape).reshape(3, -1).T
    world = nib.affines.apply_affine(img.affine, ijk)
    core = (np.hypot(world[:, 0], world[:, 1]) < 8.0).reshape(img.shape)
    mask = np.asarray(nib.load(mask_path).dataobj) > 0
    assert (core & mask).any(), "no brain-mask voxel inside the cylinder"
    return float(np.median(np.asarray(img.dataobj)[core & mask]))


@pytest.mark.parametrize("name", list(CASES))
def test_acquisition_completes_end_to_end(name: str, converted, tmp_path: Path, capsys) -> None:
    staging, session = converted(name)
    kw = CASES[name]
    ses = LABELS[name]
    ses_dir = staging / f"sub-{SUBJECT}" / f"ses-{ses}"
    dwi_runs = sorted((ses_dir / "dwi").glob("*_dwi.nii.gz"))
    assert len(dwi_runs) == kw.get("dwi_runs", 1), [p.name for p in dwi_runs]

    results = run_stand_ins(staging, tmp_path, ses, capsys)
    codes = {stage: code for stage, (code, _, _) in results.items()}
    assert codes == {"preproc": 0, "recon": 0, "parcellate": 0}, {k: v[2] for k, v in results.items()}

    d = tmp_path / "qsiprep" / f"sub-{SUBJECT}" / f"ses-{ses}" / "dwi"
    side = json.loads((d / f"sub-{SUBJECT}_ses-{ses}_space-ACPC_desc-preproc_dwi.json").read_text())
    # dipy 1.12.1's patch2self is refused for most series lengths (test_builtin_denoise): then MP-PCA.
    attempts = [(a["method"], a["outcome"]) for a in side["DenoiseAttempts"]]
    assert attempts in ([("patch2self", "used")], [("patch2self", "failed"), ("mppca", "used")]), attempts
    assert len(side["Sources"]) == len(dwi_runs)
    fmaps = sorted(p.name for p in (ses_dir / "fmap").glob("*.nii.gz")) if (ses_dir / "fmap").is_dir() else []
    assert side["FieldMapsIgnored"] == fmaps
    if "dwi_b0_pa" in kw.get("series", ()):
        assert fmaps == [f"sub-{SUBJECT}_ses-{ses}_acq-dwi_dir-PA_epi.nii.gz"]

    qc = read_image_qc(find_image_qc(tmp_path / "qsiprep", SUBJECT, ses)[0])
    assert qc["raw_num_directions"] == n_dw_volumes(kw)
    assert (qc["raw_dimension_x"], qc["raw_dimension_y"], qc["raw_dimension_z"]) == session.dwi.shape
    assert qc["mean_fd"] is None and qc["raw_coherence_index"] is None
    print(f"\n{name}: denoise={side['DenoiseMethod']} " + " ".join(f"{k}={qc[k]:.3f}" for k in (
        "raw_neighbor_corr", "raw_masked_neighbor_corr", "raw_dwi_contrast", "raw_num_bad_slices",
        "t1_masked_neighbor_corr") if qc[k] is not None))
    # Shells counted on what the real conversion and preproc wrote: two shells -> multi-shell -> dipy_dki.
    scheme = shells.session_scheme(shells.session_series(d))
    assert scheme == ("multi_shell" if len(kw.get("shells", (1,))) > 1 else "single_shell"), scheme
    workflow = {"single_shell": "qsirecon-SS3TAutoTrack", "multi_shell": "qsirecon-DKI"}[scheme]
    fa = fa_in_cylinder(tmp_path / "qsirecon/derivatives" / workflow / f"sub-{SUBJECT}" / f"ses-{ses}" /
                        "dwi" / f"sub-{SUBJECT}_ses-{ses}_space-ACPC_model-tensor_param-fa_dwimap.nii.gz",
                        d / f"sub-{SUBJECT}_ses-{ses}_space-ACPC_desc-brain_mask.nii.gz")
    if name == "poor_quality":
        assert qc["raw_masked_neighbor_corr"] < 0.4 and qc["raw_num_bad_slices"] >= 12
    else:
        assert qc["raw_masked_neighbor_corr"] > 0.8 and qc["raw_num_bad_slices"] == 0
        assert abs(fa - synth.TRUE_FA) < 0.1, fa
    # One table per scalar map: tensor fa/md/ad/rd + GQI gfa/iso/qa, or the 11 DKI maps + tensor FA.
    assert len(list((tmp_path / "qsiparc").rglob("*_diffmap.tsv"))) == {"single_shell": 7, "multi_shell": 12}[scheme]


def test_all_acquisitions_as_one_subject_through_the_preproc_cli(converted, tmp_path: Path) -> None:
    """One subject whose sessions differ in protocol (as across years of a brain bank), real CLI subprocess."""
    bids = tmp_path / "bids" / f"sub-{SUBJECT}"
    bids.mkdir(parents=True)
    for name in CASES:
        staging, _ = converted(name)
        shutil.copytree(staging / f"sub-{SUBJECT}" / f"ses-{LABELS[name]}", bids / f"ses-{LABELS[name]}")
    cmd = [sys.executable, "-m", "neuroflow_dagster.tools.builtin.preproc", "--bids-dir", str(tmp_path / "bids"),
           "--output-dir", str(tmp_path / "qsiprep"), "--participant-label", SUBJECT,
           "--session-label", *LABELS.values(), "--work-dir", str(tmp_path / "work"), "--nprocs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == ""
    assert proc.stdout.count(": processed denoise=") == len(CASES), proc.stdout
    report = (tmp_path / "qsiprep" / f"sub-{SUBJECT}.html").read_text()
    assert "different voxel grid" in report  # no registration in the stand-in: no subject template
