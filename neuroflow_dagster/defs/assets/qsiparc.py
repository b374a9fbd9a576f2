"""`qsiparc_session`: per-region tables for one session from its reconstruction."""

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.assets.common import build_or_refuse, not_applicable, session_context
from neuroflow_dagster.defs.execution import execute_spec, record_metadata
from neuroflow_dagster.defs.partitions import session_partitions
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.tools import layout, qsiparc

STAGE = "qsiparc"


def build_qsiparc_asset(config: NeuroflowConfig) -> dg.AssetsDefinition:
    stage_cfg = config.pipelines.qsiparc

    @dg.asset(
        name="qsiparc_session",
        partitions_def=session_partitions,
        deps=[dg.AssetDep("qsirecon_session")],
        group_name="parcellation",
        kinds={"python" if stage_cfg.runtime == "builtin" else stage_cfg.runtime},
        pool=STAGE,
        code_version=qsiparc.code_version(config),
        description="Per-region statistics of the session's diffusion maps (QSIParc layout).",
    )
    def qsiparc_session(context: dg.AssetExecutionContext, neuroflow: NeuroflowResource) -> dg.MaterializeResult:
        cfg = neuroflow.load()
        ses = session_context(cfg, context.partition_key)
        if not layout.qsirecon_maps(layout.qsirecon_dir(cfg), ses.participant, ses.session):
            return not_applicable(f"no QSIRecon output for sub-{ses.participant} ses-{ses.session}")
        spec = build_or_refuse(qsiparc.build_spec, cfg, ses.participant, ses.session)
        record = execute_spec(context, cfg, STAGE, spec)
        meta = record_metadata(record, spec)
        out = layout.session_dir(spec.output_dir, ses.participant, ses.session)
        tables = sorted(out.rglob("*.tsv")) if out.is_dir() else []
        meta.update(
            {
                "neuroflow/status": "done",
                "n_tables": len(tables),
                "tables": dg.MetadataValue.md("\n".join(f"- `{t.relative_to(out)}`" for t in tables[:50])),
            }
        )
        return dg.MaterializeResult(metadata=meta)

    return qsiparc_session
