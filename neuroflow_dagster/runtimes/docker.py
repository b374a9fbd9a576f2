"""Run a ToolSpec in a Docker container, through dagster-docker's Pipes client when in Dagster.

With a Dagster ``context`` the container is started by ``PipesDockerClient``:
its output reaches the run (plain lines go to the step's captured stdout, and
a Pipes-speaking process can report logs, metadata and materializations),
while a plain BIDS-app image without dagster-pipes still just works (logs
only). Without a context - CLI, tests - the same ``containers.create`` call is
made directly. Either way:

- the image must be pinned (a tag other than ``latest``, or a digest): a
  moving tag makes two runs of "the same" pipeline different tools;
- ``argv[0]`` becomes the entrypoint and ``argv[1:]`` the command, so argv
  means the same as for apptainer exec and local runs, whatever ENTRYPOINT
  the image declares (BIDS-app images declare one);
- mounts are ``host:container:ro|rw`` binds, the user is the configured
  ``uid:gid`` or the worker's own (outputs stay owned by the operator, not
  root), cpus/memory become ``nano_cpus``/``mem_limit``;
- the container is removed afterwards (the Pipes client stops it but leaves
  it; ``auto_remove`` would race with the client's ``wait()`` and ``stop()``
  calls after the output ends, which then hit a container that is gone);
- the image digest (RepoDigests, else the local image id) is recorded.

Importing this module needs the ``docker`` package; dagster-docker is only
imported when a context is given.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import docker
import docker.errors

from neuroflow_dagster.config import StageConfig
from neuroflow_dagster.runtimes.base import (
    DEFAULT_KILL_GRACE_S,
    LogFn,
    RunRecord,
    RunRequest,
    Runtime,
    ToolRunError,
    resolve_timeouts,
)
from neuroflow_dagster.runtimes.container import (
    Flags,
    bind_spec,
    container_user,
    image_problem,
    resolve_image,
    run_options,
    spec_problem,
)
from neuroflow_dagster.runtimes.failures import FailureClass, classify
from neuroflow_dagster.runtimes.process import (
    DeadMansSwitch,
    LineSplitter,
    LogSink,
    Watchdog,
    exit_failure,
    fail,
    mark_cancelled,
    new_record,
    succeed,
    timeout_failure,
)
from neuroflow_dagster.tools.spec import ToolSpec

LABEL_TOOL = "org.neuroflow.tool"
LABEL_LOG = "org.neuroflow.log"
FLAGS = Flags(cpus="--cpus", memory="--memory", memory_unit="m", bind="-v", env="-e", workdir="-w")


# --------------------------------------------------------------------------- pure helpers


def container_kwargs(spec: ToolSpec, stage: StageConfig | None, log_path: Path | None = None) -> dict[str, Any]:
    """Everything for ``containers.create`` except image, command and environment."""
    kwargs: dict[str, Any] = {
        "entrypoint": [spec.argv[0]] if spec.argv else None,
        "volumes": [bind_spec(m) for m in spec.mounts],
        "user": container_user(stage),
        "labels": {LABEL_TOOL: spec.tool},
    }
    if log_path is not None:
        kwargs["labels"][LABEL_LOG] = str(log_path)
    if spec.workdir is not None:
        kwargs["working_dir"] = str(spec.workdir)
    if stage is not None and stage.cpus:
        kwargs["nano_cpus"] = round(stage.cpus * 1e9)
    if stage is not None and stage.memory_mb:
        kwargs["mem_limit"] = f"{stage.memory_mb}m"
    return kwargs


def docker_run_argv(spec: ToolSpec, stage_config: StageConfig | None, *, image: str | None = None) -> list[str]:
    """The ``docker run`` command equivalent to what this runtime does through the API."""
    image = image or resolve_image(spec, stage_config) or "<no image>"
    argv = ["docker", "run", "--rm", "--user", container_user(stage_config), *run_options(spec, stage_config, FLAGS)]
    argv += ["--label", f"{LABEL_TOOL}={spec.tool}"]
    if spec.argv:
        argv += ["--entrypoint", spec.argv[0], image, *spec.argv[1:]]
    else:
        argv.append(image)
    return argv


# --------------------------------------------------------------------------- runtime


def _is_pipes_message(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    from dagster_pipes import PIPES_PROTOCOL_VERSION_FIELD

    if isinstance(message, dict) and PIPES_PROTOCOL_VERSION_FIELD in message:
        return message
    return None


class DockerRuntime(Runtime):
    """Runs a ToolSpec in Docker; see the module docstring for what is enforced and recorded."""

    name = "docker"

    def __init__(
        self,
        stage: StageConfig | None = None,
        *,
        client: Any | None = None,
        kill_grace_s: float = DEFAULT_KILL_GRACE_S,
        registry: dict[str, str] | None = None,
    ) -> None:
        super().__init__(stage, kill_grace_s=kill_grace_s)
        self.client = client  # plain path only; the Pipes client calls docker.client.from_env() itself
        self.registry = registry

    # -- public -----------------------------------------------------------------------------

    def execute(self, spec: ToolSpec, request: RunRequest) -> RunRecord:
        """With a Dagster context: through Dagster Pipes (results other than logs are dropped; an asset
        that wants what a Pipes-speaking tool reports uses :meth:`run_with_pipes`)."""
        if request.context is not None:
            record, _ = self.run_with_pipes(
                spec,
                context=request.context,
                log_path=request.log_path,
                timeout_s=request.timeout_s,
                soft_timeout_s=request.soft_timeout_s,
                log=request.log,
            )
            return record
        return self._run_plain(spec, request)

    def run_with_pipes(
        self,
        spec: ToolSpec,
        *,
        context: Any,
        log_path: Path,
        timeout_s: float | None = None,
        soft_timeout_s: float | None = None,
        log: LogFn | None = None,
    ) -> tuple[RunRecord, Any]:
        """Run through ``PipesDockerClient``; returns the record and the Pipes invocation.

        The asset must return a MaterializeResult (Pipes puts the step in "typed event stream"
        mode): e.g. ``invocation.get_materialize_result()`` or one built from the record.
        """
        from dagster_docker.pipes import PipesDockerClient, PipesDockerLogsMessageReader
        from dagster_pipes import DagsterPipesError

        record, sink, image, kwargs = self._prepare(spec, Path(log_path), log)
        captured: dict[str, Any] = {}
        watchdog = self._watchdog(sink, timeout_s, soft_timeout_s, captured)

        class _TeeReader(PipesDockerLogsMessageReader):
            """Pipes' log reader, but every line also goes to our log file, ``log`` and tail."""

            def consume_docker_logs(self, container: Any) -> None:
                handler = self._handler
                assert handler is not None, "logs consumed outside the Pipes session"
                splitter = LineSplitter()
                for chunk in container.logs(stdout=True, stderr=True, stream=True, follow=True):
                    for line in splitter.feed(chunk):
                        self._one(handler, line)
                for line in splitter.flush():
                    self._one(handler, line)

            def _one(self, handler: Any, line: str) -> None:
                message = _is_pipes_message(line)
                if message is not None:
                    sink.write_raw(line)
                    handler.handle_message(message)
                else:
                    sink.line(line)
                    sys.stdout.write(line + "\n")  # compute-log capture, as Pipes does

        class _Client(PipesDockerClient):
            def _create_container(self, client: Any, **kw: Any) -> Any:  # type: ignore[override]
                if watchdog.timed_out:
                    raise TimeoutError("hard timeout reached before the container was created")
                container = super()._create_container(client=client, **kw)
                captured["container"] = container
                captured["switch"] = orphan_switch(container, log_path)
                return container

        pipes_client = _Client(message_reader=_TeeReader(), registry=self.registry)
        invocation = None
        outcome: BaseException | None = None
        watchdog.start()
        try:
            invocation = pipes_client.run(
                context=context,
                image=image,
                command=list(spec.argv[1:]),
                env=dict(spec.env),
                container_kwargs=kwargs,
            )
        except (DagsterPipesError, docker.errors.DockerException, TimeoutError) as exc:
            outcome = exc
        except BaseException as exc:
            self._cancelled(record, sink, exc)  # Pipes already called container.stop() in its finally
            raise
        finally:
            watchdog.stop()
            self._finish_container(record, sink, captured.get("container"))
            if captured.get("switch") is not None:
                captured["switch"].disarm()
        if isinstance(outcome, DagsterPipesError):
            raise self._exit_failure(record, sink, watchdog) from outcome
        if outcome is not None:
            raise self._docker_failure(record, sink, image, outcome, watchdog) from outcome
        return succeed(record, sink, record.exit_code or 0), invocation

    # -- internals --------------------------------------------------------------------------

    def _prepare(
        self, spec: ToolSpec, log_path: Path, log: LogFn | None
    ) -> tuple[RunRecord, LogSink, str, dict[str, Any]]:
        image = resolve_image(spec, self.stage)
        record = new_record(
            spec,
            runtime=self.name,
            command=docker_run_argv(spec, self.stage, image=image),
            log_path=log_path,
            image=image,
        )
        record.extra["container_command"] = shlex.join(spec.argv)
        sink = LogSink(log_path, log)
        sink.note(f"tool {spec.tool} on runtime docker, image {image}")
        problem = image_problem(image) or spec_problem(spec)
        if problem is not None:
            raise fail(record, sink, f"{spec.tool}: {problem}", FailureClass.CONFIGURATION)
        sink.note(f"running: {record.command}")
        return record, sink, str(image), container_kwargs(spec, self.stage, log_path)

    def _run_plain(self, spec: ToolSpec, request: RunRequest) -> RunRecord:
        record, sink, image, kwargs = self._prepare(spec, request.log_path, request.log)
        captured: dict[str, Any] = {}
        watchdog = self._watchdog(sink, request.timeout_s, request.soft_timeout_s, captured)
        outcome: BaseException | None = None
        create = {
            "image": image,
            "command": list(spec.argv[1:]),
            "detach": True,
            "environment": dict(spec.env),
            **kwargs,
        }
        watchdog.start()
        try:
            client = self.client if self.client is not None else docker.client.from_env()
            try:
                container = client.containers.create(**create)
            except docker.errors.ImageNotFound:
                sink.note(f"pulling {image}")
                client.images.pull(image)
                container = client.containers.create(**create)
            captured["container"] = container
            captured["switch"] = orphan_switch(container, request.log_path)
            if watchdog.timed_out:
                raise TimeoutError("hard timeout reached before the container started")
            container.start()
            splitter = LineSplitter()
            for chunk in container.logs(stdout=True, stderr=True, stream=True, follow=True):
                for line in splitter.feed(chunk):
                    sink.line(line)
            for line in splitter.flush():
                sink.line(line)
            status = container.wait()
            record.exit_code = int(status.get("StatusCode", -1))
        except (docker.errors.DockerException, TimeoutError) as exc:
            outcome = exc
        except BaseException as exc:
            self._stop(captured.get("container"), sink)
            self._cancelled(record, sink, exc)
            raise
        finally:
            watchdog.stop()
            self._finish_container(record, sink, captured.get("container"))
            if captured.get("switch") is not None:
                captured["switch"].disarm()
        if outcome is not None:
            raise self._docker_failure(record, sink, image, outcome, watchdog) from outcome
        if record.exit_code != 0:
            raise self._exit_failure(record, sink, watchdog)
        return succeed(record, sink, 0)

    def _watchdog(
        self, sink: LogSink, timeout_s: float | None, soft_timeout_s: float | None, captured: dict[str, Any]
    ) -> Watchdog:
        """The stage's limits (unless given) on the container ``captured`` holds once it exists."""
        timeout_s, soft_timeout_s = resolve_timeouts(self.stage, timeout_s, soft_timeout_s)
        return Watchdog(
            sink,
            timeout_s,
            soft_timeout_s,
            self.kill_grace_s,
            lambda: self._stop(captured.get("container"), sink),
            "the container",
        )

    def _stop(self, container: Any, sink: LogSink) -> bool:
        """Stop the container (SIGTERM, SIGKILL after the grace period); False if there is none yet."""
        if container is None:
            return False
        try:
            container.stop(timeout=max(1, round(self.kill_grace_s)))
        except Exception as exc:
            sink.note(f"stopping the container failed: {exc}")
        return True

    def _exit_failure(self, record: RunRecord, sink: LogSink, watchdog: Watchdog) -> ToolRunError:
        if watchdog.timed_out:
            return timeout_failure(record, sink, watchdog.timeout_s, record.exit_code)
        if record.extra.get("oom_killed"):
            # The engine's own word (State.OOMKilled), whatever the tool printed before it died.
            limit = self.stage.memory_mb if self.stage is not None else None
            return fail(
                record,
                sink,
                f"{record.tool} was killed by the out-of-memory killer (exit code "
                f"{record.exit_code}" + (f", memory_mb {limit}" if limit else "") + f") (log: {record.log_path})",
                FailureClass.RESOURCE,
                exit_code=record.exit_code,
            )
        return exit_failure(record, sink, record.exit_code)

    def _docker_failure(
        self, record: RunRecord, sink: LogSink, image: str, exc: BaseException, watchdog: Watchdog
    ) -> ToolRunError:
        if watchdog.timed_out or isinstance(exc, TimeoutError):
            record.extra["timed_out"] = True
            return fail(
                record,
                sink,
                f"{record.tool}: hard timeout reached before the container ran (log: {record.log_path})",
                FailureClass.RESOURCE,
            )
        text = str(exc)
        if isinstance(exc, docker.errors.ImageNotFound | docker.errors.NotFound):
            message = f"{record.tool}: image not found: {image} ({text})"
            return fail(record, sink, message, FailureClass.CONFIGURATION)
        url = str(getattr(getattr(exc, "response", None), "url", "") or "")
        if isinstance(exc, docker.errors.APIError) and "/images/create" in url:
            # The image is not on this host and pulling it failed (e.g. no registry reachable, as on
            # an air-gapped site): the operator must pull or `docker load` it here, a retry will not.
            message = (
                f"{record.tool}: image not found: {image} is not on this Docker host and could not be "
                f"pulled ({exc.explanation or text}); pull it or `docker load` it on this host"
            )
            return fail(record, sink, message, FailureClass.CONFIGURATION)
        if isinstance(exc, docker.errors.APIError) and exc.is_client_error():
            # 4xx: the engine refused the request itself (e.g. more cpus than the host has).
            message = (
                f"{record.tool}: the Docker engine refused the container ({exc.explanation or text}); "
                "check the stage's cpus, memory_mb, user and mounts"
            )
            return fail(record, sink, message, FailureClass.CONFIGURATION)
        message = f"{record.tool}: docker error with image {image}: {text}"
        return fail(record, sink, message, classify(text, None))

    def _cancelled(self, record: RunRecord, sink: LogSink, exc: BaseException) -> None:
        mark_cancelled(record, exc)
        sink.note(f"interrupted by {type(exc).__name__}: container stopped")

    def _finish_container(self, record: RunRecord, sink: LogSink, container: Any) -> None:
        """Record exit code and digest, then remove the container. Never raises."""
        if container is None:
            if record.error is not None:
                record.log_tail = sink.tail
                sink.close()
            return
        record.extra["container_id"] = getattr(container, "id", None)
        state = _container_state(container)
        if record.exit_code is None and state.get("ExitCode") is not None:
            record.exit_code = int(state["ExitCode"])
        if state.get("OOMKilled"):
            record.extra["oom_killed"] = True
        try:
            image = container.image
            digests = (image.attrs or {}).get("RepoDigests") or []
            record.image_digest = digests[0] if digests else image.id
        except Exception as exc:
            sink.note(f"could not read the image digest: {exc}")
        try:
            container.remove(force=True)
            record.extra["container_removed"] = True
        except Exception as exc:
            record.extra["container_removed"] = False
            sink.note(f"could not remove container {getattr(container, 'id', '?')}: {exc}")
        if record.error is not None:  # cancelled: nothing else will finish this record
            record.log_tail = sink.tail
            sink.close()


REMOVE_CONTAINER = "import sys, docker; docker.from_env().containers.get(sys.argv[1]).remove(force=True)"


def orphan_switch(container: Any, log_path: Path | None) -> DeadMansSwitch:
    """A container outlives a killed run worker (dockerd runs it): remove it if the worker dies first.

    The cleanup talks to the same engine (DOCKER_HOST and friends are inherited).
    """
    return DeadMansSwitch([sys.executable, "-c", REMOVE_CONTAINER, str(container.id)], log_path)


def _container_state(container: Any) -> dict[str, Any]:
    """The engine's ``State`` of the container (ExitCode, OOMKilled, ...); {} if it cannot be read."""
    if container is None:
        return {}
    try:
        container.reload()
        return dict(container.attrs.get("State") or {})
    except Exception:
        return {}
