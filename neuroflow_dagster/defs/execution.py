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
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig, RetryConfig
from neuroflow_dagster.defs.graph import stage_settings
from neuroflow_dagster.naming.logs import run_log_path, safe_partition
from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY, LOG_PATH_KEY, LOG_TAIL_KEY
from neuroflow_dagster.runtimes import STAND_IN_IMAGE, get_runtime, verify_outputs
from neuroflow_dagster.runtimes.base import RunRecord, ToolRunError
from neuroflow_dagster.runtimes.failures import FailureClass, classify, is_retryable, retry_delay
from neuroflow_dagster.runtimes.jobs import JobStore
from neuroflow_dagster.tools import publish
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
    for key, value in record.extra.items():  # job id, node, state, exit code, elapsed, max RSS
        if key.startswith("slurm_") and isinstance(value, (str, int, float, bool)):
            meta[f"slurm/{key[len('slurm_'):]}"] = value
    if record.log_tail:
        meta[LOG_TAIL_KEY] = dg.MetadataValue.md("```\n" + record.log_tail[-4000:] + "\n```")
    return meta


def runtime_options(context: dg.AssetExecutionContext, config: NeuroflowConfig, stage: str,
                    partition: str) -> dict[str, Any]:
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


def execute_spec(context: dg.AssetExecutionContext, config: NeuroflowConfig, stage: str, spec: ToolSpec) -> RunRecord:
    """Run `spec` with the stage's runtime (its limits come from the stage's settings); check the
    golden outputs; publish them; raise a classified Failure or RetryRequested.

    A spec writing into a staging folder (``publish_to`` set) reaches the derivatives only here, after
    success; a failed run leaves its partial outputs in the staging folder, named in the failure.
    The tool holds the per-work lock (stage x partition) for as long as any of its processes lives.
    """
    stage_cfg = stage_settings(config, stage)
    partition = context.partition_key if context.has_partition_key else "all"
    spec = dataclasses.replace(spec, lock=work_lock(config, stage, str(partition)), lock_owner=context.run_id)
    log_path = run_log_path(config.paths.log_dir, stage, str(partition), context.run_id)
    runtime = get_runtime(stage_cfg, **runtime_options(context, config, stage, str(partition)))
    context.log.info(f"{stage}: running {spec.command_line()} ({runtime.name}); log file {log_path}")
    try:
        record = runtime.run(spec, log_path=log_path, log=context.log.info, context=context)
    except ToolRunError as exc:
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
    if spec.publish_to is not None:
        try:
            done = publish.publish_outputs(spec.output_dir, spec.publish_to, spec.publish_units,
                                           partition=str(partition))
        except (publish.PublishError, OSError) as exc:
            failure_class = classify(str(exc), None)
            if failure_class == FailureClass.TOOL:
                failure_class = FailureClass.TRANSIENT  # a rename that failed: the filesystem, not the tool
            error = ToolRunError(f"{stage}: publishing the outputs failed: {exc}", record, str(failure_class))
            raise final_failure(error, spec, str(error) + unpublished_note(spec)) from exc
        context.log.info(f"{stage}: published {', '.join(done.units) or 'files'} into {done.target} "
                         f"({done.files} files)")
        record.extra["published_units"] = done.units
    return record


def unpublished_note(spec: ToolSpec | None) -> str:
    """Where a failed run's partial outputs are, and that the published ones were not touched."""
    if spec is None or spec.publish_to is None:
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
