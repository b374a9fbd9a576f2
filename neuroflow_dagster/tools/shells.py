"""A session's shell scheme, and what QSIRecon's model fits accept of its gradient table.

Read from QSIPrep's preprocessed gradient tables (``*_desc-preproc_dwi.bval``/``.bvec``), the files
QSIRecon reconstructs. Two questions, answered before a reconstruction is run or submitted
(docs/domain-rules.md, "Pipelines"):

- the **scheme**: b-values at or below ``B0_THRESHOLD`` are b=0 (the threshold of the gradient tables
  QSIRecon's dipy nodes build); the others form shells, a b-value joining the shell of its nearest
  lower neighbour when within ``SHELL_EPSILON`` (MRtrix3's ``BValueEpsilon``, 80 s/mm^2), so a scanner's
  995/1000/1005 are one shell. One shell is single-shell, more are multi-shell, and more shells than the
  square root of the diffusion-weighted volumes is not shelled at all (Cartesian/DSI: the test QSIRecon
  copies from MRtrix3);
- the **models**: each fit of the chosen recon spec is checked against each series the way QSIRecon
  builds it. dipy's own models (DKI, MAPMRI) are constructed with dipy exactly as QSIRecon's nodes do
  (``gradient_table(bvals, bvecs, b0_threshold=50)``), so what dipy refuses is refused here with dipy's
  own message; a tensor fit (DSI Studio's or TORTOISE's scalar export) needs 6 non-collinear directions
  and a b=0 volume, which dipy's tensor fit does not check but cannot do without.

Plain Python (numpy; dipy imported only when a model is checked).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuroflow_dagster.naming import qsirecon as names

B0_THRESHOLD = 50.0
SHELL_EPSILON = 80.0
MIN_TENSOR_DIRECTIONS = 6
PREPROC_BVAL = "*_desc-preproc_dwi.bval"


class GradientError(ValueError):
    """A gradient table that cannot be read (missing, unparsable, .bval and .bvec disagree)."""


@dataclass(frozen=True)
class Shells:
    """The b=0 volumes and the shells of one gradient table."""

    n_b0: int
    shells: tuple[tuple[float, int], ...]  # (median b-value, volumes) of each shell, ascending

    @property
    def n_dw(self) -> int:
        return sum(n for _, n in self.shells)

    @property
    def scheme(self) -> str:
        if len(self.shells) > 1 and len(self.shells) > math.sqrt(self.n_dw):
            return names.CARTESIAN
        return names.MULTI_SHELL if len(self.shells) > 1 else names.SINGLE_SHELL

    def describe(self) -> str:
        """``b=0 x2, b=1000 x30: single-shell``."""
        parts = [f"b=0 x{self.n_b0}"] if self.n_b0 else ["no b=0"]
        if not self.shells:
            parts.append(f"no diffusion-weighted volume (b > {B0_THRESHOLD:g})")
        elif len(self.shells) > 8:
            parts.append(f"{len(self.shells)} b-value clusters from b={self.shells[0][0]:g} to {self.shells[-1][0]:g}")
        else:
            parts += [f"b={b:g} x{n}" for b, n in self.shells]
        return f"{', '.join(parts)}: {names.SCHEME_TEXT[self.scheme]}"


def count_shells(bvals: Sequence[float] | np.ndarray, *, b0_threshold: float = B0_THRESHOLD,
                 epsilon: float = SHELL_EPSILON) -> Shells:
    """Cluster b-values into b=0 and shells (see the module docstring)."""
    b = np.sort(np.asarray(bvals, dtype=float).ravel())
    n_b0 = int(np.sum(b <= b0_threshold))
    dw = b[b > b0_threshold]
    shells: list[tuple[float, int]] = []
    if dw.size:
        breaks = np.flatnonzero(np.diff(dw) > epsilon) + 1
        shells = [(float(np.round(np.median(c))), int(c.size)) for c in np.split(dw, breaks)]
    return Shells(n_b0, tuple(shells))


@dataclass(frozen=True)
class Series:
    """One preprocessed DWI series of a session: its gradient files and their shells."""

    bval: Path
    bvec: Path
    bvals: np.ndarray = field(repr=False, compare=False)
    bvecs: np.ndarray = field(repr=False, compare=False)  # (N, 3)
    shells: Shells

    @property
    def dwi_name(self) -> str:
        """The image the table belongs to (``..._desc-preproc_dwi.nii.gz``), for messages."""
        return self.bval.name[: -len(".bval")] + ".nii.gz"


def load_table(bval: Path, bvec: Path) -> tuple[np.ndarray, np.ndarray]:
    """FSL-style b-values (1-D) and b-vectors (3 x N; an N x 3 file is turned), unchecked against each other;
    GradientError names a file that cannot be read."""
    try:
        bvals = np.atleast_1d(np.loadtxt(bval, dtype=float))
    except ValueError as exc:
        raise GradientError(f"cannot read b-values from {bval}: {exc}") from exc
    try:
        bvecs = np.loadtxt(bvec, dtype=float, ndmin=2)
    except ValueError as exc:
        raise GradientError(f"cannot read b-vectors from {bvec}: {exc}") from exc
    if bvecs.shape[0] != 3 and bvecs.shape[-1] == 3:
        bvecs = bvecs.T
    return bvals, bvecs


def read_series(bval: Path) -> Series:
    """The gradient table beside a preprocessed DWI; GradientError names the file that is wrong."""
    bvec = bval.with_suffix(".bvec")
    for path in (bval, bvec):
        if not path.is_file():
            raise GradientError(f"missing required file {path}")
    bvals, bvecs = load_table(bval, bvec)
    if bvals.ndim != 1 or bvecs.shape != (3, bvals.size):
        raise GradientError(f"{bvec} has shape {bvecs.shape}, expected (3, {bvals.size}) for the {bvals.size} "
                            f"b-values of {bval.name}")
    return Series(bval, bvec, bvals, bvecs.T, count_shells(bvals))


def session_series(dwi_dir: Path) -> list[Series]:
    """Every preprocessed DWI series of a session (QSIPrep may keep runs apart), in name order."""
    return [read_series(p) for p in sorted(Path(dwi_dir).glob(PREPROC_BVAL))]


def session_scheme(series: Sequence[Series]) -> str:
    """The scheme QSIRecon's one spec for the session must suit: QSIRecon reconstructs every series of
    the session with the same spec, so mixed schemes take the spec every series can take (single-shell
    if any is, else multi-shell)."""
    schemes = {s.shells.scheme for s in series}
    if len(schemes) == 1:
        return schemes.pop()
    return names.SINGLE_SHELL if names.SINGLE_SHELL in schemes else names.MULTI_SHELL


def count_directions(bvals: Any, bvecs: Any, b0_threshold: float = B0_THRESHOLD, tol_deg: float = 1.0) -> int:
    """Distinct diffusion directions among b>0 volumes (±g counts once; within tol_deg is the same)."""
    dw = np.asarray(bvals) > b0_threshold
    vecs = np.asarray(bvecs, dtype=float)[dw]
    vecs = vecs[np.all(np.isfinite(vecs), axis=1)]
    norms = np.linalg.norm(vecs, axis=1)
    vecs = vecs[norms > 1e-6] / norms[norms > 1e-6, None]
    distinct: list[Any] = []
    cos_tol = np.cos(np.deg2rad(tol_deg))
    for v in vecs:
        if not any(abs(float(v @ d)) >= cos_tol for d in distinct):
            distinct.append(v)
    return len(distinct)


def tensor_refusal(bvals: Any, bvecs: Any, where: str, source: str) -> str | None:
    """Why a tensor cannot be fitted (fewer than 6 directions, or no b=0 to separate S0), or None."""
    n_dirs = count_directions(bvals, bvecs)
    if n_dirs < MIN_TENSOR_DIRECTIONS:
        return (f"{where} has {n_dirs} diffusion direction(s); the tensor model needs at least "
                f"{MIN_TENSOR_DIRECTIONS} ({source})")
    if not np.any(np.asarray(bvals) <= B0_THRESHOLD):
        return f"{where} has no b=0 volume (b <= {B0_THRESHOLD:g}); the tensor model needs one ({source})"
    return None


def qsirecon_gtab(series: Series) -> Any:
    """The gradient table QSIRecon's dipy nodes build from these files (``DipyReconInterface._get_gtab``)."""
    from dipy.core.gradients import gradient_table

    return gradient_table(bvals=np.loadtxt(series.bval), bvecs=np.loadtxt(series.bvec).T, b0_threshold=B0_THRESHOLD)


def _dipy_model(model: str, gtab: Any, params: Mapping[str, Any]) -> Any:
    """Construct dipy's model the way QSIRecon 1.1.1's node does (interfaces/dipy.py): its constructor checks
    the gradient table."""
    if model == names.DKI:
        from dipy.reconst import dki

        return dki.DiffusionKurtosisModel(gtab)
    if model == names.MAPMRI:
        from dipy.reconst import mapmri

        regularized = bool(params.get("laplacian_regularization", True))
        kwargs: dict[str, Any] = {
            "radial_order": int(params.get("radial_order", 6)),
            "laplacian_regularization": regularized,
            "positivity_constraint": bool(params.get("positivity_constraint", False)),
            # QSIRecon 1.1.1 passes its b0_threshold (50) as MAPMRI's bval_threshold, whatever the spec says.
            "bval_threshold": B0_THRESHOLD,
            "anisotropic_scaling": bool(params.get("anisotropic_scaling", True)),
        }
        if regularized:
            kwargs["laplacian_weighting"] = params.get("laplacian_weighting", 0.2)
        return mapmri.MapmriModel(gtab, **kwargs)
    raise ValueError(f"no dipy model {model!r}")


DIPY_CLASS = {names.DKI: "DiffusionKurtosisModel", names.MAPMRI: "MapmriModel"}


def model_refusals(spec: str, models: Sequence[tuple[str, Mapping[str, Any]]], series: Sequence[Series],
                   where: str) -> list[str]:
    """What each fit of ``spec`` refuses of each series, with the refusing library's own message."""
    found: list[str] = []
    for s in series:
        for model, params in models:
            if model == names.TENSOR:
                problem = tensor_refusal(s.bvals, s.bvecs, where, s.dwi_name)
                if problem is not None and problem not in found:
                    found.append(problem)
                continue
            try:
                _dipy_model(model, qsirecon_gtab(s), params)
            except ValueError as exc:
                found.append(f"{where}: {spec} cannot reconstruct {s.dwi_name} ({s.shells.describe()}): dipy's "
                             f"{DIPY_CLASS.get(model, model)} refuses its gradient table: {exc}")
    return found
