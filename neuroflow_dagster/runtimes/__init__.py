"""Where a ToolSpec runs: local process, embedded stand-in, Docker, Apptainer or a Slurm job.

The stage's ``runtime`` setting picks the implementation from config.RUNTIMES
(one entry per runtime); every one returns a RunRecord or raises ToolRunError
with a failure class (see failures.py), so the Dagster layer does not care
which one ran. process.py is the process toolkit they share, container.py the
container toolkit of docker.py and apptainer.py. Plain Python: no dagster
import (docker.py imports dagster-docker's Pipes client only when a Dagster
context is passed).
"""

from __future__ import annotations

import importlib
from typing import Any

from neuroflow_dagster.config import RUNTIMES, StageConfig
from neuroflow_dagster.runtimes.base import LogFn, RunRecord, Runtime, ToolRunError
from neuroflow_dagster.runtimes.failures import FailureClass, classify, is_retryable, retry_delay
from neuroflow_dagster.runtimes.local import STAND_IN_IMAGE, BuiltinRuntime, LocalRuntime
from neuroflow_dagster.runtimes.process import fail
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


def get_runtime(stage_config: StageConfig, **options: Any) -> Runtime:
    """The runtime the stage's ``runtime`` field names, bound to that stage's settings.

    ``options`` go to the runtime's constructor (e.g. ``kill_grace_s``, ``client`` for docker,
    ``executable`` for apptainer; ``stage_name``, ``partition``, ``run_id``, ``root_run_id``,
    ``jobs`` for slurm). Implementations are imported here, on demand, so that a
    worker without the ``docker`` package can still run local and builtin stages.
    """
    kind = stage_config.runtime
    entry = RUNTIMES.get(kind)
    if entry is None:
        raise ValueError(f"unknown runtime {kind!r} (expected {', '.join(RUNTIMES)})")
    module, _, name = entry.implementation.partition(":")
    return getattr(importlib.import_module(module), name)(stage_config, **options)


def verify_outputs(spec: ToolSpec, record: RunRecord, what: str | None = None) -> RunRecord:
    """Exit 0 is not success without the golden outputs: raise a "tool" failure naming what is missing.

    ``what`` names the run in the message (the stage, in a Dagster run; else the tool).
    """
    missing = spec.missing_outputs()
    if missing:
        record.extra["missing_outputs"] = missing
        message = (
            f"{what or spec.tool} exited 0 but expected outputs are missing under {spec.output_dir}: "
            + ", ".join(missing)
        )
        raise fail(record, None, message, FailureClass.TOOL)
    return record
