"""`qsiprep_subject`: QSIPrep over ALL of a subject's converted diffusion sessions at once.

QSIPrep builds one anatomical template from every session, so a new session
changes every session's output; the automation re-runs it per wave of
arrivals and then reconstructs every session of the subject.
"""

import dagster as dg

from neuroflow_dagster.bids.dataset import session_dir as bids_session_dir
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.assets.bids import validation_passed
from neuroflow_dagster.defs.assets.common import build_or_refuse, not_applicable
from neuroflow_dagster.defs.execution import execute_spec, record_metadata
from neuroflow_dagster.defs.partitions import subject_of_session, subjects_partitions
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.tools import heudiconv, qsiprep

STAGE = "qsiprep"


def eligible_sessions(config: NeuroflowConfig, participant: str) -> tuple[list[str], dict[str, str]]:
    """The subject's sessions QSIPrep takes, and why each other one is left out."""
    required = set(config.pipelines.qsiprep.requires_bids_suffixes)
    excluded = load_exclusions(config)
    take: list[str] = []
    left_out: dict[str, str] = {}
    for entry in Registry(config.paths.state).sessions_of(participant):
        ses = entry.session_id
        folder = bids_session_dir(config.paths.bids_root, participant, ses)
        if entry.scan_id in excluded:
            left_out[ses] = f"excluded: {excluded[entry.scan_id].get('reason')}"
        elif not folder.is_dir():
            left_out[ses] = "not converted to BIDS"
        elif not validation_passed(config, participant, ses):
            left_out[ses] = "BIDS validator reported errors"
        elif missing := required - heudiconv.present_suffixes(folder):
            left_out[ses] = f"no {', '.join(sorted(missing))} in BIDS"
        else:
            take.append(ses)
    return take, left_out


def build_qsiprep_asset(config: NeuroflowConfig) -> dg.AssetsDefinition:
    stage_cfg = config.pipelines.qsiprep
    tool_name = "QSIPrep stand-in (builtin)" if stage_cfg.runtime == "builtin" else "QSIPrep"

    @dg.asset(
        name="qsiprep_subject",
        partitions_def=subjects_partitions,
        ins={"bids_session": dg.AssetIn(partition_mapping=subject_of_session, dagster_type=dg.Nothing)},
        group_name="preprocessing",
        kinds={"python" if stage_cfg.runtime == "builtin" else stage_cfg.runtime},
        pool=STAGE,
        code_version=qsiprep.code_version(config),
        description=f"{tool_name} over all of the subject's diffusion sessions (one anatomical template); "
        "re-runs whenever the subject gains a session.",
    )
    def qsiprep_subject(context: dg.AssetExecutionContext, neuroflow: NeuroflowResource) -> dg.MaterializeResult:
        cfg = neuroflow.load()
        participant = context.partition_key
        sessions, left_out = eligible_sessions(cfg, participant)
        for ses, why in left_out.items():
            context.log.warning(f"sub-{participant} ses-{ses} left out of QSIPrep: {why}")
        if not sessions:
            return not_applicable(
                f"sub-{participant} has no session QSIPrep can take",
                left_out=dg.MetadataValue.json(left_out),
            )
        spec = build_or_refuse(qsiprep.build_spec, cfg, participant, sessions)
        record = execute_spec(context, cfg, STAGE, spec)
        meta = record_metadata(record, spec)
        meta.update(
            {
                "neuroflow/status": "done",
                "sessions": ", ".join(sessions),
                "left_out": dg.MetadataValue.json(left_out),
                "tool": tool_name,
            }
        )
        return dg.MaterializeResult(metadata=meta)

    return qsiprep_subject
