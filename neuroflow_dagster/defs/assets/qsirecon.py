"""`qsirecon_session`: reconstruction of one session from its subject's (current) QSIPrep output."""

import dagster as dg

from neuroflow_dagster.bids.dataset import session_dir as bids_session_dir
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.assets.common import build_or_refuse, not_applicable, session_context
from neuroflow_dagster.defs.execution import execute_spec, record_metadata
from neuroflow_dagster.defs.partitions import session_partitions, subject_of_session
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.tools import heudiconv, layout, qsirecon

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


def build_qsirecon_asset(config: NeuroflowConfig) -> dg.AssetsDefinition:
    stage_cfg = config.pipelines.qsirecon
    tool_name = "QSIRecon stand-in (builtin)" if stage_cfg.runtime == "builtin" else "QSIRecon"

    @dg.asset(
        name="qsirecon_session",
        partitions_def=session_partitions,
        ins={
            "qsiprep_subject": dg.AssetIn(partition_mapping=subject_of_session, dagster_type=dg.Nothing),
            "bids_session": dg.AssetIn(dagster_type=dg.Nothing),
        },
        group_name="reconstruction",
        kinds={"python" if stage_cfg.runtime == "builtin" else stage_cfg.runtime},
        pool=STAGE,
        code_version=qsirecon.code_version(config),
        description=f"{tool_name} ({stage_cfg.recon_spec}) for one session, after each QSIPrep of its subject.",
    )
    def qsirecon_session(context: dg.AssetExecutionContext, neuroflow: NeuroflowResource) -> dg.MaterializeResult:
        cfg = neuroflow.load()
        ses = session_context(cfg, context.partition_key)
        missing = set(stage_cfg.requires_bids_suffixes) - heudiconv.present_suffixes(
            bids_session_dir(cfg.paths.bids_root, ses.participant, ses.session)
        )
        if missing:
            return not_applicable(
                f"sub-{ses.participant} ses-{ses.session} has no {', '.join(sorted(missing))} in BIDS"
            )
        preproc = layout.session_dir(layout.qsiprep_dir(cfg), ses.participant, ses.session) / "dwi"
        if not any(preproc.glob("*desc-preproc_dwi.nii.gz")):
            return not_applicable(
                f"no QSIPrep output for sub-{ses.participant} ses-{ses.session} (no DWI, or left out of QSIPrep)"
            )
        spec = build_or_refuse(qsirecon.build_spec, cfg, ses.participant, ses.session)
        record = execute_spec(context, cfg, STAGE, spec)
        meta = record_metadata(record, spec)
        meta.update({"neuroflow/status": "done", "tool": tool_name, "recon_spec": stage_cfg.recon_spec})
        out = layout.session_dir(spec.output_dir, ses.participant, ses.session)
        meta["n_outputs"] = sum(1 for p in out.rglob("*") if p.is_file()) if out.is_dir() else 0
        pngs = sorted(out.rglob("*desc-qc*.png")) if out.is_dir() else []
        if pngs:
            meta.update(qc_image_metadata(pngs[0]))
        return dg.MaterializeResult(metadata=meta)

    return qsirecon_session
