"""`neuroflow status`: every registered session's state per stage, plus the folders discovery holds back.

States per stage: missing / queued / running / done / failed / stale /
not_applicable / excluded. All of it comes from Dagster's records (latest
materialization per partition, planned-but-unmaterialized attempts and their
run status, in-progress runs, the `protocol` check executions), read in a few
bulk queries per asset; the ScanID registry, exclusions and the discovery
status report supply what Dagster has no partition for.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from dagster import DagsterRunStatus

from neuroflow_dagster import stages
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.control import records
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.discovery.status_report import read_status_report
from neuroflow_dagster.naming.partitions import session_key
from neuroflow_dagster.naming.tags import PARTITION_TAG, STAGE_TAG
from neuroflow_dagster.qc.approvals import load_approvals
from neuroflow_dagster.stages import PROTOCOL_CHECK, QC_ASSET, QC_CHECK, SOURCE_ASSET, SUBJECT

STATES = ("missing", "queued", "running", "done", "failed", "stale", "not_applicable", "excluded", "retired")


def _upstream(asset: str) -> list[tuple[str, str]]:
    """Which upstream assets make a partition of ``asset`` stale, and which of their partitions:
    "same" partition, the session's "subject", or all "sessions_of_subject" (from the stage levels).
    Cached per stage registry: status asks once per session and stage (80,000 times at 20,000 sessions)."""
    return _upstream_of(asset, tuple(s.name for s in stages.stages()))


@functools.lru_cache(maxsize=256)
def _upstream_of(asset: str, _registry: tuple[str, ...]) -> list[tuple[str, str]]:
    record = stages.by_asset(asset)
    assert record is not None, asset
    out = []
    for upstream, level in stages.upstream_assets(record):
        if level == record.level:
            how = "same"
        else:
            how = "subject" if level == SUBJECT else "sessions_of_subject"
        out.append((upstream, how))
    return out


@dataclass
class AssetView:
    """Everything status needs about one asset, keyed by partition."""

    materialized: dict[str, int]  # partition -> storage id of its latest materialization
    active: dict[str, str]  # partition -> queued | running
    failed: dict[str, str]  # partition -> run id of the failed latest attempt
    not_applicable: set[str] = field(default_factory=set)  # latest materialization says so


def _run_state(status: DagsterRunStatus) -> str:
    return "running" if status in (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED) else "queued"


def _assets_of_run(run: Any) -> set[str]:
    selection = getattr(run, "asset_selection", None) or set()
    names = {key.to_user_string() for key in selection}
    if not names:  # a job run without an explicit selection: the stage tag names its asset
        stage = stages.by_tag(run.tags.get(STAGE_TAG, ""))
        if stage:
            names.add(stage.asset)
    return names


def load_views(instance: dg.DagsterInstance) -> tuple[dict[str, AssetView], dict[str, Any], set[str]]:
    """Per-asset views, the protocol check's latest execution per partition, and partitions being checked."""
    stage_assets = [s.asset for s in stages.stages()]
    active_by_asset: dict[str, dict[str, str]] = {a: {} for a in [SOURCE_ASSET, *stage_assets]}
    checking: set[str] = set()
    for rec in records.in_progress_runs(instance):
        run = rec.dagster_run
        partition = run.tags.get(PARTITION_TAG)
        if not partition:
            continue
        for asset in _assets_of_run(run):
            if asset in active_by_asset:
                active_by_asset[asset][partition] = _run_state(run.status)
        for check_key in getattr(run, "asset_check_selection", None) or set():
            if check_key.asset_key.to_user_string() == SOURCE_ASSET and check_key.name == PROTOCOL_CHECK:
                checking.add(partition)
        if run.tags.get(STAGE_TAG) == "discovery":  # the discovery sensor's check job (whole job, no selection)
            checking.add(partition)

    ids = {asset: records.latest_ids(instance, asset) for asset in [SOURCE_ASSET, *stage_assets]}
    attempts = {asset: records.open_attempts(instance, asset, *ids[asset]) for asset in stage_assets}
    runs = records.run_records(instance, (run_id for a in attempts.values() for run_id, _ in a.values()))
    views: dict[str, AssetView] = {}
    for asset in [SOURCE_ASSET, *stage_assets]:
        active = dict(active_by_asset[asset])
        failed: dict[str, str] = {}
        for partition, (run_id, _storage_id) in attempts.get(asset, {}).items():
            rec = runs.get(run_id)
            if rec is None:
                continue
            status = rec.dagster_run.status
            if status in records.IN_PROGRESS:
                active.setdefault(partition, _run_state(status))
            elif status in records.FAILED_RUN:
                failed[partition] = run_id
        # Storage ids only (staleness); "not applicable" is looked up in SQL for the few it applies to.
        mats = ids[asset][0]
        na = records.not_applicable_partitions(instance, asset, mats) if asset != SOURCE_ASSET else set()
        views[asset] = AssetView(mats, active, failed, na)
    checks = records.latest_check_states(instance, SOURCE_ASSET, PROTOCOL_CHECK)
    return views, checks, checking


def _protocol(check: Any, checking: bool) -> tuple[str, str]:
    if checking:
        return "checking", ""
    if check is None:
        return "unchecked", ""
    status = check.status
    reason = check.reason
    if status == "SUCCEEDED":
        return "passed", reason
    if status == "FAILED":
        return "failed", reason
    return "pending", ""


@dataclass(frozen=True)
class QcView:
    """The image QC gate for status: the latest `image_qc` check state per session partition (one grouped
    query; only the executions that did not pass are read, for their `neuroflow/qc` state and summary)
    and the partitions whose latest QC materialization had nothing to judge."""

    checks: dict[str, Any]
    not_applicable: set[str]


def load_qc(instance: dg.DagsterInstance) -> QcView:
    checks = records.latest_check_states(instance, QC_ASSET, QC_CHECK)
    mats = records.latest_ids(instance, QC_ASSET)[0] if checks else {}
    na = records.not_applicable_partitions(instance, QC_ASSET, mats) if mats else set()
    return QcView(checks, na)


def qc_state(check: Any, approved: bool, not_applicable: bool = False) -> str:
    """The QC column: passed / warn / FAILED / approved / - (not judged yet, or nothing to judge).

    From the latest `image_qc` check execution: passed when it succeeded, else its `neuroflow/qc`
    metadata (warn / failed / approved); a failure approved since (its relaunch still to come)
    already reads `approved`.
    """
    if check is None or not_applicable:
        return "-"
    if check.status == "SUCCEEDED":
        return "passed"
    if check.status != "FAILED":
        return "-"
    state = str(check.metadata.get("neuroflow/qc", ""))
    if state == "failed":
        return "approved" if approved else "FAILED"
    if state in ("warn", "approved"):
        return state
    return "-"


def _upstream_storage_ids(
    asset: str, participant: str, partition: str, views: dict[str, AssetView], sessions_of: dict[str, list[str]]
) -> list[int]:
    ids: list[int] = []
    for upstream, how in _upstream(asset):
        mats = views[upstream].materialized
        if how == "same":
            keys = [partition]
        elif how == "subject":
            keys = [participant]
        else:
            keys = [session_key(participant, s) for s in sessions_of.get(participant, [])]
        ids.extend(mats[k] for k in keys if k in mats)
    return ids


def stage_state(
    asset: str, partition: str, participant: str, views: dict[str, AssetView], sessions_of: dict[str, list[str]]
) -> str:
    """One partition of one asset: in-progress first, then a failed latest attempt, then its materialization."""
    view = views[asset]
    if partition in view.active:
        return view.active[partition]
    if partition in view.failed:
        return "failed"
    mat = view.materialized.get(partition)
    if mat is None:
        return "missing"
    if any(sid > mat for sid in _upstream_storage_ids(asset, participant, partition, views, sessions_of)):
        return "stale"
    return "not_applicable" if partition in view.not_applicable else "done"


def collect_status(
    instance: dg.DagsterInstance,
    config: NeuroflowConfig,
    *,
    subject: str | None = None,
    stage: str | None = None,
    failed_only: bool = False,
) -> dict[str, Any]:
    """{"sessions": [...], "held": [...], "totals": {...}}; `stage` limits the stage columns to one."""
    registry = Registry(config.paths.state)
    excluded = load_exclusions(config)
    views, checks, checking = load_views(instance)
    qc = load_qc(instance)
    approved = load_approvals(config)
    entries = registry.all()
    sessions_of: dict[str, list[str]] = {}
    for entry in entries:
        sessions_of.setdefault(entry.participant_id, []).append(entry.session_id)
    columns = [stages.stage(stage)] if stage else stages.stages()
    wanted = subject.removeprefix("sub-") if subject else None

    report = read_status_report(config)
    # Registered sessions the last tick held for a new reason (remapped, missing, unreadable, ...).
    held_now = {str(h.get("scan_id")): h for h in report.get("held", []) if h.get("reason") != "excluded"}
    merged = registry.blocked_labels()
    rows: list[dict[str, Any]] = []
    for entry in entries:
        participant, session = entry.participant_id, entry.session_id
        if wanted and participant != wanted:
            continue
        partition = session_key(participant, session)
        protocol, reason = _protocol(checks.get(partition), partition in checking)
        exclusion = excluded.get(entry.scan_id)
        row: dict[str, Any] = {
            "subject": participant,
            "session": session,
            "scan_id": entry.scan_id,
            "partition": partition,
            "mapping": f"mapped ({entry.recruitment_id})",
            "protocol": protocol,
            "protocol_reason": reason,
        }
        for column in columns:
            key = participant if column.per_subject else partition
            row[column.name] = (
                "excluded" if exclusion else stage_state(column.asset, key, participant, views, sessions_of)
            )
        row["qc"] = "-" if exclusion else qc_state(
            qc.checks.get(partition), entry.scan_id in approved, partition in qc.not_applicable
        )
        row["note"] = f"excluded: {exclusion.get('reason')}" if exclusion else ""
        if row["qc"] == "FAILED" and not row["note"]:
            summary = qc.checks[partition].metadata.get("qc_summary", "") or qc.checks[partition].reason
            row["note"] = f"{summary}; `neuroflow qc approve {entry.scan_id} --reason ...` lets it through"
        if participant in merged:
            row["note"] = "identity conflict: sessions of two SubjectCodes (see problems)"
        elif entry.scan_id in held_now:
            row["note"] = f"held: {held_now[entry.scan_id].get('reason')} (see held folders)"
        if failed_only and row["qc"] != "FAILED" and not any(row[column.name] == "failed" for column in columns):
            continue
        rows.append(row)
    if not failed_only:
        rows += [
            _retired_row(e, [c.name for c in columns])
            for e in registry.retired()
            if not wanted or e.participant_id == wanted
        ]

    held: list[dict[str, Any]] = []
    if not failed_only and not wanted:
        for item in report.get("held", []):
            if item.get("reason") == "excluded" and registry.lookup(str(item.get("scan_id", ""))) is not None:
                continue  # a registered session excluded later: shown above, as excluded
            held.append(
                {
                    "scan_id": item.get("scan_id", ""),
                    "state": item.get("reason", ""),
                    "registered": item.get("registered", ""),
                    "reason": item.get("message", ""),
                    "path": item.get("path", ""),
                }
            )
    return {
        "sessions": rows,
        "held": held,
        "problems": report.get("problems", []) if not wanted else [],
        "notes": report.get("notes", []) if not wanted else [],
        "totals": totals(rows, held, [c.name for c in columns]),
    }


def _retired_row(entry: Any, names: list[str]) -> dict[str, Any]:
    """A binding re-keyed by an operator: its labels stay reserved and its outputs stay on disk."""
    row: dict[str, Any] = {
        "subject": entry.participant_id,
        "session": entry.session_id,
        "scan_id": entry.scan_id,
        "partition": session_key(entry.participant_id, entry.session_id),
        "mapping": f"retired ({entry.recruitment_id})",
        "protocol": "-",
        "protocol_reason": "",
    }
    row.update({name: "retired" for name in names})
    row["qc"] = "-"
    row["note"] = f"re-keyed: {entry.note}"
    return row


def totals(rows: list[dict[str, Any]], held: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Counts per stage and state; a subject-level stage (QSIPrep) is counted per subject (one run each)."""
    out: dict[str, Any] = {"sessions": len(rows), "held": len(held)}
    out["held_by_reason"] = dict(Counter(h["state"] for h in held))
    out["protocol"] = dict(Counter(r["protocol"] for r in rows if r["protocol"] != "-"))
    out["qc"] = dict(Counter(r.get("qc", "-") for r in rows if r.get("qc", "-") != "-"))
    for name in names:
        if stages.stage(name).per_subject:
            per_subject = {r["subject"]: r[name] for r in rows}
            out[name] = dict(Counter(per_subject.values()))
        else:
            out[name] = dict(Counter(r[name] for r in rows))
    return out


__all__ = ["STATES", "collect_status", "stage_state", "totals"]
