"""What every stage asset needs first: which session this partition is, and whether it may run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from neuroflow_dagster import provenance as prov
from neuroflow_dagster.config import NeuroflowConfig, StageConfig
from neuroflow_dagster.defs.diskguard import refuse_if_disk_low
from neuroflow_dagster.defs.execution import execute_spec, record_metadata, staging_for
from neuroflow_dagster.discovery.identity import RegistryEntry
from neuroflow_dagster.eligibility import NotEligible, registered_session
from neuroflow_dagster.naming.bids import provenance_path
from neuroflow_dagster.naming.partitions import split_session_key
from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY, STATUS_KEY, STATUS_NOT_APPLICABLE
from neuroflow_dagster.runtimes.base import RunRecord
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


def tool_versions(stage_cfg: StageConfig, tool: str) -> dict[str, str]:
    """Versions to record for a run: the stand-in's packages (builtin), the installed tool (local), also
    inside a Slurm job; a container's image and digest are recorded from the run itself."""
    if stage_cfg.tool_runtime == "builtin":
        return prov.package_versions(prov.STAND_IN_PACKAGES)
    if stage_cfg.tool_runtime == "local":
        return prov.package_versions([tool])
    return {}


def derivative_plan(
    stage_cfg: StageConfig,
    tool: str,
    participant: str,
    sessions: Sequence[str],
    reads: Sequence[tuple[str, Path, list[str]]],
    session: str | None = None,
) -> prov.Plan:
    """The provenance plan of a derivative stage: its document in ``sub-X[/ses-Y]/`` of the staged tree,
    the files the tool reads (``reads`` from its tool module) hashed before it starts."""
    return prov.Plan(
        participant=participant,
        sessions=tuple(sessions),
        document=provenance_path(participant, session),
        inputs=tuple(prov.input_tree(label, root, patterns) for label, root, patterns in reads),
        tool_versions=tool_versions(stage_cfg, tool),
    )


def run_derivative_tool(
    context: dg.AssetExecutionContext,
    config: NeuroflowConfig,
    stage: str,
    tool: Any,
    participant: str,
    sessions: Sequence[str],
    output_root: Path,
    session: str | None = None,
    before_run: Callable[[ToolSpec], Mapping[str, Any]] | None = None,
    **tool_kwargs: Any,
) -> tuple[RunRecord, ToolSpec, dict[str, Any]]:
    """The course every derivative stage takes once it knows it applies: refuse on a low disk, build
    the tool's spec into this run's staging folder under ``output_root``, hash what it reads for the
    provenance file, run it (published on success) and return the record, the spec and the base
    metadata. ``tool`` is the stage's tool module (``build_spec``, ``reads``, ``TOOL``); a session
    stage passes ``session``, a subject stage all its ``sessions``; ``tool_kwargs`` go to both
    ``build_spec`` and ``reads`` (QSIPrep's ``anat_sessions``, QSIRecon's ``plan``).

    ``before_run``: a check of the built spec before the tool starts (QSIPrep's preflight); it raises to
    stop the run, else returns what it found ({key: JSON value}), recorded in the run's metadata and in
    the provenance file's ``tool`` section."""
    refuse_if_disk_low(context, config, stage)
    target: Any = session if session is not None else list(sessions)
    spec = build_or_refuse(
        tool.build_spec, config, participant, target, output_dir=staging_for(context, output_root), **tool_kwargs
    )
    checked = dict(before_run(spec)) if before_run is not None else {}
    reads = tool.reads(config, participant, target, **tool_kwargs)
    plan = derivative_plan(config.stage(stage), tool.TOOL, participant, sessions, reads, session=session)
    if checked:
        plan = dataclasses.replace(plan, tool_extra={**plan.tool_extra, **checked})
    record = execute_spec(context, config, stage, spec, provenance=plan)
    meta = record_metadata(record, spec)
    meta.update({key: dg.MetadataValue.json(value) for key, value in checked.items()})
    return record, spec, meta
