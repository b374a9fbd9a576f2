"""What every stage asset needs first: which session this partition is, and whether it may run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.discovery.identity import RegistryEntry
from neuroflow_dagster.eligibility import NotEligible, registered_session
from neuroflow_dagster.naming.partitions import split_session_key
from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY, STATUS_KEY, STATUS_NOT_APPLICABLE
from neuroflow_dagster.tools.spec import ToolSpec


@dataclass(frozen=True)
class SessionContext:
    participant: str
    session: str
    entry: RegistryEntry


def refuse(reason: str, failure_class: str = "validation") -> dg.Failure:
    """A failure that is not worth retrying: it says why and Dagster stops at once."""
    return dg.Failure(description=reason, metadata={FAILURE_CLASS_KEY: failure_class}, allow_retries=False)


def session_context(config: NeuroflowConfig, partition_key: str) -> SessionContext:
    participant, session = split_session_key(partition_key)
    try:
        entry = registered_session(config, participant, session)
    except NotEligible as exc:
        raise refuse(str(exc), exc.failure_class) from None
    return SessionContext(participant, session, entry)


def build_or_refuse(build: Callable[..., ToolSpec], *args: Any, **kwargs: Any) -> ToolSpec:
    """Build a tool spec; a spec that cannot be built is a configuration problem, never retried."""
    try:
        return build(*args, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        raise refuse(f"cannot prepare the tool run: {exc}", "configuration") from exc


def not_applicable(reason: str, **extra: object) -> dg.MaterializeResult:
    """A stage that does not apply (e.g. no DWI) is recorded as such, visibly, not as a failure."""
    return dg.MaterializeResult(
        metadata={STATUS_KEY: STATUS_NOT_APPLICABLE, "reason": reason, **extra},
    )
