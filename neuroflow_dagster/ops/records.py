"""Bulk reads of Dagster's records: one or two queries per asset, never one per partition.

Event storage ids grow monotonically, so "materialized after" is a comparison
of storage ids; no timestamps (and no clock skew between processes) involved.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from dagster import DagsterEventType, DagsterRunStatus

from neuroflow_dagster.ops.common import STATUS_KEY

CHUNK = 500  # keeps IN (...) lists under SQLite's variable limit
IN_PROGRESS = (
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
)
FAILED_RUN = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED, DagsterRunStatus.CANCELING)


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def metadata_values(metadata: Any) -> dict[str, Any]:
    """Plain values of a Dagster metadata mapping (PathMetadataValue -> str, ...)."""
    return {k: getattr(v, "value", v) for k, v in dict(metadata or {}).items()}


@dataclass(frozen=True)
class Materialization:
    partition: str
    storage_id: int
    run_id: str
    timestamp: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def not_applicable(self) -> bool:
        return self.metadata.get(STATUS_KEY) == "not_applicable"


def latest_materializations(
    instance: dg.DagsterInstance, asset: str, *, with_metadata: bool = True
) -> dict[str, Materialization]:
    """partition -> its latest materialization (storage ids in one query, then the events in chunks).

    Reading the events (for their metadata) is most of the cost; `with_metadata=False` gives storage
    ids only, which is all staleness needs.
    """
    key = dg.AssetKey(asset)
    ids = instance.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION)
    if not with_metadata:
        return {p: Materialization(p, sid, "", 0.0) for p, sid in ids.items()}
    out: dict[str, Materialization] = {}
    for chunk in chunks(sorted(ids.values())):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, storage_ids=list(chunk)), limit=len(chunk)
        ).records
        for rec in records:
            if rec.partition_key is None:
                continue
            mat = rec.asset_materialization
            out[str(rec.partition_key)] = Materialization(
                partition=str(rec.partition_key),
                storage_id=rec.storage_id,
                run_id=rec.run_id,
                timestamp=rec.timestamp,
                metadata=metadata_values(mat.metadata if mat else {}),
            )
    return out


def open_attempts(instance: dg.DagsterInstance, asset: str) -> dict[str, tuple[str, int]]:
    """partition -> (run id, storage id) of its latest planned materialization that has no materialization.

    Those runs are queued, running, or failed; their run status says which.
    """
    storage = instance.event_log_storage
    return dict(
        storage.get_latest_asset_partition_materialization_attempts_without_materializations(dg.AssetKey(asset))
    )


def run_records(instance: dg.DagsterInstance, run_ids: Iterable[str]) -> dict[str, Any]:
    ids = sorted(set(run_ids))
    out: dict[str, Any] = {}
    for chunk in chunks(ids):
        for rec in instance.get_run_records(dg.RunsFilter(run_ids=list(chunk))):
            out[rec.dagster_run.run_id] = rec
    return out


def in_progress_runs(instance: dg.DagsterInstance) -> list[Any]:
    """Every queued or running run (one query)."""
    return list(instance.get_run_records(dg.RunsFilter(statuses=list(IN_PROGRESS))))


def latest_check_executions(instance: dg.DagsterInstance, asset: str, check_name: str) -> dict[str, Any]:
    """partition -> the latest execution record of a partitioned asset check (history read newest first)."""
    key = dg.AssetCheckKey(dg.AssetKey(asset), check_name)
    storage = instance.event_log_storage
    out: dict[str, Any] = {}
    cursor: int | None = None
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            page = storage.get_asset_check_execution_history(key, limit=1000, cursor=cursor)
        for rec in page:
            if rec.partition is not None and rec.partition not in out:
                out[rec.partition] = rec
        if len(page) < 1000:
            return out
        cursor = page[-1].id


def planned_run_ids(
    instance: dg.DagsterInstance, asset: str, partition: str, after_storage_id: int | None
) -> list[str]:
    """Run ids that planned `asset` for `partition` after a storage id (the attempts since the last success)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = instance.get_event_records(
            dg.EventRecordsFilter(
                DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
                asset_key=dg.AssetKey(asset),
                asset_partitions=[partition],
                after_cursor=after_storage_id,
            ),
            limit=10_000,
        )
    seen: dict[str, None] = {}
    for rec in records:
        seen.setdefault(rec.run_id, None)
    return list(seen)


NOT_APPLICABLE_TEXT = '"not_applicable"'


def not_applicable_partitions(instance: dg.DagsterInstance, asset: str, latest: dict[str, Materialization]) -> set[str]:
    """Partitions whose latest materialization says `neuroflow/status: not_applicable`.

    Reading every materialization's metadata means deserializing every event (most of the cost of
    `status` on a large archive), and only a few are "not applicable". So the event log is asked in
    SQL for the materializations whose stored text carries that value, and the answer is kept only
    where it is the partition's latest one. Falls back to reading the metadata if the storage is not
    Dagster's SQL event log.
    """
    key = dg.AssetKey(asset)
    storage = instance.event_log_storage
    try:
        import sqlalchemy as sa
        from dagster._core.storage.event_log.schema import SqlEventLogStorageTable as events

        query = sa.select(events.c.partition, events.c.id).where(
            events.c.asset_key == key.to_string(),
            events.c.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION.value,
            events.c.event.like(f"%{NOT_APPLICABLE_TEXT}%"),
        )
        with storage.index_connection() as conn:  # type: ignore[attr-defined]
            rows = conn.execute(query).fetchall()
        candidates = {(str(p), int(i)) for p, i in rows if p is not None}
    except Exception:  # not a SQL storage: read the metadata instead
        full = latest_materializations(instance, asset, with_metadata=True)
        return {p for p, m in full.items() if m.not_applicable}
    if not candidates:
        return set()
    # Confirm from the events themselves (only these few are deserialized).
    confirmed: set[str] = set()
    wanted = {i for p, i in candidates if p in latest and latest[p].storage_id == i}
    for chunk in chunks(sorted(wanted)):
        for rec in instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, storage_ids=list(chunk)), limit=len(chunk)
        ).records:
            mat = rec.asset_materialization
            if rec.partition_key and metadata_values(mat.metadata if mat else {}).get(STATUS_KEY) == "not_applicable":
                confirmed.add(str(rec.partition_key))
    return confirmed


@dataclass(frozen=True)
class CheckState:
    """The latest execution of a partitioned check: SUCCEEDED / FAILED / PLANNED / ..., and why it failed."""

    status: str
    reason: str = ""


def latest_check_states(instance: dg.DagsterInstance, asset: str, check_name: str) -> dict[str, CheckState]:
    """partition -> CheckState, from one grouped query; only failed executions are read for their reason."""
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

    key = dg.AssetCheckKey(dg.AssetKey(asset), check_name)
    storage = instance.event_log_storage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infos = storage.get_asset_check_partition_info([key])
    out = {str(i.partition_key): CheckState(i.latest_execution_status.value) for i in infos if i.partition_key}
    failed = {p for p, s in out.items() if s.status == "FAILED"}
    cursor: int | None = None
    while failed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            page = storage.get_asset_check_execution_history(
                key, limit=1000, cursor=cursor, status={AssetCheckExecutionRecordStatus.FAILED}
            )
        for rec in page:
            if rec.partition in failed:
                evaluation = rec.evaluation
                reason = ""
                if evaluation is not None:
                    reason = str(evaluation.description or metadata_values(evaluation.metadata).get("reason") or "")
                out[rec.partition] = CheckState("FAILED", reason)
                failed.discard(rec.partition)
        if len(page) < 1000:
            break
        cursor = page[-1].id
    return out
