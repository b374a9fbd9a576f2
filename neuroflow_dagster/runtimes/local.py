"""Run a ToolSpec as a local process, or as an embedded stand-in (both on the process toolkit, process.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from neuroflow_dagster.runtimes.base import RunRecord, RunRequest, Runtime
from neuroflow_dagster.runtimes.failures import FailureClass
from neuroflow_dagster.runtimes.process import LogSink, fail, new_record, run_process
from neuroflow_dagster.tools.spec import ToolSpec

STAND_IN_IMAGE = "builtin stand-in (not the real tool)"


class LocalRuntime(Runtime):
    """The tool is installed on the worker (pip/conda/system): argv runs as is.

    Mounts are identity mappings here (argv already holds host paths); the stage's cpus and
    memory_mb are not enforced (use the worker's own limits, e.g. systemd or the Dagster
    pool), only the tool's own nprocs/mem settings apply.
    """

    name = "local"

    def image_label(self, spec: ToolSpec) -> str | None:
        return STAND_IN_IMAGE if spec.stand_in else None

    def check(self, spec: ToolSpec, record: RunRecord, sink: LogSink) -> None:
        """Refuse specs this runtime must not run (raise ToolRunError)."""

    def execute(self, spec: ToolSpec, request: RunRequest) -> RunRecord:
        argv = list(spec.argv)
        record = new_record(
            spec, runtime=self.name, command=argv, log_path=request.log_path, image=self.image_label(spec)
        )
        sink = LogSink(request.log_path, request.log)
        self.check(spec, record, sink)
        sink.note(f"tool {spec.tool} on runtime {self.name}" + (f" ({record.image})" if record.image else ""))
        if not argv:
            raise fail(record, sink, f"{spec.tool}: empty command", FailureClass.CONFIGURATION)
        executable = shutil.which(argv[0], path=spec.env.get("PATH", os.environ.get("PATH")))
        if executable:
            record.extra["executable"] = executable
        if spec.workdir is not None:
            try:
                Path(spec.workdir).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise fail(
                    record,
                    sink,
                    f"{spec.tool}: cannot create working directory {spec.workdir}: {exc.strerror}",
                    FailureClass.CONFIGURATION,
                ) from exc
        return run_process(
            argv,
            record=record,
            sink=sink,
            env={**os.environ, **spec.env},
            cwd=spec.workdir,
            timeout_s=request.timeout_s,
            soft_timeout_s=request.soft_timeout_s,
            kill_grace_s=self.kill_grace_s,
            lock=spec.lock,
            lock_info={"owner": spec.lock_owner, "tool": spec.tool} if spec.lock else None,
        )


class BuiltinRuntime(LocalRuntime):
    """The embedded stand-ins (``python -m neuroflow_dagster.tools.builtin.X``), run like local.

    The record says runtime "builtin" and image "builtin stand-in (not the real tool)": a
    stand-in's output must never pass for QSIPrep's. A spec for the real tool is refused here,
    because recording it as a stand-in would be just as wrong.
    """

    name = "builtin"

    def image_label(self, spec: ToolSpec) -> str | None:
        return STAND_IN_IMAGE

    def check(self, spec: ToolSpec, record: RunRecord, sink: LogSink) -> None:
        if not spec.stand_in:
            raise fail(
                record,
                sink,
                f"{spec.tool}: runtime 'builtin' got a spec for the real tool "
                "(stand_in=False); build the stand-in spec or choose runtime local/docker/apptainer",
                FailureClass.CONFIGURATION,
            )
