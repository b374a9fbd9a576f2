"""The pooled PostgreSQL storage on a real server: same records, far fewer connections.

dagster-postgres connects anew for every query; `neuroflow_dagster.pooled_storage` keeps a pool per
process. Claims tested against a real PostgreSQL started here (pg_server.py): the instance works
through `storage: custom`, a run worker rebuilding the instance from its ref gets the pooled
storages too, and registering sessions opens a handful of server sessions instead of one per query
(`pg_stat_database.sessions`, PostgreSQL 14+). Speed is measured in benchmarks/event_writes.py.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from neuroflow_dagster.pooled_storage import (
    PooledPostgresEventLogStorage,
    PooledPostgresRunStorage,
    PooledPostgresScheduleStorage,
)
from neuroflow_dagster_tests.pg_server import PgServer, pg_database, postgres  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.postgres]


def home_with(tmp_path: Path, storage: dict) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({"storage": storage, "telemetry": {"enabled": False}}))
    return home


def pooled(url: str) -> dict:
    return {
        "custom": {
            "module": "neuroflow_dagster.pooled_storage",
            "class": "PooledPostgresStorage",
            "config": {"postgres_url": url, "pool_size": 2, "max_overflow": 4},
        }
    }


def sessions_opened(server: PgServer, database: str) -> int:
    conn = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (database,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def connections_to(server: PgServer, database: str) -> int:
    conn = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def register(instance: dg.DagsterInstance, n: int) -> None:
    """n sessions as the discovery sensor registers them: a materialization and a reported verdict each."""
    instance.add_dynamic_partitions("subjects", [f"S{i:03d}" for i in range(n)])
    instance.add_dynamic_partitions("session_labels", ["01"])
    for i in range(n):
        key = f"01|S{i:03d}"
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="dicom_session", partition=key))
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey("dicom_session"), check_name="protocol", passed=True, partition=key
            )
        )


def test_pooled_storage_keeps_its_connections(
    tmp_path: Path,
    postgres: PgServer,  # noqa: F811
    pg_database: str,  # noqa: F811
) -> None:
    database = pg_database.rsplit("/", 1)[1]
    instance = dg.DagsterInstance.from_config(str(home_with(tmp_path, pooled(pg_database))))
    try:
        assert isinstance(instance.run_storage, PooledPostgresRunStorage)
        assert isinstance(instance.event_log_storage, PooledPostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PooledPostgresScheduleStorage)
        before = sessions_opened(postgres, database)
        register(instance, 40)
        opened = sessions_opened(postgres, database) - before
        records = instance.fetch_materializations(dg.AssetKey("dicom_session"), limit=100).records
        assert len(records) == 40
        history = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("dicom_session"), "protocol"), limit=100
        )
        assert len(history) == 40
        # A run worker rebuilds the instance from its ref: it must get the pooled storages as well.
        rebuilt = dg.DagsterInstance.from_ref(instance.get_ref())
        try:
            assert isinstance(rebuilt.event_log_storage, PooledPostgresEventLogStorage)
            assert isinstance(rebuilt.run_storage, PooledPostgresRunStorage)
        finally:
            rebuilt.dispose()
        assert connections_to(postgres, database) >= 1  # the pool keeps its connections open...
    finally:
        instance.dispose()
    assert connections_to(postgres, database) == 0  # ...until the instance is disposed
    # 80 events and 2 partition writes; the plain storage opens a session per query (see below).
    assert opened <= 12, f"{opened} server sessions for 80 events"


def test_plain_dagster_postgres_opens_a_session_per_query(
    tmp_path: Path,
    postgres: PgServer,  # noqa: F811
    pg_database: str,  # noqa: F811
) -> None:
    """The baseline the pooled storage is measured against (so the test above can fail)."""
    database = pg_database.rsplit("/", 1)[1]
    instance = dg.DagsterInstance.from_config(str(home_with(tmp_path, {"postgres": {"postgres_url": pg_database}})))
    try:
        before = sessions_opened(postgres, database)
        register(instance, 40)
        opened = sessions_opened(postgres, database) - before
    finally:
        instance.dispose()
    assert opened >= 80
