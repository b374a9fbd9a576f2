"""`qsiparc_session`: per-region tables for one session from its reconstruction."""

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.assets.common import not_applicable, run_derivative_tool, session_context
from neuroflow_dagster.defs.assets.image_qc import gate_or_refuse
from neuroflow_dagster.defs.graph import stage_asset_args
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.naming.tags import STATUS_DONE, STATUS_KEY
from neuroflow_dagster.stages import stage
from neuroflow_dagster.tools import layout, qsiparc, qsirecon, shells
from neuroflow_dagster.tools.layout import SpecError

STAGE = "qsiparc"


def not_reconstructed(config: NeuroflowConfig, participant: str, session: str) -> str | None:
    """Why QSIRecon does not apply to the session's shell scheme (no spec for it), so neither does QSIParc;
    None otherwise. Older maps of the session, made under another configuration, are not parcellated."""
    try:
        plan = qsirecon.plan_session(config, participant, session)
    except (SpecError, shells.GradientError):
        return None  # no QSIPrep output or an unreadable table: the reconstruction's own check says so
    return plan.reason if plan.spec is None else None


def build_qsiparc_asset(config: NeuroflowConfig) -> dg.AssetsDefinition:
    stage_cfg = config.pipelines.qsiparc

    @dg.asset(
        **stage_asset_args(stage(STAGE), stage_cfg),
        group_name="parcellation",
        code_version=qsiparc.code_version(config),
        description="Per-region statistics of the session's diffusion maps (QSIParc layout).",
    )
    def qsiparc_session(context: dg.AssetExecutionContext, neuroflow: NeuroflowResource) -> dg.MaterializeResult:
        cfg = neuroflow.load()
        ses = session_context(cfg, context.partition_key)
        unreconstructed = not_reconstructed(cfg, ses.participant, ses.session)
        if unreconstructed is not None:
            return not_applicable(f"no reconstruction: {unreconstructed}")
        if not layout.qsirecon_maps(layout.qsirecon_dir(cfg), ses.participant, ses.session):
            return not_applicable(f"no QSIRecon output for sub-{ses.participant} ses-{ses.session}")
        gate_or_refuse(cfg, ses.entry.scan_id, ses.participant, ses.session)  # an approval revoked since recon
        record, spec, meta = run_derivative_tool(
            context, cfg, STAGE, qsiparc, ses.participant, [ses.session], layout.qsiparc_dir(cfg), ses.session
        )
        out = layout.session_dir(spec.final_dir, ses.participant, ses.session)
        tables = sorted(out.rglob("*.tsv")) if out.is_dir() else []
        meta.update(
            {
                STATUS_KEY: STATUS_DONE,
                "provenance": dg.MetadataValue.path(record.extra["provenance"]),
                "n_tables": len(tables),
                "tables": dg.MetadataValue.md("\n".join(f"- `{t.relative_to(out)}`" for t in tables[:50])),
            }
        )
        return dg.MaterializeResult(metadata=meta)

    return qsiparc_session
