"""Recorded verdicts under today's cohort: which sessions' standing would change, and the operator's word.

A verdict is fixed when it is made (gate.py): sessions added later move the cohort but never release
or hold a session already judged. :func:`plan` judges every recorded verdict again from the measures in
the store (no QC table is read) with today's cohort and settings, and lists those whose level would
change; :func:`apply` records the new verdicts as an operator's action (who, when, why), in the store and
in ``state/qc_rejudgements.jsonl`` (append-only, like the approvals). Approvals are not touched.
"""

from __future__ import annotations

import getpass
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from neuroflow_dagster.config import NeuroflowConfig, QcConfig
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.qc.approvals import Approval, append_entry, load_approvals
from neuroflow_dagster.qc.cohort import CohortStats, GroupValues
from neuroflow_dagster.qc.gate import (
    FAILED,
    NOT_APPLICABLE,
    Verdict,
    judge_tables,
    judge_values,
    settings_signature,
    store_of,
)
from neuroflow_dagster.qc.store import REJUDGE, SeriesRow, StoredVerdict, now

AUDIT = "qc_rejudgements.jsonl"


@dataclass(frozen=True)
class Change:
    """A session whose recorded verdict today's cohort would change."""

    standing: StoredVerdict
    today: Verdict
    approval: Approval | None

    @property
    def released(self) -> bool:
        """Held until now, and today's cohort lets it through."""
        return self.standing.level == FAILED and self.today.level != FAILED

    @property
    def held(self) -> bool:
        """Through until now, and today's cohort holds it."""
        return self.today.level == FAILED and self.standing.level != FAILED

    def detail(self) -> str:
        """Today's reasons for the measures whose level changed (where each stands in today's cohort)."""
        before = {(m.get("table"), m.get("metric")): m.get("level") for m in self.standing.record.get("metrics", [])}
        moved = [m.reason for m in self.today.metrics if before.get((m.table, m.metric)) != m.level]
        return "; ".join(moved) or self.today.summary()


def rejudge_one(standing: StoredVerdict, rows: list[SeriesRow], values: dict[tuple[str, str], dict[str, float]],
                groups: dict[tuple[str, str], GroupValues], qc: QcConfig) -> Verdict:
    """One recorded verdict judged again from its stored measures, with today's cohort and settings."""
    record = standing.record
    tables = tuple(Path(t) for t in record.get("tables", []))
    if not tables:
        return judge_tables([], qc)
    scan_id = standing.scan_id
    group_of = {row.qc_table: row.group for row in rows}
    measured = [(row.qc_table, {m: values.get((scan_id, row.qc_table), {}).get(m) for m in qc.metrics})
                for row in rows]

    def lookup(table: str, metric: str) -> tuple[str, CohortStats | None]:
        group = group_of[table]
        found = groups.get((group.key, metric))
        stats = found.stats(without=scan_id, min_spread=qc.metrics[metric].min_spread) if found else None
        return group.label, stats

    verdict = judge_values(measured, qc, lookup, tuple(record.get("problems", [])),
                           str(record.get("problem_level", "passed")))
    return Verdict(verdict.level, verdict.metrics, tables, verdict.problems, (), verdict.notes, verdict.problem_level)


def plan(config: NeuroflowConfig, only: Collection[str] | None = None) -> list[Change]:
    """Every recorded session (of ``only``, ScanIDs) whose level today's cohort would change.

    Excluded sessions are left out (of the list and of every cohort), as the QC asset leaves them out.
    """
    qc = config.qc
    store = store_of(config)
    excluded = load_exclusions(config)
    standings = store.standings(records=True)
    wanted = [s for s in standings.values()
              if s.scan_id not in excluded and (only is None or s.scan_id in only) and s.level != NOT_APPLICABLE]
    if not wanted:
        return []
    series = store.series()
    metrics = list(qc.metrics)
    groups = store.all_group_values(metrics, skip=excluded)
    values = store.values(metrics, None if only is None else [s.scan_id for s in wanted])
    approvals = load_approvals(config)
    changes = []
    for standing in wanted:
        today = rejudge_one(standing, series.get(standing.scan_id, []), values, groups, qc)
        if today.level != standing.level:
            changes.append(Change(standing, today, approvals.get(standing.scan_id)))
    return sorted(changes, key=lambda c: (c.standing.participant, c.standing.session, c.standing.scan_id))


def apply(config: NeuroflowConfig, changes: list[Change], reason: str, by: str | None = None) -> list[StoredVerdict]:
    """Record today's verdicts of ``changes`` as an operator's re-judgement (a reason is required)."""
    if not reason or not reason.strip():
        raise ValueError("a re-judgement needs a reason (why today's cohort should decide)")
    who = (by or "").strip() or getpass.getuser()
    store = store_of(config)
    settings = settings_signature(config.qc)
    recorded = []
    for change in changes:
        before, today = change.standing, change.today
        stored = store.record_verdict(StoredVerdict(
            before.scan_id, before.participant, before.session, today.level, today.summary(), before.tables_sig,
            settings, now(), REJUDGE, who, reason.strip(), today.to_record()))
        append_entry(config, {"action": "rejudge", "scan_id": before.scan_id, "participant": before.participant,
                              "session": before.session, "by": who, "at": stored.at, "reason": reason.strip(),
                              "before": before.level, "after": today.level, "before_qc": before.summary,
                              "after_qc": stored.summary}, AUDIT)
        recorded.append(stored)
    return recorded
