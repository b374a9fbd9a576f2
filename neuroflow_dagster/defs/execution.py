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
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from neuroflow_dagster import provenance as prov
from neuroflow_dagster import retention, stages
from neuroflow_dagster.config import NeuroflowConfig, RetryConfig
from neuroflow_dagster.defs.graph import stage_settings
from neuroflow_dagster.diskspace import gb, is_disk_full
from neuroflow_dagster.naming import locks
from neuroflow_dagster.naming.logs import run_log_path
from neuroflow_dagster.naming.partitions import session_key
from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY, LOG_PATH_KEY, LOG_TAIL_KEY
from neuroflow_dagster.runtimes import STAND_IN_IMAGE, get_runtime, verify_outputs
from neuroflow_dagster.runtimes.base import RunRecord, ToolRunError
from neuroflow_dagster.runtimes.failures import FailureClass, classify, is_retryable, retry_delay
from neuroflow_dagster.runtimes.jobs import JobStore
from neuroflow_dagster.rwlock import LockBusy, ReadersWriterLock
from neuroflow_dagster.tools import publish
from neuroflow_dagster.tools.layout import package_version
from neuroflow_dagster.tools.spec import ToolSpec


def staging_for(context: dg.AssetExecutionContext, final_dir: Path) -> Path:
    """This run's own staging folder inside ``final_dir`` (published there only if the run succeeds)."""
    partition = context.partition_key if context.has_partition_key else "all"
    return publish.staging_dir(final_dir, str(partition), context.run_id)


def work_lock(config: NeuroflowConfig, stage: str, partition: str) -> Path:
    """One lock file per piece of work: two processes of the same stage x partition never run at once."""
    return locks.work_lock(config.paths.state, stage, partition)


# --------------------------------------------------------------------------- readers of a subject's output


def read_while_running(stage: stages.Stage) -> bool:
    """A subject-level stage whose output session-level stages read for hours (QSIPrep's ``sub-X``):
    its publish waits for them, and they do not start reading while it swaps (docs/domain-rules.md#state)."""
    return stage.per_subject and any(stage.name in s.upstream and not s.per_subject for s in stages.stages())


def guarded_upstream(reader: stages.Stage) -> list[stages.Stage]:
    """The subject-level stages whose published output ``reader`` reads (for the reconstruction: QSIPrep)."""
    ups = [stages.stage(name) for name in reader.upstream if name != stages.SOURCE]
    return [up for up in ups if read_while_running(up)]


def output_lock(config: NeuroflowConfig, stage: stages.Stage, participant: str) -> ReadersWriterLock:
    return ReadersWriterLock(locks.readers_lock(config.paths.state, stage.name, participant))


def publish_wait_s(config: NeuroflowConfig, stage: stages.Stage) -> float:
    """``pipelines.<stage>.publish_wait_minutes`` (QSIPrep's), in seconds."""
    return 60.0 * float(getattr(stage_settings(config, stage.name), "publish_wait_minutes", 60))


def _holder_info(context: dg.AssetExecutionContext, stage: str) -> dict[str, str]:
    partition = context.partition_key if context.has_partition_key else ""
    return {"run_id": context.run_id, "stage": stage, "partition": str(partition)}


@contextlib.contextmanager
def reading_outputs(
    context: dg.AssetExecutionContext,
    config: NeuroflowConfig,
    reader: str,
    upstream: Sequence[stages.Stage],
    participant: str,
    retry: RetryConfig,
) -> Iterator[dict[str, Any]]:
    """Hold the shared lock on the subject's output of each of ``upstream`` while the block reads it.

    Waits (bounded, logged) while a publish swaps that output; yields the metadata that says so
    (empty when it did not wait). Still held after the wait: a ``transient`` failure, retried.
    """
    meta: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for up in upstream:
            lock = output_lock(config, up, participant)
            try:
                got = stack.enter_context(
                    lock.shared(_holder_info(context, reader), publish_wait_s(config, up), log=context.log.info)
                )
            except LockBusy as exc:
                raise retryable_failure(
                    context, retry, reader, FailureClass.TRANSIENT,
                    f"not started: the {up.name} output of sub-{participant} is being replaced ({exc})",
                ) from exc  # fmt: skip
            if got.waited():
                context.log.info(
                    f"{reader}: waited {got.waited_s:.1f} s for the {up.name} publish of sub-{participant}: "
                    f"{got.describe()}"
                )
                meta[f"{up.name}_publish_waited_s"] = round(got.waited_s, 1)
                meta[f"{up.name}_publish_waited_for"] = got.describe()
        yield meta


@contextlib.contextmanager
def publishing(
    context: dg.AssetExecutionContext, config: NeuroflowConfig, stage: str, partition: str, record: RunRecord
) -> Iterator[None]:
    """The exclusive lock on the subject's output while a guarded stage publishes it (waits for its
    readers, bounded and logged; records for whom and how long in ``record.extra``). Other stages: none."""
    record_stage = next((s for s in stages.stages() if s.name == stage), None)
    if record_stage is None or not read_while_running(record_stage):
        yield
        return
    lock = output_lock(config, record_stage, partition)
    wait_s = publish_wait_s(config, record_stage)
    with lock.exclusive(_holder_info(context, stage), wait_s, log=context.log.info) as got:
        record.extra["publish_waited_s"] = round(got.waited_s, 1)
        if got.waited():
            record.extra["publish_waited_for"] = got.describe()
            context.log.info(
                f"{stage}: waited {got.waited_s:.1f} s for the runs reading sub-{partition} to finish: {got.describe()}"
            )
        yield


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
    # Who a publish waited for and how long; what reclaiming the work folder freed (execute_spec).
    for key in ("publish_waited_s", "publish_waited_for", "work_dir_reclaimed", "work_dir_freed_bytes"):
        if key in record.extra:
            meta[key] = record.extra[key]
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
) -> RunRecord:
    """Run `spec` with the stage's runtime (its limits come from the stage's settings); check the
    golden outputs; write the provenance file; publish them; raise a classified Failure or RetryRequested.

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
    if spec.scratch_dir is not None and spec.scratch_dir.is_dir():
        os.utime(spec.scratch_dir)  # the retention ages a failed run's work folder from its last start
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
            with publishing(context, config, stage, str(partition), record):
                done = publish.publish_outputs(
                    spec.output_dir, spec.publish_to, spec.publish_units, partition=str(partition)
                )
        except LockBusy as exc:
            raise failed(
                f"{stage}: not published: the runs reading the previous output did not end within "
                f"{_duration(exc.waited_s)} (pipelines.{stage}.publish_wait_minutes): "
                + "; ".join(h.describe() for h in exc.holders),
                FailureClass.TRANSIENT,
                record,
            ) from exc
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
    if spec.scratch_dir is not None:
        reclaim_work_folder(context, stage, spec, record)
    return record


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def reclaim_work_folder(context: dg.AssetExecutionContext, stage: str, spec: ToolSpec, record: RunRecord) -> None:
    """After success the tool's work folder goes (a failed run's stays for debugging, until the retention
    prunes it): measured, logged and recorded in the metadata. Never fails the run."""
    assert spec.scratch_dir is not None
    try:
        freed = retention.reclaim(spec.scratch_dir, spec.lock)
    except OSError as exc:
        context.log.warning(f"{stage}: work folder {spec.scratch_dir} not reclaimed: {exc}")
        return
    if freed is None:
        if spec.scratch_dir.exists():
            context.log.info(f"{stage}: work folder {spec.scratch_dir} kept: another process of this work holds it")
        return
    record.extra["work_dir_reclaimed"] = str(freed.path)
    record.extra["work_dir_freed_bytes"] = freed.bytes
    context.log.info(
        f"{stage}: work folder {freed.path} reclaimed: {gb(freed.bytes)} freed "
        f"({freed.files} files, {freed.seconds:.1f} s)"
    )


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
    will_retry, note = attempt_note(failure_class, retry, retry_number)
    failure = final_failure(error, spec, f"{stage} failed [{failure_class}; {note}]: {error}{unpublished_note(spec)}")
    if not will_retry:
        return failure
    return retry_later(failure, retry, retry_number, f"{stage}: {failure_class} failure", str(error), log, rng)


def attempt_note(failure_class: str, retry: RetryConfig, retry_number: int) -> tuple[bool, str]:
    """(will it be retried, ``attempt 1/4, will retry``) for this attempt of a failure of this class."""
    attempt = retry_number + 1
    will_retry = is_retryable(failure_class) and attempt <= retry.max_retries
    note = f"attempt {attempt}/{retry.max_retries + 1}" + (", will retry" if will_retry else ", not retried")
    return will_retry, note


def retry_later(
    failure: dg.Failure,
    retry: RetryConfig,
    retry_number: int,
    what: str,
    why: str,
    log: Callable[[str], None] | None = None,
    rng: random.Random | None = None,
) -> dg.RetryRequested:
    """``RetryRequested`` with this attempt's delay (docs/domain-rules.md#failures), carrying ``failure``
    as its ``__cause__`` (what Dagster reports once the retries are spent)."""
    wait = retry_delay(retry_number + 1, retry, rng)
    if log is not None:
        log(f"{what}, retrying in {wait:.0f}s: {why}")
    requested = dg.RetryRequested(max_retries=retry.max_retries, seconds_to_wait=wait)
    requested.__cause__ = failure
    return requested


def retryable_failure(
    context: dg.AssetExecutionContext,
    retry: RetryConfig,
    stage: str,
    failure_class: FailureClass,
    reason: str,
    metadata: dict[str, Any] | None = None,
) -> Exception:
    """A failure before the tool ran (a disk below its floor, a lock still held): the Failure, or a
    retry of the step when its class is retried and attempts are left."""
    will_retry, note = attempt_note(str(failure_class), retry, context.retry_number)
    failure = dg.Failure(
        description=f"{stage} failed [{failure_class}; {note}]: {reason}",
        metadata={FAILURE_CLASS_KEY: str(failure_class), **(metadata or {})},
        allow_retries=False,
    )
    if not will_retry:
        return failure
    return retry_later(failure, retry, context.retry_number, f"{stage}: {failure_class} failure", reason,
                       context.log.warning)  # fmt: skip
