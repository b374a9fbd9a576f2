"""Automation conditions: how work propagates through the graph by itself.

Built only from Dagster's built-in conditions, so they serialize and the
daemon evaluates exactly what is tested here. The rules (docs/domain-rules.md#state):

- bids_session: convert when its DICOM session is (re)registered and the
  protocol check passed.
- qsiprep_subject: once per wave of arrivals, when every arrived session of
  the subject is converted or settled (failed, or blocked by the protocol
  check); never while one of them is converting. "Arrived" matters because
  the subject x session space has phantom pairs whose DICOM never existed.
- qsirecon_session: only when the subject's QSIPrep was updated, so recon
  never runs against a stale QSIPrep output; a late session therefore gives
  bids -> QSIPrep -> recon of ALL the subject's sessions.
- qsiparc_session: after its recon.
"""

from __future__ import annotations

import dagster as dg

from neuroflow_dagster.defs.graph import asset_key

AC = dg.AutomationCondition


def _deps_settled_and_checks_passed() -> AC:
    return (~AC.any_deps_missing() & AC.all_deps_blocking_checks_passed()).with_label(
        "upstream present and its blocking checks passed"
    )


def bids_condition() -> AC:
    """eager(), plus a catch-up when the protocol check newly passes on a still-missing session.

    eager()'s triggers ("newly missing", "deps updated") ignore whatever happened before the
    condition's first evaluation, and the discovery sensor may register a session (and its
    check may pass) before the automation sensor's first tick. A check that newly passes is
    seen whenever it happens, including at the first evaluation, so no session is left behind.
    """
    catch_up = (
        AC.all_deps_blocking_checks_passed().newly_true().with_label("protocol check newly passed")
        & AC.missing()
        & ~AC.any_deps_missing()
        & ~AC.in_progress()
        & ~AC.any_deps_in_progress()
    )
    return ((AC.eager() | catch_up) & AC.all_deps_blocking_checks_passed()).with_label(
        "convert when registered (or changed) and the protocol check passed"
    )


def waiting_for_conversion() -> AC:
    """True for a bids_session partition that arrived and is still to be converted.

    Arrived = its dicom_session exists and passed the protocol check. Settled =
    converted, or its latest conversion run failed for good (retries spent).
    """
    return (
        (AC.missing() & ~AC.any_deps_missing() & AC.all_deps_blocking_checks_passed() & ~AC.execution_failed())
        | AC.in_progress()
        | AC.will_be_requested()
    ).with_label("arrived but not converted yet")


def qsiprep_condition(trigger: str = "eager", cron: str = "0 2 */3 * *") -> AC:
    # Second trigger: the subject has converted sessions and no QSIPrep yet, remembered until
    # requested; unlike since_last_handled() it is not reset by the first evaluation, so sessions
    # converted before the automation sensor first ran are not forgotten.
    never_ran = (
        (AC.missing() & AC.any_deps_match(~AC.missing()))
        .newly_true()
        .since(AC.newly_requested() | AC.newly_updated())
        .with_label("converted sessions and no QSIPrep yet")
    )
    wave = (
        (
            AC.any_deps_updated().since_last_handled().with_label("a session converted since the last QSIPrep")
            | never_ran
        )
        & ~AC.any_deps_match(waiting_for_conversion()).with_label("no session of the subject still converting")
        & ~AC.in_progress()
    )
    if trigger == "cron":
        wave = wave & AC.cron_tick_passed(cron).since_last_handled().with_label(f"cron {cron} passed")
    return wave.with_label(f"QSIPrep once per wave of sessions ({trigger})")


def qsirecon_condition() -> AC:
    return (
        AC.any_deps_updated()
        .allow(dg.AssetSelection.assets(asset_key("qsiprep")))
        .since_last_handled()
        .with_label("the subject's QSIPrep was updated")
        & _deps_settled_and_checks_passed()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("reconstruct after each new QSIPrep of the subject")


def qsiparc_condition() -> AC:
    return (AC.eager() & AC.all_deps_blocking_checks_passed()).with_label("parcellate after recon")
