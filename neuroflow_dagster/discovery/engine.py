"""One discovery tick: folders -> (stability, mapping, headers, protocol) -> registrations and held folders.

Plain Python so the Dagster sensor stays a thin wrapper and ``neuroflow scan [--dry-run]`` runs the very
same code. The sensor stores :attr:`TickResult.new_state` as its cursor; the state holds, per decided
folder, a status code and a cheap directory signature (see ``scanner.tree_signature``), so an unchanged
folder costs one stat per directory (plus a scandir of those with subfolders), no file stat and no
header read. Folders are re-tried when their signature changes, when the config key changes
(incoming path, layout, protocol rules), or when the registry no longer knows them.

State format (compact on purpose, it is a sensor cursor)::

    {"v": 2, "k": "<config key>", "rr": {"r": "<scan id>", "o": "<scan id>"},
     "f": {"<scan id>": ["R", "<L|F><signature>", "<file fingerprint>", <(re)registered on, epoch day>]
                      | ["U" | "E", "<L|F><signature>"]}}

``R`` registered, ``U`` stable but not registrable yet (unmapped, a malformed mapping row, or a label
owned by another person: re-resolved against every tick's mapping and registry without re-reading),
``E`` stable but empty / no DICOM. Unstable folders are not stored: they are fully walked every tick.
``rr`` is where the round-robin rewrite check (``file_fingerprint`` of registered folders, a bounded
number of files per tick, recent folders first) continues next tick. Version 1 states (no fingerprint,
an optional warned code) are read as version 2 with unknown fingerprints.

Nothing one entry does stops the tick: an unreadable, looping, vanished or permission-denied entry is
held (or skipped, if gone) alone; only an incoming root that cannot be listed stops it, keeping the
state. A registered folder that is no longer in incoming is held as ``missing`` (its state is kept,
so it coming back unchanged changes nothing).
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from base64 import b64decode, b64encode
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.discovery.identity import (
    AssignRequest,
    IdentityError,
    Registry,
    RegistryEntry,
    code_key,
    normalize_overrides,
    participant_label,
)
from neuroflow_dagster.discovery.mapping import MappingResult, load_mapping
from neuroflow_dagster.discovery.protocol import ProtocolResult, check_protocol
from neuroflow_dagster.discovery.scanner import (
    EntryProblem,
    HeaderSummary,
    IncomingFolderError,
    SessionFolder,
    WalkResult,
    file_fingerprint,
    os_error_text,
    read_headers,
    scan_incoming,
    stat_walk,
    tree_signature,
)

STATE_VERSION = 2
# Dagster cancels a sensor tick after 60 s and then stores no cursor: stay well inside it.
DEFAULT_TIME_BUDGET_S = 40.0
DAY_S = 86400.0
HeldReason = Literal[
    "unstable",
    "unmapped",
    "no_dicom_yet",
    "excluded",
    "mapping_error",
    "identity_conflict",
    "remapped",
    "unreadable",
    "not_a_folder",
    "missing",
]
# Held reasons an operator must act on (alerted once when they appear); the others resolve by waiting
# (unstable, no_dicom_yet), by the normal workflow (unmapped) or were chosen by an operator (excluded).
ALERT_REASONS = frozenset({"mapping_error", "identity_conflict", "remapped", "unreadable", "missing"})
MAX_ERRORS_SHOWN = 3


@dataclass(frozen=True)
class Registration:
    """A session to report this tick (new, or registered earlier and changed since)."""

    scan_id: str
    participant_label: str
    session_label: str
    recruitment_id: str
    path: str
    # Rows: [description, SeriesInstanceUID, n_files, series_number, image_type]
    series: list[list[Any]]
    n_dicom: int
    n_unreadable: int
    unreadable_examples: list[str]
    acquisition: str | None
    mapping_source: str
    protocol: ProtocolResult
    is_new_subject: bool
    is_new_session: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Held:
    """A folder seen but not registered this tick, with a reason code and a message for operators.

    ``registered``: the folder's registered labels (``sub-X ses-Y``) when it is a registered session
    held for a new reason (remapped, unreadable, missing). ``blocks``: every stage must refuse that
    session until the reason is resolved (a ``remapped`` ScanID).
    """

    scan_id: str
    path: str
    reason: HeldReason
    message: str
    registered: str = ""
    blocks: bool = False


@dataclass(frozen=True)
class Problem:
    """Something wrong that is not one folder: the registry, a mapping row, the incoming root."""

    kind: str  # "registry" | "mapping" | "incoming"
    key: str
    message: str


@dataclass
class TickStats:
    folders_seen: int = 0
    # Decided folders whose signature was unchanged: no walk, no header read.
    folders_skipped: int = 0
    folders_signed: int = 0
    dirs_signed: int = 0
    folders_walked: int = 0
    files_stated: int = 0
    folders_header_read: int = 0
    header_files_read: int = 0
    # Registered folders re-fingerprinted this tick (files rewritten in place), and how many changed.
    folders_rewrite_checked: int = 0
    folders_rewritten: int = 0
    # Folders left for the next tick because the time budget ran out (no decision, no state change).
    folders_deferred: int = 0
    registered: int = 0
    held: int = 0
    seconds: float = 0.0


@dataclass
class TickResult:
    registrations: list[Registration] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Registry, mapping-row and incoming problems that no single folder carries.
    problems: list[Problem] = field(default_factory=list)
    # Harmless oddities (the same ScanID twice in the mapping with the same code).
    notes: list[str] = field(default_factory=list)
    new_state: dict[str, Any] = field(default_factory=dict)
    stats: TickStats = field(default_factory=TickStats)
    mapping_source: str = ""


def encode_state(state: dict[str, Any]) -> str:
    """State -> compact JSON (the sensor cursor)."""
    return json.dumps(state, ensure_ascii=False, separators=(",", ":"))


def decode_state(cursor: str | None) -> dict[str, Any] | None:
    """Sensor cursor -> state; anything unreadable is treated as no state (a full re-scan, never a crash)."""
    if not cursor:
        return None
    try:
        state = json.loads(cursor)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def encode_cursor(data: dict[str, Any]) -> str:
    """The compact JSON zlib-compressed: what the sensor stores (a large tree's state stays a few tens of KB)."""
    return "z" + b64encode(zlib.compress(encode_state(data).encode("utf-8"), 6)).decode()


def decode_cursor(cursor: str | None) -> dict[str, Any] | None:
    """A stored cursor (compressed, or plain JSON) -> its data; anything unreadable -> None."""
    if cursor and cursor.startswith("z"):
        try:
            cursor = zlib.decompress(b64decode(cursor[1:])).decode("utf-8")
        except (ValueError, zlib.error):
            return None
    return decode_state(cursor)


def config_key(config: NeuroflowConfig) -> str:
    """Settings whose change invalidates every decision in the state (the folders are re-read)."""
    d = config.discovery
    text = json.dumps(
        [
            str(config.paths.dicom_incoming),
            d.layout,
            d.participant_first,
            config.protocol.model_dump(mode="json"),
        ],
        sort_keys=True,
    )
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def _previous_folders(state: dict[str, Any] | None, key: str) -> dict[str, list[Any]]:
    if not state or state.get("v") not in (1, STATE_VERSION) or state.get("k") != key:
        return {}
    folders = state.get("f")
    if not isinstance(folders, dict):
        return {}
    out: dict[str, list[Any]] = {}
    for sid, value in folders.items():
        if not isinstance(value, list) or len(value) < 2:
            continue
        if value[0] == "R":
            if state.get("v") == 1 or len(value) < 4:
                value = ["R", value[1], "", 0]  # version 1: the third item was a warned code
            out[sid] = value
        else:
            out[sid] = value[:2]
    return out


@dataclass
class _Pending:
    folder: SessionFolder
    walk: WalkResult
    headers: HeaderSummary
    recruitment_id: str
    source: str


@dataclass(frozen=True)
class _Unresolved:
    reason: HeldReason
    message: str


class _Tick:
    """The work of one tick, split into small steps; not part of the public API."""

    def __init__(
        self,
        config: NeuroflowConfig,
        state: dict[str, Any] | None,
        now: float,
        mapping: MappingResult,
        excluded: set[str],
        registry: Registry,
        time_budget_s: float | None = None,
        started: float | None = None,
    ) -> None:
        self.config = config
        self.time_budget_s = time_budget_s
        self.started = time.perf_counter() if started is None else started
        self.now = now
        self.wait_s = config.discovery.stability_wait_minutes * 60.0
        self.flat = config.discovery.layout == "flat"
        self.mapping = mapping
        self.overrides = normalize_overrides(config.mapping.label_overrides)
        self.excluded = excluded
        self.registry = registry
        self.key = config_key(config)
        self.prev = _previous_folders(state, self.key)
        rr = (state or {}).get("rr") if self.prev else None
        self.rr: dict[str, str] = {k: str(v) for k, v in rr.items()} if isinstance(rr, dict) else {}
        self.result = TickResult(mapping_source=mapping.source)
        self.stats = self.result.stats
        self.new: dict[str, list[Any]] = {}
        self.pending: list[_Pending] = []
        # Registered folders with an unchanged signature: candidates for the rewrite check.
        self.unchanged: list[tuple[SessionFolder, list[Any]]] = []

    # ------------------------------------------------------------------ helpers

    def hold(self, folder: SessionFolder, reason: HeldReason, message: str, entry: RegistryEntry | None = None) -> None:
        registered = entry.labels if entry is not None else ""
        self.result.held.append(
            Held(folder.scan_id, str(folder.path), reason, message, registered, blocks=reason == "remapped")
        )

    def keep(self, sid: str) -> None:
        """Leave the folder's state exactly as it was (nothing was decided about it this tick)."""
        prev = self.prev.get(sid)
        if prev is not None:
            self.new[sid] = prev

    def out_of_time(self) -> bool:
        return (
            self.time_budget_s is not None
            and self.stats.folders_walked > 0  # at least one per tick, so a slow mapping cannot stall us
            and time.perf_counter() - self.started > self.time_budget_s
        )

    def _mapped(self, scan_id: str, table: dict[str, Any]) -> Any:
        found = table.get(scan_id)
        return table.get(scan_id.strip()) if found is None else found

    def expected_label(self, code: str) -> str | None:
        """The label ``code`` would get, ignoring who owns it (for messages)."""
        key = code_key(code)
        if key in self.overrides:
            return self.overrides[key]
        try:
            decision = self.registry.decide_label(code, self.overrides)
        except IdentityError:
            return None
        if decision.label:
            return decision.label
        try:
            return participant_label(code)
        except IdentityError:
            return None

    def resolve(self, folder: SessionFolder) -> tuple[str, str] | _Unresolved:
        """(SubjectCode, source), or why the folder cannot be registered now."""
        sid = folder.scan_id
        if not self.flat:
            code = folder.subject_folder or ""
            source, where = "folder", f"subject folder {code!r}"
        else:
            if not self.mapping.usable:
                return _Unresolved("unmapped", f"no mapping available: {self.mapping.error}")
            problem = self._mapped(sid, self.mapping.problems)
            if problem is not None:
                return _Unresolved("mapping_error", problem)
            code = self._mapped(sid, self.mapping.mapping)
            if code is None:
                return _Unresolved("unmapped", f"ScanID {sid!r} is not in the mapping ({self.mapping.source})")
            source, where = self.mapping.source, f"ScanID {sid!r} ({self.mapping.where(sid.strip())})"
        try:
            decision = self.registry.decide_label(code, self.overrides)
        except IdentityError as exc:
            return _Unresolved("mapping_error", f"{where}: {exc}")
        if decision.problem:
            return _Unresolved("identity_conflict", f"{where}: {decision.problem}")
        return code, source

    def remap_conflict(self, folder: SessionFolder, entry: RegistryEntry) -> str | None:
        """Why a registered ScanID's binding no longer agrees with the mapping/overrides, or None."""
        sid = folder.scan_id
        registered = f"ScanID {sid!r} is registered as {entry.labels} (SubjectCode {entry.recruitment_id!r})"
        tail = (
            f"; labels are never moved silently: fix the mapping back, or move the session with "
            f"`neuroflow rekey {sid} --reason ...`. Until then no stage processes it"
        )
        code = entry.recruitment_id
        if self.flat and self.mapping.usable:
            problem = self._mapped(sid, self.mapping.problems)
            if problem is not None:
                return f"{registered}, but the mapping no longer says so clearly: {problem}{tail}"
            mapped = self._mapped(sid, self.mapping.mapping)
            if mapped is not None and code_key(mapped) != code_key(code):
                label = self.expected_label(mapped)
                target = f"participant label {label}" if label else "no valid participant label"
                return (
                    f"{registered}, but {self.mapping.where(sid.strip())} now says SubjectCode {mapped!r} "
                    f"({target}){tail}"
                )
        override = self.overrides.get(code_key(code))
        if override is not None and override != entry.participant_id:
            return f"{registered}, but mapping.label_overrides now gives that code the label {override}{tail}"
        return None

    # ------------------------------------------------------------------ per folder

    def visit(self, folder: SessionFolder) -> None:
        sid = folder.scan_id
        prev = self.prev.get(sid)
        if sid in self.excluded:
            self.hold(folder, "excluded", "excluded by an operator; not registered or processed")
            self.keep(sid)
            return
        if prev is not None:
            try:
                sig = tree_signature(folder.path, leaf_skip=str(prev[1]).startswith("L"))
            except FileNotFoundError:
                self.keep(sid)
                return  # vanished since listing: next tick reports it if it was registered
            except OSError as exc:
                self.hold_unreadable(folder, [os_error_text(exc)])
                return
            self.stats.folders_signed += 1
            self.stats.dirs_signed += sig.n_dirs
            if sig.value == prev[1] and self.visit_unchanged(folder, prev):
                return
        if self.out_of_time():
            # Out of time: leave the folder exactly as it was, the next tick picks it up.
            self.stats.folders_deferred += 1
            self.keep(sid)
            return
        self.visit_full(folder)

    def hold_unreadable(self, folder: SessionFolder, errors: list[str]) -> None:
        entry = self.registry.lookup(folder.scan_id)
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN]) + (
            f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        )
        what = "registered session kept as it was; changes are not picked up" if entry else "not registered"
        self.hold(folder, "unreadable", f"cannot read the folder: {shown}; {what} until it is readable", entry)
        self.keep(folder.scan_id)

    def visit_unchanged(self, folder: SessionFolder, prev: list[Any]) -> bool:
        """Decided folder with an unchanged signature; False if it needs the full path after all."""
        code = prev[0]
        sid = folder.scan_id
        if code == "R":
            entry = self.registry.lookup(sid)
            if entry is None:
                return False  # registry lost, edited by hand, or re-keyed: register from scratch
            conflict = self.remap_conflict(folder, entry)
            if conflict:
                self.hold(folder, "remapped", conflict, entry)
            else:
                self.unchanged.append((folder, prev))
            self.new[sid] = prev
            self.stats.folders_skipped += 1
            return True
        if code == "E":
            self.new[sid] = prev
            self.stats.folders_skipped += 1
            self.hold(folder, "no_dicom_yet", "no DICOM files yet (unchanged since the last check)")
            return True
        if code == "U":
            resolved = self.resolve(folder)
            if isinstance(resolved, _Unresolved) and sid not in self.registry:
                self.new[sid] = prev
                self.stats.folders_skipped += 1
                self.hold(folder, resolved.reason, resolved.message)
                return True
            return False  # resolvable now: walk and read it
        return False

    def visit_full(self, folder: SessionFolder, why: str = "") -> None:
        sid = folder.scan_id
        try:
            walk = stat_walk(folder.path)
        except FileNotFoundError:
            self.keep(sid)
            return  # vanished since listing
        except OSError as exc:
            self.hold_unreadable(folder, [os_error_text(exc)])
            return
        self.stats.folders_walked += 1
        self.stats.files_stated += walk.n_stat
        if walk.errors:
            self.hold_unreadable(folder, walk.errors)
            return
        entry = self.registry.lookup(sid)
        prev = self.prev.get(sid)
        if entry is not None and prev is not None and prev[0] == "R" and prev[2] == walk.fingerprint and not why:
            # Only directory times changed (permissions, owner, a move out and back, a hidden file): the
            # same files with the same size, time and inode. Nothing to re-check or re-convert.
            conflict = self.remap_conflict(folder, entry)
            if conflict:
                self.hold(folder, "remapped", conflict, entry)
            self.new[sid] = ["R", walk.signature.value, prev[2], prev[3]]
            return
        quiet_s = self.now - walk.latest_change
        if walk.churn or quiet_s < self.wait_s:
            wait_min = self.config.discovery.stability_wait_minutes
            ago = "files vanished while scanning" if walk.churn else f"last change {max(quiet_s, 0) / 60:.1f} min ago"
            self.hold(
                folder,
                "unstable",
                f"{why}still being copied? {ago}; waiting for {wait_min:g} min without changes",
                entry,
            )
            return
        if entry is not None:
            conflict = self.remap_conflict(folder, entry)
            if conflict:
                self.hold(folder, "remapped", conflict, entry)
                self.keep(sid)
                return
            resolved = self.resolve(folder)
            source = resolved[1] if isinstance(resolved, tuple) else "registry"
            recruitment = entry.recruitment_id
        else:
            resolved = self.resolve(folder)
            if isinstance(resolved, _Unresolved):
                self.new[sid] = ["U", walk.signature.value]
                self.hold(folder, resolved.reason, resolved.message)
                return
            recruitment, source = resolved
        if walk.n_files == 0 and entry is None:
            self.new[sid] = ["E", walk.signature.value]
            self.hold(folder, "no_dicom_yet", "folder is empty")
            return
        headers = read_headers(walk.candidates, folder.path)
        self.stats.folders_header_read += 1
        self.stats.header_files_read += headers.n_read
        if not self.flat and headers.n_dicom == 0 and entry is None:
            # Path layout: a leaf is a session only if it holds DICOM (docs/domain-rules.md#arrival).
            self.new[sid] = ["E", walk.signature.value]
            self.hold(
                folder,
                "no_dicom_yet",
                f"no readable DICOM among {walk.n_files} files"
                + (f" (e.g. {headers.unreadable_examples[0]})" if headers.unreadable_examples else ""),
            )
            return
        self.new[sid] = ["R", walk.signature.value, walk.fingerprint, int(self.now // DAY_S)]
        self.pending.append(_Pending(folder, walk, headers, recruitment, source))

    # ------------------------------------------------------------------ rewrites in place

    def rewrite_check(self) -> None:
        """Re-fingerprint a bounded slice of unchanged registered folders, round-robin, recent first.

        A file rewritten in place (same name, new content) changes no directory time, so the signature
        cannot see it. Budget: ``discovery.rewrite_check_files_per_tick`` file stats, half of them for
        folders registered within ``rewrite_check_recent_days`` (all of it when one group is empty);
        at least one folder per group and tick, so a folder larger than the budget is still checked.
        """
        budget = self.config.discovery.rewrite_check_files_per_tick
        if budget <= 0 or not self.unchanged:
            return
        horizon = (self.now - self.config.discovery.rewrite_check_recent_days * DAY_S) // DAY_S
        recent = sorted((c for c in self.unchanged if float(c[1][3] or 0) >= horizon), key=lambda c: c[0].scan_id)
        old = sorted((c for c in self.unchanged if float(c[1][3] or 0) < horizon), key=lambda c: c[0].scan_id)
        share = budget // 2 if recent and old else budget
        used = self._check_group(recent, "r", share)
        self._check_group(old, "o", budget - used)

    def _check_group(self, group: list[tuple[SessionFolder, list[Any]]], name: str, budget: int) -> int:
        if not group or budget <= 0:
            return 0
        last = self.rr.get(name, "")
        start = next((i for i, (f, _) in enumerate(group) if f.scan_id > last), 0)
        used = 0
        for folder, prev in group[start:] + group[:start]:
            if used >= budget or (used and self.out_of_time()):
                break
            sid = folder.scan_id
            try:
                fp = file_fingerprint(folder.path)
            except OSError:
                continue  # vanished or unreadable since the signature: the next tick says which
            used += max(fp.n_files, 1)
            self.rr[name] = sid
            self.stats.folders_rewrite_checked += 1
            self.stats.files_stated += fp.n_files
            if fp.errors:
                continue  # the signature path reports unreadable parts once their folder's times change
            if not prev[2]:
                self.new[sid] = [prev[0], prev[1], fp.value, prev[3]]  # first fingerprint (older state)
            elif fp.value != prev[2]:
                self.stats.folders_rewritten += 1
                self.result.warnings.append(
                    f"ScanID {sid!r}: files were rewritten in place since it was registered (same names, new "
                    "size or time); it is re-read and re-reported once stable"
                )
                del self.new[sid]
                self.visit_full(folder, "files rewritten in place; ")
        return used

    # ------------------------------------------------------------------ what is not in the listing

    def report_entry_problems(self, problems: list[EntryProblem]) -> None:
        for p in problems:
            folder = SessionFolder(p.scan_id, p.path)
            entry = self.registry.lookup(p.scan_id)
            message = p.message
            if entry is not None:
                message += f"; registered session kept as it was ({entry.labels})"
            elif p.subject_level and not self.flat:
                message += "; sessions under it are not scanned"
            self.hold(folder, p.reason, message, entry)  # type: ignore[arg-type]
            self.keep(p.scan_id)

    def report_missing(self, listed: set[str], problems: list[EntryProblem]) -> None:
        """Registered folders that are no longer in incoming: held as missing, their state kept."""
        bad = {p.scan_id for p in problems}
        bad_subjects = tuple(p.scan_id + "/" for p in problems if p.subject_level)
        incoming = self.config.paths.dicom_incoming
        for entry in self.registry.all():
            sid = entry.scan_id
            if sid in listed or sid in bad or sid in self.excluded or (bad_subjects and sid.startswith(bad_subjects)):
                continue
            self.hold(
                SessionFolder(sid, incoming / sid),
                "missing",
                f"registered as {entry.labels} (SubjectCode {entry.recruitment_id!r}) on "
                f"{entry.registered_at or '?'}, but its folder is no longer in {incoming}. Its registry row "
                "and every output are kept and nothing is re-run; if it comes back unchanged nothing happens, "
                "if it comes back changed it is re-checked like any changed session",
                entry,
            )
            self.keep(sid)

    # ------------------------------------------------------------------ registration

    def register_pending(self) -> None:
        """Assign labels in arrival order: acquisition time, then ScanID, for folders of the same tick."""
        self.pending.sort(key=lambda p: (p.headers.acquisition is None, p.headers.acquisition or "", p.folder.scan_id))
        requests = [
            AssignRequest(p.folder.scan_id, p.recruitment_id, p.headers.acquisition or "", str(p.folder.path))
            for p in self.pending
        ]
        assignments = self.registry.assign_many(requests, overrides=self.overrides)
        for p, a in zip(self.pending, assignments, strict=True):
            h = p.headers
            if a.entry is None:
                # Another code took the label earlier in this same tick (arrival order decides).
                sid = p.folder.scan_id
                self.new[sid] = ["U", p.walk.signature.value]
                if self.flat:
                    where = f"ScanID {sid!r} ({self.mapping.where(sid.strip())})"
                else:
                    where = f"subject folder {p.folder.subject_folder!r}"
                self.hold(p.folder, "identity_conflict", f"{where}: {a.refused}")
                continue
            self.result.registrations.append(
                Registration(
                    scan_id=p.folder.scan_id,
                    participant_label=a.entry.participant_id,
                    session_label=a.entry.session_id,
                    recruitment_id=a.entry.recruitment_id,
                    path=str(p.folder.path),
                    series=[s.as_row() for s in h.series],
                    n_dicom=h.n_dicom,
                    n_unreadable=h.n_unreadable,
                    unreadable_examples=list(h.unreadable_examples),
                    acquisition=h.acquisition,
                    mapping_source=p.source,
                    protocol=check_protocol(h.series, self.config.protocol, h.n_dicom, h.n_unreadable,
                                            h.unreadable_examples),
                    is_new_subject=a.is_new_subject,
                    is_new_session=a.is_new_session,
                )
            )

    def report_problems(self) -> None:
        for problem in self.registry.problems():
            self.result.problems.append(Problem("registry", f"{problem.kind}:{problem.key}", problem.message))
        if self.flat and self.mapping.usable:
            for text in self.mapping.row_problems:
                self.result.problems.append(Problem("mapping", text.split(" of ", 1)[0], text))
            self.result.notes.extend(self.mapping.notes)

    def run(self) -> TickResult:
        started = self.started
        if self.mapping.warning:
            self.result.warnings.append(self.mapping.warning)
        if self.mapping.error and self.flat:
            self.result.warnings.append(f"mapping unavailable, new folders are held as unmapped: {self.mapping.error}")
        self.report_problems()
        try:
            listing = scan_incoming(
                self.config.paths.dicom_incoming,
                self.config.discovery.layout,
                self.config.discovery.participant_first,
            )
        except IncomingFolderError as exc:
            # An unmounted share must not wipe the decisions: keep the previous state as it is.
            message = f"{exc}; nothing scanned this tick (every folder keeps its last state; is the share mounted?)"
            self.result.warnings.append(message)
            self.result.problems.append(Problem("incoming", "incoming", message))
            self.result.new_state = {"v": STATE_VERSION, "k": self.key, "f": dict(self.prev)}
            if self.rr:
                self.result.new_state["rr"] = self.rr
            self.stats.seconds = time.perf_counter() - started
            return self.result
        folders = listing.folders
        self.stats.folders_seen = len(folders)
        self.report_entry_problems(listing.problems)
        for folder in folders:
            self.visit(folder)
        self.rewrite_check()
        self.register_pending()
        self.report_missing({f.scan_id for f in folders}, listing.problems)
        if self.stats.folders_deferred:
            self.result.warnings.append(
                f"{self.stats.folders_deferred} of {len(folders)} folders left for the next tick: this tick "
                f"used its {self.time_budget_s:g} s budget (first scan of a large archive?)"
            )
        self.result.new_state = {"v": STATE_VERSION, "k": self.key, "f": self.new}
        if self.rr:
            self.result.new_state["rr"] = self.rr
        self.stats.registered = len(self.result.registrations)
        self.stats.held = len(self.result.held)
        self.stats.seconds = time.perf_counter() - started
        return self.result


def run_discovery(
    config: NeuroflowConfig,
    state: dict[str, Any] | None,
    now: float | None = None,
    mapping_result: MappingResult | None = None,
    excluded: Iterable[str] | None = None,
    *,
    dry_run: bool = False,
    registry: Registry | None = None,
    http_client: Any = None,
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
) -> TickResult:
    """Run one discovery tick.

    ``state``: the previous tick's ``new_state`` (None = first tick / full scan). ``now``: epoch seconds
    used for the stability rule (tests pass it instead of sleeping). ``mapping_result``: a mapping already
    fetched this tick (else it is loaded; in layout ``subject_session`` no mapping is needed).
    ``excluded``: ScanIDs an operator excluded. ``dry_run``: compute the same result, including the labels
    new sessions would get, without writing the registry or the mapping cache. ``time_budget_s``: stop
    starting new folder walks/header reads after this many seconds (the rest are decided on later ticks),
    so the first tick over a large archive cannot exceed Dagster's 60 s sensor timeout and start over
    forever; ``None`` = no limit. Header reads run at roughly 1,000 files/s per core.
    """
    started = time.perf_counter()
    flat = config.discovery.layout == "flat"
    if not flat:
        mapping = MappingResult(source="folder")
    elif mapping_result is not None:
        mapping = mapping_result
    else:
        mapping = load_mapping(config, http_client=http_client, write=not dry_run)
    if registry is None:
        registry = Registry(config.paths.state, persist=not dry_run)
    else:
        registry.reload()
    tick = _Tick(
        config,
        state,
        time.time() if now is None else now,
        mapping,
        set(excluded or ()),
        registry,
        time_budget_s,
        started,
    )
    return tick.run()


def dry_run_discovery(
    config: NeuroflowConfig, excluded: Iterable[str] | None = None, now: float | None = None
) -> TickResult:
    """What a full scan would register now (``neuroflow scan --dry-run``): nothing is written."""
    return run_discovery(config, None, now=now, excluded=excluded, dry_run=True, time_budget_s=None)


def state_size_bytes(state: dict[str, Any]) -> int:
    return len(encode_state(state).encode("utf-8"))


__all__ = [
    "ALERT_REASONS",
    "Held",
    "Problem",
    "Registration",
    "TickResult",
    "TickStats",
    "decode_cursor",
    "decode_state",
    "dry_run_discovery",
    "encode_cursor",
    "encode_state",
    "run_discovery",
]
