"""Run a ToolSpec with Apptainer (or Singularity): ``apptainer exec`` as a local process.

HPC and shared servers often forbid a Docker daemon; Apptainer runs images
as the calling user without one. The run is a local subprocess of the
``apptainer`` binary, so it reuses the process toolkit (process.py): process-group
handling, timeouts, cancellation and logging; binds and limits come from the
container toolkit (container.py) shared with Docker.

``exec`` (not ``run``) so argv is executed exactly, whatever runscript the
image has. ``--cleanenv`` keeps the worker's environment (Dagster variables,
credentials, a host PYTHONPATH) out of the container; the spec's env goes in
with ``--env``. The image is a ``.sif`` file (its sha256 is recorded) or a
pinned ``docker://`` URI.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from neuroflow_dagster.config import StageConfig
from neuroflow_dagster.runtimes.base import DEFAULT_KILL_GRACE_S, RunRecord, RunRequest, Runtime
from neuroflow_dagster.runtimes.container import (
    Flags,
    container_user,
    current_user,
    image_problem,
    resolve_image,
    run_options,
    spec_problem,
)
from neuroflow_dagster.runtimes.failures import FailureClass
from neuroflow_dagster.runtimes.process import LogSink, fail, new_record, run_process
from neuroflow_dagster.tools.spec import ToolSpec

EXECUTABLES = ("apptainer", "singularity")
FLAGS = Flags(cpus="--cpus", memory="--memory", memory_unit="M", bind="--bind", env="--env", workdir="--pwd")
_DIGESTS: dict[tuple[str, int, int], str] = {}


def find_executable(preferred: str | None = None) -> str | None:
    """``preferred`` (a name or a path) if given, else the first of apptainer/singularity on PATH."""
    for name in (preferred,) if preferred else EXECUTABLES:
        found = shutil.which(name)
        if found:
            return found
    return None


def apptainer_image_problem(image: str | None) -> str | None:
    if not image:
        return "no container image configured"
    if image.startswith("docker://"):
        return image_problem(image[len("docker://") :])
    if "://" in image:
        return f"image {image!r}: only a .sif file or a docker:// URI is supported"
    if not image.endswith(".sif"):
        return f"image {image!r} is neither a .sif file nor a docker:// URI"
    if not Path(image).is_file():
        return f"image file {image} does not exist"
    return None


def image_digest(image: str) -> str | None:
    """sha256 of a .sif (cached per path, size and mtime), or the digest pinned in a docker:// URI."""
    if image.startswith("docker://"):
        return image.split("@", 1)[1] if "@sha256:" in image else None
    path = Path(image)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        _DIGESTS[key] = f"sha256:{sha.hexdigest()}"
    return _DIGESTS[key]


def _env_problem(key: str, value: str) -> str | None:
    if not key or "=" in key or "," in key:
        return f"environment variable name {key!r} cannot be passed with --env"
    if "," in value or "\n" in value:
        # --env is a comma-separated list of K=V: a comma would split the value.
        return f"environment variable {key}: value {value!r} contains ',' or a newline (--env cannot pass it)"
    return None


def apptainer_exec_argv(
    spec: ToolSpec,
    stage_config: StageConfig | None,
    executable: str = "apptainer",
    *,
    image: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The exact command line this runtime executes."""
    image = image or resolve_image(spec, stage_config) or "<no image>"
    return [executable, "exec", "--cleanenv", *run_options(spec, stage_config, FLAGS), *extra_args, image, *spec.argv]


class ApptainerRuntime(Runtime):
    """``apptainer exec`` a ToolSpec; cpus/memory need cgroups v2 delegation (see docs/runtimes.md)."""

    name = "apptainer"

    def __init__(
        self,
        stage: StageConfig | None = None,
        *,
        executable: str | None = None,
        kill_grace_s: float = DEFAULT_KILL_GRACE_S,
        extra_args: Sequence[str] = (),
        hash_image: bool = True,
    ) -> None:
        super().__init__(stage, kill_grace_s=kill_grace_s)
        self.executable = executable
        self.extra_args = tuple(extra_args)
        self.hash_image = hash_image

    def execute(self, spec: ToolSpec, request: RunRequest) -> RunRecord:
        log_path = request.log_path
        image = resolve_image(spec, self.stage)
        executable = find_executable(self.executable)
        shown = executable or self.executable or EXECUTABLES[0]
        argv = apptainer_exec_argv(spec, self.stage, shown, image=image, extra_args=self.extra_args)
        record = new_record(spec, runtime=self.name, command=argv, log_path=log_path, image=image)
        record.extra["container_command"] = shlex.join(spec.argv)
        sink = LogSink(log_path, request.log)
        sink.note(f"tool {spec.tool} on runtime apptainer, image {image}")

        problem = None
        if executable is None:
            wanted = self.executable or " or ".join(EXECUTABLES)
            problem = f"executable not found: {wanted} is not on PATH of this worker"
        problem = problem or apptainer_image_problem(image) or spec_problem(spec)
        problem = problem or next((p for p in (_env_problem(k, v) for k, v in spec.env.items()) if p), None)
        if problem is None:
            missing = [str(m.host) for m in spec.mounts if not Path(m.host).exists()]
            if missing:
                problem = f"bind source(s) do not exist: {', '.join(missing)}"
        if problem is not None:
            raise fail(record, sink, f"{spec.tool}: {problem}", FailureClass.CONFIGURATION)

        record.extra["executable"] = executable
        if container_user(self.stage) != current_user():
            sink.note(
                f"user {container_user(self.stage)} is ignored: apptainer runs as the calling user ({current_user()})"
            )
        if self.hash_image and image is not None:
            try:
                record.image_digest = image_digest(image)
            except OSError as exc:
                sink.note(f"could not hash image {image}: {exc}")
        return run_process(
            argv,
            record=record,
            sink=sink,
            env=dict(os.environ),  # for apptainer itself; --cleanenv keeps it out of the container
            cwd=None,
            timeout_s=request.timeout_s,
            soft_timeout_s=request.soft_timeout_s,
            kill_grace_s=self.kill_grace_s,
            lock=spec.lock,
            lock_info={"owner": spec.lock_owner, "tool": spec.tool} if spec.lock else None,
        )
