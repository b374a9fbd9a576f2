"""Dagster on a real PostgreSQL server: what production stores there works as it does on SQLite.

The server is started by the test session from Debian's binaries (pg_server.py).
The instances are built from dagster.yaml files, as `dagster dev` / the daemon
build theirs: the repository's settings plus PostgreSQL storage, and the
production files deploy/dagster.yaml (DockerRunLauncher - constructed, no engine
needed) and deploy/systemd/dagster.yaml, their credentials resolved from the
environment. The last test runs one session through every stage on a real
`dagster dev` whose DAGSTER_HOME points at the server.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from neuroflow_dagster.defs.partitions import session_labels_partitions, session_partitions, subjects_partitions
from neuroflow_dagster.defs.sensors import ensure_pool_limits
from neuroflow_dagster.demo import synth
from neuroflow_dagster_tests.daemon_harness import dagster_dev, latest_metadata, materialized, wait_for
from neuroflow_dagster_tests.pg_server import PgServer, pg_database, postgres  # noqa: F401 (fixtures)
from neuroflow_dagster_tests.test_throttling import automation_ticked
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


def write_home(home: Path, url: str) -> Path:
    """DAGSTER_HOME with the repository's dagster.yaml plus PostgreSQL storage."""
    settings = yaml.safe_load((REPO / "dagster.yaml").read_text())
    settings["storage"] = {"postgres": {"postgres_url": url}}
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return home / "dagster.yaml"


def table_count(server: PgServer, database: str, table: str) -> int:
    conn = server.connect(database)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def test_instance_on_postgres_partitions_events_checks_and_pools(
    tmp_path: Path, postgres: PgServer, pg_database: str  # noqa: F811
) -> None:
    write_home(tmp_path / "home", pg_database)
    instance = dg.DagsterInstance.from_config(str(tmp_path / "home"))
    database = pg_database.rsplit("/", 1)[1]
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"

    # Dynamic partitions, as the discovery sensor adds them (a few thousand at once).
    subjects = [f"S{i:05d}" for i in range(3000)]
    instance.add_dynamic_partitions(subjects_partitions.name, subjects)
    instance.add_dynamic_partitions(session_labels_partitions.name, ["01", "02"])
    assert len(instance.get_dynamic_partitions(subjects_partitions.name)) == 3000
    assert instance.has_dynamic_partition(subjects_partitions.name, "S02999")
    instance.delete_dynamic_partition(subjects_partitions.name, "S02999")
    assert not instance.has_dynamic_partition(subjects_partitions.name, "S02999")

    # Runless events: the dicom_session materializations the discovery sensor reports.
    instance.report_runless_asset_event(
        dg.AssetMaterialization("dicom_session", partition="01|S00001", metadata={"scan_id": "20240105_0900"})
    )
    records = instance.fetch_materializations(dg.AssetKey("dicom_session"), limit=10).records
    assert [r.partition_key for r in records] == ["01|S00001"]
    assert records[0].asset_materialization.metadata["scan_id"].value == "20240105_0900"

    # Check evaluations from a run on a multi-partition (the bids_validator / protocol check shape).
    @dg.asset(
        name="bids_session",
        partitions_def=session_partitions,
        check_specs=[dg.AssetCheckSpec("valid", asset="bids_session", blocking=True)],
    )
    def bids_like() -> dg.MaterializeResult:
        return dg.MaterializeResult(check_results=[dg.AssetCheckResult(check_name="valid", passed=False)])

    result = dg.materialize([bids_like], instance=instance, partition_key="01|S00001", raise_on_error=False)
    key = dg.AssetCheckKey(dg.AssetKey("bids_session"), "valid")
    history = instance.event_log_storage.get_asset_check_execution_history(key, limit=5)
    assert [h.run_id for h in history] == [result.run_id]
    assert history[0].status.value == "FAILED"  # the blocking check failed, and that is what is stored

    # Pool limits: set from the config by the project (ensure_pool_limits), kept in PostgreSQL.
    config = make_workspace(
        tmp_path / "ws", overrides={"pipelines": {"qsirecon": {"max_concurrent": 3}}}, mapping={}
    )
    assert sorted(ensure_pool_limits(instance, config)) == [
        "bids_conversion=4", "qsiparc=4", "qsiprep=1", "qsirecon=3"
    ]  # fmt: skip
    assert ensure_pool_limits(instance, config) == []  # idempotent: nothing to change on the next tick
    reopened = dg.DagsterInstance.from_config(str(tmp_path / "home"))  # another process sees the same limits
    assert reopened.event_log_storage.get_concurrency_info("qsirecon").slot_count == 3
    storage = reopened.event_log_storage
    first = storage.claim_concurrency_slot("qsiprep", "run-1", "qsiprep_subject")
    second = storage.claim_concurrency_slot("qsiprep", "run-2", "qsiprep_subject")
    assert first.is_claimed and not second.is_claimed  # limit 1 holds across connections
    storage.free_concurrency_slots_for_run("run-1")
    storage.free_concurrency_slots_for_run("run-2")

    # The run and its events really are rows in PostgreSQL.
    assert table_count(postgres, database, "runs") == 1
    assert table_count(postgres, database, "event_logs") > 5
    assert table_count(postgres, database, "dynamic_partitions") == 3000 - 1 + 2


def pg_env(server: PgServer, database: str) -> dict[str, str]:
    return {
        "DAGSTER_POSTGRES_USER": server.user,
        "DAGSTER_POSTGRES_PASSWORD": server.password,
        "DAGSTER_POSTGRES_HOST": server.host,
        "DAGSTER_POSTGRES_DB": database,
        "DAGSTER_POSTGRES_PORT": str(server.port),
    }


@pytest.mark.parametrize("path", ["deploy/dagster.yaml", "deploy/systemd/dagster.yaml"])
def test_production_dagster_yaml_works_against_postgres(
    tmp_path: Path, postgres: PgServer, pg_database: str, path: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """The shipped files, credentials from the environment only: storage, queue settings, launcher."""
    database = pg_database.rsplit("/", 1)[1]
    for key, value in pg_env(postgres, database).items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(REPO / path, home / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(home))
    # dagster-postgres with a connection pool (neuroflow_dagster/pooled_storage.py, issue 12)
    assert type(instance.run_storage).__name__ == "PooledPostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PooledPostgresEventLogStorage"
    # Without Docker: Dagster's default launcher with the run-worker health check (defs/launcher.py).
    expected_launcher = "DockerRunLauncher" if path == "deploy/dagster.yaml" else "HealthCheckedRunLauncher"
    assert type(instance.run_launcher).__name__ == expected_launcher
    if path != "deploy/dagster.yaml":
        assert isinstance(instance.run_launcher, dg.DefaultRunLauncher)
    queue = instance.get_concurrency_config().run_queue_config
    limits = {(r["key"], r.get("value")): r["limit"] for r in queue.tag_concurrency_limits}
    assert limits[("neuroflow/stage", "qsiprep")] == 1
    assert instance.run_monitoring_max_runtime_seconds == 172800
    instance.add_dynamic_partitions("subjects", ["P0001"])
    assert table_count(postgres, database, "dynamic_partitions") == 1
    # The server checks passwords, so the instance above really used the one from the environment.
    import psycopg2

    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host=postgres.host, port=postgres.port, user=postgres.user, password="wrong", dbname=database)


def test_one_session_through_every_stage_on_postgres(
    tmp_path: Path, postgres: PgServer, pg_database: str  # noqa: F811
) -> None:
    """The e2e flow of test_daemon_e2e.py, smaller: one subject, one session, on PostgreSQL."""
    config = make_workspace(
        tmp_path / "ws",
        overrides={"discovery": {"stability_wait_minutes": 0, "interval_seconds": 5}},
        mapping={"20240115_1430": "SUBJ_A"},
    )
    staging = config.paths.work_dir / "export-20240115_1430"
    synth.write_session(staging, seed=1, n_directions=12, acquired=datetime(2024, 1, 15, 14, 30))
    dagster_yaml = write_home(tmp_path / "yaml", pg_database)
    database = pg_database.rsplit("/", 1)[1]

    with dagster_dev(config.source, tmp_path / "home", dagster_yaml=dagster_yaml) as dev:
        instance = dg.DagsterInstance.from_config(str(dev["home"]))
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        # The session arrives once the automation sensors have had their first tick (see automation_ticked).
        wait_for("the automation sensors' first ticks", lambda: automation_ticked(dev["log"]), 240, dev["log"])
        staging.rename(config.paths.dicom_incoming / "20240115_1430")
        wait_for(
            "qsiparc_session of the session",
            lambda: "01|SUBJA" in materialized(instance, "qsiparc_session"),
            timeout=480,
            log=dev["log"],
        )
        counts: dict[str, Any] = {
            key: materialized(instance, key)
            for key in ("dicom_session", "bids_session", "qsiprep_subject", "qsirecon_session", "qsiparc_session")
        }
        bids = latest_metadata(instance, "bids_session", "01|SUBJA")
        parc = latest_metadata(instance, "qsiparc_session", "01|SUBJA")
        runs = instance.get_run_records()

    assert counts == {
        "dicom_session": {"01|SUBJA": 1},
        "bids_session": {"01|SUBJA": 1},
        "qsiprep_subject": {"SUBJA": 1},
        "qsirecon_session": {"01|SUBJA": 1},
        "qsiparc_session": {"01|SUBJA": 1},
    }
    assert bids["validator_errors"] == 0
    assert parc["n_tables"] >= 1
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in runs), [
        (r.dagster_run.job_name, r.dagster_run.status.value) for r in runs
    ]
    # Everything went to PostgreSQL, nothing to SQLite files in DAGSTER_HOME.
    # Conversion, QSIPrep, recon + parcellation: three runs (issue 12: the protocol verdict of a new
    # session needs no run, and recon and parcellation of a session share one).
    assert table_count(postgres, database, "runs") == len(runs) == 3
    assert not list((tmp_path / "home").rglob("*.db")), list((tmp_path / "home").rglob("*.db"))
