"""Which sessions a stage may take (docs/domain-rules.md#state): plain rules the stage assets apply.

A partition is processed only if a ScanID maps to it, no operator excluded or
re-keyed it, and who it belongs to is not in question; QSIPrep takes the
subject's sessions that are converted, valid BIDS and have the suffixes it
needs, and says why each other one is left out. Plain Python (no dagster): the
assets turn ``NotEligible`` into a Failure that is not retried.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from neuroflow_dagster.bids.dataset import present_suffixes, session_dir
from neuroflow_dagster.bids.verdicts import verdict_passed
from neuroflow_dagster.config import NeuroflowConfig, QsiprepConfig
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.discovery.identity import Registry, RegistryEntry
from neuroflow_dagster.discovery.status_report import session_block, subject_block
from neuroflow_dagster.naming.bids import describe

# Refused because who the session belongs to is in question (docs/operations.md, "What happens when").
IDENTITY = "identity"
DWI = "dwi"


class NotEligible(Exception):
    """The partition must not be processed; the message says why (an operator reads it).

    ``failure_class``: ``validation`` (not registered, excluded) or ``identity`` (a remapped ScanID, a
    subject holding two SubjectCodes, a re-keyed binding), recorded on the refused step.
    """

    def __init__(self, message: str, failure_class: str = "validation") -> None:
        super().__init__(message)
        self.failure_class = failure_class


def registered_session(config: NeuroflowConfig, participant: str, session: str) -> RegistryEntry:
    """The session's registry entry; NotEligible if no ScanID maps to it, it was excluded or re-keyed,
    or its identity is in question (held as remapped, or its subject holds two SubjectCodes)."""
    registry = Registry(config.paths.state)
    entry = registry.get(participant, session)
    if entry is None:
        if retired := registry.retired_entry(participant, session):
            raise NotEligible(
                f"{retired.labels} (ScanID {retired.scan_id!r}, SubjectCode {retired.recruitment_id!r}) was "
                f"re-keyed: {retired.note}; its outputs are kept, it is no longer processed",
                IDENTITY,
            )
        raise NotEligible(
            f"{describe(participant, session)} is not a registered session (no ScanID maps to it); "
            "only partitions added by the discovery sensor can be processed"
        )
    excluded = load_exclusions(config).get(entry.scan_id)
    if excluded:
        raise NotEligible(f"ScanID {entry.scan_id!r} was excluded by {excluded.get('by')}: {excluded.get('reason')}")
    if blocked := session_block(config, entry, registry):
        raise NotEligible(blocked, IDENTITY)
    return entry


def missing_suffixes(required: list[str], config: NeuroflowConfig, participant: str, session: str) -> set[str]:
    """The required BIDS suffixes the session's converted folder does not have."""
    return set(required) - present_suffixes(session_dir(config.paths.bids_root, participant, session))


def parse_suffixes(text: object) -> set[str]:
    """The ``bids_suffixes`` metadata of a ``bids_session`` materialization ("T1w, dwi", or "none")."""
    if not isinstance(text, str):
        return set()
    return {s.strip() for s in text.split(",") if s.strip() and s.strip() != "none"}


def anatomical_hold(
    anat_modality: str, suffixes_by_session: Mapping[str, Collection[str]], *, sessionwise: bool = False
) -> str | None:
    """Why QSIPrep cannot run on these sessions for want of an anatomical image; None if it can.

    QSIPrep collects the anatomical images of every session of its processing group and, unless
    ``--anat-modality none``, fails the whole subject when there is none ("No T1w images found for
    participant ...", qsiprep/workflows/base.py). Its group is all the given sessions, so one session
    with the modality serves every session; with ``--subject-anatomical-reference sessionwise`` each
    session with DWI is a group of its own and needs its own (``sessionwise=True``: the suffixes of
    the sessions with DWI are what counts). docs/domain-rules.md#pipelines.
    """
    if anat_modality == "none":
        return None
    if sessionwise:
        if any(anat_modality in sfx and DWI in sfx for sfx in suffixes_by_session.values()):
            return None
        return f"no session with both DWI and {anat_modality} (subject_anatomical_reference: sessionwise)"
    if any(anat_modality in sfx for sfx in suffixes_by_session.values()):
        return None
    return f"no {anat_modality} in any session"


@dataclass(frozen=True)
class QsiprepInput:
    """What one QSIPrep run of a subject takes: ``sessions`` are preprocessed (they have what the stage
    requires, DWI), ``anat_sessions`` only lend their anatomical images (no DWI; QSIPrep uses them in
    the subject's anatomical reference); ``left_out``: every other session and why; ``hold``: why
    QSIPrep cannot run at all (anatomical_hold), None if it can: check it before the sessions."""

    sessions: list[str]
    anat_sessions: list[str]
    left_out: dict[str, str]
    hold: str | None

    @property
    def all_sessions(self) -> list[str]:
        return sorted(self.sessions + self.anat_sessions)


def plan_qsiprep(stage: QsiprepConfig, suffixes_by_session: Mapping[str, Collection[str]]) -> QsiprepInput:
    """The run over usable sessions (converted, valid, not excluded) with these BIDS suffixes.

    The automation (from the ``bids_suffixes`` metadata) and the asset (from the files) both decide
    here, so that they never disagree: a subject held here is never requested, and refused if launched.
    A session without DWI but with the anatomical modality lends its image to the subject's reference
    (QSIPrep puts "sessions that have anatomical data, but no DWI" into the group, qsiprep/cli/parser.py),
    except sessionwise, where each DWI session is its own group and one without its own image is left
    out. The hold is judged on exactly the sessions the run would be given.
    """
    required = set(stage.requires_bids_suffixes)
    modality = stage.anat_modality
    preprocess: dict[str, Collection[str]] = {}
    anat: dict[str, Collection[str]] = {}
    left_out: dict[str, str] = {}
    for ses, suffixes in sorted(suffixes_by_session.items()):
        missing = required - set(suffixes)
        if not missing:
            preprocess[ses] = suffixes
            continue
        left_out[ses] = f"no {', '.join(sorted(missing))} in BIDS"
        if DWI not in suffixes and modality != "none" and modality in suffixes and not stage.sessionwise:
            anat[ses] = suffixes
    if not preprocess:  # nothing to preprocess: not applicable, not held
        return QsiprepInput([], [], left_out, None)
    for ses in anat:
        del left_out[ses]
    given = {**preprocess, **anat}
    hold = anatomical_hold(modality, given, sessionwise=stage.sessionwise)
    sessions = []
    for ses, suffixes in preprocess.items():
        if stage.sessionwise and modality != "none" and modality not in suffixes:
            left_out[ses] = f"no {modality} in this session (subject_anatomical_reference: sessionwise)"
        else:
            sessions.append(ses)
    return QsiprepInput(sessions, list(anat), left_out, hold)


def qsiprep_sessions(config: NeuroflowConfig, participant: str) -> QsiprepInput:
    """The subject's sessions QSIPrep takes (from the converted files), and why each other one is left out.

    NotEligible (``identity``) when any session of the subject is held in an identity conflict: one
    anatomical template from two people's scans is exactly what must never be built.
    """
    if blocked := subject_block(config, participant):
        raise NotEligible(f"no template from a subject whose identity is in question: {blocked}", IDENTITY)
    excluded = load_exclusions(config)
    usable: dict[str, set[str]] = {}
    left_out: dict[str, str] = {}
    for entry in Registry(config.paths.state).sessions_of(participant):
        ses = entry.session_id
        folder = session_dir(config.paths.bids_root, participant, ses)
        if entry.scan_id in excluded:
            left_out[ses] = f"excluded: {excluded[entry.scan_id].get('reason')}"
        elif not folder.is_dir():
            left_out[ses] = "not converted to BIDS"
        elif not verdict_passed(config.paths.state, participant, ses):
            left_out[ses] = "BIDS validator reported errors"
        else:
            usable[ses] = present_suffixes(folder)
    plan = plan_qsiprep(config.pipelines.qsiprep, usable)
    return QsiprepInput(plan.sessions, plan.anat_sessions, {**left_out, **plan.left_out}, plan.hold)


def qsiprep_plan_from_metadata(
    config: NeuroflowConfig, participant: str, converted: Mapping[str, Mapping[str, object]]
) -> QsiprepInput:
    """plan_qsiprep for the automation: ``converted`` maps each converted session of the subject to the
    metadata of its latest ``bids_session`` materialization (``bids_suffixes``, ``scan_id``). Sessions
    are left out as qsiprep_sessions leaves them out (excluded, BIDS validator errors), so that the
    automation holds exactly the subjects the asset would refuse. A materialization without
    ``bids_suffixes`` (an older version's) is read from the session's files."""
    excluded = load_exclusions(config)
    usable: dict[str, set[str]] = {}
    left_out: dict[str, str] = {}
    for ses, meta in sorted(converted.items()):
        scan_id = meta.get("scan_id")
        if isinstance(scan_id, str) and scan_id in excluded:
            left_out[ses] = f"excluded: {excluded[scan_id].get('reason')}"
        elif not verdict_passed(config.paths.state, participant, ses):
            left_out[ses] = "BIDS validator reported errors"
        elif "bids_suffixes" in meta:
            usable[ses] = parse_suffixes(meta["bids_suffixes"])
        else:
            usable[ses] = present_suffixes(session_dir(config.paths.bids_root, participant, ses))
    plan = plan_qsiprep(config.pipelines.qsiprep, usable)
    return QsiprepInput(plan.sessions, plan.anat_sessions, {**left_out, **plan.left_out}, plan.hold)
