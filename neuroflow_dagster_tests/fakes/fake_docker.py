"""A stand-in for ``docker.DockerClient`` whose containers are local processes.

The Docker runtime is tested on a real engine (test_runtimes_docker.py); this fake is kept only
for what that engine cannot show on the test machines: a pull from a registry (none is
reachable) and the RepoDigest such a pull brings. It implements the part of docker-py's
API that dagster-docker's ``PipesDockerClient`` and our DockerRuntime use (``containers.create``
/ ``get`` / ``list`` / ``run``, ``images.get`` / ``pull``, a container's ``start``, ``logs``,
``wait``, ``stop``, ``reload``, ``remove``, ``image``, ``attrs``). A "container" runs
``entrypoint + command`` as a local process group with ONLY the injected ``environment`` (plus
PATH, as an image would define it), so Dagster Pipes variables reach the process and real Pipes
messages come back through ``logs()``. It cannot remap mounts: tests that execute files use
identity mounts, and every ``create()`` call is kept in ``created`` to check the exact arguments.
Errors are docker-py's own exception classes, so the runtime's handling is exercised as it is.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import docker.errors

_ids = itertools.count(1)


class FakeImage:
    def __init__(self, name: str, digest: str | None) -> None:
        self.name = name
        self.id = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        self.tags = [name]
        repo_digests = [f"{name.rsplit(':', 1)[0]}@{digest}"] if digest else []
        self.attrs: dict[str, Any] = {"Id": self.id, "RepoDigests": repo_digests}


class FakeImages:
    def __init__(self, local: dict[str, str | None], pullable: dict[str, str | None]) -> None:
        self._local = {name: FakeImage(name, digest) for name, digest in local.items()}
        self._pullable = dict(pullable)
        self.pulled: list[str] = []

    def get(self, name: str) -> FakeImage:
        if name not in self._local:
            raise docker.errors.ImageNotFound(f"No such image: {name}")
        return self._local[name]

    def pull(self, repository: str, tag: str | None = None, **_: Any) -> FakeImage:
        name = f"{repository}:{tag}" if tag else repository
        self.pulled.append(name)
        if name not in self._pullable:
            raise docker.errors.NotFound(
                f"pull access denied for {name}, repository does not exist or may require 'docker login'"
            )
        self._local[name] = FakeImage(name, self._pullable[name])
        return self._local[name]


class FakeContainer:
    def __init__(self, client: FakeDockerClient, image: str, kwargs: dict[str, Any]) -> None:
        self.client = client
        self.id = f"fake{next(_ids):012d}"
        self.name = self.id
        self.image_name = image
        self.kwargs = kwargs
        self.proc: subprocess.Popen[bytes] | None = None
        self.removed = False
        self.stop_calls: list[Any] = []
        self.attrs: dict[str, Any] = {"Id": self.id, "Image": image,
                                      "State": {"Status": "created", "Running": False, "ExitCode": 0}}

    # -- lifecycle ------------------------------------------------------------------------------
    def _argv(self) -> list[str]:
        entrypoint = self.kwargs.get("entrypoint") or []
        command = self.kwargs.get("command") or []
        if isinstance(entrypoint, str):
            entrypoint = [entrypoint]
        if isinstance(command, str):
            command = [command]
        return [*entrypoint, *command]

    def start(self) -> None:
        if self.removed:
            raise docker.errors.NotFound(f"No such container: {self.id}")
        env = {"PATH": self.client.image_path.get(self.image_name, os.environ.get("PATH", "/usr/bin:/bin"))}
        env.update(self.kwargs.get("environment") or {})
        workdir = self.kwargs.get("working_dir")
        cwd = workdir if workdir and Path(workdir).is_dir() else None
        try:
            self.proc = subprocess.Popen(self._argv(), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except OSError as exc:  # what the engine says for a missing executable
            self.attrs["State"].update(Status="exited", ExitCode=127)
            raise docker.errors.APIError(f"OCI runtime create failed: exec: {exc}") from exc
        self.attrs["State"].update(Status="running", Running=True, Pid=self.proc.pid)

    def logs(self, stdout: bool = True, stderr: bool = True, stream: bool = False, follow: bool = False,
             **_: Any) -> Iterator[bytes] | bytes:
        assert self.proc is not None and self.proc.stdout is not None, "logs() before start()"
        out = self.proc.stdout

        def chunks() -> Iterator[bytes]:
            # Arbitrary chunk boundaries, as Docker's multiplexed frames have: lines may be split.
            while True:
                data = os.read(out.fileno(), 37)
                if not data:
                    return
                yield data

        return chunks() if stream else b"".join(chunks())

    def _status(self) -> int:
        assert self.proc is not None
        rc = self.proc.wait()
        return 128 - rc if rc < 0 else rc  # a signal -> 128 + n, like the engine reports

    def wait(self, **_: Any) -> dict[str, Any]:
        if self.proc is None:
            return {"StatusCode": self.attrs["State"]["ExitCode"], "Error": None}
        code = self._status()
        self.attrs["State"].update(Status="exited", Running=False, ExitCode=code)
        return {"StatusCode": code, "Error": None}

    def stop(self, timeout: int = 10, **_: Any) -> None:
        self.stop_calls.append(timeout)
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait()

    def kill(self, signal_name: Any = None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.wait()

    def reload(self) -> None:
        if self.removed:
            raise docker.errors.NotFound(f"No such container: {self.id}")
        if self.proc is not None and self.proc.poll() is not None:
            self.wait()

    def remove(self, force: bool = False, **_: Any) -> None:
        if self.removed:
            raise docker.errors.NotFound(f"No such container: {self.id}")
        if self.proc is not None and self.proc.poll() is None:
            if not force:
                raise docker.errors.APIError(f"You cannot remove a running container {self.id}")
            self.kill()
        self.removed = True

    @property
    def image(self) -> FakeImage:
        return self.client.images.get(self.image_name)

    @property
    def status(self) -> str:
        return self.attrs["State"]["Status"]


class FakeContainers:
    def __init__(self, client: FakeDockerClient) -> None:
        self.client = client
        self.created: list[dict[str, Any]] = []  # every create() call, exactly as made
        self.all: list[FakeContainer] = []

    def create(self, image: str, command: str | Sequence[str] | None = None, **kwargs: Any) -> FakeContainer:
        self.client.images.get(image)  # ImageNotFound, like the engine
        call = {"image": image, "command": command, **kwargs}
        self.created.append(call)
        container = FakeContainer(self.client, image, call)
        self.all.append(container)
        return container

    def run(self, image: str, command: str | Sequence[str] | None = None, detach: bool = False,
            remove: bool = False, **kwargs: Any) -> Any:
        container = self.create(image, command, detach=detach, **kwargs)
        container.start()
        if detach:
            return container
        output = container.logs(stream=False)
        code = container.wait()["StatusCode"]
        if remove:
            container.remove()
        if code != 0:
            raise docker.errors.ContainerError(container, code, command, image, output)
        return output

    def get(self, container_id: str) -> FakeContainer:
        for container in self.all:
            if container.id == container_id and not container.removed:
                return container
        raise docker.errors.NotFound(f"No such container: {container_id}")

    def list(self, all: bool = False, **_: Any) -> list[FakeContainer]:
        return [c for c in self.all if not c.removed and (all or c.status == "running")]


class FakeDockerClient:
    """``local``/``pullable``: image name -> RepoDigest (None = a local build without one).

    ``image_path``: image name -> PATH inside that "image" (e.g. a folder of fake executables).
    """

    def __init__(
        self,
        local: dict[str, str | None] | None = None,
        pullable: dict[str, str | None] | None = None,
        image_path: dict[str, str] | None = None,
    ) -> None:
        self.images = FakeImages(local or {}, pullable or {})
        self.containers = FakeContainers(self)
        self.image_path = dict(image_path or {})
        self.logins: list[dict[str, Any]] = []

    def login(self, **kwargs: Any) -> None:
        self.logins.append(kwargs)

    def close(self) -> None:
        pass

    def wait_all_gone(self, timeout: float = 5.0) -> bool:
        """True once every container's process has exited (for cancellation checks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.proc is None or c.proc.poll() is not None for c in self.containers.all):
                return True
            time.sleep(0.05)
        return False
