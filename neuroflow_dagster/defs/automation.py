"""Automation: how work propagates through the graph by itself, one sensor per stage.

Each stage sensor follows Dagster's event log by storage id (`defs/ledger.py`): a tick reads the
materializations and run ends that happened since its cursor, turns them into candidate partitions,
reads those partitions' latest storage ids and decides with the rules below. A tick with nothing new
costs one query, whatever the size of the archive; a tick after N new sessions costs in proportion
to N. Declarative automation conditions evaluated the whole partition space (subjects x session
labels) on every tick, which at 20,000 sessions took longer than the sensors' interval (measured in
docs/benchmarks.md; why, in docs/architecture.md).

"Handled" = the partition was materialized, or a run for it was created (its planned event), or this
sensor requested it (remembered in the cursor until the run's planned event shows up). Storage ids
grow monotonically, so "updated since last handled" is `trigger id > handled id`. The rules
(docs/architecture.md, "Automation"):

- bids_session: its dicom_session was (re)registered after the last conversion request, the
  protocol verdict on that registration passed, and no conversion of it is running.
- qsiprep_subject: a session of the subject was converted after the last QSIPrep request, no
  session of the subject is still waiting for its conversion (registered with a passed or pending
  protocol verdict, not converted since, its latest attempt not failed; or converting), QSIPrep
  is not running, and no reconstruction run (QC, recon, parcellation) of any of the subject's
  sessions is queued or running (it reads the output QSIPrep would replace; its end brings the
  subject back). Optionally only once a cron tick passed since the last request. A subject whose
  sessions lack the anatomical image QSIPrep is configured for (`anat_modality`) is held with the
  reason instead (eligibility.plan_qsiprep): never requested, never failed; its next conversion
  decides again.
- qsirecon_session (+ image_qc_session before it and qsiparc_session after it, in the same run):
  the subject's QSIPrep was materialized after the session's last recon request by a run created
  after the session's conversion (so it includes the session), the session's BIDS passed the
  validator, and nothing it depends on is running. The sensor judges the session's image QC first
  (qc/gate.py, the verdict the QC asset records): a session the gate holds gets the QC gate alone
  (its verdict, figures and alert recorded), never a recon or parcellation that can only be refused
  (states.py: held (qc)); the QC run counts as handled, so it is not requested again until the
  subject's QSIPrep changes (then QC is judged again for every session of the subject) or an
  operator approves it (`neuroflow qc approve` relaunches QC + recon + parcellation itself).
- No stage is requested for a session that is excluded or whose identity is in question: every stage
  refuses those. Cells left out get an AssetObservation in the UI with the state model's words.
- qsiparc_session alone: its recon was materialized after the last parcellation request and not by
  the run that also planned the parcellation.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import dagster as dg

from neuroflow_dagster import stages, states
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.assets.bids import VALIDATOR_CHECK
from neuroflow_dagster.defs.graph import DICOM_KEY, asset_key
from neuroflow_dagster.defs.ledger import CheckRecord, FinishedRun, Ledger, PartitionRecord
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.discovery.status_report import read_status_report, session_block
from neuroflow_dagster.eligibility import qsiprep_plan_from_metadata
from neuroflow_dagster.naming.partitions import SESSION_LABELS, SUBJECTS, session_key, split_session_key
from neuroflow_dagster.naming.tags import CAUSE_KEY, STAGE_TAG, STATE_KEY
from neuroflow_dagster.qc.gate import session_gate

# The stages these rules are about (names from the registry, stages.py).
DICOM = DICOM_KEY
BIDS = asset_key("bids_conversion")
QSIPREP = asset_key("qsiprep")
QSIRECON = asset_key("qsirecon")
QSIPARC = asset_key("qsiparc")
PROTOCOL = dg.AssetCheckKey(DICOM, stages.PROTOCOL_CHECK)
VALIDATOR = dg.AssetCheckKey(BIDS, VALIDATOR_CHECK)
QC = dg.AssetKey(stages.QC_ASSET)  # the image QC gate: not a stage of its own, run first in each recon run
# What a session's reconstruction run (QC first, recon, parcellation) plans: while one of them is queued
# or running, the subject's QSIPrep is not requested (it would replace the output that run reads).
READERS = (QC, QSIRECON, QSIPARC)
PROTOCOL_VALID_KEY = "protocol_valid"  # dicom_session metadata: the verdict made at registration

TRIGGER_TAG = "neuroflow/trigger"
CURSOR_VERSION = 1
OVERLAP = 1000  # storage ids re-read once at the next tick
MAX_CANDIDATES = 2000  # materializations taken per tick from a long backlog
REQUEST_MEMORY_S = 6 * 3600  # a request whose run never appeared is forgotten (and retried) after this
PENDING_MAX_S = 7 * 86400  # a wait (cron, a partition not added) is given up after this


# --------------------------------------------------------------------------------------------------
# Cursor


@dataclass
class Cursor:
    """`seen`: the event-log head at the last tick; `before`: at the tick before (re-read once, so an
    event committed late with a lower id is not missed); `requested`: key -> [trigger id, time] until
    the run appears; `pending`: key -> time, re-examined every tick (only the cron wait needs it)."""

    seen: int = 0
    before: int = 0
    started: float = 0.0
    requested: dict[str, list[float]] = field(default_factory=dict)
    pending: dict[str, float] = field(default_factory=dict)
    noted: dict[str, str] = field(default_factory=dict)  # key -> the last note recorded for it (no repeats)

    @classmethod
    def decode(cls, text: str | None) -> Cursor:
        try:
            data = json.loads(text or "")
        except ValueError:
            return cls()
        if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION:
            return cls()
        return cls(
            seen=int(data.get("seen", 0)),
            before=int(data.get("before", 0)),
            started=float(data.get("started", 0.0)),
            requested={k: list(v) for k, v in dict(data.get("requested", {})).items()},
            pending={k: float(v) for k, v in dict(data.get("pending", {})).items()},
            noted={str(k): str(v) for k, v in dict(data.get("noted", {})).items()},
        )

    def encode(self) -> str:
        return json.dumps(
            {
                "v": CURSOR_VERSION,
                "seen": self.seen,
                "before": self.before,
                "started": self.started,
                "requested": self.requested,
                "pending": self.pending,
                "noted": self.noted,
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    def requested_trigger(self, key: str) -> int:
        entry = self.requested.get(key)
        return int(entry[0]) if entry else 0


# --------------------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class Note:
    """A cell the automation will not request, as the state model names it (neuroflow_dagster/states.py),
    recorded as an AssetObservation on that partition so the UI shows why (asset > partition > events)."""

    asset: dg.AssetKey
    state: str
    cause: str
    reason: str


@dataclass(frozen=True)
class Decision:
    """request: launch a run (trigger = the storage id that caused it); wait: re-examine later.

    ``assets``: the request's selection when it is not the stage's whole target (the QC gate alone for a
    session it holds); ``notes``: the cells left out and why, for the UI."""

    key: str
    action: str  # request | wait | hold | none
    reason: str
    trigger: int = 0
    assets: tuple[dg.AssetKey, ...] | None = None
    notes: tuple[Note, ...] = ()
    notable: bool = False  # a "none" the sensor logs (an ordering the operator may wonder about)

    @staticmethod
    def request(key: str, trigger: int, reason: str, assets: tuple[dg.AssetKey, ...] | None = None,
                notes: tuple[Note, ...] = ()) -> Decision:  # fmt: skip
        return Decision(key, "request", reason, trigger, assets, notes)

    @staticmethod
    def wait(key: str, reason: str) -> Decision:
        return Decision(key, "wait", reason)

    @staticmethod
    def hold(key: str, reason: str, notes: tuple[Note, ...] = ()) -> Decision:
        """Would be requested, but the run could only fail (e.g. QSIPrep without an anatomical image):
        not requested, logged with the reason; a later change of its inputs decides again."""
        return Decision(key, "hold", reason, notes=notes)

    @staticmethod
    def none(key: str, reason: str = "", notable: bool = False, notes: tuple[Note, ...] = ()) -> Decision:
        return Decision(key, "none", reason, notable=notable, notes=notes)


def protocol_verdict(dicom: PartitionRecord, check: CheckRecord | None, meta: dict[str, Any] | None) -> str | None:
    """passed / failed / running for the latest registration; None when nothing judged it yet.

    A check execution that looked at this registration wins (an operator may re-run the check);
    otherwise the verdict the discovery sensor recorded with the registration.
    """
    if not dicom.materialized:
        return None
    verdict = check.verdict_on(dicom.mat_id) if check is not None else None
    if verdict is not None:
        return verdict
    valid = (meta or {}).get(PROTOCOL_VALID_KEY)
    if isinstance(valid, bool):
        return "passed" if valid else "failed"
    return None


def decide_bids(
    key: str, dicom: PartitionRecord, verdict: str | None, bids: PartitionRecord, requested: int
) -> Decision:
    registered = dicom.mat_id
    if not registered:
        return Decision.none(key, "not registered")
    if max(bids.handled_id, requested) >= registered:
        return Decision.none(key, "already converted or requested since its registration")
    if verdict == "failed":
        return Decision.none(key, "protocol check failed")
    if verdict is None:
        return Decision.none(key, "no protocol verdict yet")
    if verdict == "running":
        return Decision.none(key, "protocol check running")
    if bids.in_progress:
        return Decision.none(key, "a conversion of an earlier registration is running")
    return Decision.request(key, registered, "registered and passed the protocol check")


def waiting_for_conversion(dicom: PartitionRecord, verdict: str | None, bids: PartitionRecord) -> bool:
    """Arrived (registered, protocol passed or still pending) and neither converted nor settled since."""
    if bids.in_progress:
        return True
    registered = dicom.mat_id
    if not registered or verdict == "failed":
        return False
    if bids.mat_id >= registered:
        return False
    if bids.planned_id > registered and bids.attempt_settled:
        return False  # its conversion was attempted after this registration and did not succeed
    return True


def decide_qsiprep(
    subject: str,
    sessions: dict[str, tuple[PartitionRecord, str | None, PartitionRecord]],
    qsiprep: PartitionRecord,
    requested: int,
    cron_ok: Callable[[], bool] | None = None,
    readers: Sequence[str] = (),
) -> Decision:
    """`sessions`: key -> (dicom record, protocol verdict, bids record) of the subject's sessions;
    `readers`: the subject's sessions whose reconstruction run (QC, recon, parcellation) is queued or
    running: they read the QSIPrep output a new run would replace."""
    converted = max((bids.mat_id for _, _, bids in sessions.values()), default=0)
    if not converted:
        return Decision.none(subject, "no converted session")
    if max(qsiprep.handled_id, requested) >= converted:
        return Decision.none(subject, "no session converted since the last QSIPrep request")
    # Waits below end with a run's end (a conversion, a check, this QSIPrep): that event brings the
    # subject back as a candidate, so they need no re-examination in between.
    if qsiprep.in_progress:
        return Decision.none(subject, "QSIPrep of the subject is running")
    waiting = sorted(
        k for k, (dicom, verdict, bids) in sessions.items() if waiting_for_conversion(dicom, verdict, bids)
    )
    if waiting:
        return Decision.none(subject, f"sessions still converting: {', '.join(waiting)}")
    if readers:
        return Decision.none(
            subject,
            f"waiting for the reconstruction of {', '.join(sorted(readers))} (queued or running) to end: "
            "it reads the subject's QSIPrep output",
            notable=True,
        )
    if cron_ok is not None and not cron_ok():
        return Decision.wait(subject, "waiting for the next QSIPrep cron tick")
    return Decision.request(subject, converted, "its sessions are converted (a new wave)")


def decide_qsirecon(
    key: str,
    qsiprep: PartitionRecord,
    prep_started: int,
    bids: PartitionRecord,
    validator: str | None,
    recon: PartitionRecord,
    requested: int,
    qc: PartitionRecord | None = None,
    qc_hold: Callable[[], str | None] | None = None,
) -> Decision:
    """`prep_started`: when the run that made the subject's latest QSIPrep was created (its planned
    event; the materialization itself for a reported one). `qc_hold`: the image QC gate's verdict on
    the session now (qc/gate.py), judged only for a session about to be requested: the reason it holds
    the session, or None. A held session gets the QC gate alone (its verdict, figures and alert are
    recorded), never a reconstruction or parcellation that can only be refused; once that QC run exists
    (`qc`, handled since the QSIPrep) nothing more is requested until an operator approves it."""
    prepped = qsiprep.mat_id
    if not prepped:
        return Decision.none(key, "no QSIPrep output for the subject")
    if max(recon.handled_id, requested) >= prepped:
        return Decision.none(key, "reconstructed or requested since the subject's last QSIPrep")
    if not bids.materialized:
        return Decision.none(key, "not converted")
    if prep_started < bids.mat_id:
        return Decision.none(key, "the subject's QSIPrep predates this conversion (the next one includes it)")
    if validator != "passed":
        return Decision.none(key, f"BIDS validator {validator or 'not run'}")
    if qsiprep.in_progress or bids.in_progress or recon.in_progress:
        return Decision.none(key, "an input or the reconstruction itself is running")
    held = qc_hold() if qc_hold is not None else None
    if held is not None:
        notes = tuple(Note(asset, states.HELD, states.HOLD_QC, held) for asset in (QSIRECON, QSIPARC))
        if qc is not None and qc.handled_id >= prepped:
            return Decision.none(key, f"held by image QC since the subject's last QSIPrep: {held}")
        return Decision.request(key, prepped, f"held by image QC ({held}): the QC gate alone, no reconstruction",
                                assets=(QC,), notes=notes)  # fmt: skip
    return Decision.request(key, prepped, "the subject's QSIPrep was updated")


def decide_qsiparc(key: str, recon: PartitionRecord, parc: PartitionRecord, requested: int) -> Decision:
    reconstructed = recon.mat_id
    if recon.attempt_settled and recon.run_status == dg.DagsterRunStatus.FAILURE and (
        parc.planned_run_id == recon.planned_run_id and parc.open_attempt
    ):
        why = f"qsirecon failed in run {recon.planned_run_id[:8]}: parcellation skipped, it has nothing to read"
        return Decision.none(key, why, notes=(Note(QSIPARC, states.BLOCKED, "qsirecon", why),))
    if not reconstructed:
        return Decision.none(key, "not reconstructed")
    if max(parc.handled_id, requested) >= reconstructed:
        return Decision.none(key, "parcellated or requested since its reconstruction")
    if parc.planned_run_id and parc.planned_run_id == recon.mat_run_id:
        return Decision.none(key, "planned in the run that reconstructed it")
    if recon.in_progress or parc.in_progress:
        return Decision.none(key, "reconstruction or parcellation running")
    return Decision.request(key, reconstructed, "its reconstruction was updated")


# --------------------------------------------------------------------------------------------------
# One tick of a stage sensor


@dataclass
class TickInput:
    """What changed since the cursor (empty on a quiet tick)."""

    materialized: dict[dg.AssetKey, dict[str, int]]
    finished: list[FinishedRun]


class Stage:
    """One stage sensor: which changes make which partitions candidates, and how each is decided."""

    name = ""
    watch: tuple[dg.AssetKey, ...] = ()
    target: tuple[dg.AssetKey, ...] = ()

    def __init__(self, config: NeuroflowConfig) -> None:
        self.config = config

    def candidates(self, ledger: Ledger, changes: TickInput) -> set[str]:
        raise NotImplementedError

    def decide(self, ledger: Ledger, keys: set[str], cursor: Cursor, now: float) -> list[Decision]:
        raise NotImplementedError


def _sessions_of(ledger: Ledger, subjects: Iterable[str]) -> list[str]:
    """Every (subject, label) key; phantoms drop out when their records are empty."""
    labels = ledger.dynamic_partitions(SESSION_LABELS)
    return [session_key(s, label) for s in sorted(set(subjects)) for label in labels]


PROTOCOL_CHECK_NAME = f"{stages.SOURCE_ASSET}:{stages.PROTOCOL_CHECK}"


def _stage_job_assets() -> dict[str, str]:
    """A whole-job run (no asset selection) names its asset by its stage tag (from the registry)."""
    return {record.tag: record.asset for record in stages.stages()}


def _run_partitions(changes: TickInput, assets: set[str], checks: frozenset[str] = frozenset()) -> set[str]:
    """Partitions of the runs that ended since the cursor and touched one of `assets` or `checks`."""
    out = set()
    for run in changes.finished:
        stage = run.tags.get(STAGE_TAG, "")
        touched = set(run.assets) or {_stage_job_assets().get(stage, "")}
        # The discovery sensor's check runs run the whole check job: no selection recorded on the run.
        touched_checks = set(run.checks) or ({PROTOCOL_CHECK_NAME} if stage == "discovery" else set())
        if run.partition and (touched & assets or touched_checks & checks):
            out.add(run.partition)
    return out


def _protocol_verdicts(ledger: Ledger, dicom: dict[str, PartitionRecord]) -> dict[str, str | None]:
    present = [k for k, r in dicom.items() if r.materialized]
    checks = ledger.checks(PROTOCOL, present)
    need_meta = [
        dicom[k].mat_id for k in present if (checks.get(k) is None or checks[k].verdict_on(dicom[k].mat_id) is None)
    ]
    meta = ledger.metadata(DICOM, need_meta)
    return {k: protocol_verdict(r, checks.get(k), meta.get(r.mat_id)) for k, r in dicom.items()}


class BidsStage(Stage):
    name = "bids_conversion"
    watch = (DICOM,)
    target = (BIDS,)

    def candidates(self, ledger: Ledger, changes: TickInput) -> set[str]:
        keys = set(changes.materialized.get(DICOM, {}))
        keys |= _run_partitions(changes, {BIDS.to_user_string()}, frozenset({PROTOCOL_CHECK_NAME}))
        return keys

    def decide(self, ledger: Ledger, keys: set[str], cursor: Cursor, now: float) -> list[Decision]:
        dicom = ledger.records(DICOM, keys)
        bids = ledger.records(BIDS, keys)
        verdicts = _protocol_verdicts(ledger, dicom)
        return [decide_bids(k, dicom[k], verdicts[k], bids[k], cursor.requested_trigger(k)) for k in sorted(keys)]


class QsiprepStage(Stage):
    name = "qsiprep"
    watch = (BIDS,)
    target = (QSIPREP,)

    def candidates(self, ledger: Ledger, changes: TickInput) -> set[str]:
        keys = {split_session_key(k)[0] for k in changes.materialized.get(BIDS, {})}
        ended = _run_partitions(changes, {BIDS.to_user_string()}, frozenset({PROTOCOL_CHECK_NAME}))
        keys |= {split_session_key(k)[0] for k in ended}
        keys |= {p for p in _run_partitions(changes, {QSIPREP.to_user_string()}) if "|" not in p}
        # A reconstruction run that ended may release a QSIPrep held for it (`readers` below).
        readers = {a.to_user_string() for a in READERS}
        keys |= {split_session_key(p)[0] for p in _run_partitions(changes, readers) if "|" in p}
        return keys

    def decide(self, ledger: Ledger, keys: set[str], cursor: Cursor, now: float) -> list[Decision]:
        session_keys = _sessions_of(ledger, keys)
        dicom = ledger.records(DICOM, session_keys)
        bids = ledger.records(BIDS, session_keys)
        verdicts = _protocol_verdicts(ledger, dicom)
        prep = ledger.records(QSIPREP, keys)
        cfg = self.config.pipelines.qsiprep
        out = []
        sessions_by = {}
        for subject in sorted(keys):
            sessions = sessions_by[subject] = {
                k: (dicom[k], verdicts[k], bids[k])
                for k in _sessions_of(ledger, [subject])
                if dicom[k].materialized or bids[k].materialized
            }
            cron_ok = None
            if cfg.trigger == "cron":
                cron_ok = self._cron_check(ledger, prep[subject], cursor, subject, now)
            out.append(decide_qsiprep(subject, sessions, prep[subject], cursor.requested_trigger(subject), cron_ok))
        # Only for the subjects about to be requested: is a reconstruction of theirs still queued or running?
        wanted = [d.key for d in out if d.action == "request"]
        busy = self._readers(ledger, wanted) if wanted else {}
        out = [
            decide_qsiprep(d.key, sessions_by[d.key], prep[d.key], cursor.requested_trigger(d.key), None, busy[d.key])
            if d.key in busy
            else d
            for d in out
        ]
        return self._hold_without_anatomy(ledger, out, bids)

    def _readers(self, ledger: Ledger, subjects: list[str]) -> dict[str, list[str]]:
        """subject -> its sessions with a queued or running run that reads its QSIPrep output."""
        keys = _sessions_of(ledger, subjects)
        records = [ledger.records(asset, keys) for asset in READERS]
        busy: dict[str, list[str]] = {}
        for key in keys:
            if any(r[key].in_progress for r in records):
                busy.setdefault(split_session_key(key)[0], []).append(key)
        return busy

    def _hold_without_anatomy(
        self, ledger: Ledger, decisions: list[Decision], bids: dict[str, PartitionRecord]
    ) -> list[Decision]:
        """A request for a subject whose sessions lack the anatomical image QSIPrep is configured for
        becomes a hold (eligibility.qsiprep_plan_from_metadata, from the conversions' metadata)."""
        subjects = {d.key for d in decisions if d.action == "request"}
        if not subjects:
            return decisions
        converted = {k: r.mat_id for k, r in bids.items() if r.materialized and split_session_key(k)[0] in subjects}
        meta = ledger.metadata(BIDS, converted.values())
        by_subject: dict[str, dict[str, dict[str, Any]]] = {}
        for key, mat_id in converted.items():
            subject, session = split_session_key(key)
            by_subject.setdefault(subject, {})[session] = meta.get(mat_id, {})
        out = []
        for d in decisions:
            hold = None
            if d.action == "request":
                hold = qsiprep_plan_from_metadata(self.config, d.key, by_subject.get(d.key, {})).hold
            note = (Note(QSIPREP, states.HELD, states.HOLD_NO_ANAT, hold),) if hold else ()
            out.append(Decision.hold(d.key, hold, notes=note) if hold else d)
        return out

    def _cron_check(
        self, ledger: Ledger, record: PartitionRecord, cursor: Cursor, subject: str, now: float
    ) -> Callable[[], bool]:
        def ok() -> bool:
            from dagster._utils.schedules import get_latest_completed_cron_tick

            latest_tick = get_latest_completed_cron_tick(
                self.config.pipelines.qsiprep.cron, datetime.fromtimestamp(now, timezone.utc), "UTC"
            ).timestamp()
            last = cursor.started
            entry = cursor.requested.get(subject)
            if entry:
                last = max(last, float(entry[1]))
            if record.planned_id:
                last = max(last, ledger.event_time(QSIPREP, record.planned_id))
            return latest_tick > last

        return ok


class QsireconStage(Stage):
    """Recon of a session, in one run with its image QC (first) and its parcellation; the QC gate alone
    for a session it holds. Handled = recon's planned event, or the QC run's for a held session."""

    name = "qsirecon"
    watch = (QSIPREP,)
    target = (QC, QSIRECON, QSIPARC)

    def candidates(self, ledger: Ledger, changes: TickInput) -> set[str]:
        subjects = set(changes.materialized.get(QSIPREP, {}))
        subjects |= {p for p in _run_partitions(changes, {QSIPREP.to_user_string()}) if "|" not in p}
        keys = set(_sessions_of(ledger, subjects))
        keys |= {p for p in _run_partitions(changes, {BIDS.to_user_string(), QSIRECON.to_user_string()}) if "|" in p}
        return keys

    def decide(self, ledger: Ledger, keys: set[str], cursor: Cursor, now: float) -> list[Decision]:
        bids = ledger.records(BIDS, keys)
        keys = {k for k in keys if bids[k].materialized}  # phantoms and unconverted sessions drop out here
        prep = ledger.records(QSIPREP, {split_session_key(k)[0] for k in keys}, mat_runs=True)
        started = ledger.planned_ids_of_runs(QSIPREP, {s: r.mat_run_id for s, r in prep.items()})
        recon = ledger.records(QSIRECON, keys)
        qc = ledger.records(QC, keys)
        checks = ledger.checks(VALIDATOR, keys)
        registry = Registry(self.config.paths.state)
        out = []
        for k in sorted(keys):
            subject, session = split_session_key(k)
            check = checks.get(k)
            validator = check.verdict_on(bids[k].mat_id) if check is not None else None
            out.append(
                decide_qsirecon(
                    k,
                    prep[subject],
                    started.get(subject, prep[subject].mat_id),
                    bids[k],
                    validator,
                    recon[k],
                    cursor.requested_trigger(k),
                    qc[k],
                    functools.partial(self.qc_hold, registry, subject, session),
                )
            )
        return out

    def qc_hold(self, registry: Registry, participant: str, session: str) -> str | None:
        """Why the image QC gate holds the session now (the same verdict the QC asset records), or None."""
        entry = registry.get(participant, session)
        if entry is None:
            return None  # not registered: the run refuses it and says why
        gate = session_gate(self.config, entry.scan_id, participant, session)
        return gate.describe() if gate.blocks else None


class QsiparcStage(Stage):
    name = "qsiparc"
    watch = (QSIRECON,)
    target = (QSIPARC,)

    def candidates(self, ledger: Ledger, changes: TickInput) -> set[str]:
        keys = set(changes.materialized.get(QSIRECON, {}))
        keys |= {p for p in _run_partitions(changes, {QSIRECON.to_user_string(), QSIPARC.to_user_string()}) if "|" in p}
        return keys

    def decide(self, ledger: Ledger, keys: set[str], cursor: Cursor, now: float) -> list[Decision]:
        recon = ledger.records(QSIRECON, keys, mat_runs=True)
        parc = ledger.records(QSIPARC, keys)
        return [decide_qsiparc(k, recon[k], parc[k], cursor.requested_trigger(k)) for k in sorted(keys)]


class FollowStage(Stage):
    """A registered stage without rules of its own (e.g. a new pipeline): eager on its upstream.

    A partition is requested when one of its upstream assets was materialized after the stage last
    handled it, all its upstream assets exist and nothing is running for it: Dagster's eager()
    semantics, computed from the event log like the other stages. Upstream at the same level maps
    partition to partition; a subject-level upstream of a session stage reaches all of the
    subject's sessions; session-level upstream of a subject stage reaches the subject.
    """

    def __init__(self, config: NeuroflowConfig, record: stages.Stage) -> None:
        super().__init__(config)
        self.record = record
        self.name = record.name
        self.target = (dg.AssetKey(record.asset),)
        self.upstream = [(dg.AssetKey(asset), level) for asset, level in stages.upstream_assets(record)]
        self.watch = tuple(key for key, _ in self.upstream)

    def _own_keys(self, ledger: Ledger, key: str, level: str) -> set[str]:
        per_subject = self.record.per_subject
        if level == self.record.level:
            return {key}
        if per_subject:  # a session of the subject changed
            return {split_session_key(key)[0]} if "|" in key else set()
        return set(_sessions_of(ledger, [key]))  # the subject changed: all its sessions

    def candidates(self, ledger: Ledger, changes: TickInput) -> set[str]:
        keys: set[str] = set()
        for asset, level in self.upstream:
            for key in changes.materialized.get(asset, {}):
                keys |= self._own_keys(ledger, key, level)
        own = {a.to_user_string() for a in self.target} | {a.to_user_string() for a in self.watch}
        for key in _run_partitions(changes, own):
            if ("|" in key) != self.record.per_subject:
                keys.add(key)
        return keys

    def _upstream_keys(self, ledger: Ledger, key: str, level: str) -> list[str]:
        if level == self.record.level:
            return [key]
        if self.record.per_subject:
            return _sessions_of(ledger, [key])
        return [split_session_key(key)[0]]

    def decide(self, ledger: Ledger, keys: set[str], cursor: Cursor, now: float) -> list[Decision]:
        own = ledger.records(self.target[0], keys)
        out = []
        for key in sorted(keys):
            latest, missing = 0, False
            for asset, level in self.upstream:
                up = ledger.records(asset, self._upstream_keys(ledger, key, level))
                ids = [r.mat_id for r in up.values() if r.materialized]
                if not ids:
                    missing = True
                    break
                latest = max(latest, *ids)
            record = own[key]
            if missing:
                out.append(Decision.none(key, "an upstream asset is missing"))
            elif max(record.handled_id, cursor.requested_trigger(key)) >= latest:
                out.append(Decision.none(key, "handled since its upstream last changed"))
            elif record.in_progress:
                out.append(Decision.none(key, "running"))
            else:
                out.append(Decision.request(key, latest, "an upstream asset was updated"))
        return out


STAGES: tuple[type[Stage], ...] = (BidsStage, QsiprepStage, QsireconStage, QsiparcStage)
_RULES = {cls.name: cls for cls in STAGES}


def stage_rules(config: NeuroflowConfig, record: stages.Stage) -> Stage:
    """The automation of one registered stage: its own rules if it has some, else FollowStage."""
    cls = _RULES.get(record.name)
    return cls(config) if cls is not None else FollowStage(config, record)


def _only_known_partitions(ledger: Ledger, decisions: list[Decision]) -> list[Decision]:
    """A request for a partition not in the dynamic sets yet becomes a wait (re-examined next tick).

    The daemon stores a discovery tick's materializations before it adds the tick's partitions, and
    a run request for an unknown partition fails the whole tick.
    """
    if not any(d.action == "request" for d in decisions):
        return decisions
    subjects = set(ledger.dynamic_partitions(SUBJECTS))
    labels = set(ledger.dynamic_partitions(SESSION_LABELS))
    out = []
    for d in decisions:
        subject, session = split_session_key(d.key) if "|" in d.key else (d.key, "")
        if d.action == "request" and (subject not in subjects or (session and session not in labels)):
            out.append(Decision.wait(d.key, "partition not added yet"))
        else:
            out.append(d)
    return out


def _not_held_by_an_operator_decision(config: NeuroflowConfig, decisions: list[Decision]) -> list[Decision]:
    """A request for a session an operator excluded, or whose identity is in question (remapped, a subject
    holding two SubjectCodes), becomes none: every stage refuses such a session, so its run could only
    fail (neuroflow_dagster/states.py: held). Subject-level stages check their sessions themselves."""
    wanted = [d for d in decisions if d.action == "request" and "|" in d.key]
    if not wanted:
        return decisions
    registry = Registry(config.paths.state)
    excluded = load_exclusions(config)
    report = read_status_report(config)
    held: dict[str, str] = {}
    for d in wanted:
        entry = registry.get(*split_session_key(d.key))
        if entry is None:
            continue  # not registered: the run refuses it and says why
        if entry.scan_id in excluded:
            held[d.key] = f"excluded: {excluded[entry.scan_id].get('reason')}"
        elif blocked := session_block(config, entry, registry, report):
            held[d.key] = blocked
    return [Decision.hold(d.key, held[d.key]) if d.key in held and d.action == "request" else d
            for d in decisions]  # fmt: skip


@dataclass
class TickResult:
    decisions: list[Decision]
    cursor: Cursor
    candidates: int
    seconds: float


def run_stage_tick(stage: Stage, instance: dg.DagsterInstance, cursor: Cursor, now: float | None = None) -> TickResult:
    """One tick: the changes since the cursor -> candidates -> decisions; the new cursor."""
    started = time.monotonic()
    now = time.time() if now is None else now
    ledger = Ledger(instance)
    head = ledger.head()
    if not cursor.started:
        cursor.started = now
    for key, (_, when) in list(cursor.requested.items()):
        if now - when > REQUEST_MEMORY_S:
            del cursor.requested[key]
    cursor.pending = {k: t for k, t in cursor.pending.items() if now - t <= PENDING_MAX_S}
    if head == cursor.seen == cursor.before and not cursor.pending:
        return TickResult([], cursor, 0, time.monotonic() - started)

    # Re-read the previous tick's window once (bounded): an event committed late with a lower id.
    after = max(cursor.before, cursor.seen - OVERLAP)
    materialized = {asset: ledger.materialized_since(asset, after) for asset in stage.watch}
    # A long backlog (the first tick on an existing archive, a sensor stopped for days) is taken in
    # pages of MAX_CANDIDATES materializations, oldest first, so that no tick outlasts the sensor
    # timeout; the cursor then stops at the page's last storage id.
    upto = head
    ids = sorted(i for found in materialized.values() for i in found.values())
    if len(ids) > MAX_CANDIDATES:
        upto = ids[MAX_CANDIDATES - 1]
        materialized = {a: {p: i for p, i in found.items() if i <= upto} for a, found in materialized.items()}
    # The first tick on an existing instance takes everything registered so far; run ends are then
    # irrelevant (every partition with a materialization is a candidate already).
    finished = ledger.runs_finished_since(after, upto) if after else []
    changes = TickInput(materialized, finished)
    keys = stage.candidates(ledger, changes) | set(cursor.pending)
    # Runs created for earlier requests: forget those requests. The QC gate's planned event does not
    # count (a QC run alone, e.g. from the UI, is not the recon run that was requested).
    for asset in (a for a in stage.target if a != QC):
        for key, planned in ledger.planned_since(asset, after).items():
            if planned >= cursor.requested_trigger(key) and key in cursor.requested:
                del cursor.requested[key]
    decisions = stage.decide(ledger, keys, cursor, now) if keys else []
    decisions = _only_known_partitions(ledger, decisions)
    decisions = _not_held_by_an_operator_decision(stage.config, decisions)
    pending = {}
    for d in decisions:
        if d.action == "request":
            cursor.requested[d.key] = [d.trigger, now]
        elif d.action == "wait":
            pending[d.key] = cursor.pending.get(d.key, now)
    cursor.pending = pending
    if upto < head:
        cursor.before = cursor.seen = upto  # the next page starts after this one
    else:
        cursor.before, cursor.seen = cursor.seen, head
    return TickResult(decisions, cursor, len(keys), time.monotonic() - started)


MAX_NOTED = 10_000  # notes remembered in the cursor (oldest forgotten first)


def take_notes(decisions: list[Decision], cursor: Cursor) -> list[dg.AssetObservation]:
    """The decisions' notes as AssetObservations on the cells they name (metadata `neuroflow/state`,
    `neuroflow/cause`, `reason`: the state model's words, as `neuroflow status` shows them), each once:
    a note already recorded for the partition is not repeated (the cursor remembers the last one)."""
    out = []
    for d in decisions:
        for note in d.notes:
            key = f"{note.asset.to_user_string()}:{d.key}"
            marker = f"{note.state}:{note.cause}:{note.reason}"
            if cursor.noted.get(key) == marker:
                continue
            cursor.noted.pop(key, None)
            cursor.noted[key] = marker
            out.append(dg.AssetObservation(
                asset_key=note.asset, partition=d.key, description=note.reason[:2000],
                metadata={STATE_KEY: note.state, CAUSE_KEY: note.cause, "reason": note.reason[:2000]},
            ))  # fmt: skip
    while len(cursor.noted) > MAX_NOTED:
        del cursor.noted[next(iter(cursor.noted))]
    return out


# --------------------------------------------------------------------------------------------------
# The sensors


def build_automation_sensors(
    config: NeuroflowConfig, run_tags: Callable[[NeuroflowConfig, stages.Stage], dict[str, str]]
) -> list[dg.SensorDefinition]:
    """One sensor per registered stage (default RUNNING): every run it launches carries `neuroflow/stage`.

    Run-queue tag limits key on that tag (asset tags are not copied to runs); the pools on the assets
    hold the limit for runs launched without tags too. Stopping a stage's sensor in the UI pauses
    that stage only.
    """
    interval = max(5, min(30, config.discovery.interval_seconds))
    return [
        _stage_sensor(stage_rules(config, record), interval, {STAGE_TAG: record.tag, **run_tags(config, record)})
        for record in stages.stages()
    ]


def _stage_sensor(stage: Stage, interval: int, tags: dict[str, str]) -> dg.SensorDefinition:
    targets = [k.to_user_string() for k in stage.target]
    mode = ""
    if isinstance(stage, QsiprepStage):
        cfg = stage.config.pipelines.qsiprep
        mode = (
            " QSIPrep once per wave of sessions"
            + (f", after each cron {cfg.cron} tick" if cfg.trigger == "cron" else "")
            + ", never while a reconstruction of the subject is queued or running."
        )

    @dg.sensor(
        name=f"automation_{stage.name}",
        target=dg.AssetSelection.assets(*stage.target),
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Automation for {stage.name} ({', '.join(targets)}): follows the event log by storage id; "
        f"its runs carry {STAGE_TAG}={tags[STAGE_TAG]}.{mode}",
    )
    def automation_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        cursor = Cursor.decode(context.cursor)
        result = run_stage_tick(stage, context.instance, cursor)
        requests = []
        waits = 0
        for d in result.decisions:
            if d.action == "request":
                selection = list(d.assets or stage.target)
                requests.append(
                    dg.RunRequest(
                        partition_key=d.key,
                        asset_selection=selection,
                        tags={TRIGGER_TAG: d.reason[:200], **tags},
                    )
                )
                context.log.info(f"request {', '.join(k.to_user_string() for k in selection)} {d.key}: {d.reason}")
            elif d.action == "wait":
                waits += 1
                context.log.debug(f"wait {d.key}: {d.reason}")
            elif d.action == "hold" or d.notable:
                context.log.info(f"hold {', '.join(targets)} {d.key}: {d.reason}")
        observations = take_notes(result.decisions, result.cursor)
        for obs in observations:
            context.log.info(f"{obs.asset_key.to_user_string()} {obs.partition}: {obs.metadata[STATE_KEY].value} "
                             f"({obs.metadata[CAUSE_KEY].value}): {obs.description}")  # fmt: skip
        if result.candidates:
            context.log.info(
                f"{result.candidates} candidate(s), {len(requests)} request(s), {waits} waiting, {result.seconds:.2f}s"
            )
        return dg.SensorResult(run_requests=requests, asset_events=observations, cursor=result.cursor.encode())

    return automation_sensor
