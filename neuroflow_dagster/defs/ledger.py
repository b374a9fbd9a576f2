"""What Dagster's records say about a few partitions, read so that the cost follows the change.

The automation sensors (`defs/automation.py`) decide from a handful of storage ids per partition:
the latest materialization, the latest planned materialization (written when a run that targets the
partition is created) and the status of that run, plus the latest execution of a blocking check.
Storage ids grow monotonically, so "updated since it was last requested" is a comparison of two ids,
with no clock involved.

Everything here reads Dagster's public storage methods with the partitions asked about (IN lists,
chunked under SQLite's variable limit) and never scans an asset's whole history, except when asked
about more partitions than `WHOLE_ASSET_THRESHOLD` (a sensor's first tick on an existing archive),
where one grouped query per asset is cheaper than many small ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster import DagsterEventType, DagsterRunStatus

CHUNK = 500  # IN (...) lists stay under SQLite's variable limit
WHOLE_ASSET_THRESHOLD = 2000
FINISHED = frozenset({DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED})
RUN_END_EVENTS = (DagsterEventType.RUN_SUCCESS, DagsterEventType.RUN_FAILURE, DagsterEventType.RUN_CANCELED)
PAGE = 1000


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class PartitionRecord:
    """One asset partition: its latest materialization and its latest attempt (planned run)."""

    mat_id: int = 0
    mat_run_id: str = ""
    planned_id: int = 0
    planned_run_id: str = ""
    run_status: DagsterRunStatus | None = None

    @property
    def materialized(self) -> bool:
        return self.mat_id > 0

    @property
    def open_attempt(self) -> bool:
        """A run was created for the partition after its latest materialization."""
        return self.planned_id > self.mat_id

    @property
    def in_progress(self) -> bool:
        """That run is queued or running (a run whose record is gone is not)."""
        return self.open_attempt and self.run_status is not None and self.run_status not in FINISHED

    @property
    def attempt_settled(self) -> bool:
        """That run ended without materializing the partition (failed, canceled, or skipped it)."""
        return self.open_attempt and (self.run_status is None or self.run_status in FINISHED)

    @property
    def handled_id(self) -> int:
        """Everything up to this storage id has been acted on: materialized, or a run was created."""
        return max(self.mat_id, self.planned_id)


@dataclass(frozen=True)
class CheckRecord:
    """The latest execution of a partitioned check: its status and which materialization it looked at."""

    status: str  # passed | failed | running | unknown
    event_id: int
    target_mat_id: int | None
    run_id: str

    def verdict_on(self, mat_id: int) -> str | None:
        """passed / failed / running for the materialization `mat_id`; None if no execution looked at it.

        A check run targets the latest materialization when it starts (target id). An evaluation the
        discovery sensor reports with the materialization has no target, but comes after it.
        """
        if self.status == "running":
            return "running" if self.event_id > mat_id or self.target_mat_id == mat_id else None
        if self.target_mat_id == mat_id or (self.target_mat_id is None and self.event_id > mat_id):
            return self.status if self.status in ("passed", "failed") else None
        return None


@dataclass(frozen=True)
class FinishedRun:
    run_id: str
    partition: str | None
    assets: frozenset[str]  # empty for a whole-job run (e.g. `dagster job backfill`): see `tags`
    checks: frozenset[str]  # "asset:check"
    tags: dict[str, str]


class Ledger:
    """Reads for one sensor tick; caches run statuses within the tick."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.storage = instance.event_log_storage
        self._run_status: dict[str, DagsterRunStatus | None] = {}
        self._dynamic: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ the change feed

    def head(self) -> int:
        return int(self.storage.get_maximum_record_id() or 0)

    def materialized_since(self, asset: dg.AssetKey, after: int) -> dict[str, int]:
        """partition -> latest materialization storage id, for partitions materialized after `after`."""
        ids = self.storage.get_latest_storage_id_by_partition(
            asset, DagsterEventType.ASSET_MATERIALIZATION, after_cursor=after
        )
        return {p: i for p, i in ids.items() if p is not None}

    def planned_since(self, asset: dg.AssetKey, after: int) -> dict[str, int]:
        """partition -> latest planned-materialization storage id, for runs created after `after`."""
        ids = self.storage.get_latest_storage_id_by_partition(
            asset, DagsterEventType.ASSET_MATERIALIZATION_PLANNED, after_cursor=after
        )
        return {p: i for p, i in ids.items() if p is not None}

    def dynamic_partitions(self, name: str) -> list[str]:
        if name not in self._dynamic:
            self._dynamic[name] = list(self.instance.get_dynamic_partitions(name))
        return self._dynamic[name]

    def event_time(self, asset: dg.AssetKey, storage_id: int) -> float:
        """Timestamp of one asset event (0.0 if gone)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for event_type in (DagsterEventType.ASSET_MATERIALIZATION_PLANNED, DagsterEventType.ASSET_MATERIALIZATION):
                records = self.instance.get_event_records(
                    dg.EventRecordsFilter(event_type, asset_key=asset, storage_ids=[storage_id]), limit=1
                )
                if records:
                    return float(records[0].timestamp)
        return 0.0

    def runs_finished_since(self, after: int, upto: int) -> list[FinishedRun]:
        """Runs that ended (success, failure, cancel) with an event in (after, upto]."""
        run_ids: dict[str, None] = {}
        for event_type in RUN_END_EVENTS:
            cursor = None
            while True:
                result = self.instance.fetch_run_status_changes(
                    dg.RunStatusChangeRecordsFilter(
                        event_type=event_type, after_storage_id=after, before_storage_id=upto + 1
                    ),
                    limit=PAGE,
                    cursor=cursor,
                    ascending=True,
                )
                for rec in result.records:
                    run_ids.setdefault(rec.run_id, None)
                if not result.has_more:
                    break
                cursor = result.cursor
        out = []
        for chunk in chunks(list(run_ids)):
            for rec in self.instance.get_run_records(dg.RunsFilter(run_ids=list(chunk))):
                run = rec.dagster_run
                self._run_status[run.run_id] = run.status
                out.append(
                    FinishedRun(
                        run_id=run.run_id,
                        partition=run.tags.get("dagster/partition"),
                        assets=frozenset(k.to_user_string() for k in run.asset_selection or ()),
                        checks=frozenset(
                            f"{k.asset_key.to_user_string()}:{k.name}" for k in run.asset_check_selection or ()
                        ),
                        tags=dict(run.tags),
                    )
                )
        return out

    # ------------------------------------------------------------------ state of chosen partitions

    def _latest_ids(
        self, asset: dg.AssetKey, event_type: DagsterEventType, partitions: Sequence[str]
    ) -> dict[str, int]:
        if not partitions:
            return {}
        if len(partitions) > WHOLE_ASSET_THRESHOLD:
            wanted = set(partitions)
            ids = self.storage.get_latest_storage_id_by_partition(asset, event_type)
            return {p: i for p, i in ids.items() if p in wanted}
        out: dict[str, int] = {}
        for chunk in chunks(sorted(set(partitions))):
            out.update(self.storage.get_latest_storage_id_by_partition(asset, event_type, partitions=set(chunk)))
        return out

    def _event_runs(
        self, asset: dg.AssetKey, event_type: DagsterEventType, storage_ids: Iterable[int]
    ) -> dict[int, str]:
        """storage id -> run id of those events (one query per chunk)."""
        ids = sorted(set(storage_ids))
        out: dict[int, str] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for chunk in chunks(ids):
                records = self.instance.get_event_records(
                    dg.EventRecordsFilter(event_type, asset_key=asset, storage_ids=list(chunk)), limit=len(chunk)
                )
                out.update({rec.storage_id: rec.run_id for rec in records})
        return out

    def planned_ids_of_runs(self, asset: dg.AssetKey, runs: dict[str, str]) -> dict[str, int]:
        """partition -> storage id of the planned event of the given run (when that run was created)."""
        wanted = {p: r for p, r in runs.items() if r}
        out: dict[str, int] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for chunk in chunks(sorted(wanted)):
                records = self.instance.get_event_records(
                    dg.EventRecordsFilter(
                        DagsterEventType.ASSET_MATERIALIZATION_PLANNED, asset_key=asset, asset_partitions=list(chunk)
                    )
                )
                for rec in records:
                    if rec.partition_key is not None and wanted.get(rec.partition_key) == rec.run_id:
                        out[rec.partition_key] = rec.storage_id
        return out

    def run_statuses(self, run_ids: Iterable[str]) -> dict[str, DagsterRunStatus | None]:
        missing = sorted({r for r in run_ids if r and r not in self._run_status})
        for chunk in chunks(missing):
            found = {
                rec.dagster_run.run_id: rec.dagster_run.status
                for rec in self.instance.get_run_records(dg.RunsFilter(run_ids=list(chunk)))
            }
            for run_id in chunk:
                self._run_status[run_id] = found.get(run_id)
        return self._run_status

    def records(
        self, asset: dg.AssetKey, partitions: Iterable[str], *, mat_runs: bool = False
    ) -> dict[str, PartitionRecord]:
        """PartitionRecord of each partition asked about (an empty record for one never seen)."""
        keys = sorted(set(partitions))
        mats = self._latest_ids(asset, DagsterEventType.ASSET_MATERIALIZATION, keys)
        planned = self._latest_ids(asset, DagsterEventType.ASSET_MATERIALIZATION_PLANNED, keys)
        open_ids = {planned[p] for p in keys if planned.get(p, 0) > mats.get(p, 0)}
        planned_runs = self._event_runs(asset, DagsterEventType.ASSET_MATERIALIZATION_PLANNED, open_ids)
        statuses = self.run_statuses(planned_runs.values())
        mat_run = self._event_runs(asset, DagsterEventType.ASSET_MATERIALIZATION, mats.values()) if mat_runs else {}
        out = {}
        for p in keys:
            pid = planned.get(p, 0)
            run_id = planned_runs.get(pid, "")
            out[p] = PartitionRecord(
                mat_id=mats.get(p, 0),
                mat_run_id=mat_run.get(mats.get(p, 0), ""),
                planned_id=pid,
                planned_run_id=run_id,
                run_status=statuses.get(run_id) if run_id else None,
            )
        return out

    def checks(self, check: dg.AssetCheckKey, partitions: Iterable[str]) -> dict[str, CheckRecord]:
        """The latest execution of a partitioned check per partition (absent when never executed)."""
        keys = sorted(set(partitions))
        infos: list[Any] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if len(keys) > WHOLE_ASSET_THRESHOLD:
                wanted = set(keys)
                infos = [i for i in self.storage.get_asset_check_partition_info([check]) if i.partition_key in wanted]
            else:
                for chunk in chunks(keys):
                    infos.extend(self.storage.get_asset_check_partition_info([check], partition_keys=list(chunk)))
        running = [i.latest_planned_run_id for i in infos if i.latest_execution_status.value == "PLANNED"]
        statuses = self.run_statuses(running)
        out = {}
        for info in infos:
            raw = info.latest_execution_status.value
            if raw == "SUCCEEDED":
                status = "passed"
            elif raw == "FAILED":
                status = "failed"
            elif raw == "PLANNED" and statuses.get(info.latest_planned_run_id) not in (None, *FINISHED):
                status = "running"
            else:
                status = "unknown"
            out[str(info.partition_key)] = CheckRecord(
                status=status,
                event_id=info.latest_check_event_storage_id,
                target_mat_id=info.latest_target_materialization_storage_id,
                run_id=info.latest_planned_run_id,
            )
        return out

    def metadata(self, asset: dg.AssetKey, storage_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """storage id -> plain metadata values of those materializations."""
        ids = sorted(set(i for i in storage_ids if i))
        out: dict[int, dict[str, Any]] = {}
        for chunk in chunks(ids):
            records = self.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=asset, storage_ids=list(chunk)), limit=len(chunk)
            ).records
            for rec in records:
                mat = rec.asset_materialization
                out[rec.storage_id] = {k: getattr(v, "value", v) for k, v in dict(mat.metadata if mat else {}).items()}
        return out
