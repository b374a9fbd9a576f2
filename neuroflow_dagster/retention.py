"""What runs leave on disk and how long it stays (docs/operations.md, "What a run leaves behind").

- A successful run's work folder (the NiPreps ``-w``: ``work_dir/qsiprep/sub-X``,
  ``work_dir/qsirecon/sub-X_ses-Y``) is deleted once its outputs are published (`reclaim`): QSIPrep
  names its nipype workflow after the session list, so a later wave never reuses it, and one subject's
  work folder is tens of GB.
- A failed run leaves its staging folder (``<derivative root>/.neuroflow-staging/<partition>.<time>.<run8>``,
  its partial outputs), its work folder, and, when its worker died, the conversion's staging folder
  (``work_dir/bids_staging/sub-X_ses-Y_<run8>``). They are kept for debugging (a retry also resumes from
  the work folder's cache) and pruned by ``disk.keep_failed_runs``: the newest ``count`` per kind, stage
  and partition, none older than ``days`` (`plan`, `prune`; the disk_guard sensor calls them).

Never pruned: anything of a queued or running run (the caller names them: `Active`), the staging
folder a Slurm job still writes into (its job record), a folder whose work lock is held (a tool of that
stage and partition is alive), and anything published: only the three kinds of folders above, found by
their names, are candidates. Finding them lists a few folders and stats their entries; a folder's
size is measured once (a failed run's folders no longer change) and remembered in
``state_dir/retention.json``, which `neuroflow status` reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from neuroflow_dagster import stages
from neuroflow_dagster.config import KeepFailedRunsConfig, NeuroflowConfig
from neuroflow_dagster.diskspace import gb
from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.naming.bids import LABEL
from neuroflow_dagster.naming.locks import work_lock
from neuroflow_dagster.naming.partitions import session_key
from neuroflow_dagster.tools import layout
from neuroflow_dagster.tools.publish import STAGING, parse_staging_name

Kind = Literal["staging", "work", "conversion"]
REPORT = "retention.json"
REPORT_VERSION = 1
CONVERSION_STAGING = "bids_staging"  # under work_dir (defs/assets/bids.py)
CONVERSION_STAGE = "bids_conversion"
MEASURE_BUDGET_S = 5.0  # sizes measured per pass at most this long; the rest on the next pass
PRUNED_KEPT = 50  # the latest prunings the report remembers
_L = LABEL.pattern
_WORK = re.compile(rf"^sub-({_L})(?:_ses-({_L}))?$")
_CONVERSION = re.compile(rf"^sub-({_L})_ses-({_L})[_.](?:.*?)([0-9a-f]{{8}})?$")


@dataclass(frozen=True)
class Leftover:
    """One folder a run left behind, as found on disk."""

    kind: Kind
    stage: str
    partition: str
    path: Path
    created: float  # epoch s: the time in a staging folder's name, else the folder's mtime (a run's start)
    run: str = ""  # first 8 characters of the run id that made it ("" for work folders)

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.kind, self.stage, self.partition)


@dataclass(frozen=True)
class Freed:
    path: Path
    bytes: int
    files: int
    seconds: float


# ------------------------------------------------------------------------------------------ sizes


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes allocated on disk, files) of a tree, as ``du`` counts: links not followed, an inode once."""
    total = files = 0
    seen: set[tuple[int, int]] = set()
    stack = [Path(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(Path(entry.path))
            elif st.st_nlink > 1 and (st.st_dev, st.st_ino) in seen:
                continue
            else:
                if st.st_nlink > 1:
                    seen.add((st.st_dev, st.st_ino))
                files += 1
            total += st.st_blocks * 512
    return total, files


def remove_tree(path: Path) -> Freed:
    """Delete a tree and say what that freed (measured first: a deleted tree cannot be measured).

    Read-only folders (HeudiConv marks its outputs read-only) are made writable on the way.
    """
    started = time.monotonic()
    size, files = tree_size(path)

    def writable_and_retry(func: Callable[..., Any], target: str, _exc: Any) -> None:
        parent = os.path.dirname(target)
        with contextlib.suppress(OSError):
            os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        func(target)

    shutil.rmtree(path, onerror=writable_and_retry)
    return Freed(Path(path), size, files, time.monotonic() - started)


@contextlib.contextmanager
def holding_work_lock(lock: Path | None) -> Any:
    """The work's lock, taken without waiting: yields False when a process of that work still holds it."""
    if lock is None:
        yield True
        return
    Path(lock).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def reclaim(work: Path, lock: Path | None) -> Freed | None:
    """Delete a successful run's work folder (under its work lock); None when there is nothing to delete
    or another process of the same work holds the lock (then the folder is its own)."""
    work = Path(work)
    if not work.is_dir() or work.is_symlink():
        return None
    with holding_work_lock(lock) as free:
        return remove_tree(work) if free else None


# ------------------------------------------------------------------------------------------ finding


def _dir_mtime(entry: os.DirEntry[str]) -> float | None:
    """A folder's mtime (no link followed); None for anything else."""
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    return st.st_mtime if stat.S_ISDIR(st.st_mode) else None


def staging_roots(config: NeuroflowConfig) -> dict[Path, str]:
    """derivative root -> the stage that stages into it; any other tree under ``paths.derivatives`` with
    a staging folder counts too, named after its folder (a stage added later)."""
    known = {layout.qsiprep_dir(config): "qsiprep", layout.qsirecon_dir(config): "qsirecon",
             layout.qsiparc_dir(config): "qsiparc"}  # fmt: skip
    roots = {root: name for root, name in known.items() if name in stages.names()}
    with contextlib.suppress(OSError):
        for tree in Path(config.paths.derivatives).iterdir():
            if tree not in roots and (tree / STAGING).is_dir():
                roots[tree] = tree.name
    return roots


def find_leftovers(config: NeuroflowConfig) -> list[Leftover]:
    """Every folder of the three kinds (module docstring) now on disk: listings and one stat per entry."""
    found: list[Leftover] = []
    for root, stage in staging_roots(config).items():
        with contextlib.suppress(OSError):
            for entry in os.scandir(root / STAGING):
                parsed = parse_staging_name(entry.name)
                if parsed is None or not entry.is_dir(follow_symlinks=False):
                    continue
                partition, created, run = parsed
                found.append(Leftover("staging", stage, partition, Path(entry.path), created, run))
    work_root = Path(config.paths.work_dir)
    for record in stages.stages():
        with contextlib.suppress(OSError):
            for entry in os.scandir(work_root / record.name):
                match = _WORK.match(entry.name)
                if match is None or bool(match.group(2)) == record.per_subject:
                    continue
                created = _dir_mtime(entry)
                if created is None:
                    continue
                subject, session = match.groups()
                partition = subject if session is None else session_key(subject, session)
                found.append(Leftover("work", record.name, partition, Path(entry.path), created))
    with contextlib.suppress(OSError):
        for entry in os.scandir(work_root / CONVERSION_STAGING):
            match = _CONVERSION.match(entry.name)
            created = _dir_mtime(entry) if match else None
            if match is None or created is None:
                continue
            subject, session, run = match.groups()
            found.append(Leftover("conversion", CONVERSION_STAGE, session_key(subject, session), Path(entry.path),
                                  created, run or ""))  # fmt: skip
    return found


# ------------------------------------------------------------------------------------------ deciding


@dataclass(frozen=True)
class Active:
    """What belongs to queued or running runs: their ids, their (stage, partition)s, and the stages a
    run works on without naming a partition (all of that stage's folders are then theirs)."""

    run_ids: frozenset[str] = frozenset()
    partitions: frozenset[tuple[str, str]] = frozenset()
    whole_stages: frozenset[str] = frozenset()

    def owns(self, leftover: Leftover) -> bool:
        """A staging folder is its run's (a later run of the partition makes its own); a work folder is
        every run's of its partition."""
        if leftover.stage in self.whole_stages:
            return True
        if leftover.run:
            return any(r.startswith(leftover.run) for r in self.run_ids)
        return (leftover.stage, leftover.partition) in self.partitions


def plan(
    leftovers: Iterable[Leftover], keep: KeepFailedRunsConfig, active: Active, now: float
) -> tuple[list[Leftover], list[Leftover], list[Leftover]]:
    """(kept, to prune, belonging to live runs): per (kind, stage, partition) the newest ``keep.count``
    folders of runs that are over, none older than ``keep.days``."""
    groups: dict[tuple[str, str, str], list[Leftover]] = {}
    live: list[Leftover] = []
    for item in leftovers:
        (live if active.owns(item) else groups.setdefault(item.group, [])).append(item)
    kept: list[Leftover] = []
    prune: list[Leftover] = []
    oldest = now - keep.days * 86400 if keep.days is not None else None
    for items in groups.values():
        items.sort(key=lambda i: (i.created, i.path.name), reverse=True)
        for n, item in enumerate(items):
            too_many = keep.count is not None and n >= keep.count
            too_old = oldest is not None and item.created < oldest
            (prune if too_many or too_old else kept).append(item)
    return kept, prune, live


def _adopted_staging(config: NeuroflowConfig, candidates: Sequence[Leftover]) -> set[Path]:
    """Staging folders a Slurm job still writes into: a run that re-attaches to the job publishes from
    there (runtimes/jobs.py), whatever happened to the run that submitted it."""
    from neuroflow_dagster.runtimes.jobs import JobRecordError, JobStore  # only when something is to go

    jobs = JobStore(config.paths.state / "jobs")
    out: set[Path] = set()
    for item in candidates:
        if item.kind == "work":
            continue
        try:
            record = jobs.load(item.stage, item.partition)
        except (JobRecordError, ValueError):
            out.add(item.path)  # cannot tell: keep it
            continue
        if record is not None and record.status != "finished" and record.output_dir:
            out.add(Path(record.output_dir))
    return out


@dataclass
class Pass:
    """One pruning pass: what it deleted, what it kept, what it left to live runs, how long it took."""

    kept: list[dict[str, Any]] = field(default_factory=list)
    pruned: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # candidates left alone, with why
    live: int = 0
    seconds: float = 0.0


def _entry(item: Leftover, size: int | None) -> dict[str, Any]:
    return {"kind": item.kind, "stage": item.stage, "partition": item.partition, "path": str(item.path),
            "created": item.created, "run": item.run, "bytes": size}  # fmt: skip


def prune_pass(
    config: NeuroflowConfig,
    live_runs: Callable[[], Active],
    *,
    now: float | None = None,
    log: Callable[[str], None] | None = None,
) -> Pass:
    """Find, decide, delete (each under its work lock) and record in ``state_dir/retention.json``.

    The folders are listed first, then ``live_runs()`` is asked: a run that was created before the read
    is protected by its id and (stage, partition), whenever it made its folders; one created later
    starts its tool seconds afterwards, and each deletion holds that work's lock.
    """
    started = time.monotonic()
    now = time.time() if now is None else now
    leftovers = find_leftovers(config)
    active = live_runs() if leftovers else Active()
    kept, prune, live = plan(leftovers, config.disk.keep_failed_runs, active, now)
    result = Pass(live=len(live))
    adopted = _adopted_staging(config, prune) if prune else set()
    previous = {(r["path"], r["created"]): r.get("bytes") for r in read_report(config).get("kept", [])}
    for item in prune:
        if item.path in adopted:
            result.skipped.append(f"{item.path}: a Slurm job still writes into it")
            kept.append(item)
            continue
        with holding_work_lock(work_lock(config.paths.state, item.stage, item.partition)) as free:
            if not free:
                result.skipped.append(f"{item.path}: a process of {item.stage} {item.partition} holds its work lock")
                kept.append(item)
                continue
            try:
                freed = remove_tree(item.path)
            except OSError as exc:
                result.skipped.append(f"{item.path}: cannot delete: {exc}")
                kept.append(item)
                continue
        row = _entry(item, freed.bytes)
        row.update({"pruned_at": now, "why": _why(item, config.disk.keep_failed_runs, now)})
        result.pruned.append(row)
        if log is not None:
            log(f"pruned {item.kind} folder {item.path} of {item.stage} {item.partition} "
                f"({gb(freed.bytes)} freed, {freed.files} files): {row['why']}")  # fmt: skip
    deadline = time.monotonic() + MEASURE_BUDGET_S
    for item in sorted(kept, key=lambda i: i.created):
        size = previous.get((str(item.path), item.created))
        if size is None and time.monotonic() < deadline:
            size = tree_size(item.path)[0]
        result.kept.append(_entry(item, size))
    result.seconds = time.monotonic() - started
    write_report(config, result, now)
    return result


def _why(item: Leftover, keep: KeepFailedRunsConfig, now: float) -> str:
    if keep.days is not None and item.created < now - keep.days * 86400:
        return f"older than {keep.days:g} days (disk.keep_failed_runs.days)"
    return f"more than {keep.count} for {item.stage} {item.partition} (disk.keep_failed_runs.count)"


# ------------------------------------------------------------------------------------------ the report


def report_path(config: NeuroflowConfig) -> Path:
    return config.paths.state / REPORT


def read_report(config: NeuroflowConfig) -> dict[str, Any]:
    try:
        data = json.loads(report_path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("v") == REPORT_VERSION else {}


def write_report(config: NeuroflowConfig, result: Pass, now: float) -> None:
    old = read_report(config)
    pruned = [*result.pruned, *old.get("pruned", [])][:PRUNED_KEPT]
    totals = old.get("pruned_total", {"folders": 0, "bytes": 0})
    totals = {
        "folders": int(totals.get("folders", 0)) + len(result.pruned),
        "bytes": int(totals.get("bytes", 0)) + sum(int(r.get("bytes") or 0) for r in result.pruned),
    }
    data = {
        "v": REPORT_VERSION,
        "checked": now,
        "seconds": round(result.seconds, 4),
        "kept": result.kept,
        "live": result.live,
        "skipped": result.skipped,
        "pruned": pruned,
        "pruned_total": totals,
    }
    atomic_write_text(report_path(config), json.dumps(data, separators=(",", ":")) + "\n")
