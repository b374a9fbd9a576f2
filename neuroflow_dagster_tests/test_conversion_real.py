"""Real HeudiConv + real dcm2niix + the real BIDS validator on synthetic and real scanner DICOM.

bval/bvec convention checked here (and relied on downstream): DICOM
(0018,9089) gives the gradient g in the patient LPS frame; dcm2niix writes
FSL-style bvecs b, i.e. in the voxel frame of the written NIfTI, with b_x
negated when the affine has a positive determinant. With R the affine's
rotation (RAS world), g_LPS = diag(-1, -1, 1) @ R @ b (after that b_x flip).
For the synthetic axial series (written as LAS, det < 0) this means
b = (g_x, -g_y, g_z). Checked per vector, signs included.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neuroflow_dagster.bids import validator
from neuroflow_dagster.bids.dataset import present_suffixes
from neuroflow_dagster.demo import sources, synth

pytestmark = pytest.mark.slow

ALL_SERIES = ("localizer", "t1w", "dwi", "dwi_b0_pa", "adc", "flair", "t2w")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def _convert(config, dicom: Path, staging: Path, participant: str, session: str, convert):
    spec, _report = convert(config, dicom, staging, participant, session)
    assert spec.missing_outputs() == []
    return spec


def bvecs_to_lps(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL-style bvecs (3, N) of an image -> unit gradients (N, 3) in the patient LPS frame."""
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    b = bvecs.T.copy()
    if np.linalg.det(rotation) > 0:
        b[:, 0] *= -1
    return (LPS_FROM_RAS @ rotation @ b.T).T


@pytest.fixture(scope="module")
def synth_converted(tmp_path_factory, convert):
    """One synthetic session with every series kind, converted once for this module."""
    from neuroflow_dagster.config import NeuroflowConfig

    root = tmp_path_factory.mktemp("synth")
    session = synth.write_session(root / "dicom" / "20240115_1430", seed=7, n_directions=15, series=ALL_SERIES)
    config = NeuroflowConfig.model_validate(
        {"paths": {k: str(root / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}}
    )
    staging = root / "work" / "stage"
    spec = _convert(config, session.folder, staging, "0075", "01", convert)
    return session, staging, spec


def test_synthetic_session_gets_bids_names_and_skips_scouts_and_derived(synth_converted) -> None:
    _session, staging, _spec = synth_converted
    ses = staging / "sub-0075" / "ses-01"
    names = sorted(str(p.relative_to(ses)) for p in ses.rglob("*.nii.gz"))
    assert names == [
        "anat/sub-0075_ses-01_FLAIR.nii.gz",
        "anat/sub-0075_ses-01_T1w.nii.gz",
        "anat/sub-0075_ses-01_T2w.nii.gz",
        "dwi/sub-0075_ses-01_dir-AP_dwi.nii.gz",
        "fmap/sub-0075_ses-01_acq-dwi_dir-PA_epi.nii.gz",
    ]  # no localizer, no ADC map
    assert present_suffixes(ses) == {"T1w", "T2w", "FLAIR", "dwi", "epi"}
    fmap = json.loads((ses / "fmap" / "sub-0075_ses-01_acq-dwi_dir-PA_epi.json").read_text())
    dwi = json.loads((ses / "dwi" / "sub-0075_ses-01_dir-AP_dwi.json").read_text())
    assert fmap["IntendedFor"] == ["ses-01/dwi/sub-0075_ses-01_dir-AP_dwi.nii.gz"]
    assert dwi["B0FieldSource"] == dwi["B0FieldIdentifier"] == fmap["B0FieldIdentifier"]
    # Opposite polarity on the same axis: what a pepolar (TOPUP) correction needs; dir- follows it.
    assert (fmap["PhaseEncodingDirection"], dwi["PhaseEncodingDirection"]) == ("j", "j-")
    assert (staging / ".heudiconv").is_dir()  # the cache stays in staging; publish never moves it


def test_synthetic_bvals_and_bvecs_match_what_was_synthesized(synth_converted) -> None:
    session, staging, _spec = synth_converted
    truth = session.dwi
    assert truth is not None
    prefix = staging / "sub-0075" / "ses-01" / "dwi" / "sub-0075_ses-01_dir-AP_dwi"
    img = nib.load(f"{prefix}.nii.gz")
    assert img.shape == (*truth.shape, 16)  # 1 b0 + 15 directions, all slices
    bvals = np.loadtxt(f"{prefix}.bval")
    bvecs = np.loadtxt(f"{prefix}.bvec")
    np.testing.assert_allclose(bvals, truth.bvals)
    assert bvecs.shape == (3, 16)
    assert np.linalg.det(img.affine[:3, :3]) < 0  # LAS: bvecs are in the voxel frame, no x flip
    np.testing.assert_allclose(bvecs.T, truth.bvecs_lps * [1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(bvecs_to_lps(bvecs, img.affine), truth.bvecs_lps, atol=1e-5)


def test_dti_fit_on_converted_data_recovers_the_phantom(synth_converted) -> None:
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    _session, staging, _spec = synth_converted
    prefix = staging / "sub-0075" / "ses-01" / "dwi" / "sub-0075_ses-01_dir-AP_dwi"
    img = nib.load(f"{prefix}.nii.gz")
    gtab = gradient_table(np.loadtxt(f"{prefix}.bval"), bvecs=np.loadtxt(f"{prefix}.bvec").T)
    fit = TensorModel(gtab).fit(np.asarray(img.dataobj, dtype=float))
    nx, ny, _nz = img.shape[:3]
    ii, jj = np.meshgrid(np.arange(nx) - (nx - 1) / 2, np.arange(ny) - (ny - 1) / 2, indexing="ij")
    core = np.hypot(ii, jj) <= 3  # well inside the radius-5 cylinder
    shell = np.hypot(ii, jj) >= 7  # isotropic tissue outside it
    fa_core = fit.fa[core].mean()
    assert abs(fa_core - synth.TRUE_FA) < 0.03, (fa_core, synth.TRUE_FA)
    assert fit.fa[shell].mean() < 0.05
    # Principal eigenvectors (voxel frame); their sign is arbitrary: align to the first, then average.
    e = fit.evecs[core][..., :, 0].reshape(-1, 3)
    e = e * np.sign(e @ e[0])[:, None]
    evec = e.mean(axis=0) / np.linalg.norm(e.mean(axis=0))
    world_lps = bvecs_to_lps(evec[:, None], img.affine)[0]
    assert abs(world_lps @ synth.FIBER_DIRECTION_LPS) > 0.99, world_lps
    md = fit.md[core].mean()
    assert abs(md - np.mean(synth.FIBER_EVALS)) < 0.05e-3


def test_validator_passes_the_converted_synthetic_session(synth_converted) -> None:
    _session, staging, _spec = synth_converted
    report = validator.validate_session(staging, "0075", "01")
    assert report.passed, report.summary()
    assert report.errors == [] and report.exit_code == 0
    assert report.validator_version == "3.0.2"
    assert report.summary_counts["subjects"] == ["0075"] and report.summary_counts["sessions"] == ["01"]


def test_real_siemens_prisma_dwi_converts_and_validates(make_config, real_dicom_dir, tmp_path, convert) -> None:
    staging = tmp_path / "work" / "stage"
    _convert(make_config(), real_dicom_dir, staging, "0075", "02", convert)
    prefix = staging / "sub-0075" / "ses-02" / "dwi" / "sub-0075_ses-02_dir-AP_dwi"
    assert nib.load(f"{prefix}.nii.gz").shape == (150, 152, 81, 3)
    np.testing.assert_allclose(np.loadtxt(f"{prefix}.bval"), [5, 5, 1500])
    sidecar = json.loads(Path(f"{prefix}.json").read_text())
    assert sidecar["Manufacturer"] == "Siemens" and sidecar["PhaseEncodingDirection"] == "j-"
    report = validator.validate_session(staging, "0075", "02")
    assert report.passed, report.summary()
    # The inputs (real DICOM copies) were only read.
    assert sorted(p.name for p in real_dicom_dir.iterdir()) == [
        f"b0dwiForFmap_b0dwi_for_fmap+0000{i}.dcm" for i in (1, 2, 3)
    ]


def test_real_nibabel_siemens_dwi_and_philips_mprage_convert_as_one_session(make_config, tmp_path, convert) -> None:
    """Two StudyInstanceUIDs in one folder: works because of `-g all`."""
    dicom = tmp_path / "dicom" / "nib"
    sources.copy_real_session(dicom, "nibabel")
    staging = tmp_path / "work" / "stage"
    _convert(make_config(), dicom, staging, "0001", "01", convert)
    ses = staging / "sub-0001" / "ses-01"
    assert present_suffixes(ses) == {"T1w", "dwi"}
    np.testing.assert_allclose(np.loadtxt(ses / "dwi" / "sub-0001_ses-01_dir-AP_dwi.bval"), [0, 1000])
    assert nib.load(ses / "anat" / "sub-0001_ses-01_T1w.nii.gz").ndim == 3
    report = validator.validate_session(staging, "0001", "01")
    assert report.passed, report.summary()
