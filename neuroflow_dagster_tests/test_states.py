"""The state model's rules, one by one (neuroflow_dagster/states.py; plain Python, no Dagster).

The same states on real Dagster records, in every output (table, CSV, JSON, summary, Nipoppy, the
UI's observations), are tested by test_operator_cli.py, test_status_nipoppy.py, test_dagster_db.py
and test_automation.py; this file pins the precedence of the rules.
"""

from __future__ import annotations

import pytest

from neuroflow_dagster import states as sm
from neuroflow_dagster.eligibility import anatomical_hold, parse_suffixes

QC = sm.Cell(sm.HELD, sm.HOLD_QC, "QC failed: raw_masked_neighbor_corr 0.128 < 0.5")
DONE = sm.Cell(sm.DONE)


def derive(upstream: list[tuple[str, sm.Cell]] | None = None, **facts: object) -> sm.Cell:
    return sm.derive(sm.Facts(stage="qsiparc", **facts), upstream or [])  # type: ignore[arg-type]


def test_own_records() -> None:
    assert derive(materialized=True) == DONE
    assert derive(active="running", materialized=True).state == sm.RUNNING
    assert derive(active="queued").state == sm.QUEUED
    assert derive(materialized=True, not_applicable="no DWI") == sm.Cell(sm.NOT_APPLICABLE, "", "no DWI")
    stale = derive(materialized=True, stale_after="qsirecon")
    assert (stale.state, stale.cause, stale.text) == (sm.WAITING, sm.STALE, "waiting (stale)")
    assert derive().state == sm.WAITING
    assert derive([("qsirecon", sm.Cell(sm.RUNNING))]).state == sm.WAITING


def test_failures_are_only_a_stages_own() -> None:
    own = derive(attempt=sm.Attempt(True, "validation", "1 diffusion direction"))
    assert (own.state, own.cause, own.text) == (sm.FAILED, "validation", "failed (validation)")
    recon_failed = sm.Cell(sm.FAILED, "validation", "1 diffusion direction")
    skipped = derive([("qsirecon", recon_failed)], attempt=sm.Attempt(False, "", "", "qsirecon"))
    assert (skipped.state, skipped.cause) == (sm.BLOCKED, "qsirecon")
    assert "neuroflow failures --stage qsirecon" in skipped.reason
    # Skipped in a run whose recon failed, recon redone since: nothing is wrong any more.
    assert derive([("qsirecon", DONE)], attempt=sm.Attempt(False, "", "", "qsirecon")).state == sm.WAITING
    cancelled = derive(attempt=sm.Attempt(False, "canceled", "run canceled"))
    assert (cancelled.state, cancelled.cause) == (sm.FAILED, "canceled")
    # Never run, its upstream failed: blocked by it; a block passes on with its root.
    assert derive([("qsirecon", recon_failed)]).text == "blocked (qsirecon)"
    assert derive([("qsirecon", sm.Cell(sm.BLOCKED, "protocol", "protocol failed"))]).text == "blocked (protocol)"
    protocol = sm.protocol_cell("failed", "Session has 0 DICOM files (minimum: 10)")
    blocked = sm.derive(sm.Facts("bids_conversion"), [(sm.PROTOCOL, protocol)])
    assert blocked.text == "blocked (protocol)" and blocked.reason.endswith("Session has 0 DICOM files (minimum: 10)")
    assert sm.protocol_cell("pending").state == sm.RUNNING and sm.protocol_cell("unchecked").state == sm.WAITING


def test_holds_come_before_failures_and_pass_downstream() -> None:
    # The QC gate holds the cell: a skipped or refused attempt is not a failure.
    refused = derive(gate=QC, attempt=sm.Attempt(True, sm.QC_STEP_FAILURE_CLASS, "failed image QC"))
    assert refused == QC
    assert derive(gate=QC, attempt=sm.Attempt(False, sm.QC_STEP_FAILURE_CLASS, "", sm.QC_STEP_FAILURE_CLASS)) == QC
    assert derive(gate=QC) == QC
    assert derive(gate=QC, materialized=True) == DONE  # outputs made before: they stay current
    assert derive(gate=QC, materialized=True, stale_after="qsiprep") == QC
    # Approved since, its relaunch still to come: waiting (qc), not failed.
    approved = derive(attempt=sm.Attempt(True, sm.QC_STEP_FAILURE_CLASS, "failed image QC"))
    assert (approved.state, approved.cause) == (sm.WAITING, sm.HOLD_QC)
    # Held upstream: held here with the same cause.
    anat = sm.Cell(sm.HELD, sm.HOLD_NO_ANAT, "no T1w in any session")
    assert derive([("qsiprep", anat)]).text == "held (no_anat)"
    assert derive([("qsirecon", sm.Cell(sm.NOT_APPLICABLE, "", "no DWI"))]).text == "not_applicable (qsirecon)"


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({"excluded": "consent withdrawn", "materialized": True}, "held (excluded)"),
        ({"identity": "remapped", "active": "running"}, "held (identity)"),
        ({"active": "queued", "pool_held": True}, "held (disk_guard)"),
        ({"active": "running", "pool_held": True}, "running"),
        ({"retired": "sheet corrected", "excluded": "x"}, "not_applicable (retired)"),
    ],
)
def test_operator_holds_first(facts: dict[str, object], expected: str) -> None:
    assert derive(**facts).text == expected


def test_every_state_has_an_action_for_the_operator() -> None:
    assert set(sm.ACTION) == set(sm.STATES)
    assert len(set(sm.STATES)) == 8


def test_anatomical_hold() -> None:
    assert anatomical_hold("T1w", {"01": {"dwi"}, "02": {"dwi", "T1w"}}) is None
    assert anatomical_hold("T1w", {"01": {"dwi"}, "02": {"dwi", "T2w"}}) == "no T1w in any session"
    assert anatomical_hold("T2w", {"01": {"dwi", "T1w"}}) == "no T2w in any session"
    assert anatomical_hold("none", {"01": {"dwi"}}) is None
    assert parse_suffixes("dwi, T1w") == {"dwi", "T1w"} and parse_suffixes("none") == frozenset()
