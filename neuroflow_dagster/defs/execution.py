"""Runs a ToolSpec from inside an asset: runtime choice, logs, timeouts, failure classes.

Every stage goes through `execute_spec`, so every run records the same
things (requirements §4) and fails the same way: a transient or resource
failure raises `RetryRequested` with the §6 delay for this attempt
(300 s x 2^(n-1), capped, +-20 %), so Dagster retries the step in the same
run; validation, configuration and tool failures raise
`Failure(allow_retries=False)` with the reason, so Dagster stops at once.
When the retries are spent the last Failure (with its metadata) is what the
run reports.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.runtimes import get_runtime
from neuroflow_dagster.runtimes.base import RunRecord, ToolRunError
from neuroflow_dagster.runtimes.failures import is_retryable, retry_delay
from neuroflow_dagster.runtimes.jobs import JobStore
from neuroflow_dagster.tools.spec import ToolSpec

STATUS_KEY = "neuroflow/status"
FAILURE_CLASS_KEY = "neuroflow/failure_class"


def log_path_for(config: NeuroflowConfig, stage: str, partition: str, run_id: str) -> Path:
    """One log file per tool run: log_dir/<stage>/<partition>_<run>.log (partition made path-safe)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", partition) or "all"
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return config.paths.log_dir / stage / f"{safe}_{stamp}_{run_id[:8]}.log"


def record_metadata(record: RunRecord, spec: ToolSpec | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "command": dg.MetadataValue.text(record.command),
        "runtime": record.runtime,
        "image": record.image or ("builtin stand-in (not the real tool)" if spec and spec.stand_in else "local"),
        "exit_code": record.exit_code if record.exit_code is not None else -1,
        "duration_s": record.duration_s if record.duration_s is not None else -1.0,
        "log_path": dg.MetadataValue.path(record.log_path),
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
        meta["log_tail"] = dg.MetadataValue.md("```\n" + record.log_tail[-4000:] + "\n```")
    return meta


def runtime_options(context: dg.AssetExecutionContext, config: NeuroflowConfig, stage: str,
                    partition: str) -> dict[str, Any]:
    """What a runtime needs beyond the stage's settings: for slurm, who owns the job and where its record goes."""
    if config.stage(stage).runtime != "slurm":
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
    """Run `spec` with the stage's runtime; check golden outputs; raise a classified Failure."""
    stage_cfg = config.stage(stage)
    partition = context.partition_key if context.has_partition_key else "all"
    log_path = log_path_for(config, stage, str(partition), context.run_id)
    runtime = get_runtime(stage_cfg, **runtime_options(context, config, stage, str(partition)))
    context.log.info(f"{stage}: running {spec.command_line()} ({runtime.name}); log file {log_path}")
    try:
        record = runtime.run(
            spec,
            log_path=log_path,
            timeout_s=stage_cfg.timeout_minutes * 60,
            soft_timeout_s=(stage_cfg.soft_timeout_minutes * 60) if stage_cfg.soft_timeout_minutes else None,
            log=context.log.info,
            context=context,
        )
    except ToolRunError as exc:
        raise classified_failure(context, stage_cfg.retry, stage, spec, exc) from exc
    missing = spec.missing_outputs()
    if missing:
        meta = record_metadata(record, spec)
        meta[FAILURE_CLASS_KEY] = "tool"
        raise dg.Failure(
            description=f"{stage} exited 0 but expected outputs are missing under {spec.output_dir}: "
            + ", ".join(missing),
            metadata=meta,
            allow_retries=False,
        )
    return record


def classified_failure(
    context: dg.AssetExecutionContext, retry: Any, stage: str, spec: ToolSpec, exc: ToolRunError
) -> Exception:
    """RetryRequested for a retryable class with attempts left, else Failure(allow_retries=False)."""
    failure_class = str(getattr(exc.failure_class, "value", exc.failure_class))
    meta = record_metadata(exc.record, spec)
    meta[FAILURE_CLASS_KEY] = failure_class
    attempt = context.retry_number + 1
    retryable = is_retryable(failure_class)
    will_retry = retryable and attempt <= retry.max_retries
    note = f"attempt {attempt}/{retry.max_retries + 1}" + (", will retry" if will_retry else ", not retried")
    failure = dg.Failure(
        description=f"{stage} failed [{failure_class}; {note}]: {exc}", metadata=meta, allow_retries=False
    )
    if not will_retry:
        return failure
    wait = retry_delay(attempt, retry)
    context.log.warning(f"{stage}: {failure_class} failure, retrying in {wait:.0f}s: {exc}")
    requested = dg.RetryRequested(max_retries=retry.max_retries, seconds_to_wait=wait)
    requested.__cause__ = failure
    return requested
