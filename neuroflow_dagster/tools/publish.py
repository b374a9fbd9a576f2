"""A tool's outputs reach the derivatives only when its run succeeded, and all at once.

Every derivative stage (QSIPrep, QSIRecon, QSIParc; BIDS has its own publish in
``bids/dataset.py``) writes into a fresh staging folder of its own run,
``<derivative root>/.neuroflow-staging/<partition>.<time>.<run>/``: inside the
derivative tree, so that publishing is a rename on the same filesystem, and
hidden, so that BIDS tools and pybids ignore it. After the run succeeded and
its golden outputs are present, `publish_outputs` moves the staged tree in:

- each *unit* the run owns (``sub-X`` for QSIPrep, every ``sub-X/ses-Y`` for a
  session stage, at whatever depth the tool nests it) replaces the previous
  version as a whole: the old folder is renamed aside, the new one renamed
  in, the old one deleted. Readers see the old or the new version, never a
  mixture, and files the new version no longer has do not linger;
- every other file (``dataset_description.json``, reports, atlases shared by
  all sessions) is moved in with ``os.replace``, one atomic step per file;
  folders are merged, nothing outside the run's units is ever deleted.

A run that crashes, times out or is cancelled publishes nothing: its partial
outputs stay in its staging folder (named in the failure) and the previous
good outputs stay where they are. The next successful run of the same
partition deletes those leftovers; until then ``disk.keep_failed_runs`` bounds
them (retention.py). Plain Python (no Dagster import).
"""

from __future__ import annotations

import calendar
import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from neuroflow_dagster.fsutil import swap_dir

STAGING = ".neuroflow-staging"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
LOCK_TIMEOUT_S = 300.0


class PublishError(Exception):
    """Staged outputs could not be moved into place; the previous outputs are intact."""


@dataclass
class Published:
    target: Path
    units: list[str] = field(default_factory=list)
    files: int = 0
    removed_leftovers: list[str] = field(default_factory=list)


def _safe(partition: str) -> str:
    return _SAFE.sub("_", partition).strip("._") or "all"


_STAGING_NAME = re.compile(r"^(?P<partition>.+)\.(?P<time>\d{8}T\d{6})\.(?P<run>[0-9a-f]{8})$")
_LABELS = re.compile(r"^(?P<first>[A-Za-z0-9]+)(?:_(?P<second>[A-Za-z0-9]+))?$")


def parse_staging_name(name: str) -> tuple[str, float, str] | None:
    """(partition key, creation time, run id prefix) of a staging folder's name (`staging_dir`), or None.

    The partition comes back as Dagster spells it (``01_A`` -> ``01|A``): labels are letters and digits
    only, so the ``_`` that replaced the ``|`` is the only one.
    """
    match = _STAGING_NAME.match(name)
    if match is None:
        return None
    try:
        created = float(calendar.timegm(time.strptime(match["time"], "%Y%m%dT%H%M%S")))
    except ValueError:
        return None
    labels = _LABELS.match(match["partition"])
    partition = match["partition"]
    if labels is not None and labels["second"]:
        partition = f"{labels['first']}|{labels['second']}"
    return partition, created, match["run"]


def staging_dir(target: Path, partition: str, run_id: str) -> Path:
    """``<target>/.neuroflow-staging/<partition>.<UTC time>.<run8>``: a fresh, empty folder for one attempt."""
    base = Path(target) / STAGING
    for previous in base.glob(f"{_safe(partition)}.*.{run_id[:8]}"):
        shutil.rmtree(previous, ignore_errors=True)  # an earlier attempt of this same run (in-run retry)
    path = base / f"{_safe(partition)}.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.{run_id[:8]}"
    path.mkdir(parents=True)
    return path


def _leftovers(target: Path, partition: str, ours: Path) -> list[Path]:
    """Staging folders of earlier attempts at the same partition (started before ours, so finished:
    the work lock lets one tool of a partition run at a time). Later ones are left alone."""
    found = (Path(target) / STAGING).glob(f"{_safe(partition)}.*")
    return [p for p in found if p.is_dir() and p.name < ours.name]


def swap_into_place(candidate: Path, final: Path) -> None:
    """Replace the folder ``final`` by ``candidate`` (same filesystem): old aside, new in, old deleted.

    Any failure before the new version is in place puts the old one back.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = swap_dir(candidate, final, final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}"))
    except OSError as exc:
        raise PublishError(exc.strerror or str(exc)) from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _units_in(staged: Path, patterns: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        for path in sorted(staged.glob(pattern)):
            if path.is_dir() and not any(path == u or u in path.parents for u in found):
                found.append(path)
    return found


def publish_outputs(
    staged: Path, target: Path, units: Sequence[str], *, partition: str, lock_dir: Path | None = None
) -> Published:
    """Move a successful run's staged tree into ``target`` (see the module docstring).

    ``units`` are glob patterns relative to ``staged`` (``sub-X``, ``**/sub-X/ses-Y``). Serialised per
    target by a file lock, so two runs publishing into the same tree (two sessions of one subject)
    never interleave their renames.
    """
    staged, target = Path(staged), Path(target)
    if not staged.is_dir():
        raise PublishError(f"nothing to publish: {staged} does not exist")
    lock_root = Path(lock_dir) if lock_dir is not None else target / STAGING
    lock_root.mkdir(parents=True, exist_ok=True)
    result = Published(target=target)
    with FileLock(str(lock_root / f"publish-{_SAFE.sub('_', target.name)}.lock"), timeout=LOCK_TIMEOUT_S):
        unit_dirs = _units_in(staged, units)
        for unit in unit_dirs:
            rel = unit.relative_to(staged)
            swap_into_place(unit, target / rel)
            result.units.append(str(rel))
        for path in sorted(staged.rglob("*")):
            if path.is_file() or path.is_symlink():
                rel = path.relative_to(staged)
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
                result.files += 1
        result.files += sum(1 for u in result.units for p in (target / u).rglob("*") if p.is_file())
        shutil.rmtree(staged, ignore_errors=True)
        for leftover in _leftovers(target, partition, ours=staged):
            with contextlib.suppress(OSError):
                shutil.rmtree(leftover)
                result.removed_leftovers.append(leftover.name)
    return result
