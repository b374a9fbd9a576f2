"""Seed a Dagster instance with a brain bank's worth of history, fast, for the scale benchmarks.

Running 20,000 sessions through real runs would take days, and even storing the events one by one
through `store_event` takes an hour on PostgreSQL. So the rows Dagster itself writes for each
session are bulk-inserted with the storage's own tables and serializers:

- `dicom_session` materialization (runless, as the discovery sensor reports it),
- the protocol check run: `ASSET_CHECK_EVALUATION_PLANNED` + `ASSET_CHECK_EVALUATION`,
- the `bids_session` run: `ASSET_MATERIALIZATION_PLANNED`, the check's planned event, the
  materialization and the `bids_validator` evaluation,
- a finished run record for each of those runs (status SUCCESS, the tags production sets),
- the asset_check_executions rows (latest status, target materialization) and the asset_keys rows.

Only the rows that asset, check and run queries read are written: the per-run step/engine events of
a run (about 12 per run) are left out (SQLite keeps them in per-run files; on PostgreSQL they share
the indexed `event_logs` table). Event ids are assigned here and the PostgreSQL id sequence is moved
past them.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluation,
    AssetCheckEvaluationPlanned,
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.partitions.subset import DefaultPartitionsSubset
from dagster._core.events import (
    AssetMaterializationPlannedData,
    DagsterEvent,
    DagsterEventType,
    StepMaterializationData,
)
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.event_log.schema import (
    AssetCheckExecutionsTable,
    SqlEventLogStorageTable,
)
from dagster._core.storage.runs.schema import RunsTable, RunTagsTable
from dagster._serdes import serialize_value

ROOT = Path(__file__).resolve().parent.parent
DICOM = dg.AssetKey("dicom_session")
BIDS = dg.AssetKey("bids_session")
PROTOCOL = "protocol"
VALIDATOR = "bids_validator"
CHUNK = 2000


# --------------------------------------------------------------------------------------------------
# The archive: which (subject, session) pairs exist


def subject_label(i: int) -> str:
    return f"S{i:05d}"


def archive(subjects: int, sessions: int, extra_subject_sessions: int = 0) -> list[tuple[str, str]]:
    """`subjects` x `sessions` pairs; optionally one more subject with `extra_subject_sessions` sessions.

    The second form is the phantom case of the issue: 1,999 x 2 + one subject with 10 sessions gives
    4,008 real sessions in a 2,000 x 10 key space (16,000 pairs that never existed).
    """
    pairs = [(subject_label(s), f"{n:02d}") for s in range(subjects) for n in range(1, sessions + 1)]
    if extra_subject_sessions:
        pairs += [(subject_label(subjects), f"{n:02d}") for n in range(1, extra_subject_sessions + 1)]
    return pairs


def key(subject: str, session: str) -> str:
    """Multi-partition key string: dimensions ordered by name (session|subject)."""
    return f"{session}|{subject}"


# --------------------------------------------------------------------------------------------------
# Instances


@dataclass
class Backend:
    """Where the instance lives: a DAGSTER_HOME with a dagster.yaml (SQLite or PostgreSQL storage)."""

    kind: str  # sqlite | postgres
    home: Path
    pg_url: str | None = None
    storage_overrides: dict[str, Any] = field(default_factory=dict)

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))


def project_instance_settings() -> dict[str, Any]:
    """The project's dagster.yaml (run queue, pools, retries, monitoring) without its storage."""
    return yaml.safe_load((ROOT / "dagster.yaml").read_text())


def write_home(home: Path, kind: str, pg_url: str | None = None, storage: dict[str, Any] | None = None) -> Backend:
    home.mkdir(parents=True, exist_ok=True)
    settings = project_instance_settings()
    if storage is not None:
        settings.update(storage)
    elif kind == "postgres":
        settings["storage"] = {"postgres": {"postgres_url": pg_url}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return Backend(kind, home, pg_url, storage or {})


def clone_backend(src: Backend, dest_home: Path, pg: Any = None, dest_db: str | None = None) -> Backend:
    """A copy of a seeded instance (files on SQLite, a template database on PostgreSQL)."""
    if dest_home.exists():
        shutil.rmtree(dest_home)
    if src.kind == "sqlite":
        shutil.copytree(src.home, dest_home)
        return Backend("sqlite", dest_home, None, src.storage_overrides)
    assert pg is not None and dest_db is not None and src.pg_url is not None
    src_db = src.pg_url.rsplit("/", 1)[1]
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {dest_db} WITH (FORCE)")
            cur.execute(f"CREATE DATABASE {dest_db} TEMPLATE {src_db}")
    finally:
        conn.close()
    url = pg.url(dest_db)
    storage = None
    if src.storage_overrides:
        storage = yaml.safe_load(yaml.safe_dump(src.storage_overrides).replace(src.pg_url, url))
    return write_home(dest_home, "postgres", url, storage)


# --------------------------------------------------------------------------------------------------
# Events, built as Dagster builds them


def _entry(
    run_id: str, job: str, event_type: DagsterEventType, data: Any, ts: float, step: str | None
) -> EventLogEntry:
    return EventLogEntry(
        user_message="",
        level=20,
        job_name=job,
        run_id=run_id,
        error_info=None,
        timestamp=ts,
        step_key=step,
        dagster_event=DagsterEvent(
            event_type_value=event_type.value, job_name=job, event_specific_data=data, step_key=step
        ),
    )


def dicom_metadata(subject: str, session: str) -> dict[str, Any]:
    series = "\n".join(f"| {n} | series_{n} | 120 |" for n in range(1, 9))
    return {
        "scan_id": f"2024{session}01_{subject}",
        "dicom_path": dg.MetadataValue.path(f"/archive/incoming/2024{session}01_{subject}"),
        "participant_label": subject,
        "session_label": session,
        "recruitment_id": f"REC_{subject}",
        "acquisition": "2024-01-15T14:30:00",
        "mapping_source": "csv",
        "n_dicom_files": 960,
        "n_unreadable_files": 0,
        "unreadable_examples": "none",
        "series": dg.MetadataValue.md("| # | description | files |\n|---|---|---|\n" + series),
        "protocol": "Session valid: 3 scan types found",
    }


def bids_metadata(subject: str, session: str) -> dict[str, Any]:
    files = "\n".join(f"- `sub-{subject}/ses-{session}/dwi/file_{n:03d}.nii.gz`" for n in range(12))
    return {
        "failure_class": "none",
        "command": "heudiconv -d ... -s ... -ss ...",
        "exit_code": 0,
        "duration_s": 3.7,
        "log_path": dg.MetadataValue.path(f"/work/logs/bids_sub-{subject}_ses-{session}.log"),
        "scan_id": f"2024{session}01_{subject}",
        "session_dir": dg.MetadataValue.path(f"/bids/sub-{subject}/ses-{session}"),
        "n_files": 12,
        "files": dg.MetadataValue.md(files),
        "bids_suffixes": "T1w, dwi",
        "validator_errors": 0,
        "validator_warnings": 2,
    }


@dataclass
class Rows:
    events: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    run_tags: list[dict[str, Any]] = field(default_factory=list)
    last: dict[dg.AssetKey, tuple[EventLogEntry, int]] = field(default_factory=dict)


class Writer:
    """Assigns storage ids and collects rows; `flush` bulk-inserts them in one transaction per table chunk."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.storage = instance.event_log_storage
        with self.storage.index_connection() as conn:
            top = conn.execute(
                SqlEventLogStorageTable.select()
                .with_only_columns(SqlEventLogStorageTable.c.id)
                .order_by(SqlEventLogStorageTable.c.id.desc())
                .limit(1)
            ).fetchone()
        self.next_id = (top[0] if top else 0) + 1
        self.rows = Rows()
        self.ts = time.time() - 86400

    def event(self, entry: EventLogEntry) -> int:
        event_id = self.next_id
        self.next_id += 1
        row = self.storage._event_to_row(entry)
        row["id"] = event_id
        self.rows.events.append(row)
        dagster_event = entry.get_dagster_event()
        if dagster_event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            self.rows.last[dagster_event.asset_key] = (entry, event_id)  # type: ignore[index]
        return event_id

    def tick(self) -> float:
        self.ts += 0.001
        return self.ts

    def run(
        self,
        run_id: str,
        job: str,
        partition: str,
        stage: str,
        asset: dg.AssetKey | None,
        checks: list[dg.AssetCheckKey],
    ) -> None:
        tags = {"dagster/partition": partition, "neuroflow/stage": stage}
        run = dg.DagsterRun(
            job_name=job,
            run_id=run_id,
            status=dg.DagsterRunStatus.SUCCESS,
            tags=tags,
            asset_selection=frozenset([asset]) if asset else None,
            asset_check_selection=frozenset(checks) if checks else None,
        )
        from datetime import datetime, timezone

        when = datetime.fromtimestamp(self.ts, timezone.utc).replace(tzinfo=None)
        self.rows.runs.append(
            {
                "run_id": run_id,
                "pipeline_name": job,
                "status": run.status.value,
                "run_body": serialize_value(run),
                "snapshot_id": None,
                "partition": partition,
                "partition_set": None,
                "create_timestamp": when,
                "update_timestamp": when,
                "start_time": self.ts - 5,
                "end_time": self.ts,
            }
        )
        self.rows.run_tags.extend({"run_id": run_id, "key": k, "value": v} for k, v in run.tags_for_storage().items())

    def materialization(
        self, asset: dg.AssetKey, partition: str, run_id: str, job: str, metadata: dict[str, Any]
    ) -> tuple[int, float]:
        ts = self.tick()
        mat = dg.AssetMaterialization(asset_key=asset, partition=partition, metadata=metadata)
        step = None if not run_id else asset.path[-1]
        return self.event(
            _entry(run_id, job, DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(mat), ts, step)
        ), ts

    def planned_materialization(self, asset: dg.AssetKey, partition: str, run_id: str, job: str) -> None:
        data = AssetMaterializationPlannedData(asset_key=asset, partition=partition)
        self.event(_entry(run_id, job, DagsterEventType.ASSET_MATERIALIZATION_PLANNED, data, self.tick(), None))

    def check(
        self,
        asset: dg.AssetKey,
        name: str,
        partition: str,
        run_id: str,
        job: str,
        passed: bool,
        target: tuple[int, str, float],
    ) -> None:
        step = f"{asset.path[-1]}_{name}" if asset == DICOM else asset.path[-1]
        planned = AssetCheckEvaluationPlanned(
            asset_key=asset, check_name=name, partitions_subset=DefaultPartitionsSubset({partition})
        )
        self.event(_entry(run_id, job, DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED, planned, self.tick(), None))
        ts = self.tick()
        evaluation = AssetCheckEvaluation(
            asset_key=asset,
            check_name=name,
            passed=passed,
            metadata={"reason": "seeded"},
            target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
                storage_id=target[0], run_id=target[1], timestamp=target[2]
            ),
            severity=dg.AssetCheckSeverity.ERROR,
            description="Session valid: 3 scan types found" if passed else "seeded failure",
            blocking=True,
            partition=partition,
        )
        entry = _entry(run_id, job, DagsterEventType.ASSET_CHECK_EVALUATION, evaluation, ts, step)
        event_id = self.event(entry)
        self.rows.checks.append(
            {
                "asset_key": asset.to_string(),
                "check_name": name,
                "partition": partition,
                "run_id": run_id,
                "execution_status": (
                    AssetCheckExecutionRecordStatus.SUCCEEDED if passed else AssetCheckExecutionRecordStatus.FAILED
                ).value,
                "evaluation_event": serialize_value(entry),
                "evaluation_event_timestamp": self.storage._event_insert_timestamp(entry),
                "evaluation_event_storage_id": event_id,
                "materialization_event_storage_id": target[0],
            }
        )

    def flush(self) -> None:
        rows = self.rows
        with self.storage.index_connection() as conn:
            for chunk in _chunks(rows.events):
                conn.execute(SqlEventLogStorageTable.insert(), list(chunk))
            for chunk in _chunks(rows.checks):
                conn.execute(AssetCheckExecutionsTable.insert(), list(chunk))
            for entry, event_id in rows.last.values():
                self.storage._store_asset_event(conn, entry, event_id)
        if getattr(
            self.storage, "_engine", None
        ) is not None and self.instance.event_log_storage.__class__.__module__.startswith("dagster_postgres"):
            pass
        with self.instance.run_storage.connect() as conn:  # type: ignore[attr-defined]
            for chunk in _chunks(rows.runs):
                conn.execute(RunsTable.insert(), list(chunk))
            for chunk in _chunks(rows.run_tags):
                conn.execute(RunTagsTable.insert(), list(chunk))
        _bump_pg_sequence(self.instance)
        self.rows = Rows()


def _bump_pg_sequence(instance: dg.DagsterInstance) -> None:
    """Move the id sequence past the inserted ids, and gather planner statistics.

    A production database has statistics (autovacuum analyzes tables as they grow); bulk-inserted
    tables have none until autovacuum comes by, and PostgreSQL then plans Dagster's grouped joins
    as nested loops (a check-state query ran for 13 minutes, seen).
    """
    storage = instance.event_log_storage
    if "Postgres" not in type(storage).__name__:
        return
    import sqlalchemy as sa

    with storage.index_connection() as conn:
        conn.execute(
            sa.text("SELECT setval(pg_get_serial_sequence('event_logs', 'id'), (SELECT max(id) FROM event_logs))")
        )
        conn.execute(sa.text("ANALYZE"))


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextmanager
def quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def add_partitions(instance: dg.DagsterInstance, pairs: Sequence[tuple[str, str]]) -> None:
    subjects = sorted({s for s, _ in pairs} - set(instance.get_dynamic_partitions("subjects")))
    labels = sorted({n for _, n in pairs} - set(instance.get_dynamic_partitions("session_labels")))
    for chunk in _chunks(subjects, 500):
        instance.add_dynamic_partitions("subjects", list(chunk))
    if labels:
        instance.add_dynamic_partitions("session_labels", labels)


def seed_downstream(writer: Writer, pairs: Sequence[tuple[str, str]]) -> None:
    """QSIPrep per subject, then recon + parcellation of each session in one run (1 in 20 not applicable)."""
    qsiprep, recon, parc = (
        dg.AssetKey("qsiprep_subject"),
        dg.AssetKey("qsirecon_session"),
        dg.AssetKey("qsiparc_session"),
    )
    subjects = sorted({s for s, _ in pairs})
    for subject in subjects:
        run_id = str(uuid.uuid4())
        writer.planned_materialization(qsiprep, subject, run_id, "__ASSET_JOB")
        writer.materialization(
            qsiprep, subject, run_id, "__ASSET_JOB", {"neuroflow/status": "done", "sessions": "01, 02"}
        )
        writer.run(run_id, "__ASSET_JOB", subject, "qsiprep", qsiprep, [])
    for i, (subject, session) in enumerate(pairs):
        partition = key(subject, session)
        run_id = str(uuid.uuid4())
        status = "not_applicable" if i % 20 == 0 else "done"
        writer.planned_materialization(recon, partition, run_id, "__ASSET_JOB")
        writer.planned_materialization(parc, partition, run_id, "__ASSET_JOB")
        writer.materialization(recon, partition, run_id, "__ASSET_JOB", {"neuroflow/status": status, "n_outputs": 12})
        writer.materialization(parc, partition, run_id, "__ASSET_JOB", {"neuroflow/status": status, "n_tables": 4})
        writer.run(run_id, "__ASSET_JOB", partition, "qsirecon", recon, [])


def seed_sessions(
    instance: dg.DagsterInstance,
    pairs: Sequence[tuple[str, str]],
    *,
    converted: bool = True,
    protocol_passed: bool = True,
    downstream: bool = False,
) -> dict[str, float]:
    """Registers `pairs` (partitions, dicom_session, protocol check run) and, if `converted`, their BIDS run;
    `downstream` adds QSIPrep, recon and parcellation (a fully processed archive)."""
    started = time.perf_counter()
    add_partitions(instance, pairs)
    t_parts = time.perf_counter() - started
    writer = Writer(instance)
    protocol_key = dg.AssetCheckKey(DICOM, PROTOCOL)
    validator_key = dg.AssetCheckKey(BIDS, VALIDATOR)
    for subject, session in pairs:
        partition = key(subject, session)
        dicom_id, dicom_ts = writer.materialization(
            DICOM, partition, "", "__ASSET_JOB", dicom_metadata(subject, session)
        )
        check_run = str(uuid.uuid4())
        writer.check(
            DICOM, PROTOCOL, partition, check_run, "dicom_protocol_check", protocol_passed, (dicom_id, "", dicom_ts)
        )
        writer.run(check_run, "dicom_protocol_check", partition, "discovery", None, [protocol_key])
        if converted:
            bids_run = str(uuid.uuid4())
            writer.planned_materialization(BIDS, partition, bids_run, "__ASSET_JOB")
            bids_id, bids_ts = writer.materialization(
                BIDS, partition, bids_run, "__ASSET_JOB", bids_metadata(subject, session)
            )
            writer.check(BIDS, VALIDATOR, partition, bids_run, "__ASSET_JOB", True, (bids_id, bids_run, bids_ts))
            writer.run(bids_run, "__ASSET_JOB", partition, "bids_conversion", BIDS, [validator_key])
    if converted and downstream:
        seed_downstream(writer, pairs)
    t_build = time.perf_counter() - started - t_parts
    writer.flush()
    return {"partitions_s": t_parts, "build_s": t_build, "write_s": time.perf_counter() - started - t_parts - t_build}


def write_registry(state_dir: Path, pairs: Sequence[tuple[str, str]]) -> Path:
    """registry.tsv for `pairs`, as discovery writes it (the status CLI lists sessions from it)."""
    import csv
    import io

    from neuroflow_dagster.discovery.identity import REGISTRY_COLUMNS, REGISTRY_FILENAME

    buf = io.StringIO(newline="")
    out = csv.writer(buf, delimiter="\t", lineterminator="\n")
    out.writerow(REGISTRY_COLUMNS)
    for subject, session in pairs:
        scan_id = f"2024{session}01_{subject}"
        out.writerow([scan_id, subject, session, f"REC_{subject}", "2024-01-15T14:30:00",
                      f"/archive/incoming/{scan_id}", "2024-01-16T00:00:00+00:00"])  # fmt: skip
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / REGISTRY_FILENAME
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path
