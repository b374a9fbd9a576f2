"""Runs a ToolSpec from inside an asset: runtime choice, logs, timeouts, failure classes.

Every stage goes through `execute_spec`, so every run records the same
things (docs/domain-rules.md#pipelines) and fails the same way
(docs/domain-rules.md#failures): a transient or resource failure raises
`RetryRequested` with the delay for this attempt (300 s x 2^(n-1), capped,
+-20 %), so Dagster retries the step in the same run; validation, configuration and tool failures raise
`Failure(allow_retries=False)` with the reason, so Dagster stops at once.
When the retries are spent the last Failure (with its metadata) is what the
run reports. The derivative stages write into their run's staging folder and
their outputs are published only here, after success (tools/publish.py).

Provenance (provenance.py): given a Plan, the input files are hashed before
the tool starts and the document is written into the staged outputs after
the golden outputs are verified, so it is published with them or not at all.
A run that fills the disk (ENOSPC) deletes its own staging folder: keeping a
half-written tree for inspection would hold on to the space every other run
needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from neuroflow_dagster import provenance as prov
from neuroflow_dagster import stages
from neuroflow_dagster.config import NeuroflowConfig, RetryConfig
from neuroflow_dagster.defs.graph import stage_settings
from neuroflow_dagster.diskspace import is_disk_full
from neuroflow_dagster.naming.logs import run_log_path, safe_partition
from neuroflow_dagster.naming.partitions import session_key
from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY, LOG_PATH_KEY, LOG_TAIL_KEY
from neuroflow_dagster.runtimes import STAND_IN_IMAGE, get_runtime, verify_outputs
from neuroflow_dagster.runtimes.base import RunRecord, ToolRunError
from neuroflow_dagster.runtimes.failures import FailureClass, classify, is_retryable, retry_delay
from neuroflow_dagster.runtimes.jobs import JobStore
from neuroflow_dagster.tools import publish
from neuroflow_dagster.tools.layout import package_version
from neuroflow_dagster.tools.spec import ToolSpec


def staging_for(context: dg.AssetExecutionContext, final_dir: Path) -> Path:
    """This run's own staging folder inside ``final_dir`` (published there only if the run succeeds)."""
    partition = context.partition_key if context.has_partition_key else "all"
    return publish.staging_dir(final_dir, str(partition), context.run_id)


def work_lock(config: NeuroflowConfig, stage: str, partition: str) -> Path:
    """One lock file per piece of work: two processes of the same stage x partition never run at once."""
    return config.paths.state / "locks" / stage / f"{safe_partition(partition)}.lock"


def record_metadata(record: RunRecord, spec: ToolSpec | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "command": dg.MetadataValue.text(record.command),
        "runtime": record.runtime,
        "image": record.image or (STAND_IN_IMAGE if spec and spec.stand_in else "local"),
        "exit_code": record.exit_code if record.exit_code is not None else -1,
        "duration_s": record.duration_s if record.duration_s is not None else -1.0,
        LOG_PATH_KEY: dg.MetadataValue.path(record.log_path),
        "output_dir": dg.MetadataValue.path(str(spec.final_dir) if spec is not None else record.output_dir),
    }
    if spec is not None and spec.publish_to is not None:
        meta["staging_dir"] = dg.MetadataValue.path(str(spec.output_dir))
    if record.image_digest:
        meta["image_digest"] = record.image_digest
    if spec is not None:
        meta["stand_in"] = spec.stand_in
        if spec.stand_in:  # the stand-ins are versioned with neuroflow (status --format nipoppy reads it)
            meta["stand_in_version"] = package_version()
    for key, value in record.extra.items():  # job id, node, state, exit code, elapsed, max RSS
        if key.startswith("slurm_") and isinstance(value, (str, int, float, bool)):
            meta[f"slurm/{key[len('slurm_') :]}"] = value
    if record.log_tail:
        meta[LOG_TAIL_KEY] = dg.MetadataValue.md("```\n" + record.log_tail[-4000:] + "\n```")
    return meta


def runtime_options(
    context: dg.AssetExecutionContext, config: NeuroflowConfig, stage: str, partition: str
) -> dict[str, Any]:
    """What a runtime needs beyond the stage's settings: for slurm, who owns the job and where its record goes."""
    if stage_settings(config, stage).runtime != "slurm":
        return {}
    return {
        "stage_name": stage,
        "partition": partition,
        "run_id": context.run_id,
        # A run retry (worker died) is a new run in the same chain: it may adopt the job's result.
        "root_run_id": context.run.root_run_id or context.run_id,
        "jobs": JobStore(config.paths.state / "jobs"),
    }


def execute_spec(
    context: dg.AssetExecutionContext,
    config: NeuroflowConfig,
    stage: str,
    spec: ToolSpec,
    provenance: prov.Plan | None = None,
    after_run: Callable[[Path], Mapping[str, Any]] | None = None,
) -> RunRecord:
    """Run `spec` with the stage's runtime (its limits come from the stage's settings); check the
    golden outputs; write the provenance file; publish them; raise a classified Failure or RetryRequested.

    ``after_run(output_dir)`` post-processes the tool's staged outputs before they are checked (the
    conversion's curation, bids/curate.py); what it returns joins the provenance document's tool section.
    An error it raises (OSError, RuntimeError) fails the run as a tool failure with its message.

    A spec writing into a staging folder (``publish_to`` set) reaches the derivatives only here, after
    success; a failed run leaves its partial outputs in the staging folder, named in the failure, unless
    it failed because the disk is full: then the staging folder is deleted.
    The tool holds the per-work lock (stage x partition) for as long as any of its processes lives.
    """
    stage_cfg = stage_settings(config, stage)
    partition = context.partition_key if context.has_partition_key else "all"
    spec = dataclasses.replace(spec, lock=work_lock(config, stage, str(partition)), lock_owner=context.run_id)
    log_path = run_log_path(config.paths.log_dir, stage, str(partition), context.run_id)
    runtime = get_runtime(stage_cfg, **runtime_options(context, config, stage, str(partition)))

    def failed(message: str, failure_class: FailureClass, record: RunRecord | None = None) -> Exception:
        record = record or RunRecord(
            tool=spec.tool,
            runtime=runtime.name,
            command=spec.command_line(),
            output_dir=str(spec.output_dir),
            log_path=str(log_path),
            started=time.time(),
        )
        error = ToolRunError(message + release_if_disk_full(spec, message), record, str(failure_class))
        return tool_failure(error, stage_cfg.retry, context.retry_number, stage, spec, log=context.log.warning)

    inputs: prov.Inputs | None = None
    if provenance is not None:
        try:
            inputs = prov.collect_inputs(provenance)
        except OSError as exc:  # an input vanished or is unreadable while being hashed: another run moved it
            raise failed(
                f"{stage}: cannot read the inputs for the provenance record: {exc}",
                FailureClass.RESOURCE if is_disk_full(exc) else FailureClass.TRANSIENT,
            ) from exc
        context.log.info(
            f"{stage}: inputs identified for provenance in {inputs.seconds:.1f}s "
            f"({inputs.bytes_hashed / 1e6:.1f} MB hashed)"
        )
    context.log.info(f"{stage}: running {spec.command_line()} ({runtime.name}); log file {log_path}")
    try:
        record = runtime.run(spec, log_path=log_path, log=context.log.info, context=context)
    except ToolRunError as exc:
        note = release_if_disk_full(spec, f"{exc}\n{exc.record.log_tail}")
        if note:
            exc = ToolRunError(str(exc) + note, exc.record, exc.failure_class)
        raise tool_failure(exc, stage_cfg.retry, context.retry_number, stage, spec, log=context.log.warning) from exc
    if record.output_dir != str(spec.output_dir):
        # A Slurm job of an earlier attempt, adopted by this run, wrote into that attempt's staging
        # folder: verify and publish from there; this run's own (empty) staging folder goes.
        context.log.info(f"{stage}: outputs of the adopted job are in {record.output_dir}")
        with contextlib.suppress(OSError):
            spec.output_dir.rmdir()
        spec = dataclasses.replace(spec, output_dir=Path(record.output_dir))
    if after_run is not None:
        try:
            extra = after_run(spec.output_dir)
        except (OSError, RuntimeError) as exc:
            failure_class = FailureClass.RESOURCE if is_disk_full(exc) else FailureClass.TOOL
            raise failed(f"{stage}: {exc}", failure_class, record) from exc
        if provenance is not None and extra:
            provenance = dataclasses.replace(provenance, tool_extra={**provenance.tool_extra, **extra})
    try:
        verify_outputs(spec, record, what=stage)
    except ToolRunError as exc:
        raise final_failure(exc, spec, str(exc) + unpublished_note(spec)) from exc
    if provenance is not None and inputs is not None:
        try:
            written = write_provenance(context, config, stage, spec, record, provenance, inputs)
        except OSError as exc:
            failure_class = FailureClass.RESOURCE if is_disk_full(exc) else FailureClass.TRANSIENT
            raise failed(f"{stage}: writing the provenance file failed: {exc}", failure_class, record) from exc
        record.extra["provenance"] = str(spec.final_dir / provenance.document)
        context.log.info(f"{stage}: provenance written ({written.name}, {provenance.document})")
    if spec.publish_to is not None:
        try:
            done = publish.publish_outputs(
                spec.output_dir, spec.publish_to, spec.publish_units, partition=str(partition)
            )
        except (publish.PublishError, OSError) as exc:
            failure_class = classify(str(exc), None)
            if failure_class == FailureClass.TOOL:
                failure_class = FailureClass.TRANSIENT  # a rename that failed: the filesystem, not the tool
            message = f"{stage}: publishing the outputs failed: {exc}"
            note = release_if_disk_full(spec, message) or unpublished_note(spec)
            error = ToolRunError(message, record, str(failure_class))
            raise final_failure(error, spec, message + note) from exc
        context.log.info(
            f"{stage}: published {', '.join(done.units) or 'files'} into {done.target} ({done.files} files)"
        )
        record.extra["published_units"] = done.units
    return record


def release_if_disk_full(spec: ToolSpec | None, text: str) -> str:
    """A run that failed because the disk is full deletes its own staging folder (the space it took);
    returns the note for the failure message ('' when the disk was not full or nothing was staged)."""
    if spec is None or spec.publish_to is None or not is_disk_full(text):
        return ""
    shutil.rmtree(spec.output_dir, ignore_errors=True)
    state = "could not be deleted" if spec.output_dir.exists() else "deleted to free the space it took"
    return (
        f"; the disk is full: staging folder {spec.output_dir} {state}, nothing published ({spec.publish_to} unchanged)"
    )


def upstream_materializations(
    context: dg.AssetExecutionContext, stage: str, participant: str, sessions: Sequence[str]
) -> list[dict[str, Any]]:
    """The latest materialization of each upstream partition this run read: asset, partition, run id,
    event storage id, time, code version (and the ScanID of a DICOM session)."""
    record = stages.stage(stage)
    out: list[dict[str, Any]] = []
    for asset, level in stages.upstream_assets(record):
        if level == stages.SUBJECT:
            partitions = [participant]
        elif record.level == stages.SUBJECT:
            partitions = [session_key(participant, s) for s in sessions]
        else:
            partitions = [str(context.partition_key)]
        for partition in partitions:
            found = context.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
            ).records
            if not found:
                out.append({"asset": asset, "partition": partition, "run_id": None, "note": "never materialized"})
                continue
            event = found[0]
            mat = event.asset_materialization
            tags = dict(mat.tags or {}) if mat is not None else {}
            row: dict[str, Any] = {
                "asset": asset,
                "partition": partition,
                "run_id": event.run_id or None,  # runless events (the discovery sensor's) have none
                "storage_id": event.storage_id,
                "materialized_at": prov.iso(event.timestamp),
                "code_version": tags.get("dagster/code_version"),
            }
            scan_id = mat.metadata.get("scan_id") if mat is not None else None
            if scan_id is not None:
                row["scan_id"] = getattr(scan_id, "value", scan_id)
            out.append(row)
    return out


def write_provenance(
    context: dg.AssetExecutionContext,
    config: NeuroflowConfig,
    stage: str,
    spec: ToolSpec,
    record: RunRecord,
    plan: prov.Plan,
    inputs: prov.Inputs,
) -> Path:
    """Build the run's provenance document and write it into its output folder (before publication)."""
    outputs, out_bytes, out_seconds = prov.describe_outputs(spec.output_dir, plan)
    code_version = None
    if context.has_assets_def:
        code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    settings = stage_settings(config, stage).model_dump(mode="json")
    document = prov.build_document(
        plan,
        stage=stage,
        asset=context.asset_key.to_user_string() if context.has_assets_def else "",
        partition=str(context.partition_key) if context.has_partition_key else "",
        code_version=code_version,
        settings=settings,
        spec=spec,
        record=record.as_dict(),
        run={
            "dagster_run_id": context.run_id,
            "job": context.run.job_name,
            "attempt": context.retry_number + 1,
            "config_file": str(config.source) if config.source is not None else None,
        },
        upstream=upstream_materializations(context, stage, plan.participant, plan.sessions)
        if stages.by_asset(context.asset_key.to_user_string()) is not None
        else [],
        inputs=inputs,
        outputs=outputs,
        outputs_seconds=out_seconds,
        outputs_bytes=out_bytes,
    )
    return prov.write_document(spec.output_dir, plan, document)


def unpublished_note(spec: ToolSpec | None) -> str:
    """Where a failed run's partial outputs are, and that the published ones were not touched
    ('' when nothing was staged, or the staging folder is gone: a full disk deletes it)."""
    if spec is None or spec.publish_to is None or not spec.output_dir.exists():
        return ""
    return f"; partial outputs kept in {spec.output_dir}, nothing published ({spec.publish_to} unchanged)"


def final_failure(error: ToolRunError, spec: ToolSpec | None, description: str) -> dg.Failure:
    """A Failure Dagster does not retry, with the run's record and failure class as metadata."""
    meta = record_metadata(error.record, spec)
    meta[FAILURE_CLASS_KEY] = str(FailureClass(error.failure_class))
    return dg.Failure(description=description, metadata=meta, allow_retries=False)


def tool_failure(
    error: ToolRunError,
    retry: RetryConfig,
    retry_number: int,
    stage: str,
    spec: ToolSpec | None = None,
    *,
    log: Callable[[str], None] | None = None,
    rng: random.Random | None = None,
) -> Exception:
    """What the asset raises for a failed tool run (``retry_number`` = ``context.retry_number``).

    A retryable class with attempts left becomes ``RetryRequested`` with the delay of
    docs/domain-rules.md#failures for this attempt, carrying the Failure as its ``__cause__``
    (what Dagster reports once the retries are spent); anything else is the Failure itself,
    ``allow_retries=False``, so no RetryPolicy re-runs a deterministic failure.
    """
    failure_class = str(FailureClass(error.failure_class))
    attempt = retry_number + 1
    will_retry = is_retryable(failure_class) and attempt <= retry.max_retries
    note = f"attempt {attempt}/{retry.max_retries + 1}" + (", will retry" if will_retry else ", not retried")
    failure = final_failure(error, spec, f"{stage} failed [{failure_class}; {note}]: {error}{unpublished_note(spec)}")
    if not will_retry:
        return failure
    wait = retry_delay(attempt, retry, rng)
    if log is not None:
        log(f"{stage}: {failure_class} failure, retrying in {wait:.0f}s: {error}")
    requested = dg.RetryRequested(max_retries=retry.max_retries, seconds_to_wait=wait)
    requested.__cause__ = failure
    return requested
