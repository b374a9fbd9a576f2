"""A real small filesystem for disk-space tests: a tmpfs of a few MB, mounted for one test.

Mounting needs root (or CAP_SYS_ADMIN), which the project's test machines have; without it the
tests that need a full disk fail with the reason (they are about a real full disk, so no stand-in).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MB = 1024**2
BALLAST = "ballast.bin"


@contextmanager
def small_filesystem(path: Path, size_mb: int = 16) -> Iterator[Path]:
    """Mount a ``size_mb`` tmpfs at ``path`` (created if needed); always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0777", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"cannot mount a {size_mb} MB tmpfs at {path} (needs root): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave_bytes: int) -> Path:
    """Write a ballast file so that about ``leave_bytes`` stay free on ``path``'s filesystem."""
    ballast = path / BALLAST
    size = max(0, free_bytes(path) - leave_bytes)
    with open(ballast, "wb") as fh:
        fh.write(b"\0" * size)
    return ballast
