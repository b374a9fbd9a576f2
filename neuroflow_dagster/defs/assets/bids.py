"""`bids_session`: one session converted to BIDS with HeudiConv + dcm2niix, checked by the real BIDS validator.

Converted into a fresh staging folder under work_dir, validated there, then
published into bids_root in one rename, so a failed run leaves no partial
session and keeps the previous good one.
"""

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from neuroflow_dagster.bids import dataset, validator
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.assets.common import build_or_refuse, session_context
from neuroflow_dagster.defs.execution import execute_spec, record_metadata
from neuroflow_dagster.defs.partitions import session_partitions
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.tools import heudiconv

STAGE = "bids_conversion"
VALIDATOR_CHECK = "bids_validator"


def _validation_file(config: NeuroflowConfig, participant: str, session: str) -> Path:
    return config.paths.state / "validation" / f"sub-{participant}_ses-{session}.json"


def save_validation(config: NeuroflowConfig, participant: str, session: str, passed: bool, summary: str) -> None:
    """Remember the validator verdict so QSIPrep leaves out sessions whose BIDS is invalid."""
    atomic_write_text(
        _validation_file(config, participant, session), json.dumps({"passed": passed, "summary": summary})
    )


def validation_passed(config: NeuroflowConfig, participant: str, session: str) -> bool:
    try:
        return bool(json.loads(_validation_file(config, participant, session).read_text())["passed"])
    except (OSError, ValueError, KeyError):
        return False


def build_bids_asset(config: NeuroflowConfig) -> dg.AssetsDefinition:
    @dg.asset(
        name="bids_session",
        partitions_def=session_partitions,
        deps=[dg.AssetDep("dicom_session")],
        group_name="conversion",
        kinds={"bids"},
        pool=STAGE,
        code_version=heudiconv.code_version(config),
        check_specs=[
            dg.AssetCheckSpec(
                VALIDATOR_CHECK,
                asset="bids_session",
                blocking=True,
                partitions_def=session_partitions,
                description="The real BIDS validator (bids-validator-deno) on the converted session.",
            )
        ],
        description="The session in BIDS (HeudiConv + dcm2niix), published atomically into paths.bids_root.",
    )
    def bids_session(context: dg.AssetExecutionContext, neuroflow: NeuroflowResource) -> Iterator[dg.MaterializeResult]:
        cfg = neuroflow.load()
        ses = session_context(cfg, context.partition_key)
        staging = cfg.paths.work_dir / "bids_staging" / f"sub-{ses.participant}_ses-{ses.session}_{context.run_id[:8]}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        try:
            spec = build_or_refuse(
                heudiconv.build_spec,
                cfg,
                dicom_dir=ses.entry.dicom_path,
                participant=ses.participant,
                session=ses.session,
                staging_dir=staging,
            )
            record = execute_spec(context, cfg, STAGE, spec)
            started = time.monotonic()
            report = (
                validator.validate_session(staging, ses.participant, ses.session)
                if cfg.pipelines.bids_conversion.bids_validator
                else None
            )
            if report is not None:
                context.log.info(f"{report.summary()} ({time.monotonic() - started:.1f}s)")
            published = dataset.publish_session(
                staging,
                cfg.paths.bids_root,
                ses.participant,
                ses.session,
                lock_dir=cfg.paths.work_dir,
                recruitment_id=ses.entry.recruitment_id,
                scan_id=ses.entry.scan_id,
                acq_time=ses.entry.acq_time,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        suffixes = sorted(heudiconv.present_suffixes(published.session_dir))
        passed = report.passed if report is not None else True
        summary = (
            report.summary()
            if report is not None
            else "BIDS validator disabled (pipelines.bids_conversion.bids_validator)"
        )
        save_validation(cfg, ses.participant, ses.session, passed, summary)
        meta = record_metadata(record, spec)
        meta.update(
            {
                "scan_id": ses.entry.scan_id,
                "session_dir": dg.MetadataValue.path(str(published.session_dir)),
                "n_files": len(published.files),
                "files": dg.MetadataValue.md("\n".join(f"- `{f}`" for f in published.files[:200])),
                "bids_suffixes": ", ".join(suffixes) or "none",
                "tool_versions": dg.MetadataValue.json(heudiconv.tool_versions()),
                "validator_errors": len(report.errors) if report else 0,
                "validator_warnings": len(report.warnings) if report else 0,
            }
        )
        yield dg.MaterializeResult(
            metadata=meta,
            check_results=[
                dg.AssetCheckResult(
                    check_name=VALIDATOR_CHECK,
                    passed=passed,
                    severity=dg.AssetCheckSeverity.ERROR,
                    description=summary,
                    metadata=report.as_metadata() if report else {},
                )
            ],
        )

    return bids_session
