"""`bids_session`: one session converted to BIDS with HeudiConv + dcm2niix, checked by the real BIDS validator.

Converted into a fresh staging folder under work_dir, validated there, then
published into bids_root in one rename, so a failed run leaves no partial
session and keeps the previous good one.
"""

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from neuroflow_dagster import provenance as prov
from neuroflow_dagster.bids import curate, dataset, validator
from neuroflow_dagster.bids.verdicts import save_verdict
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.assets.common import SessionContext, build_or_refuse, session_context
from neuroflow_dagster.defs.diskguard import refuse_if_disk_low
from neuroflow_dagster.defs.execution import execute_spec, record_metadata
from neuroflow_dagster.defs.graph import stage_asset_args
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.naming.bids import entities, provenance_path, session_path
from neuroflow_dagster.stages import stage
from neuroflow_dagster.tools import heudiconv

STAGE = "bids_conversion"
VALIDATOR_CHECK = "bids_validator"


def build_bids_asset(config: NeuroflowConfig) -> dg.AssetsDefinition:
    args = stage_asset_args(stage(STAGE))

    @dg.asset(
        **args,
        group_name="conversion",
        kinds={"bids"},
        code_version=heudiconv.code_version(config, curation=curate.CURATION_VERSION),
        check_specs=[
            dg.AssetCheckSpec(
                VALIDATOR_CHECK,
                asset=args["name"],
                blocking=True,
                partitions_def=args["partitions_def"],
                description="The real BIDS validator (bids-validator-deno) on the converted session.",
            )
        ],
        description="The session in BIDS (HeudiConv + dcm2niix), published atomically into paths.bids_root.",
    )
    def bids_session(context: dg.AssetExecutionContext, neuroflow: NeuroflowResource) -> Iterator[dg.MaterializeResult]:
        cfg = neuroflow.load()
        ses = session_context(cfg, context.partition_key)
        refuse_if_disk_low(context, cfg, STAGE)
        stage_cfg = cfg.pipelines.bids_conversion
        versions = {} if stage_cfg.containerized else heudiconv.tool_versions()
        staging = cfg.paths.work_dir / "bids_staging" / f"{entities(ses.participant, ses.session)}_{context.run_id[:8]}"
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
            heuristic = heudiconv.resolve_heuristic(stage_cfg.heuristic)
            curation: list[curate.CurationReport] = []

            def curate_staged(output_dir: Path) -> dict[str, Any]:
                # Routing by content and field map links (docs/domain-rules.md#conversion), before validation.
                report = curate.curate_conversion(output_dir, ses.participant, ses.session, heuristic)
                curation.append(report)
                return {"curation": report.as_dict()}

            record = execute_spec(
                context, cfg, STAGE, spec, provenance=conversion_plan(cfg, ses, versions), after_run=curate_staged
            )
            curated = curation[-1]
            for warning in curated.warnings:
                context.log.warning(f"{STAGE}: {warning}")
            # A Slurm job of an earlier attempt that this run adopted converted into that attempt's
            # staging folder (runtimes/slurm.py): validate and publish that one.
            staging = Path(record.output_dir)
            dataset.ensure_bidsignore(staging)  # the validator skips what bids_root's .bidsignore skips
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
        suffixes = sorted(dataset.present_suffixes(published.session_dir))
        passed = report.passed if report is not None else True
        summary = (
            report.summary()
            if report is not None
            else "BIDS validator disabled (pipelines.bids_conversion.bids_validator)"
        )
        save_verdict(cfg.paths.state, ses.participant, ses.session, passed, summary)
        meta = record_metadata(record, spec)
        meta.update(
            {
                "scan_id": ses.entry.scan_id,
                "session_dir": dg.MetadataValue.path(str(published.session_dir)),
                "n_files": len(published.files),
                "files": dg.MetadataValue.md("\n".join(f"- `{f}`" for f in published.files[:200])),
                "bids_suffixes": ", ".join(suffixes) or "none",
                "tool_versions": dg.MetadataValue.json(versions or {"image": stage_cfg.image}),
                "provenance": dg.MetadataValue.path(
                    str(cfg.paths.bids_root / provenance_path(ses.participant, ses.session, derivative=False))
                ),
                "validator_errors": len(report.errors) if report else 0,
                "validator_warnings": len(report.warnings) if report else 0,
                "conversion_warnings": len(curated.warnings),
                "conversion_decisions": dg.MetadataValue.md(curated.as_markdown()),
            }
        )
        if curated.warnings:
            meta["conversion_warning_text"] = dg.MetadataValue.md("\n".join(f"- {w}" for w in curated.warnings))
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


def conversion_plan(cfg: NeuroflowConfig, ses: SessionContext, versions: dict[str, str | None]) -> prov.Plan:
    """The conversion's provenance: in the session folder, the DICOM series as inputs, the heuristic."""
    heuristic = heudiconv.resolve_heuristic(cfg.pipelines.bids_conversion.heuristic)
    return prov.Plan(
        participant=ses.participant,
        sessions=(ses.session,),
        document=provenance_path(ses.participant, ses.session, derivative=False),
        dicom_dir=Path(ses.entry.dicom_path),
        outputs_under=(session_path(ses.participant, ses.session),),
        tool_versions=versions,
        tool_extra={
            "heuristic": {
                "name": cfg.pipelines.bids_conversion.heuristic,
                "file": str(heuristic),
                "sha256": prov.sha256_file(heuristic),
            },
            "converter": cfg.pipelines.bids_conversion.converter,
            "scan_id": ses.entry.scan_id,
        },
    )
