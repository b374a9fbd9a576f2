"""Creating the Dagster instance's storage once, and refusing to touch storage that is not ready.

On SQLite every process that opens an instance whose databases do not exist yet
creates them and stamps their migration table. Two processes doing that at the
same moment (``dagster dev`` starting while ``neuroflow status`` or a script
opens the same DAGSTER_HOME) leave two rows in ``alembic_version``, and from
then on the code location fails to load ("more than one head present") on
every restart. So:

- `prepare_instance` (run by ``neuroflow demo``, ``neuroflow instance init``
  and ``neuroflow start``, before Dagster starts) creates and migrates the
  storage under an exclusive file lock;
- `storage_problem` tells the operator commands whether the storage is ready;
  they refuse, with the fix, instead of opening (and so creating) it.
"""

from __future__ import annotations

import contextlib
import io
import sqlite3
import warnings
from pathlib import Path

from filelock import FileLock

LOCK_NAME = ".neuroflow-instance.lock"
# SQLite databases of Dagster's default storage, relative to DAGSTER_HOME.
SQLITE_DATABASES = ("history/runs.db", "history/runs/index.db", "schedules/schedules.db")
INIT_HINT = (
    "run `neuroflow instance init --dagster-home {home}` (or start Dagster with `neuroflow start` / `neuroflow demo`)"
)


class InstanceNotReady(Exception):
    """The instance's storage is missing, half-created or corrupt; the message says which and the fix."""


def _sqlite_base(home: Path) -> Path | None:
    """The base folder of the instance's SQLite storage (None: not SQLite). Read from dagster.yaml without
    Dagster where it is the default / `storage: sqlite` / PostgreSQL (control/dagster_db.py), through
    Dagster's InstanceRef otherwise."""
    from neuroflow_dagster.control.dagster_db import StorageConfigError, storage_location

    try:
        kind, where = storage_location(home)
        return Path(where) if kind == "sqlite" else None
    except StorageConfigError:
        pass
    from dagster._core.instance.ref import InstanceRef

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = InstanceRef.from_dir(str(home))
    names = {ref.run_storage_data.class_name, ref.event_storage_data.class_name, ref.schedule_storage_data.class_name}
    return home if all("Sqlite" in name for name in names) else None


def _alembic_rows(db: Path) -> list[str] | None:
    """The revisions in ``alembic_version`` (None: no such table), read-only."""
    uri = f"file:{db}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=10)
    try:
        try:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        except sqlite3.OperationalError:
            return None
        return [r[0] for r in rows]
    finally:
        conn.close()


def storage_problem(home: Path) -> str | None:
    """Why the operator commands must not open the instance at ``home`` now (None: ready)."""
    base = _sqlite_base(home)
    if base is None:
        return None  # PostgreSQL: the server serialises schema creation; nothing to check here
    hint = INIT_HINT.format(home=home)
    for rel in SQLITE_DATABASES:
        db = base / rel
        if not db.is_file():
            return f"the Dagster instance at {home} is not initialized ({rel} does not exist): {hint}"
        rows = _alembic_rows(db)
        if not rows:
            return f"the Dagster instance at {home} is being created or was left half-created ({rel}): {hint}"
        if len(rows) > 1:
            return (
                f"the Dagster instance at {home} is damaged: {rel} has {len(rows)} rows in alembic_version "
                f"({', '.join(rows)}), left by two processes creating it at once (Dagster will not load it). "
                f"If it holds no history you need, stop Dagster, move {home / 'history'} and "
                f"{home / 'schedules'} aside and run `neuroflow instance init --dagster-home {home}`; otherwise "
                "delete the row that is not this Dagster version's revision (see docs/operations.md)"
            )
    return None


def prepare_instance(home: Path) -> None:
    """Create and migrate the storage of the instance at ``home`` exactly once; safe to run any time.

    Serialised by an exclusive lock in ``home``, so racing callers wait for the first. Storage already
    damaged by an earlier concurrent creation is refused with the way out, never "repaired" by a guess.
    """
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / LOCK_NAME), timeout=300):
        damaged = storage_problem(home)
        if damaged and "is damaged" in damaged:
            raise InstanceNotReady(damaged)
        # Opening creates each storage's tables; upgrade() applies pending migrations (it prints progress).
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
            try:
                instance.upgrade()
            finally:
                instance.dispose()
        problem = storage_problem(home)
        if problem:
            raise InstanceNotReady(problem)
