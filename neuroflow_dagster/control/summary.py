"""`neuroflow status --summary`: the big picture first - how many sessions are in which state, per stage.

Built from the totals of the status report (control/status.py ``totals``): one row
per stage (the protocol check first, the image QC gate before the stage it gates),
one column per state. A subject-level stage
(QSIPrep) is counted per subject, as the report counts it (one run each).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuroflow_dagster import stages

# Column order: good news first, then in progress, then what needs a person, then what will not run
# (the state model's words, neuroflow_dagster/states.py, and the protocol and QC verdicts).
ORDER = (
    "passed",
    "warn",
    "approved",
    "done",
    "running",
    "queued",
    "checking",
    "pending",
    "waiting",
    "held",
    "blocked",
    "failed",
    "unchecked",
    "not_applicable",
)


def summary_rows(totals: Mapping[str, Any], names: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, state columns): ``{"stage", "unit", "total", <state>: count, ...}`` for protocol, each stage
    and the image QC gate ("qc", before the first stage it gates; sessions judged so far, its FAILED
    counted as failed)."""
    counted: list[tuple[str, str, Mapping[str, int]]] = [("protocol", "sessions", totals.get("protocol", {}))]
    for name in stages.with_qc(names):
        if name == "qc":
            qc: dict[str, int] = {}
            for state, n in totals.get("qc", {}).items():
                qc[state.lower()] = qc.get(state.lower(), 0) + n
            counted.append(("qc", "sessions", qc))
            continue
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
