"""PostgreSQL instance storage that keeps its connections: dagster-postgres with a connection pool.

dagster-postgres opens a new TCP connection (and authenticates) for every query: its engines use
SQLAlchemy's NullPool so that no process holds connections it does not use. Registering one event
takes several queries, so that costs 25-40 ms per query on a loopback server (docs/benchmarks.md).
These subclasses keep a small pool per process instead (a connection idle for more than 10 s is
pinged before use, all are recycled after `pool_recycle_seconds`), which is how dagster-postgres
already runs inside the webserver. The event log also remembers that the asset-check table exists
instead of asking the catalog on every check event.

Configured in dagster.yaml as Dagster's custom storage (deploy/dagster.yaml)::

    storage:
      custom:
        module: neuroflow_dagster.pooled_storage
        class: PooledPostgresStorage
        config:
          postgres_url: {env: NEUROFLOW_POSTGRES_URL}
          pool_size: 2
          max_overflow: 8

Every process that opens the instance (daemon, webserver, code server, each run worker) holds at
most `pool_size` idle connections per storage (runs, events, schedules) and `pool_size +
max_overflow` while busy, so size the server's max_connections for the number of processes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from dagster import Field, IntSource
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.config import pg_config
from dagster._core.storage.event_log import EventLogStorage
from dagster._core.storage.runs import RunStorage
from dagster._core.storage.schedules import ScheduleStorage
from dagster._serdes import ConfigurableClass, ConfigurableClassData
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.run_storage import PostgresRunStorage
from dagster_postgres.schedule_storage import PostgresScheduleStorage
from dagster_postgres.utils import create_pg_engine, get_token_provider_from_config, pg_url_from_config
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc

MODULE = __name__
POOL_DEFAULTS = {"pool_size": 2, "max_overflow": 8, "pool_recycle_seconds": 1800}


def pooled_config() -> dict[str, Any]:
    """dagster-postgres' own keys plus the pool's."""
    return {
        **pg_config(),
        "pool_size": Field(IntSource, is_required=False, default_value=POOL_DEFAULTS["pool_size"]),
        "max_overflow": Field(IntSource, is_required=False, default_value=POOL_DEFAULTS["max_overflow"]),
        "pool_recycle_seconds": Field(
            IntSource, is_required=False, default_value=POOL_DEFAULTS["pool_recycle_seconds"]
        ),
    }


def _pool_args(config: Mapping[str, Any]) -> dict[str, int]:
    return {k: int(config.get(k, v)) for k, v in POOL_DEFAULTS.items()}


IDLE_PING_SECONDS = 10.0


def _ping_when_idle(engine: Any) -> None:
    """Check a pooled connection before use only if it sat idle (a server restart or a dropped TCP
    connection shows up there); SQLAlchemy's pool_pre_ping pings on every checkout, one extra round
    trip per query (a fifth of an event write, measured)."""

    @sa_event.listens_for(engine, "checkin")
    def _checked_in(dbapi_conn: Any, record: Any) -> None:
        record.info["returned_at"] = time.monotonic()

    @sa_event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        returned = record.info.get("returned_at")
        if returned is None or time.monotonic() - returned < IDLE_PING_SECONDS:
            return
        try:
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT 1")
        except Exception as exc:  # the pool discards this connection and opens a new one
            raise sa_exc.DisconnectionError(str(exc)) from exc


def _pooled_engine(storage: Any, postgres_url: str, token_provider: Any, pool: Mapping[str, int]) -> None:
    """Swap the storage's NullPool engine for a pooled one (same URL, autocommit, as dagster-postgres)."""
    old = storage._engine
    storage._engine = create_pg_engine(
        postgres_url,
        token_provider,
        isolation_level="AUTOCOMMIT",
        pool_size=pool["pool_size"],
        max_overflow=pool["max_overflow"],
        pool_recycle=pool["pool_recycle_seconds"],
    )
    _ping_when_idle(storage._engine)
    old.dispose()


class _Pooled:
    """What the three pooled storages share: the pooled engine after dagster-postgres' own set-up, a
    dispose that closes the pool, and the config (dagster-postgres' fields + the pool's)."""

    _engine: Any

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, inst_data: Any = None,
                 token_provider: Any = None, pool: Mapping[str, int] | None = None) -> None:  # fmt: skip
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)  # type: ignore[call-arg]
        _pooled_engine(self, postgres_url, token_provider, pool or POOL_DEFAULTS)

    def dispose(self) -> None:
        """Close the pool's connections (a disposed instance must not keep them open)."""
        super().dispose()  # type: ignore[misc]
        self._engine.dispose()

    @classmethod
    def config_type(cls) -> Any:
        return pooled_config()

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Mapping[str, Any]) -> Any:
        return cls(
            pg_url_from_config(config_value),
            config_value.get("should_autocreate_tables", True),
            inst_data,
            get_token_provider_from_config(config_value),
            _pool_args(config_value),
        )


class PooledPostgresEventLogStorage(_Pooled, PostgresEventLogStorage):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._has_check_table = False

    @property
    def supports_asset_checks(self) -> bool:
        """Asked on every check event (a catalog query each); the table does not go away once there."""
        if not self._has_check_table:
            self._has_check_table = bool(super().supports_asset_checks)
        return self._has_check_table


class PooledPostgresRunStorage(_Pooled, PostgresRunStorage):
    pass


class PooledPostgresScheduleStorage(_Pooled, PostgresScheduleStorage):
    pass


class PooledPostgresStorage(DagsterStorage, ConfigurableClass):
    """`storage: custom:` composite of the three pooled storages (one pool each)."""

    def __init__(self, config_value: Mapping[str, Any], inst_data: ConfigurableClassData | None = None) -> None:
        url = pg_url_from_config(config_value)
        autocreate = config_value.get("should_autocreate_tables", True)
        token = get_token_provider_from_config(config_value)
        pool = _pool_args(config_value)
        self._inst_data = inst_data
        self._run_storage = PooledPostgresRunStorage(url, autocreate, token_provider=token, pool=pool)
        self._event_log_storage = PooledPostgresEventLogStorage(url, autocreate, token_provider=token, pool=pool)
        self._schedule_storage = PooledPostgresScheduleStorage(url, autocreate, token_provider=token, pool=pool)
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> Any:
        return pooled_config()

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> PooledPostgresStorage:
        return cls(config_value, inst_data)

    @property
    def event_log_storage(self) -> EventLogStorage:
        return self._event_log_storage

    @property
    def run_storage(self) -> RunStorage:
        return self._run_storage

    @property
    def schedule_storage(self) -> ScheduleStorage:
        return self._schedule_storage

    def _data(self, cls_name: str) -> ConfigurableClassData | None:
        return ConfigurableClassData(MODULE, cls_name, self.inst_data.config_yaml) if self.inst_data else None

    @property
    def event_storage_data(self) -> ConfigurableClassData | None:
        return self._data("PooledPostgresEventLogStorage")

    @property
    def run_storage_data(self) -> ConfigurableClassData | None:
        return self._data("PooledPostgresRunStorage")

    @property
    def schedule_storage_data(self) -> ConfigurableClassData | None:
        return self._data("PooledPostgresScheduleStorage")
