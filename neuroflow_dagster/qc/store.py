"""The image QC gate's memory: every session's measures (the cohort) and every verdict ever made.

One SQLite file, ``state/qc_cohort.sqlite3`` (the state folder must persist; a local file system, as
for the rest of the state). Tables:

- ``series``: one row per QC table of a session (ScanID, labels, its acquisition group);
- ``measures``: every numeric value of those tables, indexed by (group, measure), so that judging a
  session reads one group's values of one measure (milliseconds at 20,000 sessions, measured in
  benchmarks/qc_cohort.py) instead of every QC table on disk; groups and measure names are interned
  (``groups``, ``metrics``) so that a session's ~35 values cost about a kilobyte;
- ``verdicts``: append-only, one row per judgement (the QC asset's, or an operator's re-judgement),
  never updated: the latest row of a ScanID is its standing verdict.

A session's measures are replaced when it is judged again on new QC tables (a new QSIPrep output),
so the cohort is each session's latest measurement. Plain Python (sqlite3), no Dagster.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroflow_dagster.qc.cohort import Group, GroupValues

FILE = "qc_cohort.sqlite3"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS metrics (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, scan_id TEXT NOT NULL, qc_table TEXT NOT NULL, participant TEXT NOT NULL,
    session TEXT NOT NULL, group_id INTEGER NOT NULL, UNIQUE (scan_id, qc_table));
CREATE TABLE IF NOT EXISTS measures (
    series_id INTEGER NOT NULL, metric_id INTEGER NOT NULL, group_id INTEGER NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (series_id, metric_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS measures_by_group ON measures (group_id, metric_id, value);
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, scan_id TEXT NOT NULL, participant TEXT NOT NULL,
    session TEXT NOT NULL, at TEXT NOT NULL, action TEXT NOT NULL, by TEXT NOT NULL, reason TEXT NOT NULL,
    level TEXT NOT NULL, summary TEXT NOT NULL, tables_sig TEXT NOT NULL, settings_sig TEXT NOT NULL,
    record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS verdicts_by_scan ON verdicts (scan_id, id);
"""
JUDGE, REJUDGE = "judge", "rejudge"  # who made a verdict: the QC asset, or an operator's `qc rejudge`


class StoreError(RuntimeError):
    """The store cannot be read or written (a damaged file, a full disk): said with its path."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass(frozen=True)
class SeriesMeasures:
    """One QC table of a session: its acquisition group and its numeric values (None: not measured)."""

    qc_table: str
    group: Group
    values: dict[str, float | None]


@dataclass(frozen=True)
class SeriesRow:
    scan_id: str
    participant: str
    session: str
    qc_table: str
    group: Group


@dataclass(frozen=True)
class StoredVerdict:
    """One judgement of a session. ``record`` is the whole verdict (gate.Verdict.to_record)."""

    scan_id: str
    participant: str
    session: str
    level: str
    summary: str
    tables_sig: str
    settings_sig: str
    at: str = field(default_factory=now)
    action: str = JUDGE
    by: str = ""
    reason: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    id: int = 0


_VERDICT_COLUMNS = ("id, scan_id, participant, session, at, action, by, reason, level, summary, tables_sig, "
                    "settings_sig")


def _verdict(row: tuple[Any, ...], record: str | None = None) -> StoredVerdict:
    (id_, scan_id, participant, session, at, action, by, reason, level, summary, tables_sig, settings_sig) = row[:12]
    return StoredVerdict(scan_id, participant, session, level, summary, tables_sig, settings_sig, at, action, by,
                         reason, json.loads(record) if record else {}, id_)


class Store:
    """The store of one deployment (``paths.state``). Reading a store that does not exist yet reads nothing."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 60000")
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection | None]:
        if not self.exists():
            yield None
            return
        try:
            conn = self._connect()
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    yield None  # created a moment ago by a writer that has not committed its schema yet
                    return
                yield conn
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the QC store {self.path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")  # one writer at a time; readers go on
                if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the QC store {self.path}: {exc}") from exc

    # ------------------------------------------------------------------ writing

    def save_judgement(self, participant: str, session: str, series: Iterable[SeriesMeasures],
                       verdict: StoredVerdict) -> StoredVerdict:
        """The session's measures replace its earlier ones and the verdict is appended, in one transaction."""
        with self._write() as conn:
            self._replace_measures(conn, verdict.scan_id, participant, session, series)
            return self._append(conn, verdict)

    def save_measures(self, scan_id: str, participant: str, session: str, series: Iterable[SeriesMeasures]) -> None:
        """A session's measures into the cohort without a verdict (`neuroflow qc seed`: judged before the store)."""
        with self._write() as conn:
            self._replace_measures(conn, scan_id, participant, session, series)

    @staticmethod
    def _interned(conn: sqlite3.Connection, table: str, column: str, value: str) -> int:
        row = conn.execute(f"SELECT id FROM {table} WHERE {column} = ?", (value,)).fetchone()
        if row is not None:
            return int(row[0])
        return int(conn.execute(f"INSERT INTO {table} ({column}) VALUES (?)", (value,)).lastrowid or 0)

    def _replace_measures(self, conn: sqlite3.Connection, scan_id: str, participant: str, session: str,
                          series: Iterable[SeriesMeasures]) -> None:
        conn.execute("DELETE FROM measures WHERE series_id IN (SELECT id FROM series WHERE scan_id = ?)", (scan_id,))
        conn.execute("DELETE FROM series WHERE scan_id = ?", (scan_id,))
        metric_ids = dict(conn.execute("SELECT name, id FROM metrics").fetchall())
        for s in series:
            group_id = self._interned(conn, "groups", "key", s.group.key)
            series_id = conn.execute(
                "INSERT INTO series (scan_id, qc_table, participant, session, group_id) VALUES (?, ?, ?, ?, ?)",
                (scan_id, s.qc_table, participant, session, group_id),
            ).lastrowid
            rows = []
            for metric, value in s.values.items():
                if value is None:
                    continue
                if metric not in metric_ids:
                    metric_ids[metric] = self._interned(conn, "metrics", "name", metric)
                rows.append((series_id, metric_ids[metric], group_id, float(value)))
            conn.executemany("INSERT OR REPLACE INTO measures VALUES (?, ?, ?, ?)", rows)

    def record_verdict(self, verdict: StoredVerdict) -> StoredVerdict:
        """Append a verdict (an operator's re-judgement); the measures stay."""
        with self._write() as conn:
            return self._append(conn, verdict)

    @staticmethod
    def _append(conn: sqlite3.Connection, v: StoredVerdict) -> StoredVerdict:
        cursor = conn.execute(
            "INSERT INTO verdicts (scan_id, participant, session, at, action, by, reason, level, summary, tables_sig, "
            "settings_sig, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (v.scan_id, v.participant, v.session, v.at, v.action, v.by, v.reason, v.level, v.summary, v.tables_sig,
             v.settings_sig, json.dumps(v.record, sort_keys=True)),
        )
        return StoredVerdict(v.scan_id, v.participant, v.session, v.level, v.summary, v.tables_sig, v.settings_sig,
                             v.at, v.action, v.by, v.reason, v.record, int(cursor.lastrowid or 0))

    # ------------------------------------------------------------------ reading

    def standing(self, scan_id: str) -> StoredVerdict | None:
        """The latest verdict of a ScanID, with its record."""
        with self._read() as conn:
            if conn is None:
                return None
            row = conn.execute(f"SELECT {_VERDICT_COLUMNS}, record FROM verdicts WHERE scan_id = ? "
                               "ORDER BY id DESC LIMIT 1", (scan_id,)).fetchone()
        return _verdict(row, row[12]) if row else None

    def standings(self, *, records: bool = False, levels: Iterable[str] | None = None) -> dict[str, StoredVerdict]:
        """Every ScanID's latest verdict (only those at ``levels`` if given); records read only when asked."""
        wanted = tuple(levels) if levels is not None else None
        columns = f"{_VERDICT_COLUMNS}, record" if records else _VERDICT_COLUMNS
        sql = (f"SELECT {columns} FROM verdicts WHERE id IN (SELECT MAX(id) FROM verdicts GROUP BY scan_id)")
        params: tuple[str, ...] = ()
        if wanted is not None:
            sql += f" AND level IN ({', '.join('?' for _ in wanted)})"
            params = wanted
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall() if conn is not None else []
        return {row[1]: _verdict(row, row[12] if records else None) for row in rows}

    def levels(self) -> dict[str, str]:
        """Every ScanID's standing level (a light read for plots: no record, no objects)."""
        with self._read() as conn:
            rows = (conn.execute("SELECT scan_id, level FROM verdicts WHERE id IN "
                                 "(SELECT MAX(id) FROM verdicts GROUP BY scan_id)").fetchall() if conn else [])
        return dict(rows)

    def labels(self) -> dict[str, tuple[str, str]]:
        """ScanID -> (participant, session) of every measured session."""
        with self._read() as conn:
            rows = conn.execute("SELECT scan_id, participant, session FROM series").fetchall() if conn else []
        return {scan_id: (participant, session) for scan_id, participant, session in rows}

    def history(self, scan_id: str) -> list[StoredVerdict]:
        """Every verdict of a ScanID, oldest first."""
        with self._read() as conn:
            rows = (conn.execute(f"SELECT {_VERDICT_COLUMNS}, record FROM verdicts WHERE scan_id = ? ORDER BY id",
                                 (scan_id,)).fetchall() if conn is not None else [])
        return [_verdict(row, row[12]) for row in rows]

    def group_values(self, group: Group, metric: str, skip: Collection[str] = ()) -> GroupValues:
        """One measure's values of one acquisition group, per ScanID (indexed: no scan of the archive);
        ``skip``: ScanIDs left out (excluded sessions)."""
        out = GroupValues(group.label)
        with self._read() as conn:
            if conn is not None:
                rows = conn.execute(
                    "SELECT s.scan_id, m.value FROM measures m JOIN series s ON s.id = m.series_id "
                    "WHERE m.group_id = (SELECT id FROM groups WHERE key = ?) "
                    "AND m.metric_id = (SELECT id FROM metrics WHERE name = ?)", (group.key, metric))
                for scan_id, value in rows:
                    if scan_id not in skip:
                        out.add(scan_id, value)
        return out

    def all_group_values(self, metrics: Iterable[str],
                         skip: Collection[str] = ()) -> dict[tuple[str, str], GroupValues]:
        """(group key, measure) -> its values, for every group, in one pass (re-judgement, report)."""
        wanted = tuple(metrics)
        out: dict[tuple[str, str], GroupValues] = {}
        if not wanted:
            return out
        with self._read() as conn:
            if conn is None:
                return out
            rows = conn.execute(
                "SELECT g.key, x.name, s.scan_id, m.value FROM measures m JOIN metrics x ON x.id = m.metric_id "
                "JOIN series s ON s.id = m.series_id JOIN groups g ON g.id = m.group_id "
                f"WHERE x.name IN ({', '.join('?' for _ in wanted)})", wanted,
            )
            for key, metric, scan_id, value in rows:
                if scan_id in skip:
                    continue
                values = out.get((key, metric))
                if values is None:
                    values = out[(key, metric)] = GroupValues(Group.from_key(key).label)
                values.add(scan_id, value)
        return out

    def series(self) -> dict[str, list[SeriesRow]]:
        """ScanID -> its QC tables and their groups."""
        out: dict[str, list[SeriesRow]] = {}
        groups: dict[str, Group] = {}
        with self._read() as conn:
            rows = (conn.execute("SELECT s.scan_id, s.participant, s.session, s.qc_table, g.key FROM series s "
                                 "JOIN groups g ON g.id = s.group_id ORDER BY s.scan_id, s.qc_table").fetchall()
                    if conn is not None else [])
        for scan_id, participant, session, table, key in rows:
            group = groups.get(key) or groups.setdefault(key, Group.from_key(key))
            out.setdefault(scan_id, []).append(SeriesRow(scan_id, participant, session, table, group))
        return out

    def values(self, metrics: Iterable[str],
               scan_ids: Iterable[str] | None = None) -> dict[tuple[str, str], dict[str, float]]:
        """(ScanID, QC table) -> {measure: value} for the given measures (of the given ScanIDs)."""
        wanted = tuple(metrics)
        out: dict[tuple[str, str], dict[str, float]] = {}
        if not wanted:
            return out
        sql = ("SELECT s.scan_id, s.qc_table, x.name, m.value FROM measures m JOIN metrics x ON x.id = m.metric_id "
               f"JOIN series s ON s.id = m.series_id WHERE x.name IN ({', '.join('?' for _ in wanted)})")
        scans = sorted(set(scan_ids)) if scan_ids is not None else None
        # SQLite caps the variables of one statement: a long list of ScanIDs is asked in slices
        batches = [None] if scans is None else [scans[i:i + 500] for i in range(0, len(scans), 500)]
        with self._read() as conn:
            if conn is None:
                return out
            for batch in batches:
                where, params = ("", wanted) if batch is None else (
                    f" AND s.scan_id IN ({', '.join('?' for _ in batch)})", wanted + tuple(batch))
                for scan_id, table, metric, value in conn.execute(sql + where, params):
                    out.setdefault((scan_id, table), {})[metric] = value
        return out
