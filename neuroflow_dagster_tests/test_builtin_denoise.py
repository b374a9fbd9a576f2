"""The QSIPrep stand-in's denoising chain: library failures (raised or silent) never fail a session.

The real failure that started this (issue 10): dipy 1.12.1's patch2self raised "could
not broadcast input array from shape (...,2) into shape (...,4)" on a 2 b=0 + 12
direction series. Both of its implementations are wrong in 1.12.1 (dipy issue #3968,
fixed after 1.12.1): version 3 (the default) writes trailing volumes from a stale
buffer for most series lengths - 14 volumes raise, 13 silently return duplicates - and
passes a lone b=0 through as a copy of volume 0; version 1 predicts from mean-centred
regressors, shifting every volume by a constant. The first tests run that real dipy
code and check that the stand-in's guard (`check_denoised`) refuses each of those
outputs and accepts version 3 where its buffer arithmetic is right (15 volumes). The
chain itself is tested with the library's failure injected at its boundary (the dipy
function raising), since a real failure of a given kind cannot be ordered.
"""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neuroflow_dagster.tools.builtin import preproc
from neuroflow_dagster.tools.builtin.common import run_cli
from neuroflow_dagster_tests.test_builtin_robustness import scheme, series, signal, write_bids


def _patch2self(data: np.ndarray, bvals: np.ndarray, version: int) -> np.ndarray:
    import dipy.denoise.patch2self as p2s
    from tqdm import tqdm

    p2s.tqdm = partial(tqdm, disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return p2s.patch2self(data, bvals, model="ols", b0_threshold=50, shift_intensity=True,
                              clip_negative_vals=False, verbose=False, version=version)


def _interleaved_single_b0() -> tuple[np.ndarray, np.ndarray]:
    bvals, bvecs = scheme(n_b0=0, n_dirs=14)
    return np.insert(bvals, 5, 0.0), np.insert(bvecs, 5, [0.0, 0.0, 0.0], axis=0)


@pytest.mark.parametrize(
    ("label", "make", "dipy_v3_verdict"),
    [
        ("2 b0 + 12 dirs (14 volumes, the issue's series)", lambda: scheme(2, 12), "could not broadcast"),
        ("1 b0 + 12 dirs (13 volumes)", lambda: scheme(1, 12), "identical to volume"),
        ("lone b0 at volume 5 of 15", _interleaved_single_b0, "returned input volume 0 in place of volume 5"),
        ("1 b0 + 14 dirs (15 volumes: v3's buffer fits)", lambda: scheme(1, 14), None),
    ],
)
def test_dipy_patch2self_failures_are_caught(label, make, dipy_v3_verdict) -> None:
    """Runs dipy's real patch2self (1.12.1). If a case fails because dipy came back clean, dipy has fixed
    #3968: the guard is then simply never triggered and this expectation should be updated."""
    bvals, bvecs = make()
    data = signal(bvals, bvecs, shape=(12, 12, 6))
    if dipy_v3_verdict is None:
        preproc.check_denoised("patch2self", data, _patch2self(data, bvals, version=3))
    else:
        with pytest.raises(ValueError, match=dipy_v3_verdict):
            preproc.check_denoised("patch2self", data, _patch2self(data, bvals, version=3))
    with pytest.raises(ValueError, match="moved the mean of volume"):
        preproc.check_denoised("patch2self", data, _patch2self(data, bvals, version=1))


def test_check_denoised_refuses_impossible_outputs() -> None:
    data = np.random.default_rng(0).uniform(1, 2, (4, 4, 3, 5)).astype(np.float32)
    preproc.check_denoised("x", data, data * 0.9)
    with pytest.raises(ValueError, match="shape"):
        preproc.check_denoised("x", data, data[..., :4])
    bad = data.copy()
    bad[1, 1, 1, 2] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        preproc.check_denoised("x", data, bad)
    same = data.copy()
    same[..., 0] = data[..., 1]  # identical INPUT volumes may legitimately come back identical
    preproc.check_denoised("x", same, same)
    with pytest.raises(ValueError, match="moved the mean of volume 3"):
        preproc.check_denoised("x", data, data - np.array([0, 0, 0, 0.5, 0], dtype=np.float32))
    empty = data.copy()
    empty[..., 4] = 0.0  # a volume without signal may come back with some
    preproc.check_denoised("x", empty, empty + 0.01)


@pytest.mark.parametrize(
    ("shape", "radius"),
    [
        ((16, 16, 8, 14), [1, 1, 1]),
        ((16, 16, 8, 65), [2, 2, 2]),
        ((16, 16, 8, 130), [3, 3, 3]),
        ((7, 9, 5, 130), [3, 3, 2]),
        ((16, 16, 1, 30), [3, 3, 0]),
        ((3, 3, 3, 64), None),
    ],
)
def test_mppca_patch_radius_fits_volumes_and_grid(shape, radius) -> None:
    got = preproc.mppca_patch_radius(shape)
    assert (got is None and radius is None) or list(got) == radius


def _session(tmp_path: Path, n_b0: int = 2, n_dirs: int = 12) -> list[str]:
    bvals, bvecs = scheme(n_b0, n_dirs)
    write_bids(tmp_path, [series(signal(bvals, bvecs), bvals, bvecs)])
    return ["--bids-dir", str(tmp_path / "bids"), "--output-dir", str(tmp_path / "qsiprep"),
            "--participant-label", "01", "--session-label", "01", "--work-dir", str(tmp_path / "work")]


def _sidecar(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "qsiprep/sub-01/ses-01/dwi/sub-01_ses-01_space-ACPC_desc-preproc_dwi.json")
                      .read_text())


def _raise(message: str, *args, **kwargs):
    raise ValueError(message)


def test_patch2self_failure_falls_back_to_mppca_and_is_recorded(tmp_path, monkeypatch, capsys) -> None:
    import dipy.denoise.patch2self as p2s

    monkeypatch.setattr(p2s, "patch2self", partial(
        _raise, "could not broadcast input array from shape (16,16,8,2) into shape (16,16,8,4)"))
    assert run_cli(preproc.main, _session(tmp_path)) == 0
    out = capsys.readouterr().out
    side = _sidecar(tmp_path)
    assert side["DenoiseMethod"] == "mppca"
    assert [(a["method"], a["outcome"]) for a in side["DenoiseAttempts"]] == [("patch2self", "failed"),
                                                                              ("mppca", "used")]
    assert "could not broadcast" in side["DenoiseAttempts"][0]["reason"]
    assert "denoise=mppca (patch2self failed: ValueError: could not broadcast" in out  # -> the run's log tail
    assert "patch2self failed" in (tmp_path / "qsiprep/sub-01.html").read_text()


def test_every_denoiser_failing_leaves_the_data_undenoised_with_reasons(tmp_path, monkeypatch, capsys) -> None:
    import dipy.denoise.localpca as lpca
    import dipy.denoise.nlmeans as nlm
    import dipy.denoise.patch2self as p2s

    for module, name in ((p2s, "patch2self"), (lpca, "mppca"), (nlm, "nlmeans")):
        monkeypatch.setattr(module, name, partial(_raise, f"{name} broke"))
    args = _session(tmp_path)
    assert run_cli(preproc.main, args) == 0
    side = _sidecar(tmp_path)
    assert side["DenoiseMethod"] == "none"
    assert [(a["method"], a["outcome"]) for a in side["DenoiseAttempts"]] == [
        ("patch2self", "failed"), ("mppca", "failed"), ("nlmeans", "failed"), ("none", "used")]
    assert side["DenoiseReason"].startswith("auto: every denoiser above failed")
    raw = np.asarray(nib.load(tmp_path / "bids/sub-01/ses-01/dwi/sub-01_ses-01_dwi.nii.gz").dataobj)
    out = np.asarray(nib.load(tmp_path / "qsiprep/sub-01/ses-01/dwi/sub-01_ses-01_space-ACPC_desc-preproc_dwi.nii.gz")
                     .dataobj)
    np.testing.assert_array_equal(out, raw)


def test_memory_errors_are_not_swallowed(tmp_path, monkeypatch) -> None:
    """Out of memory is a resource failure the runtime retries (traceback -> resource class), not a fallback."""
    import dipy.denoise.patch2self as p2s

    def oom(*args, **kwargs):
        raise MemoryError("Unable to allocate 12.0 GiB")

    monkeypatch.setattr(p2s, "patch2self", oom)
    with pytest.raises(MemoryError):
        run_cli(preproc.main, _session(tmp_path))


def test_explicit_patch2self_that_cannot_run_falls_back_to_none(tmp_path, capsys) -> None:
    """Before: a configuration error for the whole subject. Now: this session is not denoised, with the reason."""
    args = _session(tmp_path, n_b0=1, n_dirs=1)
    assert run_cli(preproc.main, [*args, "--denoise-method", "patch2self"]) == 0
    side = _sidecar(tmp_path)
    assert [(a["method"], a["outcome"]) for a in side["DenoiseAttempts"]] == [("patch2self", "not applicable"),
                                                                              ("none", "used")]
    assert "needs at least 2 diffusion-weighted volumes, the series has 1" in side["DenoiseAttempts"][0]["reason"]


def test_denoise_candidates(monkeypatch) -> None:
    monkeypatch.setattr(preproc.shutil, "which", lambda name: None)
    many, few = np.r_[0, np.full(30, 1000.0)], np.array([5.0, 5.0, 1500.0])
    assert [m for m, _ in preproc.denoise_candidates("auto", many)] == ["patch2self", "mppca", "nlmeans", "none"]
    assert [m for m, _ in preproc.denoise_candidates("auto", few)] == ["nlmeans", "none"]
    assert [m for m, _ in preproc.denoise_candidates("mppca", many)] == ["mppca", "none"]
    assert [m for m, _ in preproc.denoise_candidates("none", many)] == ["none"]
    with pytest.raises(preproc.ConfigurationError, match="unknown denoise method"):
        preproc.denoise_candidates("magic", many)
    monkeypatch.setattr(preproc.shutil, "which", lambda name: "/usr/bin/dwidenoise")
    assert [m for m, _ in preproc.denoise_candidates("auto", many)][:2] == ["dwidenoise", "patch2self"]
    assert "would take" in preproc.denoise_problem("mppca", many, (150, 152, 81, 65), 380_000)
