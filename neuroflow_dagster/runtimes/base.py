"""The runtime interface: how a ToolSpec is executed, and what every run records.

docs/domain-rules.md#pipelines: every run records the exact command, container image, exit
code, start, end, duration, output path, log path and error text. RunRecord
is that record; it becomes the Dagster materialization (or failure) metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neuroflow_dagster.config import StageConfig
from neuroflow_dagster.tools.spec import ToolSpec

LogFn = Callable[[str], None]
# SIGTERM first; what is still running this much later gets SIGKILL.
DEFAULT_KILL_GRACE_S = 10.0


@dataclass
class RunRecord:
    tool: str
    runtime: str
    command: str
    output_dir: str
    log_path: str
    started: float
    ended: float | None = None
    exit_code: int | None = None
    image: str | None = None
    image_digest: str | None = None
    log_tail: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        return None if self.ended is None else round(self.ended - self.started, 3)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["duration_s"] = self.duration_s
        return data


class ToolRunError(Exception):
    """A tool run that did not succeed; carries its record and its failure class.

    ``failure_class`` is one of neuroflow_dagster.runtimes.failures.FailureClass
    values; whether Dagster retries depends on it.
    """

    def __init__(self, message: str, record: RunRecord, failure_class: str) -> None:
        super().__init__(message)
        self.record = record
        self.failure_class = failure_class
        record.error = message


@dataclass(frozen=True)
class RunRequest:
    """How one run goes: its log file, its limits (already resolved), the log callable, the Dagster context."""

    log_path: Path
    timeout_s: float | None = None
    soft_timeout_s: float | None = None
    log: LogFn | None = None
    context: Any | None = None


def resolve_timeouts(
    stage: StageConfig | None, timeout_s: float | None, soft_timeout_s: float | None
) -> tuple[float | None, float | None]:
    """Explicit arguments win; otherwise the stage's own limits (StageConfig.timeout_s / soft_timeout_s)."""
    if stage is not None:
        timeout_s = stage.timeout_s if timeout_s is None else timeout_s
        soft_timeout_s = stage.soft_timeout_s if soft_timeout_s is None else soft_timeout_s
    return timeout_s, soft_timeout_s


class Runtime:
    """Executes a ToolSpec with a stage's settings; raises ToolRunError on any failure (non-zero exit,
    timeout, cancel). A runtime implements ``execute``; ``run`` is the one call every caller makes."""

    name = ""

    def __init__(self, stage: StageConfig | None = None, *, kill_grace_s: float = DEFAULT_KILL_GRACE_S) -> None:
        self.stage = stage
        self.kill_grace_s = kill_grace_s

    def run(
        self,
        spec: ToolSpec,
        *,
        log_path: Path,
        timeout_s: float | None = None,
        soft_timeout_s: float | None = None,
        log: LogFn | None = None,
        context: Any | None = None,
    ) -> RunRecord:
        """Run ``spec``; the limits default to the stage's (``timeout_minutes`` / ``soft_timeout_minutes``)."""
        timeout_s, soft_timeout_s = resolve_timeouts(self.stage, timeout_s, soft_timeout_s)
        return self.execute(spec, RunRequest(Path(log_path), timeout_s, soft_timeout_s, log, context))

    def execute(self, spec: ToolSpec, request: RunRequest) -> RunRecord:
        raise NotImplementedError
