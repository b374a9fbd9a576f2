"""Who a session belongs to: participant/session labels and the ScanID registry.

Labels become Dagster partition keys and BIDS entities (``sub-<label>``, ``ses-<label>``), so they are
restricted to ASCII letters and digits: no ``|`` or ``,`` (Dagster multi-partition separators), no path
separators. A ScanID (the folder name) may contain anything; it never becomes a key.

The registry (``registry.tsv`` under ``paths.state``) is the single place where a ScanID is bound to
(participant, session). An assignment is never changed once written, because BIDS folders, derivatives
and Dagster partitions are all named after it. Writes are atomic (temp file + ``os.replace``) and
serialised with a file lock, so the sensor and ``neuroflow scan`` can run at the same time.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.naming.bids import is_label

REGISTRY_FILENAME = "registry.tsv"
REGISTRY_COLUMNS = (
    "scan_id",
    "participant_id",
    "session_id",
    "recruitment_id",
    "acq_time",
    "dicom_path",
    "registered_at",
)
_NOT_LABEL_CHARS = re.compile(r"[^A-Za-z0-9]")
PARTICIPANT_LABEL_WIDTH = 4
SESSION_LABEL_WIDTH = 2


class IdentityError(ValueError):
    """A subject code or label that cannot name a participant or session."""


class RegistryError(Exception):
    """The registry file is unreadable or inconsistent; the message names the file and the row."""


def participant_label(subject_code: str) -> str:
    """SubjectCode -> participant label (docs/domain-rules.md#identity): keep ASCII letters/digits, zero-pad to 4.

    ``75`` -> ``0075``, ``CLM_L_01`` -> ``CLML01``. Only ASCII is kept because BIDS labels are
    ``[a-zA-Z0-9]+``; a code with nothing left raises :class:`IdentityError`.
    """
    cleaned = _NOT_LABEL_CHARS.sub("", subject_code or "")
    if not cleaned:
        raise IdentityError(
            f"SubjectCode {subject_code!r} has no letters or digits, so it cannot become a participant label"
        )
    return cleaned.rjust(PARTICIPANT_LABEL_WIDTH, "0")


def session_label(ordinal: int) -> str:
    """Per-subject ordinal -> session label: 1 -> ``01`` (wider from 100 on)."""
    if ordinal < 1:
        raise IdentityError(f"session ordinal must be >= 1, got {ordinal}")
    return str(ordinal).rjust(SESSION_LABEL_WIDTH, "0")


def is_valid_label(label: str) -> bool:
    """True if ``label`` is safe as a partition key and BIDS label (ASCII letters/digits only)."""
    return is_label(label)


def _now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class RegistryEntry:
    scan_id: str
    participant_id: str
    session_id: str
    recruitment_id: str
    acq_time: str = ""
    dicom_path: str = ""
    registered_at: str = ""

    @property
    def ordinal(self) -> int:
        return int(self.session_id)


@dataclass(frozen=True)
class AssignRequest:
    """One ScanID to bind; requests in one call are assigned in the order given."""

    scan_id: str
    recruitment_id: str
    acq_time: str = ""
    dicom_path: str = ""


@dataclass(frozen=True)
class Assignment:
    entry: RegistryEntry
    is_new_session: bool
    is_new_subject: bool
    # Set when the ScanID was already registered under a different SubjectCode: labels are kept.
    conflict: str | None = None


@dataclass
class Registry:
    """ScanID <-> (participant, session) bindings, persisted in ``<state_dir>/registry.tsv``.

    With ``persist=False`` (``neuroflow scan --dry-run``) assignments are computed the same way but kept
    in memory only, so a dry run shows exactly the labels a real run would give.
    """

    state_dir: Path
    persist: bool = True
    _by_scan: dict[str, RegistryEntry] = field(default_factory=dict, init=False, repr=False)
    # Dry-run assignments, layered over the file's content.
    _pending: dict[str, RegistryEntry] = field(default_factory=dict, init=False, repr=False)
    _disk_key: tuple[int, int, int] | None = field(default=None, init=False, repr=False)
    _loaded: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.reload()

    @property
    def path(self) -> Path:
        return self.state_dir / REGISTRY_FILENAME

    @property
    def lock_path(self) -> Path:
        return self.state_dir / (REGISTRY_FILENAME + ".lock")

    # ------------------------------------------------------------------ reading

    def reload(self, force: bool = False) -> None:
        """Re-read the file if it changed on disk (another process may have assigned)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            key = None
        else:
            # os.replace gives a new inode, so this key changes on every write even within one tick.
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._loaded and not force and key == self._disk_key:
            return
        entries = _read_registry(self.path) if key is not None else {}
        for scan_id, entry in self._pending.items():
            entries.setdefault(scan_id, entry)
        self._by_scan = entries
        self._disk_key = key
        self._loaded = True

    def lookup(self, scan_id: str) -> RegistryEntry | None:
        return self._by_scan.get(scan_id)

    def get(self, participant: str, session: str) -> RegistryEntry | None:
        for entry in self._by_scan.values():
            if entry.participant_id == participant and entry.session_id == session:
                return entry
        return None

    def sessions_of(self, participant: str) -> list[RegistryEntry]:
        found = [e for e in self._by_scan.values() if e.participant_id == participant]
        return sorted(found, key=lambda e: e.ordinal)

    def participants(self) -> list[str]:
        return sorted({e.participant_id for e in self._by_scan.values()})

    def all(self) -> list[RegistryEntry]:
        return sorted(self._by_scan.values(), key=lambda e: (e.participant_id, e.ordinal))

    def __len__(self) -> int:
        return len(self._by_scan)

    def __contains__(self, scan_id: object) -> bool:
        return scan_id in self._by_scan

    # ------------------------------------------------------------------ writing

    def assign(
        self,
        scan_id: str,
        recruitment_id: str,
        *,
        acq_time: str = "",
        dicom_path: str | os.PathLike[str] = "",
    ) -> Assignment:
        """Bind ``scan_id`` to the participant of ``recruitment_id`` and its next session ordinal.

        A ScanID that is already registered keeps its labels; ``conflict`` then says if the SubjectCode
        differs from the registered one.
        """
        request = AssignRequest(scan_id, recruitment_id, acq_time, str(dicom_path))
        return self.assign_many([request])[0]

    def assign_many(self, requests: Sequence[AssignRequest]) -> list[Assignment]:
        """Assign several ScanIDs in order under one lock and one atomic write."""
        if not requests:
            return []
        for req in requests:
            participant_label(req.recruitment_id)  # fail before touching the file
        if not self.persist:
            self.reload()
            results = self._assign_in_memory(requests)
            self._pending.update({r.entry.scan_id: r.entry for r in results if r.is_new_session})
            return results
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path), timeout=60):
            self.reload(force=True)
            results = self._assign_in_memory(requests)
            if any(r.is_new_session for r in results):
                _write_registry(self.path, self._by_scan.values())
                self.reload(force=True)
        return results

    def _assign_in_memory(self, requests: Iterable[AssignRequest]) -> list[Assignment]:
        results: list[Assignment] = []
        for req in requests:
            existing = self._by_scan.get(req.scan_id)
            if existing is not None:
                conflict = None
                if existing.recruitment_id != req.recruitment_id:
                    conflict = (
                        f"ScanID {req.scan_id!r} is registered as sub-{existing.participant_id} "
                        f"ses-{existing.session_id} (SubjectCode {existing.recruitment_id!r}) but the "
                        f"mapping now says {req.recruitment_id!r}; registered labels are never reassigned"
                    )
                results.append(Assignment(existing, False, False, conflict))
                continue
            participant = participant_label(req.recruitment_id)
            previous = [e for e in self._by_scan.values() if e.participant_id == participant]
            ordinal = max((e.ordinal for e in previous), default=0) + 1
            entry = RegistryEntry(
                scan_id=req.scan_id,
                participant_id=participant,
                session_id=session_label(ordinal),
                recruitment_id=req.recruitment_id,
                acq_time=req.acq_time,
                dicom_path=req.dicom_path,
                registered_at=_now_iso(),
            )
            self._by_scan[req.scan_id] = entry
            results.append(Assignment(entry, True, not previous))
        return results


def _read_registry(path: Path) -> dict[str, RegistryEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"cannot read the ScanID registry {path}: {exc.strerror}") from exc
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    rows = list(reader)
    if not rows:
        return {}
    header = tuple(rows[0])
    if header[: len(REGISTRY_COLUMNS)] != REGISTRY_COLUMNS:
        raise RegistryError(f"{path}: unexpected header {list(header)}, expected {list(REGISTRY_COLUMNS)}")
    entries: dict[str, RegistryEntry] = {}
    seen: dict[tuple[str, str], str] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < len(REGISTRY_COLUMNS):
            raise RegistryError(f"{path}: row {lineno} has {len(row)} columns, expected {len(REGISTRY_COLUMNS)}")
        entry = RegistryEntry(*row[: len(REGISTRY_COLUMNS)])
        if not (is_valid_label(entry.participant_id) and entry.session_id.isdigit()):
            raise RegistryError(
                f"{path}: row {lineno} has invalid labels {entry.participant_id!r}/{entry.session_id!r}"
            )
        key = (entry.participant_id, entry.session_id)
        if key in seen and seen[key] != entry.scan_id:
            raise RegistryError(
                f"{path}: row {lineno}: sub-{key[0]} ses-{key[1]} is bound to both {seen[key]!r} and {entry.scan_id!r}"
            )
        seen[key] = entry.scan_id
        entries[entry.scan_id] = entry
    return entries


def _write_registry(path: Path, entries: Iterable[RegistryEntry]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(REGISTRY_COLUMNS)
    for e in sorted(entries, key=lambda e: (e.participant_id, e.ordinal)):
        writer.writerow(
            [
                e.scan_id,
                e.participant_id,
                e.session_id,
                e.recruitment_id,
                e.acq_time,
                e.dicom_path,
                e.registered_at,
            ]
        )
    atomic_write_text(path, buf.getvalue())
