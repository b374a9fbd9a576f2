"""Pathological DWI data through the three stand-ins: each case completes or is refused - never a traceback.

Direct NIfTI-level cases (what a converter other than dcm2niix, a hand-edited table
or a broken export can hand over): NaN/inf/zero voxels, all-zero series, single-slice
and single-volume (3D) series, b=0-only and 5-direction series, b0 by threshold
(b = 5 / 50), non-unit / zero / NaN b-vectors, bval/bvec length mismatches, text in
a .bval, 5D images (3D and 5D are refused with QSIPrep's own "DWI file not 4D"),
a corrupt NIfTI, a tiny grid, 130 volumes on a 6x6x4 grid,
separately acquired b0 and DW runs. Acquisition shapes from a scanner go through the
real conversion in test_builtin_acquisitions.py.

Each stand-in runs in-process through ``run_cli`` (the CLI's own exit-code mapping):
a validation refusal is exit 2 with ONE ``validation error: ...`` line on stderr, and
anything unexpected propagates as an exception, i.e. fails the test with its traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neuroflow_dagster.demo.synth import hemisphere_directions
from neuroflow_dagster.tools.builtin import parcellate, preproc, recon
from neuroflow_dagster.tools.builtin.common import run_cli
from neuroflow_dagster.tools.qc_table import find_image_qc, read_image_qc
from neuroflow_dagster_tests.bids_files import write_t1w
from neuroflow_dagster_tests.test_builtin_recon import default_spec

SHAPE = (10, 10, 6)
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


def scheme(n_b0: int = 2, n_dirs: int = 12, b: float = 1000.0, b0: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    bvals = np.r_[np.full(n_b0, b0), np.full(n_dirs, b)]
    bvecs = np.concatenate([np.zeros((n_b0, 3)), hemisphere_directions(n_dirs) if n_dirs >= 6 else
                            hemisphere_directions(6)[:n_dirs]])
    return bvals, bvecs


def signal(bvals: np.ndarray, bvecs: np.ndarray, shape: tuple[int, ...] = SHAPE, snr: float = 40.0,
           seed: int = 0) -> np.ndarray:
    """Box 'brain' in air: prolate tensor (x) in the left half, isotropic in the right, S0 ramp + Rician noise."""
    from dipy.core.gradients import gradient_table
    from dipy.sims.voxel import single_tensor

    gtab = gradient_table(bvals, bvecs=np.where(np.linalg.norm(bvecs, axis=1, keepdims=True) > 0, bvecs,
                                                [1.0, 0.0, 0.0]), b0_threshold=50)
    pro = single_tensor(gtab, S0=1.0, evals=np.array([1.7e-3, 0.3e-3, 0.3e-3]), evecs=np.eye(3), snr=None)
    iso = single_tensor(gtab, S0=1.0, evals=np.array([0.8e-3] * 3), evecs=np.eye(3), snr=None)
    data = np.zeros((*shape, len(bvals)), dtype=np.float32)
    lo = [max(1, d // 5) if d > 2 else 0 for d in shape]
    hi = [d - lo_ for d, lo_ in zip(shape, lo, strict=True)]
    ramp = 800.0 + 40.0 * np.arange(shape[1])[None, :, None]  # some structure for the QC correlations
    box = np.zeros(shape, dtype=bool)
    box[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    left = box.copy()
    left[shape[0] // 2:] = False
    s0 = np.broadcast_to(ramp, shape)
    data[left] = s0[left][:, None] * pro
    data[box & ~left] = s0[box & ~left][:, None] * iso
    rng = np.random.default_rng(seed)
    sigma = 1000.0 / snr
    return np.sqrt((data + rng.normal(0, sigma, data.shape)) ** 2 + rng.normal(0, sigma, data.shape) ** 2).astype(
        np.float32)


@dataclass
class Series:
    """One DWI run as files: the image and the exact text of its .bval/.bvec."""

    data: np.ndarray | None
    bval_text: str
    bvec_text: str
    name: str = "sub-01_ses-01_dwi"
    raw_bytes: bytes | None = None  # write these instead of a NIfTI (a corrupt file)
    header_edit: Callable[[nib.Nifti1Image], nib.Nifti1Image] | None = None


def series(data: np.ndarray | None, bvals: np.ndarray, bvecs: np.ndarray, **kw) -> Series:
    bval_text = " ".join(f"{b:g}" for b in bvals) + "\n"
    bvec_text = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in np.asarray(bvecs).T) + "\n"
    return Series(data, bval_text, bvec_text, **kw)


def write_bids(root: Path, runs: list[Series]) -> Path:
    """The session's DWI runs, and a T1w as a real session has (QSIPrep refuses a subject without one)."""
    d = root / "bids" / "sub-01" / "ses-01" / "dwi"
    d.mkdir(parents=True)
    write_t1w(root / "bids", "01", "01")
    for run in runs:
        if run.raw_bytes is not None:
            (d / f"{run.name}.nii.gz").write_bytes(run.raw_bytes)
        else:
            assert run.data is not None
            img = nib.Nifti1Image(run.data, AFFINE)
            if run.header_edit:
                img = run.header_edit(img)
            nib.save(img, d / f"{run.name}.nii.gz")
        (d / f"{run.name}.bval").write_text(run.bval_text)
        (d / f"{run.name}.bvec").write_text(run.bvec_text)
    return root / "bids"


@dataclass
class Outcome:
    codes: dict[str, int] = field(default_factory=dict)
    stderr: dict[str, str] = field(default_factory=dict)
    stdout: dict[str, str] = field(default_factory=dict)


def run_chain(root: Path, capsys, denoise: str = "auto") -> Outcome:
    """preproc -> recon -> parcellate in-process via run_cli; stops at the first non-zero exit."""
    out = Outcome()
    steps = (
        ("preproc", preproc.main, lambda: ["--bids-dir", str(root / "bids"), "--output-dir", str(root / "qsiprep"),
                                           "--participant-label", "01", "--session-label", "01",
                                           "--work-dir", str(root / "work"), "--denoise-method", denoise]),
        # The spec neuroflow would choose for what preproc wrote (single-shell, multi-shell ...).
        ("recon", recon.main, lambda: ["--qsiprep-dir", str(root / "qsiprep"), "--output-dir", str(root / "qsirecon"),
                                       "--participant-label", "01", "--session-label", "01",
                                       "--work-dir", str(root / "work"),
                                       "--recon-spec", default_spec(root / "qsiprep", "01", "01")]),
        ("parcellate", parcellate.main, lambda: ["--qsirecon-dir", str(root / "qsirecon"), "--output-dir",
                                                 str(root / "qsiparc"), "--participant-label", "01",
                                                 "--session-label", "01"]),
    )
    for name, main, argv in steps:
        code = run_cli(main, argv())
        captured = capsys.readouterr()
        out.codes[name], out.stderr[name], out.stdout[name] = code, captured.err, captured.out
        if code:
            break
    return out


def _base(**kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bvals, bvecs = scheme(**kw)
    return signal(bvals, bvecs), bvals, bvecs


def _with(data_fn: Callable[[np.ndarray], None]) -> list[Series]:
    data, bvals, bvecs = _base()
    data_fn(data)
    return [series(data, bvals, bvecs)]


def case_nan_voxels() -> list[Series]:
    def poke(d: np.ndarray) -> None:
        d[0, 0, 0, :] = np.nan
        d[5, 5, 3, 4] = np.nan
        d[4, 4, 2, 0] = np.inf
    return _with(poke)


def case_zero_dw_volume() -> list[Series]:
    return _with(lambda d: d.__setitem__((..., 6), 0.0))


def case_all_zero() -> list[Series]:
    return _with(lambda d: d.__setitem__(..., 0.0))


def case_single_slice() -> list[Series]:
    bvals, bvecs = scheme()
    return [series(signal(bvals, bvecs, shape=(12, 12, 1)), bvals, bvecs)]


def case_single_volume_b0_3d() -> list[Series]:
    bvals, bvecs = scheme(n_b0=1, n_dirs=0)
    return [series(signal(bvals, bvecs)[..., 0], bvals, bvecs)]


def case_single_volume_dw_3d() -> list[Series]:
    bvals, bvecs = scheme(n_b0=0, n_dirs=1)
    return [series(signal(bvals, bvecs)[..., 0], bvals, bvecs)]


def case_b0_only() -> list[Series]:
    bvals, bvecs = scheme(n_b0=5, n_dirs=0)
    return [series(signal(bvals, bvecs), bvals, bvecs)]


def case_five_directions() -> list[Series]:
    bvals, bvecs = scheme(n_b0=1, n_dirs=5)
    return [series(signal(bvals, bvecs), bvals, bvecs)]


def case_b50_counts_as_b0() -> list[Series]:
    bvals, bvecs = scheme(n_b0=2, b0=50.0)
    return [series(signal(bvals, bvecs), bvals, bvecs)]


def case_b5_b0_with_direction() -> list[Series]:
    bvals, bvecs = scheme(n_b0=2, b0=5.0)
    bvecs[:2] = [0.0, 0.0, 1.0]  # Siemens writes a nominal direction on its b=5 "b0"
    return [series(signal(bvals, bvecs), bvals, bvecs)]


def case_nonunit_bvecs() -> list[Series]:
    data, bvals, bvecs = _base()
    bvecs[2:8] *= 0.5
    bvecs[8:] *= 1.8
    return [series(data, bvals, bvecs)]


def case_zero_bvec_on_dw() -> list[Series]:
    data, bvals, bvecs = _base()
    bvecs[13] = 0.0
    return [series(data, bvals, bvecs)]


def case_bval_count_mismatch() -> list[Series]:
    data, bvals, bvecs = _base()
    s = series(data, bvals, bvecs)
    s.bval_text = " ".join(f"{b:g}" for b in bvals[:-1]) + "\n"
    return [s]


def case_bvec_count_mismatch() -> list[Series]:
    data, bvals, bvecs = _base()
    s = series(data, bvals, bvecs)
    s.bvec_text = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs[:-1].T) + "\n"
    return [s]


def case_bvec_transposed() -> list[Series]:
    data, bvals, bvecs = _base()
    s = series(data, bvals, bvecs)
    s.bvec_text = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs) + "\n"  # N x 3
    return [s]


def case_negative_bval() -> list[Series]:
    data, bvals, bvecs = _base()
    bvals[5] = -1000.0
    return [series(data, bvals, bvecs)]


def case_nan_bvec_on_dw() -> list[Series]:
    data, bvals, bvecs = _base()
    bvecs[5] = np.nan
    return [series(data, bvals, bvecs)]


def case_nan_bvec_on_b0() -> list[Series]:
    data, bvals, bvecs = _base()
    bvecs[:2] = np.nan  # as in dipy's own small_64D files
    return [series(data, bvals, bvecs)]


def case_bval_text() -> list[Series]:
    data, bvals, bvecs = _base()
    s = series(data, bvals, bvecs)
    s.bval_text = "zero zero " + s.bval_text.split(" ", 2)[2]
    return [s]


def case_five_d_image() -> list[Series]:
    data, bvals, bvecs = _base()
    return [series(data[:, :, :, None, :], bvals, bvecs)]


def case_corrupt_nifti() -> list[Series]:
    bvals, bvecs = scheme()
    return [series(None, bvals, bvecs, raw_bytes=b"\x1f\x8b" + b"not really a gzipped NIfTI" * 10)]


def case_tiny_grid() -> list[Series]:
    bvals, bvecs = scheme()
    return [series(signal(bvals, bvecs, shape=(2, 2, 2)), bvals, bvecs)]


def case_many_volumes_tiny_grid() -> list[Series]:
    b1, v1 = scheme(n_b0=2, n_dirs=64, b=1000.0)
    b2, v2 = scheme(n_b0=0, n_dirs=64, b=2000.0)
    bvals, bvecs = np.r_[b1, b2], np.r_[v1, v2]
    return [series(signal(bvals, bvecs, shape=(6, 6, 4)), bvals, bvecs)]


def case_b0_run_and_dw_run() -> list[Series]:
    b_0, v_0 = scheme(n_b0=2, n_dirs=0)
    b_dw, v_dw = scheme(n_b0=0, n_dirs=12)
    return [series(signal(b_0, v_0), b_0, v_0, name="sub-01_ses-01_acq-b0_dwi"),
            series(signal(b_dw, v_dw, seed=1), b_dw, v_dw, name="sub-01_ses-01_acq-dir12_dwi")]


def case_int16_scaled() -> list[Series]:
    data, bvals, bvecs = _base()

    def as_int16(img: nib.Nifti1Image) -> nib.Nifti1Image:
        out = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
        out.set_data_dtype(np.int16)  # nibabel picks scl_slope/inter on save
        return out
    return [series(data * 30.0, bvals, bvecs, header_edit=as_int16)]


def case_flat_image() -> list[Series]:
    return _with(lambda d: d.__setitem__(..., 100.0))


COMPLETE = None
CASES: dict[str, tuple[Callable[[], list[Series]], tuple[str, str] | None]] = {
    # name: (builder, None = completes | (stage that refuses, text in its validation error))
    "nan_and_inf_voxels": (case_nan_voxels, COMPLETE),
    "one_dw_volume_all_zero": (case_zero_dw_volume, COMPLETE),
    "all_zero_series": (case_all_zero, ("preproc", "hold no signal")),
    "flat_image": (case_flat_image, COMPLETE),
    "single_slice": (case_single_slice, COMPLETE),
    # A one-volume series stored as 3D, and a 5D file: QSIPrep's own refusal, word for word.
    "single_volume_b0_3d": (case_single_volume_b0_3d, ("preproc", "DWI file not 4D: ")),
    "single_volume_dw_3d": (case_single_volume_dw_3d, ("preproc", "DWI file not 4D: ")),
    "b0_only": (case_b0_only, ("recon", "has 0 diffusion direction(s)")),
    "five_directions": (case_five_directions, ("recon", "has 5 diffusion direction(s)")),
    "b50_counts_as_b0": (case_b50_counts_as_b0, COMPLETE),
    "b5_b0_with_nominal_direction": (case_b5_b0_with_direction, COMPLETE),
    "nonunit_bvecs": (case_nonunit_bvecs, COMPLETE),
    "zero_bvec_on_dw_volume": (case_zero_bvec_on_dw, ("preproc", "volume(s) 13 have b > 50 but a zero gradient")),
    "bval_count_mismatch": (case_bval_count_mismatch, ("preproc", "has 13 b-values but the image has 14 volumes")),
    "bvec_count_mismatch": (case_bvec_count_mismatch, ("preproc", "has shape (3, 13), expected (3, 14)")),
    "bvec_transposed_n_by_3": (case_bvec_transposed, COMPLETE),
    "negative_bval": (case_negative_bval, ("preproc", "negative b-value(s) at volume(s) 5")),
    "nan_bvec_on_dw_volume": (case_nan_bvec_on_dw, ("preproc", "b-vector(s) of volume(s) 5 are not numbers")),
    "nan_bvec_on_b0_volumes": (case_nan_bvec_on_b0, COMPLETE),
    "text_in_bval": (case_bval_text, ("preproc", "cannot read b-values")),
    "five_d_image": (case_five_d_image, ("preproc", "DWI file not 4D: ")),
    "corrupt_nifti": (case_corrupt_nifti, ("preproc", "cannot read")),
    "tiny_2x2x2_grid": (case_tiny_grid, ("recon", "the demo atlas needs at least 12")),
    "130_volumes_on_6x6x4": (case_many_volumes_tiny_grid, COMPLETE),
    "separate_b0_and_dw_runs": (case_b0_run_and_dw_run, COMPLETE),
    "int16_scaled": (case_int16_scaled, COMPLETE),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pathological_series_completes_or_is_refused(name: str, tmp_path: Path, capsys) -> None:
    build, expected = CASES[name]
    write_bids(tmp_path, build())
    out = run_chain(tmp_path, capsys)
    failed = {stage: code for stage, code in out.codes.items() if code}
    if expected is COMPLETE:
        assert failed == {}, f"{name}: {failed} {out.stderr}"
        assert list(out.codes) == ["preproc", "recon", "parcellate"]
        qc = read_image_qc(find_image_qc(tmp_path / "qsiprep", "01", "01")[0])
        assert qc["raw_num_directions"] is not None and qc["mean_fd"] is None
        assert list((tmp_path / "qsiparc").rglob("*_diffmap.tsv")), "no parcellation table"
        return
    stage, text = expected
    assert failed == {stage: 2}, f"{name}: expected {stage} to refuse, got {out.codes} {out.stderr}"
    lines = out.stderr[stage].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("validation error: "), out.stderr[stage]
    assert text in lines[0], lines[0]


def test_refusals_leave_earlier_outputs_of_other_sessions_alone(tmp_path: Path, capsys) -> None:
    """A refused re-run of a subject does not delete what an earlier good run wrote (atomic session folders)."""
    data, bvals, bvecs = _base()
    write_bids(tmp_path, [series(data, bvals, bvecs)])
    assert run_chain(tmp_path, capsys).codes["preproc"] == 0
    good = tmp_path / "qsiprep/sub-01/ses-01/dwi/sub-01_ses-01_space-ACPC_desc-preproc_dwi.nii.gz"
    before = good.read_bytes()
    (tmp_path / "bids/sub-01/ses-01/dwi/sub-01_ses-01_dwi.bval").write_text("0 0 1000\n")  # now mismatched
    assert run_chain(tmp_path, capsys).codes == {"preproc": 2}
    assert good.read_bytes() == before


def test_nonfinite_voxels_and_nonunit_bvecs_are_recorded(tmp_path: Path, capsys) -> None:
    write_bids(tmp_path / "a", case_nan_voxels())
    assert run_chain(tmp_path / "a", capsys).codes["parcellate"] == 0
    side = json.loads((tmp_path / "a/qsiprep/sub-01/ses-01/dwi/sub-01_ses-01_space-ACPC_desc-preproc_dwi.json")
                      .read_text())
    assert side["NonFiniteValuesZeroed"] == 14 + 2
    write_bids(tmp_path / "b", case_nonunit_bvecs())
    out = run_chain(tmp_path / "b", capsys)
    assert out.codes["parcellate"] == 0
    side = json.loads((tmp_path / "b/qsiprep/sub-01/ses-01/dwi/sub-01_ses-01_space-ACPC_desc-preproc_dwi.json")
                      .read_text())
    assert side["GradientNotes"] and "12 b-vector(s)" in side["GradientNotes"][0]
    assert "scaled to unit length" in out.stdout["preproc"]
    bvec = np.loadtxt(tmp_path / "b/qsiprep/sub-01/ses-01/dwi/sub-01_ses-01_space-ACPC_desc-preproc_dwi.bvec")
    np.testing.assert_allclose(np.linalg.norm(bvec[:, 2:], axis=0), 1.0, atol=1e-5)


def test_recon_normalises_nonunit_bvecs_it_is_given(tmp_path: Path, capsys) -> None:
    """QSIPrep outputs from elsewhere with non-unit directions: dipy's gradient_table would raise; recon copes."""
    data, bvals, bvecs = _base()
    d = tmp_path / "qsiprep/sub-01/ses-01/dwi"
    d.mkdir(parents=True)
    p = "sub-01_ses-01_space-ACPC"
    nib.save(nib.Nifti1Image(data, AFFINE), d / f"{p}_desc-preproc_dwi.nii.gz")
    np.savetxt(d / f"{p}_desc-preproc_dwi.bval", bvals[None], fmt="%g")
    np.savetxt(d / f"{p}_desc-preproc_dwi.bvec", (bvecs * 0.9).T, fmt="%.6f")
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2:8, 2:8, 1:5] = 1
    nib.save(nib.Nifti1Image(mask, AFFINE), d / f"{p}_desc-brain_mask.nii.gz")
    code = run_cli(recon.main, ["--qsiprep-dir", str(tmp_path / "qsiprep"), "--output-dir", str(tmp_path / "r"),
                                "--participant-label", "01", "--session-label", "01", "--work-dir", str(tmp_path),
                                "--recon-spec", "ss3t_fod_autotrack"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "scaled to unit length" in out.out
