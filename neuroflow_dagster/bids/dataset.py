"""The BIDS dataset at ``paths.bids_root``: atomic session publication and shared top-level files.

Why this module exists: bids_root is read by QSIPrep (and people) while
conversions of other sessions run concurrently in separate processes. So:

* A session appears all at once. The staged ``sub-X/ses-Y`` (converted into
  a fresh staging dir under ``paths.work_dir``) is moved in with
  ``os.rename``. If work_dir is on another filesystem it is first copied to a
  hidden temp dir next to its destination (``sub-X/.ses-Y.incoming-*``), then
  renamed. A previous good version is renamed aside (``sub-X/.ses-Y.old-*``)
  and deleted only after the new one is in place and the tables are updated;
  any failure puts the old one back. Hidden (dot) entries are ignored by the
  BIDS validator, and a crash between the two renames is repaired by the
  next publish of that session (``recover_session``).
* Top-level files shared by all sessions (participants.tsv, the subject's
  sessions.tsv, their JSON sidecars, dataset_description.json, README,
  .bidsignore) are read-modified-written under one cross-process file lock
  that lives in work_dir (never in bids_root), each written to a temp file
  and ``os.replace``d, with rows unique by id and sorted.

Plain Python (no Dagster import).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from filelock import FileLock, Timeout

from neuroflow_dagster.fsutil import atomic_write_text, swap_dir
from neuroflow_dagster.naming.bids import (
    BIDS_VERSION,
    PROVENANCE_SUFFIX,
    entities,
    ses,
    session_dir,
    session_path,
    sub,
    subject_dir,
)

__all__ = [
    "PublishError",
    "PublishResult",
    "bids_root_lock",
    "ensure_bidsignore",
    "ensure_dataset",
    "new_staging_dir",
    "present_suffixes",
    "publish_session",
    "read_tsv",
    "recover_session",
    "session_acq_time",
    "session_dir",
    "sessions_table",
    "upsert_participant",
    "upsert_session",
    "write_tsv",
]

DEFAULT_NAME = "Neuroflow brain bank MRI"
NA = "n/a"
LOCK_TIMEOUT_S = 300.0
_SUFFIX = re.compile(r"_([A-Za-z0-9]+)\.(?:nii\.gz|nii)$")
_INCOMING = ".{session}.incoming-"
_OLD = ".{session}.old-"

PARTICIPANT_COLUMNS: dict[str, dict[str, str]] = {
    "participant_id": {"Description": "BIDS participant label (sub-<label>), from the brain bank's SubjectCode"},
    "recruitment_id": {"Description": "SubjectCode as recorded in the brain bank's ScanID mapping, unmodified"},
}
SESSION_COLUMNS: dict[str, dict[str, str]] = {
    "session_id": {"Description": "BIDS session label (ses-<label>)"},
    "acq_time": {"Description": "Acquisition start of the session (earliest acq_time of its scans)"},
    "scan_id": {"Description": "Brain-bank ScanID of the DICOM session folder (YYYYMMDD_hhmm)"},
}
SCANS_COLUMNS: dict[str, dict[str, str]] = {
    "filename": {"Description": "Path of the scan relative to the session folder"},
    "acq_time": {"Description": "Acquisition time of the scan"},
    "operator": {"Description": "Operator of the scanner (HeudiConv column; n/a when unknown)"},
    "randstr": {"Description": "Random string HeudiConv writes to make rows unique"},
}
README_TEXT = """\
# Neuroflow brain bank MRI

Raw MRI sessions of the brain bank, converted from DICOM to BIDS by
neuroflow-dagster with HeudiConv and dcm2niix (heuristic: see
GeneratedBy in dataset_description.json). Each session folder is published
atomically; participants.tsv maps BIDS participant labels to the bank's
SubjectCodes (recruitment_id), and sub-*/sub-*_sessions.tsv maps BIDS
session labels to the bank's ScanIDs (scan_id).

Do not edit files here by hand: re-run the conversion of the session instead.
"""
# Hidden publish leftovers, and the provenance file of each session (not a BIDS file: docs/provenance.md).
BIDSIGNORE_LINES = ("**/.ses-*.incoming-*", "**/.ses-*.old-*", f"**/*_{PROVENANCE_SUFFIX}.json")


class PublishError(RuntimeError):
    """Publishing a staged session failed; bids_root still holds the previous version (if any)."""


@dataclass(frozen=True)
class PublishResult:
    """What publish_session did; becomes materialization metadata."""

    session_dir: Path
    participant: str
    session: str
    replaced_previous: bool
    method: str  # "rename" (same filesystem) or "copy+rename"
    files: tuple[str, ...]  # published files, relative to bids_root, sorted
    n_bytes: int
    suffixes: frozenset[str]
    participants_row: dict[str, str] = field(default_factory=dict)
    sessions_row: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0
    recovered: tuple[str, ...] = ()  # repairs of an earlier interrupted publish (recover_session)

    @property
    def n_files(self) -> int:
        return len(self.files)


# --------------------------------------------------------------------------- locking and atomic files


def lock_path(bids_root: Path, lock_dir: Path) -> Path:
    """One lock per bids_root (keyed by its resolved path), kept in lock_dir (work_dir), not bids_root."""
    digest = hashlib.sha1(str(Path(bids_root).resolve()).encode()).hexdigest()[:12]
    return Path(lock_dir) / f"bids-root-{digest}.lock"


@contextlib.contextmanager
def bids_root_lock(bids_root: Path, lock_dir: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Cross-process lock for bids_root's shared files (filelock: flock on the lock file)."""
    path = lock_path(bids_root, lock_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=timeout_s):
        yield


def _clean(value: object) -> str:
    text = "" if value is None else str(value)
    text = " ".join(text.replace("\t", " ").splitlines()).strip()
    return text or NA


def read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of a BIDS TSV ([] and [] if it does not exist)."""
    if not path.exists():
        return [], []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = list(reader.fieldnames or [])
        rows = [{k: (v if v is not None else NA) for k, v in row.items() if k is not None} for row in reader]
    return columns, rows


def _format_tsv(columns: list[str], rows: list[dict[str, str]]) -> str:
    lines = ["\t".join(columns)]
    lines += ["\t".join(_clean(row.get(c)) for c in columns) for row in rows]
    return "\n".join(lines) + "\n"


def write_tsv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    """Write a BIDS TSV atomically (cells cleaned as every table here is: n/a for empty)."""
    atomic_write_text(path, _format_tsv(columns, rows))


def upsert_tsv_row(path: Path, key: str, row: Mapping[str, object], first_columns: list[str]) -> dict[str, str]:
    """Insert or update the row whose ``key`` column equals ``row[key]``; rows unique and sorted by key.

    Existing columns are kept (values of an existing row that ``row`` does
    not mention are kept too); new columns are appended. Call under the lock.
    """
    columns, rows = read_tsv(path)
    new = {k: _clean(v) for k, v in row.items()}
    for name in [*first_columns, *new]:
        if name not in columns:
            columns.append(name)
    merged: dict[str, dict[str, str]] = {}
    for existing in rows:
        merged[existing.get(key, NA)] = existing
    merged[new[key]] = {**merged.get(new[key], {}), **new}
    ordered = [merged[k] for k in sorted(merged)]
    atomic_write_text(path, _format_tsv(columns, ordered))
    return {c: _clean(merged[new[key]].get(c)) for c in columns}


def _ensure_json(path: Path, content: Mapping[str, object], *, merge_keys: bool = False) -> None:
    """Create a JSON file once; with merge_keys, add missing top-level keys to an existing one."""
    if path.exists():
        if not merge_keys:
            return
        current = json.loads(path.read_text(encoding="utf-8"))
        missing = {k: v for k, v in content.items() if k not in current}
        if not missing:
            return
        content = {**current, **missing}
    atomic_write_text(path, json.dumps(content, indent=2, sort_keys=False) + "\n")


def _column_descriptions(columns: list[str], known: Mapping[str, Mapping[str, str]]) -> dict[str, object]:
    return {c: dict(known.get(c, {"Description": f"{c} (added by neuroflow)"})) for c in columns}


# --------------------------------------------------------------------------- top-level files


def _generated_by() -> list[dict[str, str]]:
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return [
        {"Name": "neuroflow-dagster", "Version": version("neuroflow-dagster")},
        {"Name": "heudiconv", "Version": version("heudiconv")},
        {"Name": "dcm2niix", "Version": version("dcm2niix")},
    ]


def ensure_dataset(bids_root: Path, *, name: str = DEFAULT_NAME) -> None:
    """Create bids_root's fixed top-level files once (call under the lock)."""
    root = Path(bids_root)
    root.mkdir(parents=True, exist_ok=True)
    _ensure_json(
        root / "dataset_description.json",
        {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "raw", "GeneratedBy": _generated_by()},
    )
    if not (root / "README").exists() and not (root / "README.md").exists():
        atomic_write_text(root / "README", README_TEXT)
    ensure_bidsignore(root)
    _ensure_json(root / "scans.json", SCANS_COLUMNS, merge_keys=True)
    _ensure_json(
        root / "sessions.json",
        {k: v for k, v in SESSION_COLUMNS.items() if k != "session_id"},
        merge_keys=True,
    )


def ensure_bidsignore(root: Path) -> None:
    """Add the lines the validator must skip (BIDSIGNORE_LINES) to ``root/.bidsignore``, keeping the rest.

    Called for bids_root under the lock, and for a staged dataset before it is validated, so the staged
    session is judged exactly as it will be once published.
    """
    ignore = Path(root) / ".bidsignore"
    current = ignore.read_text(encoding="utf-8").splitlines() if ignore.exists() else []
    missing = [line for line in BIDSIGNORE_LINES if line not in current]
    if missing:
        atomic_write_text(ignore, "\n".join([*current, *missing]) + "\n")


def upsert_participant(bids_root: Path, participant: str, row: Mapping[str, object] | None = None) -> dict[str, str]:
    """participants.tsv (+ participants.json) row for ``sub-<participant>``; call under the lock."""
    root = Path(bids_root)
    values = {**(row or {}), "participant_id": sub(participant)}
    written = upsert_tsv_row(root / "participants.tsv", "participant_id", values, list(PARTICIPANT_COLUMNS))
    columns, _ = read_tsv(root / "participants.tsv")
    _ensure_json(root / "participants.json", _column_descriptions(columns, PARTICIPANT_COLUMNS), merge_keys=True)
    return written


def upsert_session(
    bids_root: Path, participant: str, session: str, row: Mapping[str, object] | None = None
) -> dict[str, str]:
    """``sub-X/sub-X_sessions.tsv`` row for ``ses-<session>``; the sidecar is the top-level sessions.json
    (BIDS inheritance), extended with any new column. Call under the lock."""
    root = Path(bids_root)
    folder = subject_dir(root, participant)
    folder.mkdir(parents=True, exist_ok=True)
    values = {**(row or {}), "session_id": ses(session)}
    table = sessions_table(root, participant)
    written = upsert_tsv_row(table, "session_id", values, list(SESSION_COLUMNS))
    columns, _ = read_tsv(table)
    described = _column_descriptions([c for c in columns if c != "session_id"], SESSION_COLUMNS)
    _ensure_json(root / "sessions.json", described, merge_keys=True)
    return written


def present_suffixes(session_path: str | os.PathLike[str]) -> set[str]:
    """BIDS suffixes of the NIfTI files in a session folder, e.g. {"T1w", "dwi", "epi"}.

    What the stages after conversion gate on (``requires_bids_suffixes: [dwi]``).
    A missing folder has no suffixes.
    """
    root = Path(session_path)
    found: set[str] = set()
    if not root.is_dir():
        return found
    for path in root.glob("*/*.nii*"):
        match = _SUFFIX.search(path.name)
        if match:
            found.add(match.group(1))
    return found


def sessions_table(bids_root: Path, participant: str) -> Path:
    """``sub-X/sub-X_sessions.tsv``: the subject's sessions with their ScanIDs and acquisition times."""
    return subject_dir(bids_root, participant) / f"{sub(participant)}_sessions.tsv"


def session_acq_time(session_path: Path) -> str | None:
    """Earliest acq_time in the session's ``*_scans.tsv`` (HeudiConv writes one), or None."""
    times: list[str] = []
    for table in Path(session_path).glob("*_scans.tsv"):
        _, rows = read_tsv(table)
        times += [r["acq_time"] for r in rows if r.get("acq_time") and r["acq_time"] != NA]
    return min(times) if times else None


# --------------------------------------------------------------------------- staging and publication


def new_staging_dir(work_dir: Path, participant: str, session: str) -> Path:
    """A fresh, empty dir ``work_dir/bids_staging/sub-X_ses-Y.<unique>`` for one conversion attempt."""
    base = Path(work_dir) / "bids_staging"
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{entities(participant, session)}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def _same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _tree_files(path: Path, relative_to: Path) -> tuple[tuple[str, ...], int]:
    files: list[str] = []
    n_bytes = 0
    for p in path.rglob("*"):
        if p.is_file():
            files.append(str(relative_to / p.relative_to(path)))
            n_bytes += p.stat().st_size
    return tuple(sorted(files)), n_bytes


def _iso(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _rmtree(path: Path) -> None:
    """Delete a tree (HeudiConv marks converted files read-only; unlink does not care on POSIX)."""
    shutil.rmtree(path)


def recover_session(bids_root: Path, participant: str, session: str, *, keep: Path | None = None) -> list[str]:
    """Repair what an interrupted publish left (call under the lock). Returns what was done.

    If ``ses-Y`` is missing but an ``.ses-Y.old-*`` exists (crash between the
    two renames), the old version is put back; leftover incoming/old dirs are
    deleted (except ``keep``, the caller's own incoming copy).
    """
    folder = subject_dir(bids_root, participant)
    if not folder.is_dir():
        return []
    done: list[str] = []
    final = session_dir(bids_root, participant, session)
    olds = sorted(folder.glob(_OLD.format(session=final.name) + "*"), key=lambda p: p.stat().st_mtime)
    if not final.exists() and olds:
        newest = olds.pop()
        os.rename(newest, final)
        done.append(f"restored {final.name} from {newest.name}")
    for leftover in [*olds, *folder.glob(_INCOMING.format(session=final.name) + "*")]:
        if keep is not None and leftover == keep:
            continue
        _rmtree(leftover)
        done.append(f"removed {leftover.name}")
    return done


def publish_session(
    staging_dir: str | os.PathLike[str],
    bids_root: str | os.PathLike[str],
    participant: str,
    session: str,
    *,
    participants_row: Mapping[str, object] | None = None,
    sessions_row: Mapping[str, object] | None = None,
    lock_dir: str | os.PathLike[str] | None = None,
    recruitment_id: str | None = None,
    scan_id: str | None = None,
    acq_time: datetime | str | None = None,
    dataset_name: str = DEFAULT_NAME,
) -> PublishResult:
    """Move ``staging_dir/sub-X/ses-Y`` into ``bids_root`` atomically and update the shared tables.

    ``participants_row`` e.g. {"recruitment_id": "CLM_L_01"}; ``sessions_row``
    e.g. {"scan_id": "20240115_1430"}; ``recruitment_id``, ``scan_id`` and
    ``acq_time`` are shortcuts for those columns (acq_time defaults to the
    earliest acq_time in the session's scans.tsv).
    ``lock_dir`` holds the cross-process lock: pass ``paths.work_dir`` (default:
    the staging dir's parent, i.e. work_dir/bids_staging for new_staging_dir).
    Only the session folder is published: the staging dir's .heudiconv cache and
    HeudiConv's top-level templates stay behind. Raises PublishError with the
    previous version (if any) still in place.
    """
    started = time.monotonic()
    staging = Path(staging_dir)
    root = Path(bids_root)
    source = session_dir(staging, participant, session)
    if not source.is_dir() or not any(source.iterdir()):
        raise PublishError(f"nothing to publish: staged session {source} is missing or empty")
    locks = Path(lock_dir) if lock_dir is not None else staging.parent
    subject_folder = subject_dir(root, participant)
    final = session_dir(root, participant, session)
    p_values: dict[str, object] = dict(participants_row or {})
    if recruitment_id is not None:
        p_values["recruitment_id"] = recruitment_id
    s_values: dict[str, object] = dict(sessions_row or {})
    if scan_id is not None:
        s_values["scan_id"] = scan_id
    s_values["acq_time"] = _iso(acq_time) or _iso(s_values.get("acq_time")) or session_acq_time(source)
    files, n_bytes = _tree_files(source, Path(session_path(participant, session)))
    suffixes = frozenset(present_suffixes(source))

    created_subject = not subject_folder.exists()
    subject_folder.mkdir(parents=True, exist_ok=True)
    incoming: Path | None = None
    if _same_filesystem(source, subject_folder):
        candidate, method = source, "rename"
    else:
        # Copy outside the lock (may be slow), next to the destination so the final step is a rename.
        incoming = subject_folder / (_INCOMING.format(session=final.name) + uuid.uuid4().hex[:8])
        try:
            shutil.copytree(source, incoming, copy_function=shutil.copy2)
        except BaseException as exc:
            if incoming.exists():
                _rmtree(incoming)
            raise PublishError(f"copying {source} to {incoming} failed: {exc}") from exc
        candidate, method = incoming, "copy+rename"

    try:
        with bids_root_lock(root, locks):
            recovered = recover_session(root, participant, session, keep=incoming)
            tables = [root / "participants.tsv", sessions_table(root, participant)]
            saved = {t: (t.read_text(encoding="utf-8") if t.exists() else None) for t in tables}
            aside = subject_folder / (_OLD.format(session=final.name) + uuid.uuid4().hex[:8])
            try:
                old = swap_dir(candidate, final, aside)
            except OSError as exc:
                raise PublishError(exc.strerror or str(exc)) from exc
            try:
                ensure_dataset(root, name=dataset_name)
                p_row = upsert_participant(root, participant, p_values)
                s_row = upsert_session(root, participant, session, s_values)
            except BaseException as exc:
                # Undo: new version out (back where it came from), old version back, tables restored.
                os.rename(final, candidate)
                if old is not None:
                    os.rename(old, final)
                for table, text in saved.items():
                    if text is None:
                        with contextlib.suppress(FileNotFoundError):
                            table.unlink()
                    else:
                        atomic_write_text(table, text)
                raise PublishError(f"updating the top-level tables of {root} failed: {exc}") from exc
            if old is not None:
                _rmtree(old)
    except Timeout as exc:
        raise PublishError(
            f"could not lock {lock_path(root, locks)} within {LOCK_TIMEOUT_S:.0f} s (another publish stuck?)"
        ) from exc
    except BaseException:
        if incoming is not None and incoming.exists():
            _rmtree(incoming)
        raise
    finally:
        # A first publish of a participant that failed must not leave an empty sub-X behind.
        if created_subject and subject_folder.is_dir() and not any(subject_folder.iterdir()):
            with contextlib.suppress(OSError):
                subject_folder.rmdir()
    return PublishResult(
        session_dir=final,
        participant=participant,
        session=session,
        replaced_previous=old is not None,
        method=method,
        files=files,
        n_bytes=n_bytes,
        suffixes=suffixes,
        participants_row=p_row,
        sessions_row=s_row,
        duration_s=round(time.monotonic() - started, 3),
        recovered=tuple(recovered),
    )
