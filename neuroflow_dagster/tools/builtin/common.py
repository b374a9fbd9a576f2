"""Shared plumbing of the embedded stand-ins: exit conventions, provenance, atomic writes.

The stand-ins run as subprocesses (``python -m neuroflow_dagster.tools.builtin.<name>``)
so that the runtime records them exactly like a real tool run: argv, exit code, log.
The runtime classifies failures from the exit code and stderr, hence the fixed
conventions here:

- exit 2 + one stderr line ``validation error: ...``  (bad or missing input data; not retried)
- exit 3 + one stderr line ``configuration error: ...`` (bad settings/files from config; not retried)
- any other exception: traceback, exit 1 (unexpected; the runtime's text rules decide)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from neuroflow_dagster.tools.shells import B0_THRESHOLD  # b <= 50 is b=0 (Siemens "b0" volumes are often b=5)

EXIT_VALIDATION = 2
EXIT_CONFIGURATION = 3


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; published outputs get the usual umask-based mode."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


class StandInError(Exception):
    """Base for the errors a stand-in reports as one clean stderr line."""

    prefix = "error"
    exit_code = 1

    def line(self) -> str:
        text = " ".join(str(self).split())  # one line, whatever the message contained
        return f"{self.prefix}: {text}"


class ValidationError(StandInError):
    """The input data cannot be processed (missing file, too few directions, ...)."""

    prefix = "validation error"
    exit_code = EXIT_VALIDATION


class ConfigurationError(StandInError):
    """A setting or a configured file is wrong (atlas file missing, unknown option value)."""

    prefix = "configuration error"
    exit_code = EXIT_CONFIGURATION


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; make that a configuration error (the argv came from config)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigurationError(f"{self.prog}: {message}")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a stand-in's main; turn StandInError into its single stderr line and exit code."""
    try:
        return main(argv)
    except StandInError as exc:
        print(exc.line(), file=sys.stderr, flush=True)
        return exc.exit_code


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-0075`` -> ``0075``; labels may be given with or without their BIDS prefix."""
    return label[len(prefix) :] if label.startswith(prefix) else label


def check_label(value: str, what: str) -> str:
    """BIDS labels are alphanumeric; anything else would break file names and entity parsing."""
    if not value or not value.isalnum():
        raise ConfigurationError(f"{what} {value!r} is not a BIDS label (letters and digits only)")
    return value


def require_file(path: Path, what: str = "required file") -> Path:
    if not path.is_file():
        raise ValidationError(f"missing {what} {path}")
    return path


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("neuroflow-dagster")
    except Exception:
        return "0+unknown"


def generated_by(stands_in_for: str, description: str) -> dict[str, Any]:
    """The GeneratedBy entry of every stand-in output: never presented as the real tool."""
    return {
        "Name": f"neuroflow-dagster builtin stand-in for {stands_in_for}",
        "Version": package_version(),
        "Description": description,
        "StandIn": True,
        "StandsInFor": stands_in_for,
    }


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write JSON via a temp file + os.replace so concurrent runs never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
        _publish_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        _publish_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_dataset_description(
    out_dir: Path, name: str, stands_in_for: str, description: str, extra: dict[str, Any] | None = None
) -> Path:
    """A BIDS derivative dataset_description.json whose GeneratedBy names the stand-in."""
    data: dict[str, Any] = {
        "Name": name,
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by(stands_in_for, description)],
        "GeneratedAt": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        data.update(extra)
    return write_json_atomic(out_dir / "dataset_description.json", data)


class AtomicDir:
    """Build a directory beside its final place, then swap it in.

    Usage: ``with AtomicDir(final) as tmp: write into tmp``. On success the old
    ``final`` (stale outputs of an earlier run) is moved aside and deleted, and
    ``tmp`` is renamed to ``final``; on error ``tmp`` is deleted and ``final`` is
    untouched. Readers see either the old complete set or the new one; the only
    window is between the two renames (same directory, so both are cheap). Temp folders
    left by a killed run are removed by the next run of the same folder.
    """

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of a run that was killed mid-write (one writer per session is the platform's rule).
        for pattern in (f".{self.final.name}.tmp-*", f".{self.final.name}.old-*"):
            for leftover in self.final.parent.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _publish_mode(self.tmp, is_dir=True)
        old: Path | None = None
        if self.final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.final.parent))
            os.rename(self.final, old / self.final.name)
        os.rename(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def bids_prefix(participant: str, session: str) -> str:
    return f"sub-{participant}_ses-{session}"


def load_gradients(bval_path: Path, bvec_path: Path, n_volumes: int) -> tuple[Any, Any]:
    """Read FSL-style bval/bvec and check they match the image; errors name the file."""
    from neuroflow_dagster.tools.shells import GradientError, load_table

    try:
        bvals, bvecs = load_table(bval_path, bvec_path)
    except GradientError as exc:
        raise ValidationError(str(exc)) from exc
    if bvals.ndim != 1:
        raise ValidationError(f"{bval_path} must hold one row of b-values, it has shape {bvals.shape}")
    if bvals.size != n_volumes:
        raise ValidationError(f"{bval_path} has {bvals.size} b-values but the image has {n_volumes} volumes")
    if bvecs.shape != (3, n_volumes):
        raise ValidationError(f"{bvec_path} has shape {bvecs.shape}, expected (3, {n_volumes})")
    return bvals, bvecs.T


def _volume_list(indices: Any, limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def check_gradients(
    bvals: Any, bvecs: Any, source: str, b0_threshold: float = B0_THRESHOLD
) -> tuple[Any, Any, list[str]]:
    """Refuse gradient tables no diffusion model can use; normalise non-unit directions.

    Refused (ValidationError naming ``source`` and the volumes, counted from 0): non-finite
    or negative b-values, non-finite b-vectors of diffusion-weighted volumes (on b=0
    volumes they are set to 0, as dipy does), and a diffusion-weighted volume
    (b > b0_threshold) whose direction is zero (a trace/isotropic image left in the
    series, or a broken table: which direction it encodes cannot be known).
    Directions of b > b0_threshold volumes that are not unit length are scaled to unit
    length (the b-value is kept) and reported in the returned notes. b=0 volumes keep
    their vectors (often zero, sometimes a nominal direction for b = 5).
    """
    import numpy as np

    bvals = np.asarray(bvals, dtype=float)
    bvecs = np.array(bvecs, dtype=float)
    notes: list[str] = []
    bad = np.flatnonzero(~np.isfinite(bvals))
    if bad.size:
        raise ValidationError(f"{source}: b-value(s) of volume(s) {_volume_list(bad)} are not numbers")
    bad = np.flatnonzero(bvals < 0)
    if bad.size:
        raise ValidationError(f"{source}: negative b-value(s) at volume(s) {_volume_list(bad)}")
    dw = bvals > b0_threshold
    bad = np.flatnonzero(~np.isfinite(bvecs).all(axis=1) & dw)
    if bad.size:
        raise ValidationError(f"{source}: b-vector(s) of volume(s) {_volume_list(bad)} are not numbers")
    bvecs[~np.isfinite(bvecs)] = 0.0  # b=0 volumes: dipy's own data files carry NaN there; no direction is meant
    norms = np.linalg.norm(bvecs, axis=1)
    bad = np.flatnonzero(dw & (norms < 1e-6))
    if bad.size:
        raise ValidationError(
            f"{source}: volume(s) {_volume_list(bad)} have b > {b0_threshold:g} but a zero gradient direction "
            "(an isotropic/trace image left in the series or a broken .bvec); remove them or fix the table"
        )
    off = np.flatnonzero(dw & (np.abs(norms - 1.0) > 1e-2))
    if off.size:
        notes.append(
            f"{source}: {off.size} b-vector(s) of diffusion-weighted volumes were not unit length "
            f"(norms {norms[off].min():.3g}-{norms[off].max():.3g}); scaled to unit length, "
            "b-values kept"
        )
    bvecs[dw] = bvecs[dw] / norms[dw, None]
    return bvals, bvecs, notes


def main_entry(main: Callable[[Sequence[str] | None], int]) -> None:
    """``if __name__ == "__main__": main_entry(main)``."""
    sys.exit(run_cli(main))
