"""Who a session belongs to: participant/session labels and the ScanID registry.

Labels become Dagster partition keys and BIDS entities (``sub-<label>``, ``ses-<label>``), so they are
restricted to ASCII letters and digits: no ``|`` or ``,`` (Dagster multi-partition separators), no path
separators. A ScanID (the folder name) may contain anything; it never becomes a key.

The registry (``registry.tsv`` under ``paths.state``) is the single place where a ScanID is bound to
(participant, session). An assignment is never changed once written, because BIDS folders, derivatives
and Dagster partitions are all named after it. Writes are atomic (temp file + ``os.replace``) and
serialised with a file lock, so the sensor and ``neuroflow scan`` can run at the same time.

Two people must never become one subject. A participant label is *owned* by the SubjectCode(s) of the
active registry rows under it; a second code whose label is already owned by another code (``CLM_L_01``
and ``CLML01`` both clean to ``CLML01``; ``ab1`` and ``AB1`` differ only in case) is refused, never
merged. Codes are the same person only when :func:`code_key` says so (surrounding whitespace ignored, a
purely numeric code compared as a number: ``75`` = ``075`` = ``0075``). An operator separates two
codes with ``mapping.label_overrides`` (one label per code). A code keeps the label it was first
registered under, so a change of the cleaning rule never splits a person over two labels.

Rows are never deleted: ``neuroflow rekey`` *retires* a binding (status ``retired``): its labels stay
reserved, its outputs stay on disk, every stage refuses it, and the ScanID is free to be registered
again under the subject the mapping names now.
"""

from __future__ import annotations

import copy
import csv
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.naming.bids import is_label
from neuroflow_dagster.naming.subjects import code_key, label_fold

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
# Written since re-keying exists; files without them (older versions) read as all-active.
OPTIONAL_COLUMNS = ("status", "note")
RETIRED = "retired"
_NOT_LABEL_CHARS = re.compile(r"[^A-Za-z0-9]")
PARTICIPANT_LABEL_WIDTH = 4
SESSION_LABEL_WIDTH = 2


class IdentityError(ValueError):
    """A subject code or label that cannot name a participant or session."""


class RegistryError(Exception):
    """The registry file is unreadable or inconsistent; the message names the file and the row."""


def participant_label(subject_code: str) -> str:
    """SubjectCode -> participant label (docs/domain-rules.md#identity): keep ASCII letters/digits; a
    purely numeric code is a number.

    ``CLM_L_01`` -> ``CLML01``; ``75``, ``075``, ``0075`` and ``00075`` -> ``0075`` (leading zeros dropped,
    then zero-padded to 4 digits); ``12345`` -> ``12345``. Codes with a letter are never padded
    (``BAD`` -> ``BAD``: ``0BAD`` would only add a character nobody wrote). Only ASCII is kept because
    BIDS labels are ``[a-zA-Z0-9]+``; a code with nothing left raises :class:`IdentityError`.
    """
    cleaned = _NOT_LABEL_CHARS.sub("", subject_code or "")
    if not cleaned:
        raise IdentityError(
            f"SubjectCode {subject_code!r} has no letters or digits, so it cannot become a participant label"
        )
    if cleaned.isdigit():
        return cleaned.lstrip("0").rjust(PARTICIPANT_LABEL_WIDTH, "0")
    return cleaned


def session_label(ordinal: int) -> str:
    """Per-subject ordinal -> session label: 1 -> ``01`` (wider from 100 on)."""
    if ordinal < 1:
        raise IdentityError(f"session ordinal must be >= 1, got {ordinal}")
    return str(ordinal).rjust(SESSION_LABEL_WIDTH, "0")


def is_valid_label(label: str) -> bool:
    """True if ``label`` is safe as a partition key and BIDS label (ASCII letters/digits only)."""
    return is_label(label)


def normalize_overrides(overrides: Mapping[str, str] | None) -> dict[str, str]:
    """``mapping.label_overrides`` keyed by :func:`code_key` (the config validated them already)."""
    return {code_key(code): label for code, label in (overrides or {}).items()}


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
    # "" = active; "retired" = re-keyed by an operator (labels reserved, refused by every stage).
    status: str = ""
    note: str = ""

    @property
    def ordinal(self) -> int:
        return int(self.session_id)

    @property
    def retired(self) -> bool:
        return self.status == RETIRED

    @property
    def labels(self) -> str:
        return f"sub-{self.participant_id} ses-{self.session_id}"


@dataclass(frozen=True)
class AssignRequest:
    """One ScanID to bind; requests in one call are assigned in the order given."""

    scan_id: str
    recruitment_id: str
    acq_time: str = ""
    dicom_path: str = ""


@dataclass(frozen=True)
class Assignment:
    # None when ``refused``: the ScanID was not bound (identity conflict).
    entry: RegistryEntry | None
    is_new_session: bool
    is_new_subject: bool
    # Set when the ScanID was already registered under a different SubjectCode: labels are kept.
    conflict: str | None = None
    # Set when the ScanID was NOT registered because its label belongs to another person.
    refused: str | None = None


@dataclass(frozen=True)
class LabelDecision:
    """The participant label a SubjectCode gets, or why it gets none (``problem``)."""

    label: str | None
    # "override" | "registered" | "cleaned"
    how: str = ""
    problem: str | None = None


@dataclass(frozen=True)
class IdentityProblem:
    """A registry that breaks the one-person-one-label rule (written before codes were checked)."""

    kind: str  # "merged" | "case_collision" | "split"
    key: str  # the label (merged, case_collision) or the code (split)
    message: str
    # Labels whose processing must stop until an operator resolves it ("merged" only).
    blocks: tuple[str, ...] = ()


def _scan_list(entries: Iterable[RegistryEntry], limit: int = 4) -> str:
    items = sorted(entries, key=lambda e: (e.participant_id, e.ordinal))
    text = ", ".join(f"{e.scan_id!r} = {e.labels}" for e in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass
class Registry:
    """ScanID <-> (participant, session) bindings, persisted in ``<state_dir>/registry.tsv``.

    With ``persist=False`` (``neuroflow scan --dry-run``) assignments are computed the same way but kept
    in memory only, so a dry run shows exactly the labels a real run would give.
    """

    state_dir: Path
    persist: bool = True
    # Active bindings by ScanID.
    _by_scan: dict[str, RegistryEntry] = field(default_factory=dict, init=False, repr=False)
    _retired: list[RegistryEntry] = field(default_factory=list, init=False, repr=False)
    # Dry-run assignments, layered over the file's content.
    _pending: dict[str, RegistryEntry] = field(default_factory=dict, init=False, repr=False)
    _disk_key: tuple[int, int, int] | None = field(default=None, init=False, repr=False)
    _loaded: bool = field(default=False, init=False, repr=False)
    # Indices, rebuilt on every (re)load: folded label -> active entries; folded label -> every label
    # spelling ever used (retired rows too: their folders exist); code key -> active labels;
    # label -> highest ordinal ever given (retired rows too: labels are never reused).
    _active_by_fold: dict[str, list[RegistryEntry]] = field(default_factory=dict, init=False, repr=False)
    _spellings: dict[str, set[str]] = field(default_factory=dict, init=False, repr=False)
    _labels_of_code: dict[str, set[str]] = field(default_factory=dict, init=False, repr=False)
    _max_ordinal: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.reload()

    @property
    def path(self) -> Path:
        return self.state_dir / REGISTRY_FILENAME

    @property
    def lock_path(self) -> Path:
        return self.state_dir / (REGISTRY_FILENAME + ".lock")

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "registry_audit.jsonl"

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
        active, retired = _read_registry(self.path) if key is not None else ({}, [])
        for scan_id, entry in self._pending.items():
            active.setdefault(scan_id, entry)
        self._by_scan = active
        self._retired = retired
        self._disk_key = key
        self._loaded = True
        self._index()

    def _index(self) -> None:
        self._active_by_fold = {}
        self._spellings = {}
        self._labels_of_code = {}
        self._max_ordinal = {}
        for entry in self._by_scan.values():
            self._add_to_index(entry)
        for entry in self._retired:
            self._spellings.setdefault(label_fold(entry.participant_id), set()).add(entry.participant_id)
            self._max_ordinal[entry.participant_id] = max(self._max_ordinal.get(entry.participant_id, 0), entry.ordinal)

    def _add_to_index(self, entry: RegistryEntry) -> None:
        fold = label_fold(entry.participant_id)
        self._active_by_fold.setdefault(fold, []).append(entry)
        self._spellings.setdefault(fold, set()).add(entry.participant_id)
        self._labels_of_code.setdefault(code_key(entry.recruitment_id), set()).add(entry.participant_id)
        self._max_ordinal[entry.participant_id] = max(self._max_ordinal.get(entry.participant_id, 0), entry.ordinal)

    def lookup(self, scan_id: str) -> RegistryEntry | None:
        """The ScanID's active binding (a retired one is not returned)."""
        return self._by_scan.get(scan_id)

    def get(self, participant: str, session: str) -> RegistryEntry | None:
        for entry in self._by_scan.values():
            if entry.participant_id == participant and entry.session_id == session:
                return entry
        return None

    def retired_entry(self, participant: str, session: str) -> RegistryEntry | None:
        """The retired binding of (participant, session), if it was re-keyed."""
        for entry in self._retired:
            if entry.participant_id == participant and entry.session_id == session:
                return entry
        return None

    def retired(self) -> list[RegistryEntry]:
        return sorted(self._retired, key=lambda e: (e.participant_id, e.ordinal))

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

    # ------------------------------------------------------------------ identity

    def labels_of(self, subject_code: str) -> set[str]:
        """The labels ``subject_code`` (as :func:`code_key`) holds active sessions under."""
        return set(self._labels_of_code.get(code_key(subject_code), set()))

    def decide_label(self, subject_code: str, overrides: Mapping[str, str] | None = None) -> LabelDecision:
        """The label ``subject_code`` gets now, or the reason it may not get one.

        ``overrides``: :func:`normalize_overrides` of ``mapping.label_overrides``. Order: an override;
        else the label the code is already registered under; else :func:`participant_label` (which
        raises :class:`IdentityError` for a code without letters or digits). The label is then refused
        if another code owns it, or if it differs only in case from a label in use.
        """
        key = code_key(subject_code)
        override = (overrides or {}).get(key)
        if override is not None:
            label, how = override, "override"
        else:
            registered = self._labels_of_code.get(key, set())
            if len(registered) > 1:
                entries = [e for e in self._by_scan.values() if code_key(e.recruitment_id) == key]
                return LabelDecision(
                    None,
                    problem=f"SubjectCode {subject_code!r} is already registered under {len(registered)} "
                    f"participant labels ({_scan_list(entries)}); choose one with mapping.label_overrides",
                )
            if registered:
                label, how = next(iter(registered)), "registered"
            else:
                label, how = participant_label(subject_code), "cleaned"
        fold = label_fold(label)
        others = [e for e in self._active_by_fold.get(fold, []) if code_key(e.recruitment_id) != key]
        origin = {
            "override": f"mapping.label_overrides gives it {label}",
            "registered": f"it is registered as sub-{label}",
            "cleaned": f"it cleans to participant label {label}",
        }[how]
        if others:
            codes = sorted({e.recruitment_id for e in others})
            return LabelDecision(
                None,
                how=how,
                problem=f"SubjectCode {subject_code!r}: {origin}, but sub-{others[0].participant_id} already "
                f"belongs to SubjectCode {' and '.join(map(repr, codes))} ({_scan_list(others)}); two codes "
                "never share a participant. Different people: give one its own label in "
                "mapping.label_overrides; the same person: write one SubjectCode for both in the mapping",
            )
        spellings = self._spellings.get(fold, set()) - {label}
        if spellings:
            return LabelDecision(
                None,
                how=how,
                problem=f"SubjectCode {subject_code!r}: {origin}, which differs only in case from "
                f"sub-{sorted(spellings)[0]} (already in the registry); on a case-insensitive file system "
                "they would be one folder. Choose another label with mapping.label_overrides",
            )
        return LabelDecision(label, how=how)

    def problems(self) -> list[IdentityProblem]:
        """Registry rows that break the rule (possible only in registries written by older versions)."""
        found: list[IdentityProblem] = []
        by_label: dict[str, list[RegistryEntry]] = {}
        for entry in self._by_scan.values():
            by_label.setdefault(entry.participant_id, []).append(entry)
        for entries in by_label.values():
            codes: dict[str, list[RegistryEntry]] = {}
            for e in entries:
                codes.setdefault(code_key(e.recruitment_id), []).append(e)
            if len(codes) > 1:
                labels = sorted({e.participant_id for e in entries})
                parts = "; ".join(
                    f"SubjectCode {grp[0].recruitment_id!r}: {_scan_list(grp)}" for _, grp in sorted(codes.items())
                )
                found.append(
                    IdentityProblem(
                        "merged",
                        "/".join(labels),
                        f"sub-{'/'.join(labels)} holds sessions of {len(codes)} SubjectCodes ({parts}): two people "
                        "may have been merged into one subject (registered before codes were checked). Its "
                        "processing is stopped. Same person: write one SubjectCode for all its ScanIDs in the "
                        "mapping, then `neuroflow rekey` the ScanIDs with the other code; different people: give "
                        "one code its own label in mapping.label_overrides, then `neuroflow rekey` its ScanIDs",
                        tuple(labels),
                    )
                )
        for spellings in self._spellings.values():
            if len(spellings) > 1:
                names = sorted(spellings)
                found.append(
                    IdentityProblem(
                        "case_collision",
                        "/".join(names),
                        f"participant labels {', '.join('sub-' + n for n in names)} differ only in case: on a "
                        "case-insensitive file system (macOS, Windows shares) they are one folder. Give one of "
                        "their SubjectCodes another label in mapping.label_overrides and `neuroflow rekey` its "
                        "ScanIDs",
                    )
                )
        for key, labels in self._labels_of_code.items():
            if len(labels) > 1:
                entries = [e for e in self._by_scan.values() if code_key(e.recruitment_id) == key]
                written = ", ".join(sorted({repr(e.recruitment_id) for e in entries}))
                found.append(
                    IdentityProblem(
                        "split",
                        key,
                        f"SubjectCode {key!r} (as written: {written}) "
                        f"is registered under {len(labels)} participant labels ({_scan_list(entries)}): one "
                        "person, several subjects. Choose one label with mapping.label_overrides and "
                        "`neuroflow rekey` the ScanIDs under the others",
                    )
                )
        return sorted(found, key=lambda p: (p.kind, p.key))

    def blocked_labels(self) -> dict[str, str]:
        """label -> why every stage must refuse its sessions (a merged subject)."""
        return {label: p.message for p in self.problems() for label in p.blocks}

    # ------------------------------------------------------------------ writing

    def assign(
        self,
        scan_id: str,
        recruitment_id: str,
        *,
        acq_time: str = "",
        dicom_path: str | os.PathLike[str] = "",
        overrides: Mapping[str, str] | None = None,
    ) -> Assignment:
        """Bind ``scan_id`` to the participant of ``recruitment_id`` and its next session ordinal.

        A ScanID that is already registered keeps its labels; ``conflict`` then says if the SubjectCode
        differs from the registered one. A code whose label belongs to another code is ``refused``.
        """
        request = AssignRequest(scan_id, recruitment_id, acq_time, str(dicom_path))
        return self.assign_many([request], overrides=overrides)[0]

    def assign_many(
        self, requests: Sequence[AssignRequest], overrides: Mapping[str, str] | None = None
    ) -> list[Assignment]:
        """Assign several ScanIDs in order under one lock and one atomic write."""
        if not requests:
            return []
        for req in requests:
            key = code_key(req.recruitment_id)
            if key not in (overrides or {}) and key not in self._labels_of_code:
                participant_label(req.recruitment_id)  # fail before touching the file
        if not self.persist:
            self.reload()
            results = self._assign_in_memory(requests, overrides)
            self._pending.update({r.entry.scan_id: r.entry for r in results if r.entry and r.is_new_session})
            return results
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path), timeout=60):
            self.reload(force=True)
            try:
                results = self._assign_in_memory(requests, overrides)
                if any(r.is_new_session for r in results):
                    _write_registry(self.path, [*self._by_scan.values(), *self._retired])
            finally:
                self.reload(force=True)
        return results

    def _assign_in_memory(
        self, requests: Iterable[AssignRequest], overrides: Mapping[str, str] | None
    ) -> list[Assignment]:
        results: list[Assignment] = []
        for req in requests:
            existing = self._by_scan.get(req.scan_id)
            if existing is not None:
                conflict = None
                if code_key(existing.recruitment_id) != code_key(req.recruitment_id):
                    conflict = (
                        f"ScanID {req.scan_id!r} is registered as {existing.labels} "
                        f"(SubjectCode {existing.recruitment_id!r}) but the mapping now says "
                        f"{req.recruitment_id!r}; registered labels are never reassigned"
                    )
                results.append(Assignment(existing, False, False, conflict))
                continue
            decision = self.decide_label(req.recruitment_id, overrides)
            if decision.label is None:
                results.append(Assignment(None, False, False, refused=decision.problem))
                continue
            participant = decision.label
            previous = self._max_ordinal.get(participant, 0)
            entry = RegistryEntry(
                scan_id=req.scan_id,
                participant_id=participant,
                session_id=session_label(previous + 1),
                recruitment_id=req.recruitment_id,
                acq_time=req.acq_time,
                dicom_path=req.dicom_path,
                registered_at=_now_iso(),
            )
            self._by_scan[req.scan_id] = entry
            self._add_to_index(entry)
            results.append(Assignment(entry, True, previous == 0))
        return results

    def replace_entries(self, changes: Sequence[tuple[RegistryEntry, RegistryEntry]]) -> None:
        """Apply (old active entry -> new entry) under the lock; fails if the file changed underneath.

        The new entry is either the same ScanID re-coded (still active) or the old one retired. Used by
        ``neuroflow rekey`` only, after it planned the change on this registry's content.
        """
        if not self.persist:
            raise RegistryError("a dry-run registry cannot be changed")
        with FileLock(str(self.lock_path), timeout=60):
            before = self._disk_key
            self.reload(force=True)
            if self._disk_key != before:
                raise RegistryError(f"{self.path} changed while re-keying; run the command again")
            for old, _ in changes:
                if self._by_scan.get(old.scan_id) != old:
                    raise RegistryError(f"{self.path}: ScanID {old.scan_id!r} is no longer {old.labels}")
            for old, new in changes:
                if new.retired:
                    del self._by_scan[old.scan_id]
                    self._retired.append(new)
                else:
                    self._by_scan[old.scan_id] = new
            try:
                _write_registry(self.path, [*self._by_scan.values(), *self._retired])
            finally:
                self.reload(force=True)

    def with_changes(self, changes: Sequence[tuple[RegistryEntry, RegistryEntry]]) -> Registry:
        """A copy in memory with (old -> new) applied, for planning a re-key; never written."""
        sim = copy.copy(self)
        sim.persist = False
        sim._by_scan = dict(self._by_scan)
        sim._retired = list(self._retired)
        sim._pending = {}
        for old, new in changes:
            if new.retired:
                del sim._by_scan[old.scan_id]
                sim._retired.append(new)
            else:
                sim._by_scan[old.scan_id] = new
        sim._index()
        return sim


def retire(entry: RegistryEntry, note: str) -> RegistryEntry:
    return replace(entry, status=RETIRED, note=note)


def _read_registry(path: Path) -> tuple[dict[str, RegistryEntry], list[RegistryEntry]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"cannot read the ScanID registry {path}: {exc.strerror}") from exc
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    rows = list(reader)
    if not rows:
        return {}, []
    header = tuple(rows[0])
    if header[: len(REGISTRY_COLUMNS)] != REGISTRY_COLUMNS:
        raise RegistryError(f"{path}: unexpected header {list(header)}, expected {list(REGISTRY_COLUMNS)}")
    extra = {name: header.index(name) for name in OPTIONAL_COLUMNS if name in header}
    active: dict[str, RegistryEntry] = {}
    retired: list[RegistryEntry] = []
    seen: dict[tuple[str, str], str] = {}
    active_row: dict[str, int] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < len(REGISTRY_COLUMNS):
            raise RegistryError(f"{path}: row {lineno} has {len(row)} columns, expected {len(REGISTRY_COLUMNS)}")
        optional = {name: (row[i] if i < len(row) else "") for name, i in extra.items()}
        entry = RegistryEntry(*row[: len(REGISTRY_COLUMNS)], **optional)
        if not (is_valid_label(entry.participant_id) and entry.session_id.isdigit()):
            raise RegistryError(
                f"{path}: row {lineno} has invalid labels {entry.participant_id!r}/{entry.session_id!r}"
            )
        if entry.status not in ("", RETIRED):
            raise RegistryError(f"{path}: row {lineno} has unknown status {entry.status!r}")
        key = (entry.participant_id, entry.session_id)
        if key in seen and seen[key] != entry.scan_id:
            raise RegistryError(
                f"{path}: row {lineno}: sub-{key[0]} ses-{key[1]} is bound to both {seen[key]!r} and {entry.scan_id!r}"
            )
        seen[key] = entry.scan_id
        if entry.retired:
            retired.append(entry)
            continue
        if entry.scan_id in active_row:
            raise RegistryError(
                f"{path}: rows {active_row[entry.scan_id]} and {lineno} both bind ScanID {entry.scan_id!r}"
            )
        active_row[entry.scan_id] = lineno
        active[entry.scan_id] = entry
    return active, retired


def _write_registry(path: Path, entries: Iterable[RegistryEntry]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow([*REGISTRY_COLUMNS, *OPTIONAL_COLUMNS])
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
                e.status,
                e.note,
            ]
        )
    atomic_write_text(path, buf.getvalue())
