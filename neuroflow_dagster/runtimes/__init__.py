"""Where a ToolSpec runs: local process, embedded stand-in, Docker, Apptainer or a Slurm job.

The stage's ``runtime`` setting picks the implementation; every one returns a
RunRecord or raises ToolRunError with a failure class (see failures.py), so
the Dagster layer does not care which one ran.
"""

from __future__ import annotations

from typing import Any

from neuroflow_dagster.runtimes.base import LogFn, RunRecord, Runtime, ToolRunError
from neuroflow_dagster.runtimes.failures import FailureClass, classify, is_retryable, retry_delay
from neuroflow_dagster.runtimes.local import STAND_IN_IMAGE, BuiltinRuntime, LocalRuntime, fail
from neuroflow_dagster.tools.spec import ToolSpec

__all__ = [
    "STAND_IN_IMAGE",
    "BuiltinRuntime",
    "FailureClass",
    "LocalRuntime",
    "LogFn",
    "RunRecord",
    "Runtime",
    "ToolRunError",
    "classify",
    "get_runtime",
    "is_retryable",
    "retry_delay",
    "verify_outputs",
]


def get_runtime(stage_config: Any, **options: Any) -> Runtime:
    """The runtime the stage's ``runtime`` field names, bound to that stage's settings.

    ``options`` go to the runtime's constructor (e.g. ``kill_grace_s``, ``client`` for docker,
    ``executable`` for apptainer; ``stage_name``, ``partition``, ``run_id``, ``root_run_id``,
    ``jobs`` for slurm). docker/apptainer/slurm are imported here, on demand, so that a worker
    without the ``docker`` package can still run local and builtin stages.
    """
    kind = getattr(stage_config, "runtime", None)
    if kind == "local":
        return LocalRuntime(stage_config, **options)
    if kind == "builtin":
        return BuiltinRuntime(stage_config, **options)
    if kind == "docker":
        from neuroflow_dagster.runtimes.docker import DockerRuntime

        return DockerRuntime(stage_config, **options)
    if kind == "apptainer":
        from neuroflow_dagster.runtimes.apptainer import ApptainerRuntime

        return ApptainerRuntime(stage_config, **options)
    if kind == "slurm":
        from neuroflow_dagster.runtimes.slurm import SlurmRuntime

        return SlurmRuntime(stage_config, **options)
    raise ValueError(f"unknown runtime {kind!r} (expected builtin, local, docker, apptainer or slurm)")


def verify_outputs(spec: ToolSpec, record: RunRecord) -> RunRecord:
    """Exit 0 is not success without the golden outputs: raise a "tool" failure naming what is missing."""
    missing = spec.missing_outputs()
    if missing:
        record.extra["missing_outputs"] = missing
        message = (f"{spec.tool} exited 0 but produced no file matching {', '.join(missing)} "
                   f"under {spec.output_dir} (log: {record.log_path})")
        raise fail(record, None, message, FailureClass.TOOL)
    return record
