"""`qsirecon_session`: reconstruction of one session from its subject's (current) QSIPrep output, with the
recon spec of its shell scheme (docs/domain-rules.md, "Pipelines")."""

import shutil

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.assets.common import not_applicable, refuse, run_derivative_tool, session_context
from neuroflow_dagster.defs.assets.image_qc import gate_or_refuse
from neuroflow_dagster.defs.execution import guarded_upstream, reading_outputs
from neuroflow_dagster.defs.graph import stage_asset_args, tool_label
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.eligibility import missing_suffixes
from neuroflow_dagster.naming.qsirecon import SCHEME_TEXT
from neuroflow_dagster.naming.tags import STATUS_DONE, STATUS_KEY
from neuroflow_dagster.stages import stage
from neuroflow_dagster.tools import layout, qsirecon, shells
from neuroflow_dagster.tools.layout import SpecError

STAGE = "qsirecon"


def qc_image_metadata(png: object) -> dict[str, dg.MetadataValue]:
    """A picture where a person would rather look than read: the QC image inline in the UI."""
    import base64
    from pathlib import Path

    path = Path(str(png))
    if not path.is_file() or path.stat().st_size > 400_000:
        return {}
    data = base64.b64encode(path.read_bytes()).decode()
    return {
        "qc_image": dg.MetadataValue.md(f"![QC](data:image/png;base64,{data})"),
        "qc_image_path": dg.MetadataValue.path(str(path)),
    }


def plan_or_refuse(config: NeuroflowConfig, participant: str, session: str) -> qsirecon.ReconPlan:
    """The session's shell scheme and spec; a gradient table that cannot be read is the data's fault."""
    try:
        return qsirecon.plan_session(config, participant, session)
    except (shells.GradientError, SpecError) as exc:
        where = f"sub-{participant} ses-{session}"
        raise refuse(f"cannot read the gradient table QSIPrep wrote for {where}: {exc}") from exc


def build_qsirecon_asset(config: NeuroflowConfig) -> dg.AssetsDefinition:
    stage_cfg = config.pipelines.qsirecon
    tool_name = tool_label(stage_cfg, "QSIRecon")
    specs = ", ".join(f"{SCHEME_TEXT[k]}: {v}" for k, v in stage_cfg.recon_specs.named().items()) or "no spec"
    reads = guarded_upstream(stage(STAGE))

    @dg.asset(
        **stage_asset_args(stage(STAGE), stage_cfg),
        group_name="reconstruction",
        code_version=qsirecon.code_version(config),
        description=f"{tool_name} ({specs}) for one session, after each QSIPrep of its subject.",
    )
    def qsirecon_session(context: dg.AssetExecutionContext, neuroflow: NeuroflowResource) -> dg.MaterializeResult:
        cfg = neuroflow.load()
        ses = session_context(cfg, context.partition_key)
        missing = missing_suffixes(stage_cfg.requires_bids_suffixes, cfg, ses.participant, ses.session)
        if missing:
            return not_applicable(
                f"sub-{ses.participant} ses-{ses.session} has no {', '.join(sorted(missing))} in BIDS"
            )
        # QSIPrep's output of the subject is not replaced while this run reads it (docs/domain-rules.md#state).
        with reading_outputs(context, cfg, STAGE, reads, ses.participant, stage_cfg.retry) as waited:
            preproc = layout.session_dir(layout.qsiprep_dir(cfg), ses.participant, ses.session) / "dwi"
            if not any(preproc.glob("*desc-preproc_dwi.nii.gz")):
                return not_applicable(
                    f"no QSIPrep output for sub-{ses.participant} ses-{ses.session} (no DWI, or left out of QSIPrep)"
                )
            gate = gate_or_refuse(cfg, ses.entry.scan_id, ses.participant, ses.session)
            plan = plan_or_refuse(cfg, ses.participant, ses.session)
            scheme = {"shell_scheme": plan.scheme, "shells": plan.describe()}
            if plan.spec is None:
                return not_applicable(plan.reason, **scheme)
            # What QSIRecon's fits would refuse hours into a run (or a Slurm job) is refused now, with dipy's words.
            try:
                refused = qsirecon.refusals(plan)
            except SpecError as exc:  # a spec file that cannot be read
                raise refuse(str(exc), "configuration") from exc
            if refused:
                raise refuse("; ".join(refused))
            out_root = layout.qsirecon_dir(cfg)
            record, spec, meta = run_derivative_tool(
                context, cfg, STAGE, qsirecon, ses.participant, [ses.session], out_root, ses.session, plan=plan
            )
        published = record.extra.get("published_units")
        stale = (qsirecon.stale_workflow_sessions(spec.final_dir, ses.participant, ses.session, published)
                 if published else [])
        for folder in stale:
            shutil.rmtree(folder)
            context.log.info(f"removed {folder}: written by an earlier recon spec of this session")
        meta.update(waited)
        meta.update(
            {
                STATUS_KEY: STATUS_DONE,
                "tool": tool_name,
                "recon_spec": plan.spec,
                "removed_stale": ", ".join(str(f.relative_to(spec.final_dir)) for f in stale) or "none",
                **scheme,
                "provenance": dg.MetadataValue.path(record.extra["provenance"]),
            }
        )
        out = layout.session_dir(spec.final_dir, ses.participant, ses.session)
        meta["image_qc"] = gate.describe()
        meta["n_outputs"] = sum(1 for p in out.rglob("*") if p.is_file()) if out.is_dir() else 0
        pngs = sorted(out.rglob("*desc-qc*.png")) if out.is_dir() else []
        if pngs:
            meta.update(qc_image_metadata(pngs[0]))
        return dg.MaterializeResult(metadata=meta)

    return qsirecon_session
