"""The pinned tools venvs the preflight runs in: one per QSIPrep version, built from a committed lock.

    python -m neuroflow_dagster.preflight.venvs --dir DIR [--version 1.1.1 ...] [--python PY]
    (also: ``neuroflow preflight install`` and scripts/qsiprep-preflight-venv.sh)

Why full installs of QSIPrep, not just its parser: the preflight runs QSIPrep's whole workflow
construction (nipype, niworkflows, dipy, pandas, pybids, ...), and it must behave exactly as the
container does, so every package is pinned by ``locks/qsiprep-<version>.txt`` (``pip freeze`` of a
resolved install; two breakages seen while writing it came from drifting transitive pins:
``universal_pathlib`` 0.3 and a missing ``toml``). The lock is installed ``--no-deps`` (no resolver,
the same set every time) and then ``pip check``-ed. Idempotent: a stamp holding the lock's sha256 and
the interpreter's version makes a second call return at once; a changed lock rebuilds. One builder at
a time (a file lock beside the venv). ~1.5 GB and ~2 min per version on a warm pip cache.

The build ends with a smoke run inside the venv: QSIPrep's parser is imported with TEMPLATEFLOW_HOME
set to the venv's own ``templateflow`` folder, which TemplateFlow fills with its bundled skeleton
(local, no download); later preflights read it and never write it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filelock import FileLock

# QSIPrep versions with a lock, and the oldest Python each supports (their wheels' Requires-Python).
VERSIONS: dict[str, tuple[int, int]] = {"1.1.1": (3, 10), "26.1.1": (3, 11)}
LOCKS = Path(__file__).with_name("locks")
STAMP = ".ready"
TEMPLATEFLOW = "templateflow"
MPLCONFIG = "mplconfig"
# The environment every process in a preflight venv gets: no start-up pings (nipype's etelemetry, the
# NiPreps trackers), TemplateFlow and matplotlib pointed at folders prepared at build time.
NO_PING = {"NIPYPE_NO_ET": "1", "NO_ET": "1"}


class VenvError(RuntimeError):
    """A venv that could not be built (the message says which step failed and why)."""


def lock_file(version: str) -> Path:
    if version not in VERSIONS:
        raise VenvError(f"no lock for QSIPrep {version} (locked: {', '.join(VERSIONS)})")
    return LOCKS / f"qsiprep-{version}.txt"


def venv_dir(root: Path, version: str) -> Path:
    return Path(root) / f"qsiprep-{version}"


def python_of(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def tool_env(venv: Path) -> dict[str, str]:
    """What the venv's processes need beyond the caller's environment (see the module docstring)."""
    return {**NO_PING, "TEMPLATEFLOW_HOME": str(Path(venv) / TEMPLATEFLOW), "MPLCONFIGDIR": str(Path(venv) / MPLCONFIG)}


def clean_environ(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without what would make the venv's Python load the project's packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env.update(extra)
    return env


def stamp_text(version: str, python_version: str) -> str:
    digest = hashlib.sha256(lock_file(version).read_bytes()).hexdigest()
    return f"qsiprep=={version} lock-sha256={digest} python={python_version}\n"


def _python_version(python: Path | str) -> str:
    proc = subprocess.run(
        [str(python), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise VenvError(f"cannot run {python}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc.stdout.strip()


def problem(root: Path, version: str) -> str | None:
    """Why the venv of ``version`` under ``root`` cannot be used now (None: it is ready)."""
    venv = venv_dir(root, version)
    stamp = venv / STAMP
    if not stamp.is_file():
        what = "is incomplete (a build did not finish)" if venv.exists() else "is not built"
        return f"the QSIPrep {version} preflight venv {venv} {what}; build it with `neuroflow preflight install`"
    try:
        built = stamp.read_text(encoding="utf-8")
        python_version = built.rsplit("python=", 1)[-1].strip()
        if built != stamp_text(version, python_version):
            return f"the QSIPrep {version} preflight venv {venv} was built from another lock; rebuild it with " \
                "`neuroflow preflight install`"  # fmt: skip
    except (OSError, VenvError) as exc:
        return f"the QSIPrep {version} preflight venv {venv} cannot be read: {exc}"
    if not os.access(python_of(venv), os.X_OK):
        return f"the QSIPrep {version} preflight venv {venv} has no interpreter (its base Python was removed?)"
    return None


def build(
    root: Path, version: str, python: str | None = None, log: Callable[[str], None] = print
) -> Path:  # fmt: skip
    """Build (or find ready) the venv of QSIPrep ``version`` under ``root``; return its folder."""
    lock = lock_file(version)
    root = Path(root).resolve()
    python = python or getattr(sys, "_base_executable", None) or sys.executable
    python_version = _python_version(python)
    needed = VERSIONS[version]
    if tuple(int(p) for p in python_version.split(".")[:2]) < needed:
        raise VenvError(
            f"QSIPrep {version} needs Python >= {needed[0]}.{needed[1]}; {python} is {python_version} "
            "(give another interpreter: --python, or pipelines.qsiprep.preflight.python)"
        )
    venv = venv_dir(root, version)
    stamp = stamp_text(version, python_version)
    if problem(root, version) is None and (venv / STAMP).read_text(encoding="utf-8") == stamp:
        return venv
    Path(root).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(root) / f".qsiprep-{version}.lock")):
        if (venv / STAMP).is_file() and (venv / STAMP).read_text(encoding="utf-8") == stamp:
            return venv
        started = time.monotonic()
        log(f"building the QSIPrep {version} preflight venv in {venv} (Python {python_version}, lock {lock.name})")
        shutil.rmtree(venv, ignore_errors=True)
        _step("create the venv", [python, "-m", "venv", "--without-pip", str(venv)])
        # The running interpreter's pip installs into the new venv (--python): no second copy of pip.
        pip = [sys.executable, "-m", "pip", "--python", str(python_of(venv)), "--disable-pip-version-check",
               "--no-input"]  # fmt: skip
        _step("install the lock", [*pip, "install", "--quiet", "--no-deps", "-r", str(lock)])
        _step("check the installed set", [*pip, "check"])
        for folder in (TEMPLATEFLOW, MPLCONFIG):
            (venv / folder).mkdir(exist_ok=True)
        _step(
            "import QSIPrep's parser (and lay out the TemplateFlow skeleton)",
            [str(python_of(venv)), "-c", "import qsiprep.cli.parser, qsiprep.cli.workflow, templateflow.api"],
            env=clean_environ(tool_env(venv)),
        )
        (venv / STAMP).write_text(stamp, encoding="utf-8")
        size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
        log(f"built {venv} in {time.monotonic() - started:.0f} s, {size / 1e9:.2f} GB")
    return venv


def _step(what: str, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=3600, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-15:])
        raise VenvError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuroflow_dagster.preflight.venvs", description=__doc__)
    parser.add_argument("--dir", required=True, type=Path, help="where the venvs go (one folder per version)")
    parser.add_argument("--version", action="append", choices=sorted(VERSIONS), help="default: every locked version")
    parser.add_argument("--python", help="interpreter to build with (default: the one running this)")
    args = parser.parse_args(argv)
    versions = args.version or list(VERSIONS)
    # Both at once: a build is mostly pip unpacking wheels and waiting on the disk, not one CPU's work.
    with ThreadPoolExecutor(max_workers=len(versions)) as pool:
        futures = [pool.submit(build, args.dir, v, args.python, lambda m: print(m, file=sys.stderr)) for v in versions]
        failed = False
        for future in futures:
            try:
                print(future.result())
            except VenvError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
