"""Runs a ToolSpec from inside an asset: runtime choice, logs, timeouts, failure classes.

Every stage goes through `execute_spec`, so every run records the same
things (docs/domain-rules.md#pipelines) and fails the same way
(docs/domain-rules.md#failures): a transient or resource failure raises
`RetryRequested` with the delay for this attempt (300 s x 2^(n-1), capped,
+-20 %), so Dagster retries the step in the same run; validation, configuration and tool failures raise
`Failure(allow_retries=False)` with the reason, so Dagster stops at once.
When the retries are spent the last Failure (with its metadata) is what the
run reports.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig, RetryConfig
from neuroflow_dagster.defs.graph import stage_settings
from neuroflow_dagster.naming.logs import run_log_path
from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY, LOG_PATH_KEY, LOG_TAIL_KEY
from neuroflow_dagster.runtimes import STAND_IN_IMAGE, get_runtime, verify_outputs
from neuroflow_dagster.runtimes.base import RunRecord, ToolRunError
from neuroflow_dagster.runtimes.failures import FailureClass, is_retryable, retry_delay
from neuroflow_dagster.runtimes.jobs import JobStore
from neuroflow_dagster.tools.spec import ToolSpec


def record_metadata(record: RunRecord, spec: ToolSpec | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "command": dg.MetadataValue.text(record.command),
        "runtime": record.runtime,
        "image": record.image or (STAND_IN_IMAGE if spec and spec.stand_in else "local"),
        "exit_code": record.exit_code if record.exit_code is not None else -1,
        "duration_s": record.duration_s if record.duration_s is not None else -1.0,
        LOG_PATH_KEY: dg.MetadataValue.path(record.log_path),
        "output_dir": dg.MetadataValue.path(record.output_dir),
    }
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
    golden outputs; raise a classified Failure or RetryRequested."""
    stage_cfg = stage_settings(config, stage)
    partition = context.partition_key if context.has_partition_key else "all"
    log_path = run_log_path(config.paths.log_dir, stage, str(partition), context.run_id)
    runtime = get_runtime(stage_cfg, **runtime_options(context, config, stage, str(partition)))
    context.log.info(f"{stage}: running {spec.command_line()} ({runtime.name}); log file {log_path}")
    try:
        record = runtime.run(spec, log_path=log_path, log=context.log.info, context=context)
    except ToolRunError as exc:
        raise tool_failure(exc, stage_cfg.retry, context.retry_number, stage, spec, log=context.log.warning) from exc
    try:
        return verify_outputs(spec, record, what=stage)
    except ToolRunError as exc:
        raise final_failure(exc, spec, str(exc)) from exc


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
    failure = final_failure(error, spec, f"{stage} failed [{failure_class}; {note}]: {error}")
    if not will_retry:
        return failure
    wait = retry_delay(attempt, retry, rng)
    if log is not None:
        log(f"{stage}: {failure_class} failure, retrying in {wait:.0f}s: {error}")
    requested = dg.RetryRequested(max_retries=retry.max_retries, seconds_to_wait=wait)
    requested.__cause__ = failure
    return requested
