"""The runtime interface: how a ToolSpec is executed, and what every run records.

docs/domain-rules.md#pipelines: every run records the exact command, container image, exit
code, start, end, duration, output path, log path and error text. RunRecord
is that record; it becomes the Dagster materialization (or failure) metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from neuroflow_dagster.tools.spec import ToolSpec

LogFn = Callable[[str], None]


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


class Runtime(Protocol):
    """Executes a ToolSpec; raises ToolRunError on any failure (non-zero exit, timeout, cancel)."""

    name: str

    def run(
        self,
        spec: ToolSpec,
        *,
        log_path: Path,
        timeout_s: float | None = None,
        soft_timeout_s: float | None = None,
        log: LogFn | None = None,
        context: Any | None = None,
    ) -> RunRecord: ...
