"""`neuroflow failures`: the dead-letter list, i.e. the cells whose state is `failed`.

Which cells: the state model (neuroflow_dagster/states.py, through control/status.py), so a cell
held (the QC gate, an exclusion, ...) or blocked by a failed upstream stage (a parcellation skipped
because its reconstruction failed in the same run) is never listed, and `neuroflow retry`, which
relaunches what this lists, never relaunches a run that can only fail again. The details of each
come from Dagster's records: the failed runs since the partition's last success (attempts), and the
STEP_FAILURE event of the newest one, whose user failure metadata carries `neuroflow/failure_class`
and `log_path` (raised by defs/execution.py and defs/assets/common.py); the class is the one the
state model gives (a known cause is never `unclassified`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import dagster as dg
from dagster import DagsterEventType, DagsterRunStatus

from neuroflow_dagster import stages
from neuroflow_dagster import states as sm
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.control import records
from neuroflow_dagster.control.status import collect_status
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.naming.partitions import split_session_key
from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY, LOG_PATH_KEY

_RUN_EVENTS = {
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.STEP_UP_FOR_RETRY,
    DagsterEventType.RUN_FAILURE,
}


def _iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds") if ts else ""


def _run_failure(instance: dg.DagsterInstance, run_id: str, asset: str) -> dict[str, Any]:
    """What one failed run says: step attempts, failure class, description and log path."""
    conn = instance.get_records_for_run(run_id, of_type=_RUN_EVENTS)
    retries: dict[str, int] = {}
    failures: dict[str, Any] = {}
    run_message = ""
    for rec in conn.records:
        event = rec.event_log_entry.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.RUN_FAILURE:
            run_message = rec.event_log_entry.message or ""
        elif event.event_type == DagsterEventType.STEP_UP_FOR_RETRY:
            retries[event.step_key or ""] = retries.get(event.step_key or "", 0) + 1
        else:
            failures[event.step_key or ""] = event.step_failure_data
    # The asset's own step (its key is the asset name); else whichever step failed in that run.
    step = asset if asset in failures else next(iter(failures), None)
    if step is None:
        return {"attempts": 1, "failure_class": "run", "last_error": run_message, "log_path": ""}
    failure = failures[step]
    user = failure.user_failure_data
    meta = records.metadata_values(user.metadata if user else {})
    error = failure.error.message.strip() if failure.error else ""
    return {
        "attempts": retries.get(step, 0) + 1,
        "failure_class": str(meta.get(FAILURE_CLASS_KEY) or "unclassified"),
        "last_error": (user.description if user and user.description else error) or run_message,
        "log_path": str(meta.get(LOG_PATH_KEY) or ""),
    }


def failed_cells(
    instance: dg.DagsterInstance, config: NeuroflowConfig, stage: str | None = None
) -> dict[str, dict[str, Any]]:
    """stage -> partition -> its failed cell (state, cause = class, reason) from the state model."""
    report = collect_status(instance, config)
    out: dict[str, dict[str, Any]] = {}
    for record in stages.stages():
        if stage and record.name != stage:
            continue
        for row in report["sessions"]:
            if row.get(record.name) == sm.FAILED:
                key = row["subject"] if record.per_subject else row["partition"]
                out.setdefault(record.name, {})[key] = row.get("why", {}).get(record.name, {})
    return out


def collect_failures(
    instance: dg.DagsterInstance, config: NeuroflowConfig, stage: str | None = None
) -> list[dict[str, Any]]:
    """One row per failed cell (stage, partition), newest first."""
    registry = Registry(config.paths.state)
    cells = failed_cells(instance, config, stage)
    rows: list[dict[str, Any]] = []
    for record in stages.stages():
        name, asset = record.name, record.asset
        if name not in cells:
            continue
        attempts = records.open_attempts(instance, asset)
        failed = {p: attempts[p][0] for p in cells[name] if p in attempts}
        runs = records.run_records(instance, failed.values())
        last_ok = records.latest_materializations(instance, asset)
        for partition, run_id in failed.items():
            after = last_ok[partition].storage_id if partition in last_ok else None
            history = records.run_records(instance, records.planned_run_ids(instance, asset, partition, after))
            failed_runs = [r for r in history.values() if r.dagster_run.status in records.FAILED_RUN]
            total_attempts = 0
            for rec in failed_runs:
                total_attempts += _run_failure(instance, rec.dagster_run.run_id, asset)["attempts"]
            latest = runs[run_id]
            info = _run_failure(instance, run_id, asset)
            if latest.dagster_run.status != DagsterRunStatus.FAILURE and info["failure_class"] == "run":
                info["last_error"] = info["last_error"] or "run canceled"
            info["failure_class"] = cells[name][partition].get("cause") or info["failure_class"]
            if record.per_subject:
                participant, session = partition, ""
            else:
                participant, session = split_session_key(partition)
            entry = registry.get(participant, session) if session else None
            rows.append(
                {
                    "stage": name,
                    "partition": partition,
                    "subject": participant,
                    "session": session,
                    "scan_id": entry.scan_id if entry else "",
                    "failure_class": info["failure_class"],
                    "attempts": max(total_attempts, info["attempts"]),
                    "failed_runs": max(len(failed_runs), 1),
                    "last_error": info["last_error"],
                    "log_path": info["log_path"],
                    "run_id": run_id,
                    "at": _iso(latest.end_time or latest.update_timestamp.timestamp()),
                }
            )
    rows.sort(key=lambda r: r["at"], reverse=True)
    return rows
