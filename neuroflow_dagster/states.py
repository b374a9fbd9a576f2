"""The operator's state model: every (session or subject, stage) cell is in exactly one state.

One vocabulary for every place that shows where work stands (`neuroflow status` table/csv/json,
`status --summary`, `--format nipoppy`, `neuroflow failures` and `retry`, the automation sensors'
observations in the Dagster UI, docs/operations.md "States"), and one function, `derive`, that
turns what the records say about a cell into its state. Plain Python: the status path never
imports dagster, and the sensors use the same words.

- ``done``: materialized, and nothing it was made from changed since;
- ``running`` / ``queued``: a run for it is under way or waits in the run queue;
- ``waiting``: nothing wrong, its turn has not come (an upstream stage is not done yet, or its
  outputs predate a newer upstream and the automation re-runs it);
- ``held`` with a cause: it will not run until an operator acts, and nothing failed
  (``qc``: the image QC gate; ``no_anat``: QSIPrep has no anatomical image for the subject;
  ``excluded``; ``identity``: the ScanID is remapped or its subject holds two SubjectCodes;
  ``disk_guard``: a queued run waits for free space);
- ``blocked`` by a named upstream stage: that stage (or the protocol check) failed, so this one
  cannot run; fix the upstream, not this;
- ``not_applicable`` with a reason: the stage does not apply (no DWI, no spec for the shell
  scheme, re-keyed binding);
- ``failed`` with its failure class: a run of this stage failed on its own; `neuroflow failures`
  lists exactly these cells and `neuroflow retry` relaunches exactly these.

Why held and blocked are not failures: retrying them can only fail again, and the operator's
action is elsewhere (approve the QC, add a T1w, fix the upstream stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DONE = "done"
RUNNING = "running"
QUEUED = "queued"
WAITING = "waiting"
HELD = "held"
BLOCKED = "blocked"
NOT_APPLICABLE = "not_applicable"
FAILED = "failed"
STATES = (DONE, RUNNING, QUEUED, WAITING, HELD, BLOCKED, NOT_APPLICABLE, FAILED)

# Causes of a hold.
HOLD_QC = "qc"
HOLD_NO_ANAT = "no_anat"
HOLD_EXCLUDED = "excluded"
HOLD_IDENTITY = "identity"
HOLD_DISK = "disk_guard"
HOLDS = (HOLD_QC, HOLD_NO_ANAT, HOLD_EXCLUDED, HOLD_IDENTITY, HOLD_DISK)

PROTOCOL = "protocol"  # the protocol check, named as what blocks a conversion
STALE = "stale"  # a waiting cell whose outputs predate its upstream
RETIRED = "retired"  # a not-applicable cell of a re-keyed binding
QC_STEP_FAILURE_CLASS = "qc"  # the class of a gated stage refusing an unapproved QC failure

# What the operator does, per state (docs/operations.md "States" has the same table).
ACTION = {
    DONE: "nothing",
    RUNNING: "nothing (watch it in the UI: Runs)",
    QUEUED: "nothing (it starts when a pool slot frees)",
    WAITING: "nothing: the automation requests it once its upstream is done",
    HELD: "act on the cause: approve or exclude (qc), add the anatomical image (no_anat), include (excluded), "
    "fix the mapping or rekey (identity), free space (disk_guard)",
    BLOCKED: "fix the named upstream stage (its failure is listed by `neuroflow failures`)",
    NOT_APPLICABLE: "nothing (the reason says why the stage does not apply)",
    FAILED: "read the class and the log (`neuroflow failures`, `neuroflow logs`), fix, `neuroflow retry`",
}


@dataclass(frozen=True)
class Cell:
    """One cell's state, its cause (the hold, the blocking stage, the failure class, `stale`) and why."""

    state: str
    cause: str = ""
    reason: str = ""

    @property
    def text(self) -> str:
        """The table's spelling: ``held (qc)``, ``blocked (qsirecon)``, ``failed (validation)``, ``done``."""
        return f"{self.state} ({self.cause})" if self.cause else self.state

    def as_dict(self) -> dict[str, str]:
        return {"state": self.state, "cause": self.cause, "reason": self.reason}


@dataclass(frozen=True)
class Attempt:
    """The latest attempt of a cell whose run failed: did its own step fail, and why.

    ``failed_stage``: the stage (or ``qc`` for the image QC gate's step) whose step failed in that run
    when it was not this cell's own step; empty when no step failed (a cancelled run, a dead worker).
    """

    own_step_failed: bool
    failure_class: str
    message: str = ""
    failed_stage: str = ""


@dataclass(frozen=True)
class Facts:
    """What the records say about one cell (control/status.py gathers them from Dagster's tables)."""

    stage: str
    excluded: str | None = None  # the exclusion's reason
    retired: str | None = None  # a re-keyed binding's note
    identity: str | None = None  # why discovery holds the session's identity in question
    active: str | None = None  # queued | running
    pool_held: bool = False  # the disk guard holds this stage's pool (limit 0)
    disk_reason: str = ""
    gate: Cell | None = None  # a gate that holds this stage now (QC for recon/parc, no anatomical for QSIPrep)
    qc_approved: bool = False  # the session's QC failed and an operator approved it since
    attempt: Attempt | None = None  # the latest attempt, when its run failed
    materialized: bool = False
    stale_after: str = ""  # the upstream stage materialized after this cell (empty: current)
    not_applicable: str | None = None  # the reason recorded with the materialization


def _from_upstream(upstream: Sequence[tuple[str, Cell]]) -> Cell | None:
    """What an upstream cell that is not done means for a cell with nothing of its own.

    Held passes on with its cause (the operator's action is the same), a failure blocks (named by the
    failed stage), a block passes on with its root, not applicable passes on; else None.
    """
    for name, cell in upstream:
        if cell.state == HELD:
            return Cell(HELD, cell.cause, f"{name} is held: {cell.reason}" if cell.reason else f"{name} is held")
    for name, cell in upstream:
        if cell.state == FAILED:
            if cell.cause:  # a stage's failure: `neuroflow failures` lists it with its message and log
                why = f"{name} failed ({cell.cause}): `neuroflow failures --stage {name}` says why"
                return Cell(BLOCKED, name, why)
            return Cell(BLOCKED, name, f"{name} failed" + (f": {cell.reason[:300]}" if cell.reason else ""))
        if cell.state == BLOCKED:
            return Cell(BLOCKED, cell.cause, cell.reason)
    for name, cell in upstream:
        if cell.state == NOT_APPLICABLE:
            return Cell(NOT_APPLICABLE, name, f"{name} not applicable: {cell.reason}" if cell.reason else "")
    return None


def derive(facts: Facts, upstream: Sequence[tuple[str, Cell]] = ()) -> Cell:
    """The one rule set: a cell's state from its facts and its upstream cells (name, cell), in order.

    First match wins: re-keyed; excluded; identity in question; a run under way (queued while the disk
    guard holds its pool is held); a gate that holds it (unless its outputs are current); a failed
    attempt (its own step: failed; another step: blocked by it, or held by the QC gate; no step:
    failed, e.g. cancelled); materialized (not applicable, stale = waiting unless its upstream is
    blocked, else done); nothing yet (from the upstream cells, else waiting).
    """
    if facts.retired is not None:
        return Cell(NOT_APPLICABLE, RETIRED, f"re-keyed: {facts.retired}")
    if facts.excluded is not None:
        return Cell(HELD, HOLD_EXCLUDED, f"excluded: {facts.excluded}")
    if facts.identity is not None:
        return Cell(HELD, HOLD_IDENTITY, facts.identity)
    if facts.active is not None:
        if facts.active == QUEUED and facts.pool_held:
            return Cell(HELD, HOLD_DISK, facts.disk_reason or "queued until the disk guard sees free space")
        return Cell(facts.active)
    current = facts.materialized and not facts.stale_after
    if facts.gate is not None and not current:
        return facts.gate
    from_upstream = _from_upstream(upstream)
    if facts.attempt is not None:
        attempt = facts.attempt
        if attempt.own_step_failed and attempt.failure_class != QC_STEP_FAILURE_CLASS:
            return Cell(FAILED, attempt.failure_class, attempt.message)
        if attempt.own_step_failed or attempt.failed_stage == QC_STEP_FAILURE_CLASS:
            # Refused or skipped by the QC gate, which no longer holds it (approved since): a relaunch is due.
            return Cell(WAITING, HOLD_QC, "QC approved; `neuroflow qc approve` relaunches it (or `neuroflow retry`)")
        if attempt.failed_stage:
            # Skipped because an upstream step failed in the same run: blocked while that stage stays failed.
            return from_upstream or Cell(WAITING, "", f"{attempt.failed_stage} failed in its last run and was redone")
        return Cell(FAILED, attempt.failure_class, attempt.message)
    if facts.materialized:
        if facts.not_applicable is not None:
            return Cell(NOT_APPLICABLE, "", facts.not_applicable)
        if facts.stale_after:
            if from_upstream is not None and from_upstream.state in (BLOCKED, HELD):
                return from_upstream
            return Cell(WAITING, STALE, f"{facts.stale_after} changed since: a re-run is due")
        return Cell(DONE)
    return from_upstream or Cell(WAITING)


def protocol_cell(protocol: str, reason: str = "") -> Cell:
    """The protocol check as an upstream cell of the conversion: passed = done, failed = failed."""
    if protocol == "passed":
        return Cell(DONE)
    if protocol == "failed":
        return Cell(FAILED, "", reason)
    if protocol in ("checking", "pending"):
        return Cell(RUNNING)
    return Cell(WAITING)


__all__ = [
    "ACTION",
    "BLOCKED",
    "DONE",
    "FAILED",
    "HELD",
    "HOLDS",
    "NOT_APPLICABLE",
    "QUEUED",
    "RUNNING",
    "STATES",
    "WAITING",
    "Attempt",
    "Cell",
    "Facts",
    "derive",
    "protocol_cell",
]
