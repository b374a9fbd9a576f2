"""File-system helpers shared by every layer (plain Python, no Dagster import)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file in the same folder + fsync + ``os.replace``: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def swap_dir(candidate: Path, final: Path, aside: Path) -> Path | None:
    """Put the folder ``candidate`` at ``final``; a previous ``final`` is moved to ``aside`` first and
    returned (None if there was none), for the caller to delete once it is sure. Two renames on one
    file system, so readers see the old version or the new one, never a mix. If the second rename
    fails, the old version is put back. Raises OSError with a message naming the step that failed.
    """
    old: Path | None = None
    if final.exists():
        try:
            os.rename(final, aside)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot move the previous {final} aside: {exc.strerror}") from exc
        old = aside
    try:
        os.rename(candidate, final)
    except BaseException as exc:
        if old is not None:
            os.rename(old, final)
        raise OSError(getattr(exc, "errno", None), f"moving {candidate} to {final} failed: {exc}") from exc
    return old
