"""`qsiprep_subject`: QSIPrep over ALL of a subject's converted diffusion sessions at once.

QSIPrep builds one anatomical template from every session, so a new session
changes every session's output; the automation re-runs it per wave of
arrivals and then reconstructs every session of the subject.
"""

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.assets.common import not_applicable, refuse, run_derivative_tool
from neuroflow_dagster.defs.graph import stage_asset_args, tool_label
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.eligibility import NotEligible, qsiprep_sessions
from neuroflow_dagster.naming.tags import STATUS_DONE, STATUS_KEY
from neuroflow_dagster.stages import stage
from neuroflow_dagster.tools import layout, qsiprep

STAGE = "qsiprep"


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
