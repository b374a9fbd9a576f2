"""`neuroflow status --summary`: the big picture first - how many sessions are in which state, per stage.

Built from the totals of the status report (control/status.py ``totals``): one row
per stage (the protocol check first), one column per state. A subject-level stage
(QSIPrep) is counted per subject, as the report counts it (one run each).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuroflow_dagster import stages

# Column order: good news first, then in progress, then what needs a person, then what will not run.
ORDER = (
    "passed",
    "done",
    "stale",
    "running",
    "queued",
    "checking",
    "pending",
    "failed",
    "missing",
    "unchecked",
    "not_applicable",
    "excluded",
    "retired",
)


def summary_rows(totals: Mapping[str, Any], names: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, state columns): ``{"stage", "unit", "total", <state>: count, ...}`` for protocol and each stage."""
    counted: list[tuple[str, str, Mapping[str, int]]] = [("protocol", "sessions", totals.get("protocol", {}))]
    for name in names:
        unit = "subjects" if stages.stage(name).per_subject else "sessions"
        counted.append((name, unit, totals.get(name, {})))
    seen = {state for _, _, counts in counted for state in counts}
    columns = [s for s in ORDER if s in seen] + sorted(seen - set(ORDER))
    rows = []
    for name, unit, counts in counted:
        row: dict[str, Any] = {"stage": name, "unit": unit, "total": sum(counts.values())}
        row.update({state: counts.get(state, 0) for state in columns})
        rows.append(row)
    return rows, columns


__all__ = ["ORDER", "summary_rows"]
