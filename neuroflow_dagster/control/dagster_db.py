"""Dagster's storage tables, read directly (SQL by table and column name), for `neuroflow status`.

`neuroflow status` must answer in about a second at 20,000 sessions; importing `dagster` alone
costs 1.2-1.5 s of a CLI process, and Dagster's record APIs build Python objects per row. So the
status read side opens the instance's databases itself, from its dagster.yaml, with the plain
DB-API driver (``sqlite3``; ``psycopg2`` for PostgreSQL) and asks for exactly the columns it
needs, in one grouped query per asset. This module never imports dagster.

Where the storage lives (`Db.from_home`): dagster.yaml with no storage key, or ``storage:
sqlite:``, is SQLite under the base dir (the event log's cross-run index shard
``history/runs/index.db`` holds every asset and check event; runs are in ``history/runs.db``);
``storage: postgres:`` and this project's pooled ``storage: custom:``
(neuroflow_dagster.pooled_storage) are PostgreSQL (``postgres_url`` or ``postgres_db``, ``{env:
VAR}`` values). Any other storage is opened through Dagster (lazy import) and its own SQLAlchemy
connections are used for the same SQL (`Db.from_instance`, control/instance.open_db), so there is
one set of queries.

Dagster's names used in SQL (event types, run and check statuses) are stable enum values; they are
named here once and pinned against Dagster's enums by neuroflow_dagster_tests/test_dagster_db.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

# --- Dagster's enum values (DagsterEventType, DagsterRunStatus, AssetCheckExecutionRecordStatus)
ASSET_MATERIALIZATION = "ASSET_MATERIALIZATION"
ASSET_MATERIALIZATION_PLANNED = "ASSET_MATERIALIZATION_PLANNED"
STEP_FAILURE = "STEP_FAILURE"
RUN_FAILURE = "PIPELINE_FAILURE"  # DagsterEventType.RUN_FAILURE keeps its legacy value
RUN_IN_PROGRESS = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED")
RUN_RUNNING = ("STARTING", "STARTED")
RUN_FAILED = ("FAILURE", "CANCELED", "CANCELING")
CHECK_SUCCEEDED = "SUCCEEDED"
CHECK_FAILED = "FAILED"

CHUNK = 500  # keeps IN (...) lists under SQLite's variable limit
SQLITE_INDEX_DB = "history/runs/index.db"
SQLITE_RUNS_DB = "history/runs.db"
POOLED_MODULE = "neuroflow_dagster.pooled_storage"
NOT_APPLICABLE_TEXT = '"not_applicable"'


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def asset_key_string(asset: str) -> str:
    """The event log's `asset_key` column for a user-facing key ("a/b" -> '["a", "b"]'), as AssetKey.to_string."""
    return json.dumps(asset.split("/"))


@dataclass(frozen=True)
class CheckState:
    """The latest execution of a partitioned check: SUCCEEDED / FAILED / PLANNED / ..., and why it failed."""

    status: str
    reason: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)  # a failed one's plain metadata values


@dataclass(frozen=True)
class StepFailure:
    """A step that failed in a run: its failure class (metadata ``neuroflow/failure_class``), its message
    (the failure's description, else the error's) and the error's class name."""

    failure_class: str
    message: str
    error_class: str = ""


@dataclass(frozen=True)
class RunFailure:
    """What a failed run says: the steps that failed (step key -> StepFailure), the run's own failure
    message and the class a run tag gives (the run launcher tags a run whose worker died)."""

    steps: dict[str, StepFailure]
    message: str = ""
    tagged_class: str = ""


@dataclass(frozen=True)
class RunInfo:
    """What status needs of a run: its id, status, tags, and the assets / checks it selected."""

    run_id: str
    status: str
    tags: Mapping[str, str]
    assets: frozenset[str]  # user strings ("bids_session"); empty: no explicit selection
    checks: frozenset[tuple[str, str]]  # (asset user string, check name)


class StorageConfigError(Exception):
    """dagster.yaml names a storage this reader cannot open itself (the caller opens it through Dagster)."""


def _env(value: Any) -> Any:
    """Dagster's ``{env: VAR}`` config values."""
    if isinstance(value, Mapping) and set(value) == {"env"}:
        name = str(value["env"])
        if name not in os.environ:
            raise StorageConfigError(f"dagster.yaml reads ${name}, which is not set")
        return os.environ[name]
    return value


def _pg_url(config: Mapping[str, Any]) -> str:
    """dagster-postgres' `postgres_url`, or the URL its `postgres_db` block spells (same rules)."""
    from urllib.parse import quote, urlencode

    if config.get("postgres_url"):
        return str(_env(config["postgres_url"]))
    db = {k: _env(v) for k, v in dict(config.get("postgres_db") or {}).items()}
    if not db:
        raise StorageConfigError("postgres storage config has neither postgres_url nor postgres_db")
    user, password = quote(str(db.get("username", ""))), str(db.get("password") or "")
    userinfo = f"{user}:{quote(password)}" if password else user
    host = f"{db.get('hostname', '')}:{db.get('port', 5432)}"
    url = f"{db.get('scheme', 'postgresql')}://{userinfo}@{host}/{db.get('db_name', '')}"
    if db.get("params"):
        url += "?" + urlencode(db["params"], quote_via=quote)
    return url


def storage_location(home: Path) -> tuple[str, Any]:
    """("sqlite", base dir) or ("postgres", url) from `home`/dagster.yaml; StorageConfigError otherwise."""
    path = Path(home) / "dagster.yaml"
    settings = (yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None) or {}
    if any(k in settings for k in ("run_storage", "event_log_storage")):
        raise StorageConfigError("dagster.yaml configures run_storage / event_log_storage separately")
    storage = settings.get("storage")
    if not storage:
        return "sqlite", Path(home)
    if not isinstance(storage, Mapping) or len(storage) != 1:
        raise StorageConfigError("dagster.yaml's storage: has not exactly one kind")
    kind, body = next(iter(storage.items()))
    body = body or {}
    if kind == "sqlite":
        base = _env(body.get("base_dir")) if body.get("base_dir") else None
        return "sqlite", Path(base) if base else Path(home)
    if kind == "postgres":
        return "postgres", _pg_url(body)
    if kind == "custom" and body.get("module") == POOLED_MODULE:
        return "postgres", _pg_url(body.get("config") or {})
    raise StorageConfigError(f"dagster.yaml's storage: {kind} is not read directly")


class Db:
    """Two DB-API connections (event log index, runs; the same one on PostgreSQL) and their paramstyle."""

    def __init__(self, events: Any, runs: Any, placeholder: str, dialect: str, shards: Path | None = None) -> None:
        self.events = events
        self.runs = runs
        self.placeholder = placeholder  # "?" (sqlite3) or "%s" (psycopg2)
        self.dialect = dialect
        # SQLite keeps a run's own events (step failures) in a shard per run, <shards>/<run id>.db; the
        # index shard (`events`) has the asset events only. PostgreSQL keeps them all in `events`.
        self.shards = shards

    # -------------------------------------------------------------- opening
    @classmethod
    @contextmanager
    def from_home(cls, home: Path) -> Iterator[Db]:
        """The instance at `home` read directly; StorageConfigError if its storage is not one of those above
        (control/instance.open_db then uses Dagster's own connections)."""
        kind, where = storage_location(home)
        if kind == "sqlite":
            events = _sqlite_ro(Path(where) / SQLITE_INDEX_DB)
            runs = _sqlite_ro(Path(where) / SQLITE_RUNS_DB)
            try:
                yield cls(events, runs, "?", "sqlite", Path(where) / "history" / "runs")
            finally:
                events.close()
                runs.close()
            return
        import psycopg2

        conn = psycopg2.connect(_libpq_url(str(where)))
        conn.set_session(readonly=True, autocommit=True)
        try:
            yield cls(conn, conn, "%s", "postgresql")
        finally:
            conn.close()

    @classmethod
    @contextmanager
    def from_instance(cls, instance: Any) -> Iterator[Db]:
        """A DagsterInstance's SQL storages (their SQLAlchemy connections, used through DB-API)."""
        with instance.event_log_storage.index_connection() as ev, instance.run_storage.connect() as rn:
            dialect = ev.dialect.name
            placeholder = "?" if ev.dialect.paramstyle == "qmark" else "%s"
            base = getattr(instance.event_log_storage, "_base_dir", None) if dialect == "sqlite" else None
            yield cls(ev.connection.dbapi_connection, rn.connection.dbapi_connection, placeholder, dialect,
                      Path(base) if base else None)

    # -------------------------------------------------------------- querying
    def _rows(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        cur = conn.cursor()
        try:
            cur.execute(sql, tuple(params))
            return cur.fetchall()
        finally:
            cur.close()

    def events_rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._rows(self.events, sql, params)

    def runs_rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._rows(self.runs, sql, params)

    def _marks(self, n: int) -> str:
        return ", ".join("?" * n)

    def _wipe_filter(self, asset: str) -> tuple[str, list[Any]]:
        """SQL and parameters keeping only events after the asset's last wipe (as Dagster's own queries do)."""
        rows = self.events_rows("SELECT asset_details FROM asset_keys WHERE asset_key = ?", [asset_key_string(asset)])
        details = json.loads(rows[0][0]) if rows and rows[0][0] else {}
        wiped = details.get("last_wipe_timestamp") if isinstance(details, dict) else None
        if not wiped:
            return "", []
        at = datetime.fromtimestamp(float(wiped), timezone.utc).replace(tzinfo=None)
        return " AND timestamp > ?", [at.strftime("%Y-%m-%d %H:%M:%S.%f") if self.dialect == "sqlite" else at]

    # -------------------------------------------------------------- reads
    def latest_ids(self, asset: str, *, planned: bool = True) -> tuple[dict[str, int], dict[str, int]]:
        """(latest materialization, latest planned materialization) storage id per partition, one query
        (`planned=False`: materializations only, half the rows)."""
        wipe, wipe_params = self._wipe_filter(asset)
        types = [ASSET_MATERIALIZATION, ASSET_MATERIALIZATION_PLANNED] if planned else [ASSET_MATERIALIZATION]
        rows = self.events_rows(
            'SELECT dagster_event_type, "partition", MAX(id) FROM event_logs '
            f'WHERE asset_key = ? AND "partition" IS NOT NULL AND dagster_event_type IN ({self._marks(len(types))})'
            + wipe + ' GROUP BY dagster_event_type, "partition"',
            [asset_key_string(asset), *types, *wipe_params],
        )
        mats: dict[str, int] = {}
        planned: dict[str, int] = {}
        for event_type, partition, sid in rows:
            (mats if event_type == ASSET_MATERIALIZATION else planned)[partition] = sid
        return mats, planned

    def event_run_ids(self, storage_ids: Iterable[int]) -> dict[int, str]:
        """storage id -> run id of those events."""
        ids = sorted(set(storage_ids))
        out: dict[int, str] = {}
        for chunk in chunks(ids):
            for sid, run_id in self.events_rows(
                f"SELECT id, run_id FROM event_logs WHERE id IN ({self._marks(len(chunk))})", chunk
            ):
                out[int(sid)] = run_id
        return out

    def open_attempts(self, asset: str, done: dict[str, int], planned: dict[str, int]) -> dict[str, tuple[str, int]]:
        """partition -> (run id, storage id) of its latest planned materialization that has no materialization."""
        open_ids = {sid: p for p, sid in planned.items() if sid > done.get(p, 0)}
        runs = self.event_run_ids(open_ids)
        return {open_ids[sid]: (run_id, sid) for sid, run_id in runs.items()}

    def run_statuses(self, run_ids: Iterable[str]) -> dict[str, str]:
        """run id -> DagsterRunStatus value."""
        ids = sorted(set(run_ids))
        out: dict[str, str] = {}
        for chunk in chunks(ids):
            out.update(
                self.runs_rows(f"SELECT run_id, status FROM runs WHERE run_id IN ({self._marks(len(chunk))})", chunk)
            )
        return out

    def in_progress_runs(self) -> list[RunInfo]:
        """Every queued or running run (one query; their serialized bodies give tags and selections)."""
        rows = self.runs_rows(
            f"SELECT run_id, status, run_body FROM runs WHERE status IN ({self._marks(len(RUN_IN_PROGRESS))})",
            RUN_IN_PROGRESS,
        )
        return [_run_info(run_id, status, body) for run_id, status, body in rows]

    def not_applicable_partitions(self, asset: str, latest: dict[str, int]) -> set[str]:
        """Partitions whose latest materialization says `neuroflow/status: not_applicable`.

        Deserializing every materialization is most of the cost of reading metadata, and only a few are
        "not applicable"; so SQL finds the materializations whose stored text carries that value (quoted:
        only a value exactly "not_applicable", which this project writes under `neuroflow/status` only),
        and the answer is kept where it is the partition's latest one.
        """
        rows = self.events_rows(
            'SELECT "partition", id FROM event_logs WHERE asset_key = ? AND dagster_event_type = ? AND event LIKE ?',
            [asset_key_string(asset), ASSET_MATERIALIZATION, f"%{NOT_APPLICABLE_TEXT}%"],
        )
        return {p for p, i in rows if p is not None and latest.get(p) == i}

    def latest_check_states(self, asset: str, check_name: str) -> dict[str, CheckState]:
        """partition -> CheckState of any partitioned asset check's latest execution (one grouped query);
        only failed ones are read, for their reason (the evaluation's description, else metadata
        "reason") and their plain metadata values."""
        key = asset_key_string(asset)
        rows = self.events_rows(
            'SELECT "partition", execution_status, id FROM asset_check_executions WHERE id IN ('
            "SELECT MAX(id) FROM asset_check_executions WHERE asset_key = ? AND check_name = ? "
            'AND evaluation_event_storage_id IS NOT NULL GROUP BY "partition")',
            [key, check_name],
        )
        out = {p: CheckState(str(status)) for p, status, _ in rows if p is not None}
        failed = sorted(i for p, status, i in rows if p is not None and status == CHECK_FAILED)
        for chunk in chunks(failed):
            sql = 'SELECT "partition", evaluation_event FROM asset_check_executions WHERE id IN ({})'
            for partition, body in self.events_rows(sql.format(self._marks(len(chunk))), chunk):
                out[partition] = CheckState(CHECK_FAILED, *_check_failure(body))
        return out

    def materialization_metadata(self, storage_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """storage id -> plain metadata values of those materializations (read for a few, never for all)."""
        ids = sorted(set(storage_ids))
        out: dict[int, dict[str, Any]] = {}
        for chunk in chunks(ids):
            for sid, body in self.events_rows(
                f"SELECT id, event FROM event_logs WHERE id IN ({self._marks(len(chunk))})", chunk
            ):
                mat = _specific_data(body).get("materialization") or {}
                out[int(sid)] = _metadata(mat.get("metadata_entries") or mat.get("metadata"))
        return out

    def run_failures(self, run_ids: Iterable[str], failure_class_key: str) -> dict[str, RunFailure]:
        """run id -> RunFailure, for failed runs (their STEP_FAILURE and RUN_FAILURE events and tags)."""
        ids = sorted(set(run_ids))
        steps: dict[str, dict[str, StepFailure]] = {r: {} for r in ids}
        messages: dict[str, str] = {}
        tagged: dict[str, str] = {}
        for chunk in chunks(ids):
            marks = self._marks(len(chunk))
            for run_id, step_key, event_type, body in self._run_events(chunk, (STEP_FAILURE, RUN_FAILURE)):
                if event_type == RUN_FAILURE:
                    messages[run_id] = _event_message(body)
                else:
                    steps[run_id][str(step_key or "")] = _step_failure(body, failure_class_key)
            for run_id, _status, body in self.runs_rows(
                f"SELECT run_id, status, run_body FROM runs WHERE run_id IN ({marks})", chunk
            ):
                tagged[run_id] = _run_info(run_id, "", body).tags.get(failure_class_key, "")
        return {r: RunFailure(steps[r], messages.get(r, ""), tagged.get(r, "")) for r in ids}

    def _run_events(self, run_ids: Sequence[str], types: Sequence[str]) -> list[tuple[Any, ...]]:
        """(run id, step key, event type, event) of the runs' events of those types, in order."""
        sql = (
            "SELECT run_id, step_key, dagster_event_type, event FROM event_logs WHERE run_id IN ({}) "
            "AND dagster_event_type IN ({}) ORDER BY id"
        )
        if self.shards is None:
            return self.events_rows(sql.format(self._marks(len(run_ids)), self._marks(len(types))), [*run_ids, *types])
        rows: list[tuple[Any, ...]] = []
        for run_id in run_ids:
            shard = self.shards / f"{run_id}.db"
            if not shard.is_file():
                continue
            conn = _sqlite_ro(shard)
            try:
                rows += conn.execute(sql.format("?", self._marks(len(types))), [run_id, *types]).fetchall()
            finally:
                conn.close()
        return rows

    def held_pools(self, pools: Sequence[str]) -> list[str]:
        """The pools whose limit was set to 0 explicitly (the disk guard's hold), as diskspace.held_pools."""
        if not pools:
            return []
        rows = self.events_rows(
            f'SELECT concurrency_key, "limit", using_default_limit FROM concurrency_limits '
            f"WHERE concurrency_key IN ({self._marks(len(pools))})",
            list(pools),
        )
        held = {key for key, limit, default in rows if limit == 0 and not default}
        return [p for p in pools if p in held]


def _sqlite_ro(path: Path) -> sqlite3.Connection:
    """Read-only: never create a database file (storage.py: creation races with a starting Dagster)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def _libpq_url(url: str) -> str:
    """SQLAlchemy-style driver suffixes ("postgresql+psycopg2://") are not libpq's."""
    scheme, sep, rest = url.partition("://")
    return ("postgresql" if scheme.startswith("postgres") else scheme) + sep + rest


def _frozenset_items(value: Any) -> list[Any]:
    if isinstance(value, Mapping) and "__frozenset__" in value:
        return list(value["__frozenset__"])
    return list(value or [])


def _user_key(value: Any) -> str:
    return "/".join((value or {}).get("path", []))


def _run_info(run_id: str, status: str, body: str) -> RunInfo:
    """Tags and selections from a serialized DagsterRun (Dagster's serdes JSON)."""
    run = json.loads(body) if body else {}
    return RunInfo(
        run_id=run_id,
        status=status,
        tags={str(k): str(v) for k, v in dict(run.get("tags") or {}).items()},
        assets=frozenset(_user_key(k) for k in _frozenset_items(run.get("asset_selection"))),
        checks=frozenset(
            (_user_key(k.get("asset_key")), str(k.get("name")))
            for k in _frozenset_items(run.get("asset_check_selection"))
        ),
    )


PLAIN_FIELDS = ("text", "value", "data", "md_str", "path", "url")


def _plain(value: Any) -> Any:
    """A serialized metadata value's plain value, as `.value` of Dagster's (TextMetadataEntryData -> its
    text, Int/Float/Bool -> value, Json -> data, Path -> path, Null -> None); anything else as stored."""
    if isinstance(value, Mapping) and "__class__" in value:
        if str(value["__class__"]).startswith("Null"):
            return None
        for name in PLAIN_FIELDS:
            if name in value:
                return value[name]
    return value


def _metadata(stored: Any) -> dict[str, Any]:
    """Plain metadata values, stored as a mapping (check evaluations) or as Dagster's legacy list of
    ``EventMetadataEntry`` {label, entry_data} (materializations, step failures)."""
    if isinstance(stored, Mapping):
        return {str(k): _plain(v) for k, v in stored.items()}
    if isinstance(stored, list):
        return {str(e.get("label")): _plain(e.get("entry_data")) for e in stored if isinstance(e, Mapping)}
    return {}


def _specific_data(body: str | None) -> dict[str, Any]:
    """A serialized EventLogEntry's ``dagster_event.event_specific_data`` ({} when unreadable)."""
    try:
        event = json.loads(body or "{}")
        data = (event.get("dagster_event") or {}).get("event_specific_data") or {}
        return data if isinstance(data, dict) else {}
    except (ValueError, AttributeError):
        return {}


def _event_message(body: str | None) -> str:
    try:
        event = json.loads(body or "{}")
        return str(event.get("user_message") or (event.get("dagster_event") or {}).get("message") or "")
    except (ValueError, AttributeError):
        return ""


def _step_failure(body: str | None, failure_class_key: str) -> StepFailure:
    """A STEP_FAILURE event's class, message and error class (StepFailureData, serialized)."""
    data = _specific_data(body)
    user = data.get("user_failure_data") or {}
    meta = _metadata(user.get("metadata_entries") or user.get("metadata"))
    error = data.get("error") or {}
    wrapper = "DagsterExecutionStepExecutionError"
    while isinstance(error, dict) and error.get("cause") and error.get("cls_name") == wrapper:
        error = error["cause"]  # the user code's error, not Dagster's wrapper
    message = str(user.get("description") or (error or {}).get("message") or "").strip()
    return StepFailure(str(meta.get(failure_class_key) or ""), message, str((error or {}).get("cls_name") or ""))


def _check_failure(body: str | None) -> tuple[str, dict[str, Any]]:
    """Why a check failed (its evaluation's description, else its metadata "reason") and its metadata."""
    try:
        event = json.loads(body or "{}")
        data = (event.get("dagster_event") or {}).get("event_specific_data") or {}
        stored = data.get("metadata") or {}
        metadata = {str(k): _plain(v) for k, v in stored.items()} if isinstance(stored, Mapping) else {}
        return str(data.get("description") or metadata.get("reason") or ""), metadata
    except (ValueError, AttributeError):
        return "", {}


__all__ = ["CheckState", "Db", "RunInfo", "StorageConfigError", "asset_key_string", "storage_location"]
