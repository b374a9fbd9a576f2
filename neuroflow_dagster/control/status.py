"""`neuroflow status`: every registered session's state per stage, plus the folders discovery holds back.

States per stage: missing / queued / running / done / failed / stale /
not_applicable / excluded. All of it comes from Dagster's records (latest
materialization per partition, planned-but-unmaterialized attempts and their
run status, in-progress runs, the `protocol` check executions), read in a few
bulk queries per asset straight from the instance's tables (control/dagster_db.py:
this path never imports dagster, which alone costs more than the 2 s budget of
`status` at 20,000 sessions); the ScanID registry, exclusions and the discovery
status report supply what Dagster has no partition for.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from neuroflow_dagster import stages
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.control import dagster_db
from neuroflow_dagster.control.dagster_db import Db, RunInfo
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


def _run_state(status: str) -> str:
    return "running" if status in dagster_db.RUN_RUNNING else "queued"


def _assets_of_run(run: RunInfo) -> set[str]:
    names = set(run.assets)
    if not names:  # a job run without an explicit selection: the stage tag names its asset
        stage = stages.by_tag(run.tags.get(STAGE_TAG, ""))
        if stage:
            names.add(stage.asset)
    return names


def load_views(db: Db) -> tuple[dict[str, AssetView], dict[str, Any], set[str]]:
    """Per-asset views, the protocol check's latest execution per partition, and partitions being checked."""
    stage_assets = [s.asset for s in stages.stages()]
    active_by_asset: dict[str, dict[str, str]] = {a: {} for a in [SOURCE_ASSET, *stage_assets]}
    checking: set[str] = set()
    for run in db.in_progress_runs():
        partition = run.tags.get(PARTITION_TAG)
        if not partition:
            continue
        for asset in _assets_of_run(run):
            if asset in active_by_asset:
                active_by_asset[asset][partition] = _run_state(run.status)
        if (SOURCE_ASSET, PROTOCOL_CHECK) in run.checks:
            checking.add(partition)
        if run.tags.get(STAGE_TAG) == "discovery":  # the discovery sensor's check job (whole job, no selection)
            checking.add(partition)

    # The source asset is never planned by a stage run status tracks: its materializations only.
    ids = {asset: db.latest_ids(asset, planned=asset != SOURCE_ASSET) for asset in [SOURCE_ASSET, *stage_assets]}
    attempts = {asset: db.open_attempts(asset, *ids[asset]) for asset in stage_assets}
    statuses = db.run_statuses(run_id for a in attempts.values() for run_id, _ in a.values())
    views: dict[str, AssetView] = {}
    for asset in [SOURCE_ASSET, *stage_assets]:
        active = dict(active_by_asset[asset])
        failed: dict[str, str] = {}
        for partition, (run_id, _storage_id) in attempts.get(asset, {}).items():
            status = statuses.get(run_id)
            if status in dagster_db.RUN_IN_PROGRESS:
                active.setdefault(partition, _run_state(status))
            elif status in dagster_db.RUN_FAILED:
                failed[partition] = run_id
        # Storage ids only (staleness); "not applicable" is looked up in SQL for the few it applies to.
        mats = ids[asset][0]
        na = db.not_applicable_partitions(asset, mats) if asset != SOURCE_ASSET else set()
        views[asset] = AssetView(mats, active, failed, na)
    checks = db.latest_check_states(SOURCE_ASSET, PROTOCOL_CHECK)
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


def load_qc(db: Db) -> QcView:
    checks = db.latest_check_states(QC_ASSET, QC_CHECK)
    mats = db.latest_ids(QC_ASSET, planned=False)[0] if checks else {}
    na = db.not_applicable_partitions(QC_ASSET, mats) if mats else set()
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



class Upstream:
    """The newest upstream storage id of a partition, for staleness: the stage's upstream plan is looked
    up once per asset and a subject's newest session-level materialization once per subject, not once
    per session and stage (80,000 times at 20,000 sessions)."""

    def __init__(self, views: dict[str, AssetView], sessions_of: dict[str, list[str]]) -> None:
        self.views = views
        self.sessions_of = sessions_of
        self._plans: dict[str, list[tuple[str, str]]] = {}
        self._of_subject: dict[tuple[str, str], int] = {}

    def newest(self, asset: str, participant: str, partition: str) -> int:
        """The largest storage id among the partition's upstream materializations (0: none)."""
        plan = self._plans.get(asset)
        if plan is None:
            plan = self._plans[asset] = _upstream(asset)
        newest = 0
        for upstream, how in plan:
            if how == "sessions_of_subject":
                sid = self._subject_max(upstream, participant)
            else:
                sid = self.views[upstream].materialized.get(partition if how == "same" else participant, 0)
            if sid > newest:
                newest = sid
        return newest

    def _subject_max(self, upstream: str, participant: str) -> int:
        key = (upstream, participant)
        sid = self._of_subject.get(key)
        if sid is None:
            mats = self.views[upstream].materialized
            sid = max((mats.get(session_key(participant, s), 0) for s in self.sessions_of.get(participant, [])),
                      default=0)  # fmt: skip
            self._of_subject[key] = sid
        return sid


def stage_state(
    asset: str,
    partition: str,
    participant: str,
    views: dict[str, AssetView],
    sessions_of: dict[str, list[str]],
    upstream: Upstream | None = None,
) -> str:
    """One partition of one asset: in-progress first, then a failed latest attempt, then its materialization.

    Pass one `Upstream` for all the calls of a report (it caches per subject)."""
    view = views[asset]
    if partition in view.active:
        return view.active[partition]
    if partition in view.failed:
        return "failed"
    mat = view.materialized.get(partition)
    if mat is None:
        return "missing"
    if (upstream or Upstream(views, sessions_of)).newest(asset, participant, partition) > mat:
        return "stale"
    return "not_applicable" if partition in view.not_applicable else "done"


def collect_status(
    source: Any,
    config: NeuroflowConfig,
    *,
    subject: str | None = None,
    stage: str | None = None,
    failed_only: bool = False,
) -> dict[str, Any]:
    """{"sessions": [...], "held": [...], "totals": {...}}; `stage` limits the stage columns to one.

    `source`: a `Db` (the CLI: the instance's tables, no dagster import) or a DagsterInstance (its own
    connections, same queries)."""
    registry = Registry(config.paths.state)
    excluded = load_exclusions(config)
    if isinstance(source, Db):
        views, checks, checking = load_views(source)
        qc = load_qc(source)
    else:
        with Db.from_instance(source) as db:
            views, checks, checking = load_views(db)
            qc = load_qc(db)
    approved = load_approvals(config)
    entries = registry.all()
    sessions_of: dict[str, list[str]] = {}
    for entry in entries:
        sessions_of.setdefault(entry.participant_id, []).append(entry.session_id)
    upstream = Upstream(views, sessions_of)
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
                "excluded" if exclusion else stage_state(column.asset, key, participant, views, sessions_of, upstream)
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


__all__ = ["STATES", "Upstream", "collect_status", "stage_state", "totals"]
