"""`qsiprep_subject`: QSIPrep over ALL of a subject's converted diffusion sessions at once.

QSIPrep builds one anatomical template from every session, so a new session
changes every session's output; the automation re-runs it per wave of
arrivals and then reconstructs every session of the subject.

Before the tool starts (or its Slurm job is submitted), QSIPrep's own input handling judges the run's
exact inputs (preflight/qsiprep.py): what it refuses fails the run in seconds, class ``validation``,
never retried, with QSIPrep's own message (docs/tools.md, "The QSIPrep preflight").
"""

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.assets.common import not_applicable, refuse, run_derivative_tool
from neuroflow_dagster.defs.graph import stage_asset_args, tool_label
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.eligibility import NotEligible, qsiprep_sessions
from neuroflow_dagster.naming.logs import run_log_path
from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY, LOG_PATH_KEY, LOG_TAIL_KEY, STATUS_DONE, STATUS_KEY
from neuroflow_dagster.preflight import qsiprep as preflight
from neuroflow_dagster.runtimes.failures import FailureClass
from neuroflow_dagster.stages import stage
from neuroflow_dagster.tools import layout, qsiprep
from neuroflow_dagster.tools.spec import ToolSpec

STAGE = "qsiprep"


def preflight_check(
    context: dg.AssetExecutionContext,
    config: NeuroflowConfig,
    participant: str,
    sessions: Sequence[str],
    anat_sessions: Sequence[str] = (),
) -> Callable[[ToolSpec], dict[str, Any]]:
    """The check run_derivative_tool makes on the built spec before the tool starts."""

    def check(spec: ToolSpec) -> dict[str, Any]:
        log_path = run_log_path(config.paths.log_dir, STAGE, participant, context.run_id).with_suffix(".preflight.log")
        verdict = preflight.run(config, spec, participant, sessions, log_path=log_path, anat_sessions=anat_sessions)
        if verdict.status == "off":
            return {}
        if verdict.status == "unavailable":
            if verdict.news:
                context.log.warning(f"{STAGE}: {verdict.message}; runs go ahead without the preflight (said once)")
            else:
                context.log.info(f"{STAGE}: no preflight ({verdict.message})")
        elif verdict.refused:
            context.log.error(f"{STAGE}: {verdict.message} (log: {log_path})")
            with contextlib.suppress(OSError):  # the run's staging folder, still empty: nothing to keep
                spec.output_dir.rmdir()
            raise preflight_refusal(verdict)
        else:
            context.log.info(
                f"{STAGE}: preflight ok: QSIPrep {verdict.qsiprep_version} accepts the inputs and builds its "
                f"workflow ({verdict.details.get('nodes')} nodes, {verdict.seconds:.1f} s)"
            )
        return {"preflight": verdict.as_dict()}

    return check


def preflight_refusal(verdict: preflight.Verdict) -> dg.Failure:
    """Refused by QSIPrep's own input handling: the same inputs give the same refusal, so never retried."""
    tail = ""
    if verdict.log_path:
        try:
            with open(verdict.log_path, encoding="utf-8", errors="replace") as handle:
                tail = "\n".join(handle.read().splitlines()[-40:])
        except OSError:
            tail = ""
    metadata: dict[str, Any] = {
        FAILURE_CLASS_KEY: str(FailureClass.VALIDATION),
        "preflight": dg.MetadataValue.json(verdict.as_dict()),
    }
    if verdict.log_path:
        metadata[LOG_PATH_KEY] = dg.MetadataValue.path(verdict.log_path)
    if tail:
        metadata[LOG_TAIL_KEY] = dg.MetadataValue.md("```\n" + tail[-4000:] + "\n```")
    return dg.Failure(
        description=f"{STAGE} failed [{FailureClass.VALIDATION}; preflight, not started, not retried]: "
        f"{verdict.message}",
        metadata=metadata,
        allow_retries=False,
    )


def build_qsiprep_asset(config: NeuroflowConfig) -> dg.AssetsDefinition:
    stage_cfg = config.pipelines.qsiprep
    tool_name = tool_label(stage_cfg, "QSIPrep")

    @dg.asset(
        **stage_asset_args(stage(STAGE), stage_cfg),
        group_name="preprocessing",
        code_version=qsiprep.code_version(config),
        description=f"{tool_name} over all of the subject's diffusion sessions (one anatomical template); "
        "re-runs whenever the subject gains a session.",
    )
    def qsiprep_subject(context: dg.AssetExecutionContext, neuroflow: NeuroflowResource) -> dg.MaterializeResult:
        cfg = neuroflow.load()
        participant = context.partition_key
        try:
            plan = qsiprep_sessions(cfg, participant)
        except NotEligible as exc:
            raise refuse(str(exc), exc.failure_class) from None
        if plan.hold is not None:
            # The automation holds such a subject (never requests it); launched by hand, it is refused
            # before any tool starts, as the real QSIPrep would fail it (docs/domain-rules.md#pipelines).
            raise refuse(
                f"sub-{participant}: QSIPrep cannot run: {plan.hold} (pipelines.qsiprep.anat_modality: "
                f"{cfg.pipelines.qsiprep.anat_modality}); held until a session with it is converted"
            )
        for ses, why in plan.left_out.items():
            context.log.warning(f"sub-{participant} ses-{ses} left out of QSIPrep: {why}")
        if not plan.sessions:
            return not_applicable(
                f"sub-{participant} has no session QSIPrep can take",
                left_out=dg.MetadataValue.json(plan.left_out),
            )
        record, _spec, meta = run_derivative_tool(
            context,
            cfg,
            STAGE,
            qsiprep,
            participant,
            plan.sessions,
            layout.qsiprep_dir(cfg),
            before_run=preflight_check(context, cfg, participant, plan.sessions, plan.anat_sessions),
            anat_sessions=plan.anat_sessions,
        )
        meta.update(
            {
                STATUS_KEY: STATUS_DONE,
                "sessions": ", ".join(plan.sessions),
                # Sessions without DWI whose anatomical images went into the subject's reference.
                "anat_only_sessions": ", ".join(plan.anat_sessions) or "none",
                "left_out": dg.MetadataValue.json(plan.left_out),
                "tool": tool_name,
                "provenance": dg.MetadataValue.path(record.extra["provenance"]),
            }
        )
        return dg.MaterializeResult(metadata=meta)

    return qsiprep_subject
