"""`neuroflow logs`: the tool log files of a run, or the newest one of a partition.

Every tool run writes one file, log_dir/<stage>/<partition>_<time>_<run8>.log
(naming/logs.py `run_log_path`), and records its path in the
materialization or failure metadata (`log_path`). A run without such a file
(refused before the tool started) is shown through Dagster's event log.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from pathlib import Path

import dagster as dg
from dagster import DagsterEventType

from neuroflow_dagster import stages
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.control import records
from neuroflow_dagster.control.targets import PartitionRef
from neuroflow_dagster.naming.logs import partition_log_glob, stage_log_dir
from neuroflow_dagster.naming.tags import LOG_PATH_KEY

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)


def looks_like_run_id(text: str) -> bool:
    return bool(_UUID.match(text.strip()))


def run_log_paths(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """log_path of every materialization and step failure of the run, in event order."""
    conn = instance.get_records_for_run(
        run_id, of_type={DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.STEP_FAILURE}
    )
    paths: list[str] = []
    for rec in conn.records:
        event = rec.event_log_entry.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            meta = records.metadata_values(event.step_materialization_data.materialization.metadata)
        else:
            user = event.step_failure_data.user_failure_data
            meta = records.metadata_values(user.metadata if user else {})
        path = str(meta.get(LOG_PATH_KEY) or "")
        if path and path not in paths:
            paths.append(path)
    return paths


def run_event_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The run's Dagster event log as lines: time, level, step, message."""
    lines = []
    for entry in instance.all_logs(run_id):
        stamp = datetime.fromtimestamp(entry.timestamp).strftime("%Y-%m-%d %H:%M:%S")
        level = logging.getLevelName(entry.level) if isinstance(entry.level, int) else str(entry.level)
        step = f" [{entry.step_key}]" if entry.step_key else ""
        event = entry.dagster_event
        kind = f" {event.event_type.name}" if event else ""
        message = entry.message or entry.user_message or ""
        if event is not None and event.event_type == DagsterEventType.STEP_FAILURE:
            failure = event.step_failure_data
            user = failure.user_failure_data
            detail = user.description if user and user.description else (failure.error.message if failure.error else "")
            message = f"{message} {detail.strip()}".strip()
        lines.append(f"{stamp} {level}{kind}{step}: {message}")
    return lines


def partition_log_files(config: NeuroflowConfig, ref: PartitionRef, stage: str | None = None) -> list[tuple[str, Path]]:
    """(stage, newest log file) for the partition, per stage in pipeline order.

    A session also shows its subject's QSIPrep log; a subject shows its QSIPrep
    log (session stages need a session).
    """
    out: list[tuple[str, Path]] = []
    for record in stages.stages():
        name = record.name
        if stage and name != stage:
            continue
        if record.per_subject:
            key = ref.participant
        elif ref.session is not None:
            key = ref.key
        else:
            continue
        folder = stage_log_dir(config.paths.log_dir, name)
        files = [p for p in folder.glob(partition_log_glob(key)) if p.is_file()] if folder.is_dir() else []
        if files:
            out.append((name, max(files, key=lambda p: (p.stat().st_mtime, p.name))))
    return out
