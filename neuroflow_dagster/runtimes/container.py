"""The container toolkit docker.py and apptainer.py share: image pinning, binds, user, run options.

Both engines run ``argv`` exactly (``argv[0]`` as the entrypoint), see the
spec's mounts as ``host:container:ro|rw`` binds, get the stage's cpus and
memory limits and the spec's environment and working directory. Only the
flag spellings differ, so the option list is built once here.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from neuroflow_dagster.config import StageConfig
from neuroflow_dagster.tools.spec import Mount, ToolSpec


def image_problem(image: str | None) -> str | None:
    """Why ``image`` may not be used (None if it is pinned): untagged and ``:latest`` move."""
    if not image:
        return "no container image configured"
    if "@sha256:" in image:
        return None
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return f"image {image!r} has no tag; pin a version (e.g. {image}:1.1.1) or a digest (@sha256:...)"
    tag = name.rsplit(":", 1)[1]
    if not tag or tag == "latest":
        return f"image {image!r} uses the moving tag 'latest'; pin a version or a digest (@sha256:...)"
    return None


def mount_problem(mount: Mount) -> str | None:
    """Bind specs are ``host:container:mode``, comma-separated for apptainer: those characters break them."""
    for side, path in (("host", str(mount.host)), ("container", mount.container)):
        if ":" in path or "," in path:
            return f"mount {side} path {path!r} contains ':' or ',' which bind specifications cannot carry"
    if not mount.container.startswith("/"):
        return f"mount container path {mount.container!r} must be absolute"
    return None


def spec_problem(spec: ToolSpec) -> str | None:
    """What no engine can run: an empty command, or a mount its bind syntax cannot carry."""
    if not spec.argv:
        return "empty command"
    return next((p for p in map(mount_problem, spec.mounts) if p), None)


def current_user() -> str:
    return f"{os.getuid()}:{os.getgid()}"


def container_user(stage: StageConfig | None) -> str:
    """The configured ``uid:gid``, else the worker's own (outputs stay owned by the operator, not root)."""
    return stage.user if stage is not None and stage.user else current_user()


def bind_spec(mount: Mount) -> str:
    return f"{mount.host}:{mount.container}:{'ro' if mount.read_only else 'rw'}"


def resolve_image(spec: ToolSpec, stage: StageConfig | None) -> str | None:
    return spec.image or (stage.image if stage is not None else None)


class Flags(NamedTuple):
    """How an engine spells the options both have."""

    cpus: str
    memory: str
    memory_unit: str
    bind: str
    env: str
    workdir: str


def run_options(spec: ToolSpec, stage: StageConfig | None, flags: Flags) -> list[str]:
    """Limits, binds, environment and working directory, in that order, in the engine's spelling."""
    argv: list[str] = []
    if stage is not None and stage.cpus:
        argv += [flags.cpus, f"{stage.cpus:g}"]
    if stage is not None and stage.memory_mb:
        argv += [flags.memory, f"{stage.memory_mb}{flags.memory_unit}"]
    for mount in spec.mounts:
        argv += [flags.bind, bind_spec(mount)]
    for key, value in spec.env.items():
        argv += [flags.env, f"{key}={value}"]
    if spec.workdir is not None:
        argv += [flags.workdir, str(spec.workdir)]
    return argv
