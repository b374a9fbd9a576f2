"""The QSIPrep stand-in on a tiny BIDS dataset built from dipy's real small_64D DWI (10x10x10x65)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neuroflow_dagster.tools.builtin import preproc
from neuroflow_dagster.tools.builtin.common import run_cli
from neuroflow_dagster_tests.bids_files import write_t1w


def small_64d() -> tuple[Path, Path, Path]:
    from dipy.data import get_fnames

    return get_fnames(name="small_64D")


def add_session(bids: Path, sub: str, ses: str, run: str | None = None, data_scale: float = 1.0,
                t1w: bool = True) -> Path:
    """Copy small_64D into ``bids/sub-X/ses-Y/dwi`` as a BIDS DWI series (optionally a run), with a T1w."""
    if t1w:
        write_t1w(bids, sub, ses)
    fdata, fbval, fbvec = small_64d()
    d = bids / f"sub-{sub}" / f"ses-{ses}" / "dwi"
    d.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{sub}_ses-{ses}" + (f"_run-{run}" if run else "") + "_dwi"
    img = nib.load(fdata)
    data = np.asarray(img.dataobj, dtype=np.float32) * data_scale
    nib.save(nib.Nifti1Image(data, img.affine), d / f"{stem}.nii.gz")
    bvecs = np.loadtxt(fbvec)
    np.savetxt(d / f"{stem}.bvec", bvecs if bvecs.shape[0] == 3 else bvecs.T, fmt="%.6f")
    shutil.copy(fbval, d / f"{stem}.bval")
    return d


@pytest.fixture(scope="module")
def two_sessions(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("preproc")
    bids = root / "bids"
    add_session(bids, "0075", "01")
    add_session(bids, "0075", "02", data_scale=1.3)  # another scanner gain: template normalises it
    (bids / "sub-0075" / "ses-03" / "anat").mkdir(parents=True)  # a session without DWI
    cmd = [sys.executable, "-m", "neuroflow_dagster.tools.builtin.preproc", "--bids-dir", str(bids),
           "--output-dir", str(root / "qsiprep"), "--participant-label", "0075",
           "--session-label", "01", "02", "03", "--work-dir", str(root / "work"), "--nprocs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    return root / "qsiprep", proc


def test_preproc_two_sessions_golden_files_and_nonempty_mask(two_sessions):
    out, proc = two_sessions
    assert proc.returncode == 0, proc.stderr
    src = nib.load(small_64d()[0])
    for ses in ("01", "02"):
        for pattern in preproc.preproc_outputs("0075", ses):
            assert (out / pattern).is_file(), pattern
        d = out / f"sub-0075/ses-{ses}/dwi"
        p = f"sub-0075_ses-{ses}_space-ACPC"
        dwi = nib.load(d / f"{p}_desc-preproc_dwi.nii.gz")
        assert dwi.shape == src.shape and np.allclose(dwi.affine, src.affine)
        assert np.loadtxt(d / f"{p}_desc-preproc_dwi.bval").size == 65
        assert np.loadtxt(d / f"{p}_desc-preproc_dwi.bvec").shape == (3, 65)
        mask = np.asarray(nib.load(d / f"{p}_desc-brain_mask.nii.gz").dataobj)
        assert 0 < mask.sum() < mask.size
        ref = nib.load(d / f"{p}_dwiref.nii.gz").get_fdata()
        assert ref.shape == src.shape[:3] and ref[mask > 0].mean() > ref[mask == 0].mean()
        side = json.loads((d / f"{p}_desc-preproc_dwi.json").read_text())
        assert side["DenoiseMethod"] in ("patch2self", "dwidenoise")  # 64 DW volumes -> not nlmeans
        denoised = dwi.get_fdata()
        assert not np.allclose(denoised, np.asarray(src.dataobj) * (1.3 if ses == "02" else 1.0))
    assert "ses-03: skipped (no DWI" in proc.stdout


def test_preproc_provenance_report_and_subject_template(two_sessions):
    out, _ = two_sessions
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "neuroflow-dagster builtin stand-in for QSIPrep"
    report = (out / "sub-0075.html").read_text()
    assert "NOT a QSIPrep report" in report
    assert "ses-01" in report and "ses-02" in report and "no DWI" in report
    tpl = nib.load(out / "sub-0075/anat/sub-0075_space-ACPC_desc-b0template.nii.gz").get_fdata()
    # each reference is divided by its in-mask median, so the 1.3x gain of ses-02 cancels out
    r1 = nib.load(out / "sub-0075/ses-01/dwi/sub-0075_ses-01_space-ACPC_dwiref.nii.gz").get_fdata()
    m1 = np.asarray(nib.load(out / "sub-0075/ses-01/dwi/sub-0075_ses-01_space-ACPC_desc-brain_mask.nii.gz")
                    .dataobj) > 0
    assert np.median(tpl[m1]) == pytest.approx(1.0, abs=0.05)
    assert np.corrcoef(tpl[m1], r1[m1])[0, 1] > 0.95


def test_preproc_rerun_replaces_stale_outputs_and_concatenates_runs(tmp_path):
    bids = tmp_path / "bids"
    add_session(bids, "01", "01", run="1")
    add_session(bids, "01", "01", run="2")
    out = tmp_path / "out"
    stale = out / "sub-01/ses-01/dwi/sub-01_ses-01_space-ACPC_desc-old_dwi.nii.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    res = preproc.run_preproc(bids, out, "sub-01", ["ses-01"], tmp_path / "w", denoise_method="none")
    assert res[0].runs_used == ["sub-01_ses-01_run-1_dwi.nii.gz", "sub-01_ses-01_run-2_dwi.nii.gz"]
    dwi = nib.load(out / "sub-01/ses-01/dwi/sub-01_ses-01_space-ACPC_desc-preproc_dwi.nii.gz")
    assert dwi.shape[3] == 130
    assert not stale.exists()
    assert not [p for p in (out / "sub-01").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_preproc_validation_errors(tmp_path, capsys):
    bids = tmp_path / "bids"
    (bids / "sub-01" / "ses-01" / "anat").mkdir(parents=True)
    base = ["--bids-dir", str(bids), "--output-dir", str(tmp_path / "o"), "--participant-label", "01",
            "--work-dir", str(tmp_path / "w")]
    assert run_cli(preproc.main, [*base, "--session-label", "01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("validation error: missing required file: no DWI series in any listed session")
    assert len(err.strip().splitlines()) == 1
    assert run_cli(preproc.main, [*base, "--session-label", "09"]) == 2
    assert capsys.readouterr().err.startswith("validation error: missing required folder ")
    d = add_session(bids, "01", "01")
    (d / "sub-01_ses-01_dwi.bvec").unlink()
    assert run_cli(preproc.main, [*base, "--session-label", "01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("validation error: missing required file ") and "sub-01_ses-01_dwi.bvec" in err
    assert run_cli(preproc.main, [*base, "--session-label", "01", "--denoise-method", "magic"]) == 3
    assert capsys.readouterr().err.startswith("configuration error: ")


def test_choose_denoise_method(monkeypatch):
    monkeypatch.setattr(preproc.shutil, "which", lambda name: None)
    many = np.r_[0, np.full(30, 1000.0)]
    few = np.array([5.0, 5.0, 1500.0])
    assert preproc.choose_denoise_method("auto", many)[0] == "patch2self"
    assert preproc.choose_denoise_method("auto", few)[0] == "nlmeans"
    with pytest.raises(preproc.ConfigurationError, match="dwidenoise is not on PATH"):
        preproc.choose_denoise_method("dwidenoise", many)
    monkeypatch.setattr(preproc.shutil, "which", lambda name: "/usr/bin/dwidenoise")
    assert preproc.choose_denoise_method("auto", few)[0] == "dwidenoise"


# --------------------------------------------------------------------------- QSIPrep's own refusals


def _tiny_session(bids: Path, ses: str, *, t1w: bool, shape4d: bool = True) -> None:
    """A 10x10x6 DWI (2 b0 + 12 directions; or its first volume alone, stored 3D) and maybe a T1w."""
    from neuroflow_dagster_tests.test_builtin_robustness import scheme, signal

    bvals, bvecs = scheme()
    data = signal(bvals, bvecs)
    d = bids / "sub-01" / f"ses-{ses}" / "dwi"
    d.mkdir(parents=True)
    if not shape4d:
        data, bvals, bvecs = data[..., 0], bvals[:1], bvecs[:1]
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.5, 1.0])), d / f"sub-01_ses-{ses}_dwi.nii.gz")
    np.savetxt(d / f"sub-01_ses-{ses}_dwi.bval", bvals[None], fmt="%g")
    np.savetxt(d / f"sub-01_ses-{ses}_dwi.bvec", bvecs.T, fmt="%.6f")
    if t1w:
        write_t1w(bids, "01", ses)


NO_T1W = ("validation error: No T1w images found for participant 01. To bypass anatomical processing choose "
          "--anat-modality none")


def test_preproc_refuses_a_subject_without_its_anatomical_image_as_qsiprep_does(tmp_path, capsys):
    """The words of qsiprep/workflows/base.py (1.1.1 to 26.1.1), exit 2 (validation, never retried); the
    same message from the real QSIPrep on the same files: test_tool_specs_parsers.py."""
    bids = tmp_path / "bids"
    _tiny_session(bids, "01", t1w=False)
    _tiny_session(bids, "02", t1w=False)
    base = ["--bids-dir", str(bids), "--output-dir", str(tmp_path / "o"), "--participant-label", "01",
            "--session-label", "01", "02", "--work-dir", str(tmp_path / "w"), "--denoise-method", "none"]
    assert run_cli(preproc.main, base) == 2
    assert capsys.readouterr().err.strip() == NO_T1W
    assert not (tmp_path / "o" / "sub-01").exists()  # refused before anything was written
    assert run_cli(preproc.main, [*base, "--anat-modality", "T2w"]) == 2
    assert "No T2w images found for participant 01. To bypass" in capsys.readouterr().err
    assert run_cli(preproc.main, [*base, "--anat-modality", "none"]) == 0
    capsys.readouterr()
    # One T1w in any given session serves the subject's reference, even from a session without DWI ...
    write_t1w(bids, "01", "03")
    assert run_cli(preproc.main, [*base[:7], "01", "02", "03", *base[9:]]) == 0
    capsys.readouterr()
    # ... but sessionwise, every session with DWI is its own group and needs its own.
    write_t1w(bids, "01", "01")
    sessionwise = [*base, "--subject-anatomical-reference", "sessionwise"]
    assert run_cli(preproc.main, sessionwise) == 2
    assert capsys.readouterr().err.strip() == NO_T1W
    write_t1w(bids, "01", "02")
    assert run_cli(preproc.main, sessionwise) == 0


def test_preproc_refuses_a_3d_dwi_file_as_qsiprep_does(tmp_path, capsys):
    """A one-volume series stored 3D in dwi/ (a reverse-PE b=0 named as a DWI): "DWI file not 4D: <file>"
    (qsiprep/utils/bids.py), before any session is processed, even when another session is fine."""
    bids = tmp_path / "bids"
    _tiny_session(bids, "01", t1w=True)
    _tiny_session(bids, "02", t1w=True, shape4d=False)
    argv = ["--bids-dir", str(bids), "--output-dir", str(tmp_path / "o"), "--participant-label", "01",
            "--session-label", "01", "02", "--work-dir", str(tmp_path / "w")]
    assert run_cli(preproc.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"validation error: DWI file not 4D: {bids}/sub-01/ses-02/dwi/sub-01_ses-02_dwi.nii.gz"
    assert not (tmp_path / "o" / "sub-01").exists()


def test_refusals_are_classified_like_the_real_tools_log() -> None:
    """The stand-in's line and the real QSIPrep's traceback tail are both `validation` (not retried)."""
    from neuroflow_dagster.runtimes.failures import FailureClass, classify

    assert classify(NO_T1W, 2) is FailureClass.VALIDATION
    real_tail = ("  File \"/opt/conda/envs/qsiprep/lib/python3.10/site-packages/qsiprep/workflows/base.py\", "
                 "line 157, in init_single_subject_wf\n    raise Exception(\nException: No T1w images found for "
                 "participant 0075. To bypass anatomical processing choose --anat-modality none\n")
    assert classify(real_tail, 1) is FailureClass.VALIDATION
    assert classify("RuntimeError: DWI file not 4D: /data/bids/sub-1/ses-1/dwi/sub-1_ses-1_dwi.nii.gz", 1) \
        is FailureClass.VALIDATION
    assert classify("Exception: No dwi images found for participant 0075. All workflows require dwi images", 1) \
        is FailureClass.VALIDATION
