"""`neuroflow status`: every registered session's state per stage, plus the folders discovery holds back.

Each cell is in one state of the state model (neuroflow_dagster/states.py: done, running, queued,
waiting, held, blocked, not_applicable, failed; with its cause and reason), derived there from the
facts gathered here. All of it comes from Dagster's records (latest
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
from neuroflow_dagster import states as sm
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.control import dagster_db
from neuroflow_dagster.control.dagster_db import Db, RunFailure, RunInfo
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.discovery.status_report import read_status_report
from neuroflow_dagster.eligibility import qsiprep_plan_from_metadata
from neuroflow_dagster.naming.partitions import session_key
from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY, PARTITION_TAG, STAGE_TAG
from neuroflow_dagster.qc.approvals import load_approvals
from neuroflow_dagster.runtimes.failures import FailureClass, classify
from neuroflow_dagster.stages import PROTOCOL_CHECK, QC_ASSET, QC_CHECK, SOURCE, SOURCE_ASSET, SUBJECT

STATES = sm.STATES
CHECK_FAILED_ERROR = "DagsterAssetCheckFailedError"  # a blocking check failed in the step (the QC gate)


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
    attempts: dict[str, sm.Attempt] = field(default_factory=dict)  # partition -> what its failed attempt says
    reasons: dict[str, str] = field(default_factory=dict)  # not applicable partition -> its recorded reason


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
        meta = db.materialization_metadata(mats[p] for p in na) if na else {}
        reasons = {p: str(meta.get(mats[p], {}).get("reason") or "") for p in na}
        views[asset] = AssetView(mats, active, failed, na, reasons=reasons)
    # The few failed attempts: which step failed in their run, and why (a run's own events).
    failures = db.run_failures({r for v in views.values() for r in v.failed.values()}, FAILURE_CLASS_KEY)
    for asset, view in views.items():
        view.attempts = {
            p: attempt_of(asset, failures.get(run_id), statuses.get(run_id, "")) for p, run_id in view.failed.items()
        }
    checks = db.latest_check_states(SOURCE_ASSET, PROTOCOL_CHECK)
    return views, checks, checking


def step_class(step: dagster_db.StepFailure) -> str:
    """A failed step's class: the one the stage recorded; else a known cause read from the error (the QC
    gate's blocking check, a message the failure classifier knows); else `unclassified` (an unexpected
    exception: a defect to report, not a tool failure)."""
    if step.failure_class:
        return step.failure_class
    if step.error_class == CHECK_FAILED_ERROR:
        return sm.QC_STEP_FAILURE_CLASS
    known = classify(step.message, None)
    return "unclassified" if known is FailureClass.TOOL else str(known)


def attempt_of(asset: str, failure: RunFailure | None, run_status: str) -> sm.Attempt:
    """What a failed attempt of `asset` says: its own step failed (class, message), another step failed
    (which stage: a skipped step is not a failure of its own), or none did (cancelled, worker lost,
    stopped at the maximum runtime)."""
    failure = failure or RunFailure({})
    own = failure.steps.get(asset)
    if own is not None:
        return sm.Attempt(True, step_class(own), own.message)
    for step in failure.steps:
        if step == QC_ASSET:
            return sm.Attempt(False, sm.QC_STEP_FAILURE_CLASS, "", sm.QC_STEP_FAILURE_CLASS)
        by_asset = stages.by_asset(step)
        return sm.Attempt(False, "", "", by_asset.name if by_asset else step)
    message = failure.message
    if failure.tagged_class:
        cls = failure.tagged_class
    elif run_status in ("CANCELED", "CANCELING"):
        cls, message = "canceled", message or "run canceled"
    elif "maximum runtime" in message:
        cls = str(FailureClass.RESOURCE)  # stopped at its hard limit (docs/domain-rules.md#failures)
    else:
        cls = "run"
    return sm.Attempt(False, cls, message)


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

    def newer(self, asset: str, participant: str, partition: str, than: int) -> str:
        """The first upstream asset materialized after storage id `than` (empty: none, the cell is current)."""
        plan = self._plans.get(asset)
        if plan is None:
            plan = self._plans[asset] = _upstream(asset)
        for upstream, how in plan:
            if how == "sessions_of_subject":
                sid = self._subject_max(upstream, participant)
            else:
                sid = self.views[upstream].materialized.get(partition if how == "same" else participant, 0)
            if sid > than:
                return upstream
        return ""

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
    """One partition's state from its own records alone (no hold, no upstream cell): the state model's
    word. Pass one `Upstream` for all the calls of a report (it caches per subject)."""
    facts = record_facts(stages.by_asset(asset).name, asset, partition, participant, views,  # type: ignore[union-attr]
                         upstream or Upstream(views, sessions_of))  # fmt: skip
    return sm.derive(facts).state


def record_facts(
    stage: str, asset: str, key: str, participant: str, views: dict[str, AssetView], upstream: Upstream, **holds: Any
) -> sm.Facts:
    """What Dagster's records say about one cell (plus the holds the caller knows of)."""
    view = views[asset]
    mat = view.materialized.get(key)
    stale = ""
    if mat is not None:
        newer = upstream.newer(asset, participant, key, mat)
        by = stages.by_asset(newer)
        stale = by.name if by else newer
    return sm.Facts(
        stage=stage,
        active=view.active.get(key),
        attempt=view.attempts.get(key) if key in view.failed else None,
        materialized=mat is not None,
        stale_after=stale,
        not_applicable=view.reasons.get(key, "") if key in view.not_applicable else None,
        **holds,
    )


def _subject_upstream(cells: list[sm.Cell]) -> list[tuple[str, sm.Cell]]:
    """A subject-level stage reads all the subject's sessions: it waits while one of them can still come,
    and takes over what stops them all (held, blocked, not applicable) only when every session is stopped."""
    if not cells or any(c.state in (sm.DONE, sm.RUNNING, sm.QUEUED, sm.WAITING) for c in cells):
        return []
    return [("bids_conversion", c) for c in cells]


def anatomical_holds(
    db: Db, config: NeuroflowConfig, views: dict[str, AssetView], subjects: dict[str, list[str]]
) -> dict[str, str]:
    """subject -> why QSIPrep cannot run for want of an anatomical image, for the subjects whose QSIPrep is
    not made yet: the plan the automation and the asset make (eligibility.qsiprep_plan_from_metadata),
    from their converted sessions' `bids_session` metadata (a few events read, not all)."""
    if config.pipelines.qsiprep.anat_modality == "none":
        return {}
    prep = stages.stage("qsiprep").asset
    bids = views[stages.stage("bids_conversion").asset].materialized
    prep_view = views[prep]
    wanted: dict[str, dict[str, int]] = {}
    for participant, labels in subjects.items():
        if prep_view.active.get(participant) or participant in prep_view.materialized:
            continue  # running, or made: its own record says more than the suffixes
        converted = {label: bids[session_key(participant, label)] for label in labels
                     if session_key(participant, label) in bids}  # fmt: skip
        if converted:
            wanted[participant] = converted
    meta = db.materialization_metadata(sid for c in wanted.values() for sid in c.values()) if wanted else {}
    out: dict[str, str] = {}
    for participant, converted in wanted.items():
        found = {ses: meta.get(sid, {}) for ses, sid in converted.items()}
        plan = qsiprep_plan_from_metadata(config, participant, found)
        if plan.hold:
            out[participant] = plan.hold
    return out


_DONE = sm.Cell(sm.DONE)
_NEEDS_A_PERSON = (sm.FAILED, sm.BLOCKED, sm.HELD)


@dataclass(frozen=True)
class Holds:
    """What every cell of a session row shares: operator holds and the QC gate."""

    excluded: str | None
    identity: str | None
    qc_gate: sm.Cell | None
    qc: str  # the QC column
    held: dict[str, Any] | None  # the discovery report's item for a registered session held for a new reason
    exclusion: dict[str, Any] | None


def _cells(
    rows: list[dict[str, Any]],
    base: list[Holds],
    views: dict[str, AssetView],
    upstream: Upstream,
    anat: dict[str, str],
    pools_held: set[str],
) -> list[dict[str, sm.Cell]]:
    """Every row's cells, stage by stage in pipeline order (a cell reads its upstream cells).

    A cell with nothing but a current materialization is `done` without building its facts: at 20,000
    sessions that is nearly every cell, and the rules (states.derive) run only for the others."""
    cells: list[dict[str, sm.Cell]] = [{} for _ in rows]
    rows_of: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        rows_of.setdefault(row["subject"], []).append(i)
    for record in stages.stages():
        pool_held = record.pool in pools_held
        view = views[record.asset]
        mats, special = view.materialized, view.active.keys() | view.failed.keys() | view.not_applicable
        if record.per_subject:
            # One cell per subject: its upstream is all its sessions; a session's own hold (excluded, identity)
            # shows in that session's row only.
            for participant, indices in rows_of.items():
                gate = None
                if participant in anat:
                    gate = sm.Cell(sm.HELD, sm.HOLD_NO_ANAT, f"QSIPrep has no anatomical image: {anat[participant]}")
                if (gate is None and participant in mats and participant not in special
                        and not upstream.newer(record.asset, participant, participant, mats[participant])):
                    cell = _DONE
                else:
                    ups = _subject_upstream([cells[j][u] for j in indices for u in record.upstream if u in cells[j]])
                    facts = record_facts(record.name, record.asset, participant, participant, views, upstream,
                                         gate=gate, pool_held=pool_held, disk_reason=_DISK_REASON)
                    cell = sm.derive(facts, ups)
                for j in indices:
                    own = base[j]
                    if own.excluded is not None or own.identity is not None:
                        cells[j][record.name] = sm.derive(
                            sm.Facts(record.name, excluded=own.excluded, identity=own.identity)
                        )
                    else:
                        cells[j][record.name] = cell
            continue  # fmt: skip
        gated = record.name in stages.QC_GATED_STAGES
        for i, row in enumerate(rows):
            holds = base[i]
            key, participant = row["partition"], row["subject"]
            gate = holds.qc_gate if gated else None
            if (gate is None and holds.excluded is None and holds.identity is None and key in mats
                    and key not in special and not upstream.newer(record.asset, participant, key, mats[key])):
                cells[i][record.name] = _DONE
                continue
            ups = [(u, cells[i][u]) if u != SOURCE else (sm.PROTOCOL, sm.protocol_cell(row["protocol"],
                   row["protocol_reason"])) for u in record.upstream]  # fmt: skip
            facts = record_facts(record.name, record.asset, key, participant, views, upstream,
                                 excluded=holds.excluded, identity=holds.identity, gate=gate,
                                 qc_approved=holds.qc == "approved", pool_held=pool_held,
                                 disk_reason=_DISK_REASON)  # fmt: skip
            cells[i][record.name] = sm.derive(facts, ups)
    return cells


def collect_status(
    source: Any,
    config: NeuroflowConfig,
    *,
    subject: str | None = None,
    stage: str | None = None,
    failed_only: bool = False,
) -> dict[str, Any]:
    """{"sessions": [...], "held": [...], "totals": {...}}; `stage` limits the stage columns to one.

    Each session row has one key per stage with its state word, and "why": {stage: {"cause", "reason"}}
    for the cells that have one. `source`: a `Db` (the CLI: the instance's tables, no dagster import) or
    a DagsterInstance (its own connections, same queries)."""
    if isinstance(source, Db):
        return _collect(source, config, subject, stage, failed_only)
    with Db.from_instance(source) as db:
        return _collect(db, config, subject, stage, failed_only)


def _collect(
    db: Db, config: NeuroflowConfig, subject: str | None, stage: str | None, failed_only: bool
) -> dict[str, Any]:
    registry = Registry(config.paths.state)
    excluded = load_exclusions(config)
    views, checks, checking = load_views(db)
    qc = load_qc(db)
    pools_held = set(db.held_pools(sorted({s.pool for s in stages.stages()})))
    approved = load_approvals(config)
    entries = registry.all()
    sessions_of: dict[str, list[str]] = {}
    for entry in entries:
        sessions_of.setdefault(entry.participant_id, []).append(entry.session_id)
    upstream = Upstream(views, sessions_of)
    columns = [stages.stage(stage)] if stage else stages.stages()
    wanted = subject.removeprefix("sub-") if subject else None
    if wanted:
        entries = [e for e in entries if e.participant_id == wanted]
    anat = anatomical_holds(db, config, views, {p: sessions_of[p] for p in {e.participant_id for e in entries}})

    report = read_status_report(config)
    # Registered sessions the last tick held for a new reason (remapped, missing, unreadable, ...).
    held_now = {str(h.get("scan_id")): h for h in report.get("held", []) if h.get("reason") != "excluded"}
    merged = registry.blocked_labels()
    rows: list[dict[str, Any]] = []  # the row's head: who, mapping, protocol, QC
    base: list[Holds] = []  # per row: the holds every cell of it shares
    for entry in entries:
        participant, session = entry.participant_id, entry.session_id
        partition = session_key(participant, session)
        protocol, reason = _protocol(checks.get(partition), partition in checking)
        exclusion = excluded.get(entry.scan_id)
        held = held_now.get(entry.scan_id)
        identity = None
        if participant in merged:
            identity = f"identity conflict: {merged[participant]}"
        elif held and held.get("blocks"):
            identity = f"identity conflict: {held.get('message')}"
        qc_col = "-" if exclusion else qc_state(
            qc.checks.get(partition), entry.scan_id in approved, partition in qc.not_applicable
        )
        qc_gate = None
        if qc_col == "FAILED":
            summary = qc.checks[partition].metadata.get("qc_summary", "") or qc.checks[partition].reason
            qc_gate = sm.Cell(sm.HELD, sm.HOLD_QC, summary or "image QC failed")
        rows.append({
            "subject": participant, "session": session, "scan_id": entry.scan_id, "partition": partition,
            "mapping": f"mapped ({entry.recruitment_id})", "protocol": protocol, "protocol_reason": reason,
        })  # fmt: skip
        base.append(Holds(
            exclusion.get("reason") if exclusion else None, identity, qc_gate, qc_col, held, exclusion,
        ))  # fmt: skip

    cells = _cells(rows, base, views, upstream, anat, pools_held)

    out_rows: list[dict[str, Any]] = []
    names = [c.name for c in columns]
    order = stages.with_qc(names)
    for row, holds, row_cells in zip(rows, base, cells, strict=True):
        for name in order:
            row[name] = holds.qc if name == "qc" else row_cells[name].state
        if "qc" not in row:
            row["qc"] = holds.qc
        plain = all(row_cells[n] is _DONE for n in names)  # nearly every row of a large archive
        why: dict[str, dict[str, str]] = {}
        for n in () if plain else names:
            c = row_cells[n]
            if c.cause or c.reason:
                why[n] = {"cause": c.cause, "reason": c.reason}
        row["why"] = why
        exclusion, held = holds.exclusion, holds.held
        note = f"excluded: {exclusion.get('reason')}" if exclusion else ""
        if holds.qc == "FAILED" and not note and holds.qc_gate is not None:
            note = f"{holds.qc_gate.reason}; `neuroflow qc approve {row['scan_id']} --reason ...` lets it through"
        if row["subject"] in merged:
            note = "identity conflict: sessions of two SubjectCodes (see problems)"
        elif held:
            note = f"held: {held.get('reason')} (see held folders)"
        if not note and not plain:  # the first cell that needs a person, and why
            for n in names:
                c = row_cells[n]
                if c.state in _NEEDS_A_PERSON and c.reason:
                    note = f"{n} {c.text}: {c.reason}" if c.state == sm.FAILED else f"{n}: {c.reason}"
                    break
        row["note"] = note
        if failed_only and holds.qc != "FAILED" and not any(row.get(n) == sm.FAILED for n in names):
            continue
        out_rows.append(row)
    rows = out_rows
    if not failed_only:
        rows += [
            _retired_row(e, [c.name for c in columns])
            for e in registry.retired()
            if not wanted or e.participant_id == wanted
        ]

    held_folders: list[dict[str, Any]] = []
    if not failed_only and not wanted:
        for item in report.get("held", []):
            if item.get("reason") == "excluded" and registry.lookup(str(item.get("scan_id", ""))) is not None:
                continue  # a registered session excluded later: shown above, as excluded
            held_folders.append(
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
        "held": held_folders,
        "problems": report.get("problems", []) if not wanted else [],
        "notes": report.get("notes", []) if not wanted else [],
        "totals": totals(rows, held_folders, [c.name for c in columns]),
    }


_DISK_REASON = "queued while the disk guard holds new runs (see the disk guard line)"


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
    cell = sm.derive(sm.Facts(stage="", retired=entry.note))
    row["qc"] = "-"
    row.update({name: cell.state for name in names})
    row["why"] = {name: {"cause": cell.cause, "reason": cell.reason} for name in names}
    row["note"] = f"re-keyed: {entry.note}"
    return row


def totals(rows: list[dict[str, Any]], held: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Counts per stage and state; a subject-level stage (QSIPrep) is counted per subject (one run each).

    ``causes``: per stage, the count of each held / blocked / failed cell by its spelled state
    (``held (qc)``, ``blocked (qsirecon)``, ``failed (validation)``)."""
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
    causes: dict[str, dict[str, int]] = {}
    for name in names:
        counted_rows = {r["subject"]: r for r in rows}.values() if stages.stage(name).per_subject else rows
        counted = Counter(cell_text(r, name) for r in counted_rows if r[name] in _NEEDS_A_PERSON)
        if counted:
            causes[name] = dict(counted)
    out["causes"] = causes
    return out


def cell_text(row: dict[str, Any], name: str) -> str:
    """A row's cell as the table spells it: ``held (qc)``, ``blocked (qsirecon)``, ``done``."""
    cause = row.get("why", {}).get(name, {}).get("cause", "")
    return f"{row[name]} ({cause})" if cause else str(row[name])


__all__ = ["STATES", "Upstream", "cell_text", "collect_status", "stage_state", "totals"]
