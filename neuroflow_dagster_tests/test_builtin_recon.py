"""The QSIRecon stand-in on synthetic phantoms with a known tensor (dipy.sims), run as the CLI subprocess.

The phantom is written directly in QSIPrep's output layout so the recon step is
tested on its own: left half a prolate tensor (FA ~0.80), right half isotropic.
Single-shell data get the default single-shell spec (ss3t_fod_autotrack: tensor and
GQI maps), two shells the multi-shell one (dipy_dki: dipy's DKI, as QSIRecon fits it);
what QSIRecon's fits refuse, the stand-in refuses with the same words.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neuroflow_dagster.naming import qsirecon as names
from neuroflow_dagster.tools import shells
from neuroflow_dagster.tools.builtin import recon
from neuroflow_dagster.tools.builtin.common import run_cli

SINGLE = names.DEFAULT_SPECS[names.SINGLE_SHELL]
MULTI = names.DEFAULT_SPECS[names.MULTI_SHELL]
SINGLE_WF = "qsirecon-SS3TAutoTrack"

SHAPE = (12, 12, 12)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = -12.0
PROLATE = np.array([1.7e-3, 0.3e-3, 0.3e-3])
ISO = np.array([0.8e-3, 0.8e-3, 0.8e-3])


def gradient_scheme(n_dirs: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One b0 plus ``n_dirs`` directions of dipy's real 64-direction scheme (b ~1000)."""
    from dipy.data import get_fnames

    _, fbval, fbvec = get_fnames(name="small_64D")
    bvals = np.loadtxt(fbval)
    bvecs = np.loadtxt(fbvec)
    if bvecs.shape[0] == 3:
        bvecs = bvecs.T
    keep = np.r_[0, 1 : n_dirs + 1]
    return bvals[keep], bvecs[keep]


def phantom(bvals: np.ndarray, bvecs: np.ndarray, snr: float | None = 100.0, seed: int = 0,
            iso: np.ndarray = ISO) -> tuple[np.ndarray, np.ndarray]:
    """4D signal: prolate tensor along x for x<6, isotropic (``iso``) for x>=6, inside mask [2:10]^3."""
    from dipy.core.gradients import gradient_table
    from dipy.sims.voxel import single_tensor

    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=50)
    s_pro = single_tensor(gtab, S0=1000.0, evals=PROLATE, evecs=np.eye(3), snr=None)
    s_iso = single_tensor(gtab, S0=1000.0, evals=iso, evecs=np.eye(3), snr=None)
    data = np.zeros((*SHAPE, len(bvals)), dtype=np.float32)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2:10, 2:10, 2:10] = True
    left = mask.copy()
    left[6:] = False
    right = mask & ~left
    data[left] = s_pro
    data[right] = s_iso
    if snr is not None:
        rng = np.random.default_rng(seed)
        sigma = 1000.0 / snr
        noise1 = rng.normal(0, sigma, data.shape)
        noise2 = rng.normal(0, sigma, data.shape)
        data = np.sqrt((data + noise1) ** 2 + noise2**2).astype(np.float32)  # Rician
    return data, mask


def write_qsiprep_session(root: Path, sub: str, ses: str, data: np.ndarray, bvals: np.ndarray,
                          bvecs: np.ndarray, mask: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """The files the QSIPrep stand-in (and QSIPrep) write for one session."""
    d = root / f"sub-{sub}" / f"ses-{ses}" / "dwi"
    d.mkdir(parents=True, exist_ok=True)
    p = f"sub-{sub}_ses-{ses}_space-ACPC"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), d / f"{p}_desc-preproc_dwi.nii.gz")
    np.savetxt(d / f"{p}_desc-preproc_dwi.bval", bvals[None, :], fmt="%g")
    np.savetxt(d / f"{p}_desc-preproc_dwi.bvec", bvecs.T, fmt="%.6f")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), d / f"{p}_desc-brain_mask.nii.gz")
    if np.any(bvals <= 50):
        b0 = data[..., bvals <= 50].mean(axis=3)
        nib.save(nib.Nifti1Image(b0.astype(np.float32), affine), d / f"{p}_dwiref.nii.gz")
    return d


def two_shell_scheme(n_dirs: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """b=0 plus the same ``n_dirs`` directions at b~1000 and b~2000 (dipy's 64-direction scheme)."""
    bvals, bvecs = gradient_scheme(n_dirs)
    return np.r_[bvals, bvals[1:] * 2], np.r_[bvecs, bvecs[1:]]


def default_spec(qsiprep: Path, sub: str, ses: str) -> str:
    """The spec neuroflow chooses by default for the session's preprocessed series (its shell scheme)."""
    series = shells.session_series(qsiprep / f"sub-{sub}" / f"ses-{ses}" / "dwi")
    return names.DEFAULT_SPECS[shells.session_scheme(series)] if series else SINGLE


def run_recon_cli(qsiprep: Path, out: Path, sub: str, ses: str, *extra: str,
                  spec: str = SINGLE) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "neuroflow_dagster.tools.builtin.recon", "--qsiprep-dir", str(qsiprep),
           "--output-dir", str(out), "--participant-label", sub, "--session-label", ses,
           "--work-dir", str(out.parent / "work"), "--recon-spec", spec, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def true_fa(evals: np.ndarray) -> float:
    from dipy.reconst.dti import fractional_anisotropy

    return float(fractional_anisotropy(evals))


def two_halves_atlas(folder: Path) -> tuple[Path, Path]:
    """A 1 mm atlas over the phantom's field of view: label 7 where world x < 0, label 9 elsewhere."""
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine[:3, 3] = -12.5  # voxel centres of the 2 mm grid fall between 1 mm voxels: exercises rounding
    ijk = np.indices((24, 24, 24)).reshape(3, -1).T
    world_x = nib.affines.apply_affine(fine, ijk)[:, 0].reshape(24, 24, 24)
    atlas = np.where(world_x < 0, 7, 9).astype(np.int16)
    atlas_file = folder / "atlas-TwoHalves_dseg.nii.gz"
    nib.save(nib.Nifti1Image(atlas, fine), atlas_file)
    labels_file = folder / "labels.tsv"
    labels_file.write_text("index\tlabel\n7\tLeft_Half\n9\tRight_Half\n")
    return atlas_file, labels_file


def recon_phantom(root: Path, table: tuple[np.ndarray, np.ndarray],
                  spec: str) -> tuple[Path, subprocess.CompletedProcess, np.ndarray]:
    """The noisy phantom with this gradient table, in QSIPrep's layout, reconstructed by the stand-in CLI."""
    data, mask = phantom(*table)
    write_qsiprep_session(root / "qsiprep", "0075", "01", data, *table, mask)
    return root / "qsirecon", run_recon_cli(root / "qsiprep", root / "qsirecon", "0075", "01", spec=spec), mask


@pytest.fixture(scope="module")
def phantom_recon(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, np.ndarray]:
    return recon_phantom(tmp_path_factory.mktemp("recon"), gradient_scheme(64), SINGLE)


def test_recon_recovers_phantom_tensor_and_writes_qsirecon_layout(phantom_recon):
    out, proc, mask = phantom_recon
    assert proc.returncode == 0, proc.stderr
    for pattern in recon.recon_outputs("0075", "01", SINGLE):
        assert list(out.glob(pattern)), f"missing golden output {pattern}"
    wf = out / "derivatives" / SINGLE_WF / "sub-0075" / "ses-01" / "dwi"
    maps = {m: nib.load(wf / f"sub-0075_ses-01_space-ACPC_model-tensor_param-{m}_dwimap.nii.gz").get_fdata()
            for m in ("fa", "md", "ad", "rd")}
    fa = maps["fa"]
    assert fa.min() >= 0.0 and fa.max() <= 1.0
    assert np.all(fa[~mask] == 0)
    left = mask.copy()
    left[6:] = False
    right = mask & ~left
    assert true_fa(PROLATE) == pytest.approx(0.799, abs=0.001)
    assert float(np.median(fa[left])) == pytest.approx(true_fa(PROLATE), abs=0.03)
    assert float(np.median(fa[right])) < 0.1
    assert float(np.median(maps["md"][left])) == pytest.approx(PROLATE.mean(), rel=0.05)
    assert float(np.median(maps["ad"][left])) == pytest.approx(PROLATE[0], rel=0.05)
    assert float(np.median(maps["rd"][left])) == pytest.approx(PROLATE[1], rel=0.10)
    # The GQI maps DSI Studio's export writes beside the tensor: anisotropy where the tensor is prolate.
    gqi = {m: nib.load(wf / f"sub-0075_ses-01_space-ACPC_model-gqi_param-{m}_dwimap.nii.gz").get_fdata()
           for m in ("gfa", "iso", "qa")}
    assert np.median(gqi["gfa"][left]) > 3 * np.median(gqi["gfa"][right])
    assert np.median(gqi["qa"][left]) > 3 * np.median(gqi["qa"][right])
    assert np.median(gqi["iso"][right]) > np.median(gqi["iso"][left]) > 0
    assert all(np.all(m[~mask] == 0) for m in gqi.values())


def test_recon_demo_atlas_lut_and_provenance(phantom_recon):
    out, _, mask = phantom_recon
    dseg = nib.load(out / "sub-0075/ses-01/dwi/sub-0075_ses-01_space-ACPC_seg-DemoQuantileGrid_dseg.nii.gz")
    labels = np.asarray(dseg.dataobj)
    assert np.all(labels[~mask] == 0) and np.all(labels[mask] > 0)
    counts = np.bincount(labels[mask].ravel())[1:]
    assert len(counts) == 12 and counts.min() >= mask.sum() // 12 - 1  # balanced by construction
    lut = pd.read_csv(out / "atlases/atlas-DemoQuantileGrid/atlas-DemoQuantileGrid_dseg.tsv", sep="\t")
    assert list(lut.columns) == ["index", "label"] and list(lut["index"]) == list(range(1, 13))
    # x < 0 (RAS) is the Left half: region 1 lies in the lower x indices of this phantom
    assert lut.loc[0, "label"] == "Left_Posterior_Inferior"
    assert np.argwhere(labels == 1)[:, 0].max() < 6
    for desc in (out / "dataset_description.json",
                 out / "derivatives" / SINGLE_WF / "dataset_description.json"):
        data = json.loads(desc.read_text())
        assert data["DatasetType"] == "derivative"
        assert data["GeneratedBy"][0]["Name"] == "neuroflow-dagster builtin stand-in for QSIRecon"


def test_recon_qc_png_is_a_small_real_png(phantom_recon):
    import matplotlib.image as mpimg

    out, _, _ = phantom_recon
    png = out / "sub-0075/ses-01/figures/sub-0075_ses-01_desc-qc_dwi.png"
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert png.stat().st_size < 200_000


def test_recon_atlas_file_is_resampled_nearest_neighbour(tmp_path):
    bvals, bvecs = gradient_scheme(64)
    data, mask = phantom(bvals, bvecs, snr=None)
    write_qsiprep_session(tmp_path / "qsiprep", "01", "02", data, bvals, bvecs, mask)
    atlas_file, labels_file = two_halves_atlas(tmp_path)
    res = recon.run_recon(tmp_path / "qsiprep", tmp_path / "out", "01", "02", tmp_path / "work", SINGLE,
                          atlas_file=atlas_file, atlas_labels=labels_file)
    assert res.atlas == "TwoHalves" and res.n_regions == 2
    dseg = np.asarray(nib.load(res.dseg).dataobj)
    world = nib.affines.apply_affine(AFFINE, np.argwhere(mask))
    expected = np.where(world[:, 0] < 0, 7, 9)
    assert np.array_equal(dseg[mask], expected)
    assert np.all(dseg[~mask] == 0)
    lut = pd.read_csv(res.lut, sep="\t")
    assert lut.to_dict("list") == {"index": [7, 9], "label": ["Left_Half", "Right_Half"]}


def test_recon_one_direction_is_a_validation_error(tmp_path):
    """Like heudiconv's b0dwiForFmap series (b=5,5,1500, one direction): exit 2, one clean line."""
    bvals = np.array([5.0, 5.0, 1500.0])
    bvecs = np.array([[-0.5, -0.527, 0.686], [-0.5, -0.527, 0.686], [0.9999, -0.015, -0.007]])
    data = np.full((*SHAPE, 3), 500.0, dtype=np.float32)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[3:9, 3:9, 3:9] = True
    write_qsiprep_session(tmp_path / "qsiprep", "0075", "01", data, bvals, bvecs, mask)
    proc = run_recon_cli(tmp_path / "qsiprep", tmp_path / "qsirecon", "0075", "01")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        "validation error: sub-0075 ses-01 has 1 diffusion direction(s); the tensor model needs at least 6")
    assert not (tmp_path / "qsirecon" / "sub-0075").exists()


def test_recon_five_directions_fail_six_pass(tmp_path, capsys):
    bvals_all, bvecs_all = gradient_scheme(64)
    for n, code in ((5, 2), (6, 0)):
        bvals, bvecs = bvals_all[: n + 1], bvecs_all[: n + 1]
        data, mask = phantom(bvals, bvecs, snr=None)
        write_qsiprep_session(tmp_path / f"q{n}", "01", "01", data, bvals, bvecs, mask)
        argv = ["--qsiprep-dir", str(tmp_path / f"q{n}"), "--output-dir", str(tmp_path / f"o{n}"),
                "--participant-label", "01", "--session-label", "01", "--work-dir", str(tmp_path / "w"),
                "--recon-spec", SINGLE]
        assert run_cli(recon.main, argv) == code
    assert "has 5 diffusion direction(s)" in capsys.readouterr().err


def test_recon_missing_input_and_bad_atlas_config(tmp_path, capsys):
    base = ["--output-dir", str(tmp_path / "o"), "--participant-label", "01", "--session-label", "01",
            "--work-dir", str(tmp_path / "w"), "--recon-spec", SINGLE]
    assert run_cli(recon.main, ["--qsiprep-dir", str(tmp_path / "nothing"), *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("validation error: missing required file ")
    assert "sub-01_ses-01_space-ACPC_desc-preproc_dwi.nii.gz" in err

    bvals, bvecs = gradient_scheme(8)
    data, mask = phantom(bvals, bvecs, snr=None)
    write_qsiprep_session(tmp_path / "q", "01", "01", data, bvals, bvecs, mask)
    missing_atlas = ["--atlas-file", str(tmp_path / "no_atlas.nii.gz"), "--atlas-labels", str(tmp_path / "x")]
    assert run_cli(recon.main, ["--qsiprep-dir", str(tmp_path / "q"), *base, *missing_atlas]) == 3
    assert capsys.readouterr().err.startswith("configuration error: atlas file not found: ")
    assert run_cli(recon.main, ["--qsiprep-dir", str(tmp_path / "q"), *base, "--atlas-file",
                                str(tmp_path / "a.nii.gz")]) == 3
    assert "must be given together" in capsys.readouterr().err


def test_recon_no_b0_is_a_validation_error(tmp_path, capsys):
    bvals, bvecs = gradient_scheme(12)
    data, mask = phantom(bvals, bvecs, snr=None)
    write_qsiprep_session(tmp_path / "q", "01", "01", data[..., 1:], bvals[1:], bvecs[1:], mask)
    argv = ["--qsiprep-dir", str(tmp_path / "q"), "--output-dir", str(tmp_path / "o"),
            "--participant-label", "01", "--session-label", "01", "--work-dir", str(tmp_path / "w"),
            "--recon-spec", SINGLE]
    assert run_cli(recon.main, argv) == 2
    assert capsys.readouterr().err.startswith("validation error: sub-01 ses-01 has no b=0 volume")


def test_recon_rerun_replaces_stale_session_outputs(tmp_path):
    bvals, bvecs = gradient_scheme(12)
    data, mask = phantom(bvals, bvecs, snr=None)
    write_qsiprep_session(tmp_path / "q", "01", "01", data, bvals, bvecs, mask)
    res = recon.run_recon(tmp_path / "q", tmp_path / "o", "01", "01", tmp_path / "w", SINGLE)
    stale = [res.dseg.parent / "sub-01_ses-01_space-ACPC_seg-Old_dseg.nii.gz",
             res.maps["tensor-fa"].parent / "sub-01_ses-01_space-ACPC_model-old_param-x_dwimap.nii.gz"]
    for path in stale:
        path.write_bytes(b"stale")
    killed = tmp_path / "o" / "sub-01" / ".ses-01.tmp-killedrun"  # a run killed mid-write left this
    killed.mkdir()
    res2 = recon.run_recon(tmp_path / "q", tmp_path / "o", "01", "01", tmp_path / "w", SINGLE)
    assert res2.dseg.is_file() and res2.maps["tensor-fa"].is_file()
    assert not any(p.exists() for p in stale)
    assert not [p for p in (tmp_path / "o" / "sub-01").iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def multishell_recon(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, np.ndarray]:
    return recon_phantom(tmp_path_factory.mktemp("recon_ms"), two_shell_scheme(32), MULTI)


def test_recon_multishell_fits_dipy_dki_as_qsirecon_does(multishell_recon):
    """Two shells: dipy's DKI (QSIRecon's own fit) recovers the Gaussian phantom: tensor FA and MD, ~0 kurtosis."""
    out, proc, mask = multishell_recon
    assert proc.returncode == 0, proc.stderr
    for pattern in recon.recon_outputs("0075", "01", MULTI):
        assert list(out.glob(pattern)), f"missing golden output {pattern}"
    wf = out / "derivatives/qsirecon-DKI/sub-0075/ses-01/dwi"
    names_written = sorted(p.name for p in wf.glob("*_dwimap.nii.gz"))
    assert len(names_written) == 12 and not list((out / "derivatives").glob(f"{SINGLE_WF}*"))

    def load(model: str, param: str) -> np.ndarray:
        return nib.load(wf / f"sub-0075_ses-01_space-ACPC_model-{model}_param-{param}_dwimap.nii.gz").get_fdata()

    left = mask.copy()
    left[6:] = False
    right = mask & ~left
    assert float(np.median(load("tensor", "fa")[left])) == pytest.approx(true_fa(PROLATE), abs=0.03)
    assert float(np.median(load("dki", "md")[left])) == pytest.approx(PROLATE.mean(), rel=0.05)
    assert float(np.median(load("dki", "ad")[right])) == pytest.approx(ISO[0], rel=0.05)
    assert abs(float(np.median(load("dki", "mk")[mask]))) < 0.1  # a single Gaussian compartment has no kurtosis
    side = json.loads((wf / "sub-0075_ses-01_space-ACPC_model-dki_param-mk_dwimap.json").read_text())
    assert side["ReconSpec"] == MULTI and side["GeneratedBy"][0]["StandIn"] is True


def test_recon_dki_on_single_shell_is_refused_with_dipys_own_words(tmp_path):
    """The stand-in refuses dipy_dki on one shell exactly as dipy (and so QSIRecon's DKI node) does."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    bvals, bvecs = gradient_scheme(30)
    data, mask = phantom(bvals, bvecs, snr=None)
    write_qsiprep_session(tmp_path / "q", "01", "01", data, bvals, bvecs, mask)
    with pytest.raises(ValueError) as dipy_says:
        DiffusionKurtosisModel(gradient_table(bvals, bvecs=bvecs, b0_threshold=50))
    proc = run_recon_cli(tmp_path / "q", tmp_path / "o", "01", "01", spec=MULTI)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.startswith("validation error: sub-01 ses-01: dipy_dki cannot reconstruct "
                           "sub-01_ses-01_space-ACPC_desc-preproc_dwi.nii.gz (b=0 x1, b=")
    assert line.endswith(f"single-shell): dipy's DiffusionKurtosisModel refuses its gradient table: {dipy_says.value}")
    assert str(dipy_says.value) == "DKI requires at least 3 b-values (which can include b=0)."
    assert not (tmp_path / "o" / "sub-01").exists()


def test_recon_spec_is_required_and_limited_to_what_the_stand_in_implements(tmp_path, capsys):
    bvals, bvecs = gradient_scheme(12)
    data, mask = phantom(bvals, bvecs, snr=None)
    write_qsiprep_session(tmp_path / "q", "01", "01", data, bvals, bvecs, mask)
    base = ["--qsiprep-dir", str(tmp_path / "q"), "--output-dir", str(tmp_path / "o"), "--participant-label", "01",
            "--session-label", "01", "--work-dir", str(tmp_path / "w")]
    assert run_cli(recon.main, base) == 3
    assert "--recon-spec" in capsys.readouterr().err
    assert run_cli(recon.main, [*base, "--recon-spec", "mrtrix_singleshell_ss3t_noACT"]) == 3
    err = capsys.readouterr().err
    assert "the stand-in writes the maps of dipy_dki, dsi_studio_gqi, ss3t_fod_autotrack only" in err
    # dsi_studio_gqi (the default for Cartesian schemes): the same maps under QSIRecon's DSIStudio folder.
    assert run_cli(recon.main, [*base, "--recon-spec", "dsi_studio_gqi"]) == 0
    assert len(list((tmp_path / "o/derivatives/qsirecon-DSIStudio").rglob("*_dwimap.nii.gz"))) == 7
    assert set(recon.STAND_IN_SPECS) == names.STAND_IN_SPECS  # the configuration allows exactly these
