"""Which sessions a stage may take (docs/domain-rules.md#state): plain rules the stage assets apply.

A partition is processed only if a ScanID maps to it, no operator excluded or
re-keyed it, and who it belongs to is not in question; QSIPrep takes the
subject's sessions that are converted, valid BIDS and have the suffixes it
needs, and says why each other one is left out. Plain Python (no dagster): the
assets turn ``NotEligible`` into a Failure that is not retried.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from neuroflow_dagster.bids.dataset import present_suffixes, session_dir
from neuroflow_dagster.bids.verdicts import verdict_passed
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.discovery.identity import Registry, RegistryEntry
from neuroflow_dagster.discovery.status_report import session_block, subject_block
from neuroflow_dagster.naming.bids import describe

# Refused because who the session belongs to is in question (docs/operations.md, "What happens when").
IDENTITY = "identity"


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


def qsiprep_sessions(config: NeuroflowConfig, participant: str) -> tuple[list[str], dict[str, str]]:
    """The subject's sessions QSIPrep takes, and why each other one is left out.

    NotEligible (``identity``) when any session of the subject is held in an identity conflict: one
    anatomical template from two people's scans is exactly what must never be built.
    """
    if blocked := subject_block(config, participant):
        raise NotEligible(f"no template from a subject whose identity is in question: {blocked}", IDENTITY)
    required = config.pipelines.qsiprep.requires_bids_suffixes
    excluded = load_exclusions(config)
    take: list[str] = []
    left_out: dict[str, str] = {}
    for entry in Registry(config.paths.state).sessions_of(participant):
        ses = entry.session_id
        if entry.scan_id in excluded:
            left_out[ses] = f"excluded: {excluded[entry.scan_id].get('reason')}"
        elif not session_dir(config.paths.bids_root, participant, ses).is_dir():
            left_out[ses] = "not converted to BIDS"
        elif not verdict_passed(config.paths.state, participant, ses):
            left_out[ses] = "BIDS validator reported errors"
        elif missing := missing_suffixes(required, config, participant, ses):
            left_out[ses] = f"no {', '.join(sorted(missing))} in BIDS"
        else:
            take.append(ses)
    return take, left_out


def anatomical_hold(anat_modality: str, suffixes_by_session: Mapping[str, Collection[str]]) -> str | None:
    """Why QSIPrep cannot run for a subject for want of an anatomical image, or None when it can.

    QSIPrep builds the subject's anatomical reference from every session's ``anat/`` images of
    ``--anat-modality`` (``pipelines.qsiprep.anat_modality``); with ``none`` it runs on DWI alone.
    ``suffixes_by_session``: session label -> the BIDS suffixes its converted folder holds (the
    ``bids_session`` materialization's ``bids_suffixes``). docs/domain-rules.md#pipelines.
    """
    if anat_modality.lower() == "none":
        return None
    if any(anat_modality in suffixes for suffixes in suffixes_by_session.values()):
        return None
    return f"no {anat_modality} in any session"


def parse_suffixes(text: object) -> frozenset[str]:
    """The ``bids_suffixes`` metadata value ("dwi, T1w", "none") as a set."""
    return frozenset(s.strip() for s in str(text or "").split(",") if s.strip() and s.strip() != "none")
