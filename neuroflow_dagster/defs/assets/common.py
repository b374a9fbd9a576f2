"""What every stage asset needs first: which session this partition is, and whether it may run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.execution import FAILURE_CLASS_KEY
from neuroflow_dagster.defs.partitions import split_session_key
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.discovery.identity import Registry, RegistryEntry
from neuroflow_dagster.discovery.status_report import session_block
from neuroflow_dagster.tools.spec import ToolSpec


@dataclass(frozen=True)
class SessionContext:
    participant: str
    session: str
    entry: RegistryEntry


# Refused because who the session belongs to is in question (docs/operations.md, "What happens when").
IDENTITY = "identity"


def refuse(reason: str, failure_class: str = "validation") -> dg.Failure:
    """A failure that is not worth retrying: it says why and Dagster stops at once."""
    return dg.Failure(description=reason, metadata={FAILURE_CLASS_KEY: failure_class}, allow_retries=False)


def session_context(config: NeuroflowConfig, partition_key: str) -> SessionContext:
    participant, session = split_session_key(partition_key)
    registry = Registry(config.paths.state)
    entry = registry.get(participant, session)
    if entry is None:
        if retired := registry.retired_entry(participant, session):
            raise refuse(f"{retired_reason(retired)}; its outputs are kept, it is no longer processed", IDENTITY)
        raise refuse(
            f"sub-{participant} ses-{session} is not a registered session (no ScanID maps to it); "
            "only partitions added by the discovery sensor can be processed"
        )
    excluded = load_exclusions(config).get(entry.scan_id)
    if excluded:
        raise refuse(f"ScanID {entry.scan_id!r} was excluded by {excluded.get('by')}: {excluded.get('reason')}")
    if blocked := session_block(config, entry, registry):
        raise refuse(blocked, IDENTITY)
    return SessionContext(participant, session, entry)


def retired_reason(entry: RegistryEntry) -> str:
    return f"{entry.labels} (ScanID {entry.scan_id!r}, SubjectCode {entry.recruitment_id!r}) was re-keyed: {entry.note}"


def build_or_refuse(build: Callable[..., ToolSpec], *args: Any, **kwargs: Any) -> ToolSpec:
    """Build a tool spec; a spec that cannot be built is a configuration problem, never retried."""
    try:
        return build(*args, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        raise refuse(f"cannot prepare the tool run: {exc}", "configuration") from exc


def not_applicable(reason: str, **extra: object) -> dg.MaterializeResult:
    """A stage that does not apply (e.g. no DWI) is recorded as such, visibly, not as a failure."""
    return dg.MaterializeResult(
        metadata={"neuroflow/status": "not_applicable", "reason": reason, **extra},
    )
