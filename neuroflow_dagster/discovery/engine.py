"""One discovery tick: folders -> (stability, mapping, headers, protocol) -> registrations and held folders.

Plain Python so the Dagster sensor stays a thin wrapper and ``neuroflow scan [--dry-run]`` runs the very
same code. The sensor stores :attr:`TickResult.new_state` as its cursor; the state holds, per decided
folder, a status code and a cheap directory signature (see ``scanner.tree_signature``), so an unchanged
folder costs one stat per directory (plus a scandir of those with subfolders), no file stat and no
header read. Folders are re-tried when their signature changes, when the config key changes
(incoming path, layout, protocol rules), or when the registry no longer knows them.

State format (compact on purpose, it is a sensor cursor)::

    {"v": 1, "k": "<config key>", "f": {"<scan id>": ["R" | "U" | "E", "<L|F><signature>", "<warned code>"?]}}

``R`` registered, ``U`` stable but unmapped (re-tried against every tick's mapping without re-reading),
``E`` stable but empty / no DICOM. Unstable folders are not stored: they are fully walked every tick.
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
    participant_label,
)
from neuroflow_dagster.discovery.mapping import MappingResult, load_mapping
from neuroflow_dagster.discovery.protocol import ProtocolResult, check_protocol
from neuroflow_dagster.discovery.scanner import (
    HeaderSummary,
    IncomingFolderError,
    SessionFolder,
    WalkResult,
    list_session_folders,
    read_headers,
    stat_walk,
    tree_signature,
)

STATE_VERSION = 1
# Dagster cancels a sensor tick after 60 s and then stores no cursor: stay well inside it.
DEFAULT_TIME_BUDGET_S = 40.0
HeldReason = Literal["unstable", "unmapped", "no_dicom_yet", "excluded"]


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
    """A folder seen but not registered this tick, with a reason code and a message for operators."""

    scan_id: str
    path: str
    reason: HeldReason
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
    if not state or state.get("v") != STATE_VERSION or state.get("k") != key:
        return {}
    folders = state.get("f")
    if not isinstance(folders, dict):
        return {}
    return {k: v for k, v in folders.items() if isinstance(v, list) and len(v) >= 2}


@dataclass
class _Pending:
    folder: SessionFolder
    walk: WalkResult
    headers: HeaderSummary
    recruitment_id: str
    source: str


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
        self.excluded = excluded
        self.registry = registry
        self.key = config_key(config)
        self.prev = _previous_folders(state, self.key)
        self.result = TickResult(mapping_source=mapping.source)
        self.stats = self.result.stats
        self.new: dict[str, list[Any]] = {}
        self.pending: list[_Pending] = []

    # ------------------------------------------------------------------ helpers

    def hold(self, folder: SessionFolder, reason: HeldReason, message: str) -> None:
        self.result.held.append(Held(folder.scan_id, str(folder.path), reason, message))

    def resolve(self, folder: SessionFolder) -> tuple[str | None, str]:
        """(SubjectCode, source) or (None, why not)."""
        if not self.flat:
            code = folder.subject_folder or ""
            try:
                participant_label(code)
            except IdentityError as exc:
                return None, str(exc)
            return code, "folder"
        if not self.mapping.usable:
            return None, f"no mapping available: {self.mapping.error}"
        code = self.mapping.mapping.get(folder.scan_id)
        if code is None:
            code = self.mapping.mapping.get(folder.scan_id.strip())
        if code is None:
            return None, f"ScanID {folder.scan_id!r} is not in the mapping ({self.mapping.source})"
        try:
            participant_label(code)
        except IdentityError as exc:
            return None, f"ScanID {folder.scan_id!r}: {exc}"
        return code, self.mapping.source

    def check_conflict(self, folder: SessionFolder, entry_code: str, warned: str | None) -> str | None:
        """Warn (once per differing code) when the mapping no longer agrees with the registry."""
        if not self.flat or not self.mapping.usable:
            return warned
        code = self.mapping.mapping.get(folder.scan_id)
        if code is None or code == entry_code:
            return None
        if code != warned:
            entry = self.registry.lookup(folder.scan_id)
            labels = f"sub-{entry.participant_id} ses-{entry.session_id}" if entry else "?"
            self.result.warnings.append(
                f"ScanID {folder.scan_id!r} is registered as {labels} (SubjectCode {entry_code!r}) but the "
                f"mapping now says {code!r}; registered labels are never reassigned - fix the mapping or "
                "re-register by hand"
            )
        return code

    # ------------------------------------------------------------------ per folder

    def visit(self, folder: SessionFolder) -> None:
        sid = folder.scan_id
        prev = self.prev.get(sid)
        if sid in self.excluded:
            self.hold(folder, "excluded", "excluded by an operator; not registered or processed")
            if prev is not None:
                self.new[sid] = prev
            return
        if prev is not None:
            try:
                sig = tree_signature(folder.path, leaf_skip=str(prev[1]).startswith("L"))
            except OSError:
                return  # vanished since listing
            self.stats.folders_signed += 1
            self.stats.dirs_signed += sig.n_dirs
            if sig.value == prev[1] and self.visit_unchanged(folder, prev):
                return
        if (
            self.time_budget_s is not None
            and self.stats.folders_walked > 0  # at least one per tick, so a slow mapping cannot stall us
            and time.perf_counter() - self.started > self.time_budget_s
        ):
            # Out of time: leave the folder exactly as it was, the next tick picks it up.
            self.stats.folders_deferred += 1
            if prev is not None:
                self.new[sid] = prev
            return
        self.visit_full(folder)

    def visit_unchanged(self, folder: SessionFolder, prev: list[Any]) -> bool:
        """Decided folder with an unchanged signature; False if it needs the full path after all."""
        code = prev[0]
        sid = folder.scan_id
        if code == "R":
            entry = self.registry.lookup(sid)
            if entry is None:
                return False  # registry lost or edited by hand: re-register from scratch
            warned = self.check_conflict(folder, entry.recruitment_id, prev[2] if len(prev) > 2 else None)
            self.new[sid] = [code, prev[1], warned] if warned else [code, prev[1]]
            self.stats.folders_skipped += 1
            return True
        if code == "E":
            self.new[sid] = prev
            self.stats.folders_skipped += 1
            self.hold(folder, "no_dicom_yet", "no DICOM files yet (unchanged since the last check)")
            return True
        if code == "U":
            recruitment, why = self.resolve(folder)
            if recruitment is None and sid not in self.registry:
                self.new[sid] = prev
                self.stats.folders_skipped += 1
                self.hold(folder, "unmapped", why)
                return True
            return False  # mapped now: walk and read it
        return False

    def visit_full(self, folder: SessionFolder) -> None:
        sid = folder.scan_id
        try:
            walk = stat_walk(folder.path)
        except OSError:
            return  # vanished since listing
        self.stats.folders_walked += 1
        self.stats.files_stated += walk.n_stat
        quiet_s = self.now - walk.latest_change
        if walk.churn or quiet_s < self.wait_s:
            wait_min = self.config.discovery.stability_wait_minutes
            ago = "files vanished while scanning" if walk.churn else f"last change {max(quiet_s, 0) / 60:.1f} min ago"
            self.hold(folder, "unstable", f"still being copied? {ago}; waiting for {wait_min:g} min without changes")
            return
        entry = self.registry.lookup(sid)
        recruitment, source = self.resolve(folder)
        warned = None
        if entry is not None:
            prev = self.prev.get(sid)
            warned = self.check_conflict(
                folder, entry.recruitment_id, prev[2] if prev is not None and len(prev) > 2 else None
            )
            source = source if recruitment is not None else "registry"
            recruitment = entry.recruitment_id
        elif recruitment is None:
            self.new[sid] = ["U", walk.signature.value]
            self.hold(folder, "unmapped", source)
            return
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
        assert recruitment is not None
        self.new[sid] = ["R", walk.signature.value, warned] if warned else ["R", walk.signature.value]
        self.pending.append(_Pending(folder, walk, headers, recruitment, source))

    # ------------------------------------------------------------------ registration

    def register_pending(self) -> None:
        """Assign labels in arrival order: acquisition time, then ScanID, for folders of the same tick."""
        self.pending.sort(key=lambda p: (p.headers.acquisition is None, p.headers.acquisition or "", p.folder.scan_id))
        requests = [
            AssignRequest(p.folder.scan_id, p.recruitment_id, p.headers.acquisition or "", str(p.folder.path))
            for p in self.pending
        ]
        assignments = self.registry.assign_many(requests)
        for p, a in zip(self.pending, assignments, strict=True):
            h = p.headers
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
                    protocol=check_protocol(h.series, self.config.protocol, h.n_dicom),
                    is_new_subject=a.is_new_subject,
                    is_new_session=a.is_new_session,
                )
            )

    def run(self) -> TickResult:
        started = self.started
        if self.mapping.warning:
            self.result.warnings.append(self.mapping.warning)
        if self.mapping.error and self.flat:
            self.result.warnings.append(f"mapping unavailable, new folders are held as unmapped: {self.mapping.error}")
        try:
            folders = list_session_folders(
                self.config.paths.dicom_incoming,
                self.config.discovery.layout,
                self.config.discovery.participant_first,
            )
        except IncomingFolderError as exc:
            # An unmounted share must not wipe the decisions: keep the previous state as it is.
            self.result.warnings.append(f"{exc}; nothing scanned this tick")
            self.result.new_state = {"v": STATE_VERSION, "k": self.key, "f": dict(self.prev)}
            self.stats.seconds = time.perf_counter() - started
            return self.result
        self.stats.folders_seen = len(folders)
        for folder in folders:
            self.visit(folder)
        self.register_pending()
        if self.stats.folders_deferred:
            self.result.warnings.append(
                f"{self.stats.folders_deferred} of {len(folders)} folders left for the next tick: this tick "
                f"used its {self.time_budget_s:g} s budget (first scan of a large archive?)"
            )
        self.result.new_state = {"v": STATE_VERSION, "k": self.key, "f": self.new}
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
    "Held",
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
