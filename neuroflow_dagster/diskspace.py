"""The disk-space guard's measurement and verdict: is there room to start new work?

A full disk half-way through QSIPrep wastes hours and can leave half-written
files behind; a run that never starts costs nothing. So the free space of
the folders the stages write (``paths.work_dir``, ``paths.derivatives``,
``paths.bids_root``) is compared with a floor (``disk.min_free_gb``, per
folder ``disk.per_path.<folder>``) before heavy work starts and on every
tick of the guard's sensor. Below a floor the Dagster layer holds new runs
(defs/diskguard.py); this module only measures and decides.

Hysteresis: once holding, the guard lets go only when every folder has its
floor plus a margin free (5 % of the floor: 1 GB above a 20 GB floor), so a disk
hovering at the floor does not start and stop runs (and send alerts) on
every tick. Sizes are in GB of 2^30 bytes, the unit ``df -h`` prints as "G".

Plain Python (no Dagster import): the CLI's ``status`` shows the same verdict.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroflow_dagster.config import NeuroflowConfig

GB = 1024**3
# The folders the stages write into, by their key under `paths` (and `disk.per_path`).
GUARDED = ("work_dir", "derivatives", "bids_root")
MARGIN_FRACTION = 0.05


def resume_margin_gb(floor_gb: float) -> float:
    """How far above its floor a folder must be before a holding guard lets go."""
    return MARGIN_FRACTION * floor_gb


def gb(n_bytes: float) -> str:
    """``1.2 GB`` (``350.0 MB`` below 1 GB, so a nearly full disk does not read as 0.0 GB)."""
    return f"{n_bytes / GB:.1f} GB" if n_bytes >= GB else f"{n_bytes / 1024**2:.1f} MB"


def _floor_text(floor_gb: float) -> str:
    return gb(floor_gb * GB)


@dataclass(frozen=True)
class FolderSpace:
    """One guarded folder: where it is, what its filesystem has free, and its floor."""

    key: str
    path: Path
    measured: Path  # the folder measured: ``path``, or its nearest existing parent if not created yet
    free_bytes: int
    total_bytes: int
    floor_gb: float

    @property
    def floor_bytes(self) -> int:
        return int(self.floor_gb * GB)

    @property
    def guarded(self) -> bool:
        return self.floor_gb > 0

    @property
    def low(self) -> bool:
        """Below its floor now."""
        return self.guarded and self.free_bytes < self.floor_bytes

    @property
    def short_of_resume(self) -> bool:
        """Below floor + margin: a holding guard keeps holding."""
        return self.guarded and self.free_bytes < (self.floor_gb + resume_margin_gb(self.floor_gb)) * GB

    def describe(self) -> str:
        """``/srv/work has 1.2 GB free < 20 GB (work_dir)``: the folder, the space, the floor."""
        sign = "<" if self.low else ">="
        return f"{self.path} has {gb(self.free_bytes)} free {sign} {_floor_text(self.floor_gb)} ({self.key})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "folder": self.key,
            "path": str(self.path),
            "free_gb": round(self.free_bytes / GB, 2),
            "total_gb": round(self.total_bytes / GB, 2),
            "floor_gb": self.floor_gb,
            "low": self.low,
        }


@dataclass(frozen=True)
class DiskReport:
    folders: list[FolderSpace]
    errors: list[str] = field(default_factory=list)  # folders that could not be measured, with the reason

    @property
    def low(self) -> list[FolderSpace]:
        return [f for f in self.folders if f.low]

    @property
    def guarded(self) -> bool:
        return any(f.guarded for f in self.folders)

    def should_hold(self, holding: bool) -> bool:
        """Hold new runs? Start holding below a floor; once holding, until floor + margin everywhere."""
        if holding:
            return any(f.short_of_resume for f in self.folders)
        return bool(self.low)

    def low_text(self) -> str:
        return "; ".join(f.describe() for f in self.low)

    def status_line(self, holding: bool) -> str:
        """The one line ``neuroflow status`` prints (``holding``: the stage pools are held now)."""
        if not self.guarded:
            return "disk guard: off (disk.min_free_gb is 0)"
        errors = f"; cannot measure: {'; '.join(self.errors)}" if self.errors else ""
        if self.low and holding:
            return f"disk guard: holding new runs: {self.low_text()}{errors}"
        if self.low:
            return (
                "disk guard: below the floor, new runs are refused and held at the next guard tick: "
                f"{self.low_text()}{errors}"
            )
        if holding:
            waiting = [f for f in self.folders if f.short_of_resume]
            if waiting:
                parts = [
                    f"{f.path} has {gb(f.free_bytes)} free, resumes at "
                    f"{_floor_text(f.floor_gb + resume_margin_gb(f.floor_gb))} ({f.key})"
                    for f in waiting
                ]
                return f"disk guard: holding new runs until space returns: {'; '.join(parts)}{errors}"
            return f"disk guard: space is back, new runs resume at the next guard tick{errors}"
        parts = [
            f"{f.key} {gb(f.free_bytes)} free (floor {_floor_text(f.floor_gb)})" for f in self.folders if f.guarded
        ]
        return f"disk guard: ok: {', '.join(parts)}{errors}"

    def as_dict(self, holding: bool | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "low": bool(self.low),
            "folders": [f.as_dict() for f in self.folders],
            "errors": list(self.errors),
        }
        if holding is not None:
            data["holding"] = holding
            data["message"] = self.status_line(holding)
        return data


def floor_gb(config: NeuroflowConfig, key: str) -> float:
    """The floor of one guarded folder: its ``disk.per_path`` entry, else ``disk.min_free_gb``."""
    specific = getattr(config.disk.per_path, key)
    return float(config.disk.min_free_gb if specific is None else specific)


def guarded_folders(config: NeuroflowConfig) -> dict[str, Path]:
    return {key: Path(getattr(config.paths, key)) for key in GUARDED}


def _existing(path: Path) -> Path:
    """The folder itself, or its nearest existing parent (a folder not created yet lives there)."""
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def measure(config: NeuroflowConfig) -> DiskReport:
    """Free space of every guarded folder's filesystem (one statvfs each: cheap enough for every tick)."""
    folders: list[FolderSpace] = []
    errors: list[str] = []
    for key, path in guarded_folders(config).items():
        measured = _existing(path)
        try:
            usage = shutil.disk_usage(measured)
        except OSError as exc:
            errors.append(f"{path} ({key}): {exc.strerror or exc}")
            continue
        folders.append(FolderSpace(key, path, measured, int(usage.free), int(usage.total), floor_gb(config, key)))
    return DiskReport(folders, errors)


def is_disk_full(error: BaseException | str | None) -> bool:
    """True for ENOSPC / EDQUOT: an OSError anywhere in an exception's chain, or the text a tool printed."""
    markers = ("no space left on device", "disk quota exceeded", "enospc")
    seen: set[int] = set()
    current: BaseException | str | None = error
    while isinstance(current, BaseException) and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(marker in str(current).lower() for marker in markers):
            return True
        current = current.__cause__ or current.__context__
    return isinstance(current, str) and any(marker in current.lower() for marker in markers)


def held_pools(storage: Any, pools: Sequence[str]) -> list[str]:
    """The pools the guard holds now: limit 0, set explicitly (config cannot give 0: max_concurrent >= 1).

    ``storage`` is Dagster's event log storage (``instance.event_log_storage``; only its
    ``get_concurrency_info`` is used, so this module needs no Dagster import). A pool that was never
    set reports Dagster's default limit and does not count.
    """
    held = []
    for pool in pools:
        try:
            info = storage.get_concurrency_info(pool)
        except Exception:  # pragma: no cover - a storage without pools holds nothing
            continue
        if info.limit == 0 and not info.using_default_limit:
            held.append(pool)
    return held
