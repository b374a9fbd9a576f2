"""A readers-writer lock between processes, built on ``flock``: a dead holder releases it.

Publishing swaps a folder other runs may be reading (QSIPrep's ``sub-X``, read for hours by the
reconstruction of each of the subject's sessions): the readers hold the lock shared for as long as
they read, the publish takes it exclusively for its renames. ``flock`` locks belong to an open file
description, so they work across processes and threads alike, and the kernel drops them when the
holding process dies (``kill -9``, OOM, a node reboot of the service host): a dead reader never
blocks a publish, a dead writer never blocks the readers.

Who is waiting for whom is visible: the writer writes a line about itself into the lock file once
it holds it; each reader writes one into a file of its own, ``<lock>.readers/<id>.json``, which it
holds locked while it reads (written under a temporary name and renamed into place once locked, so
a file that can be locked by someone else belongs to a reader that is gone). A waiting writer lists
the live readers, a waiting reader names the writer, and both say how long they waited.

Every wait is bounded: after ``wait_s`` the caller gets ``LockBusy`` naming the holders, and decides
(the stages fail as ``transient``, which is retried). Plain Python, standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLL_S = 0.2
RETELL_S = 300.0  # a long wait repeats who it waits for this often


@dataclass(frozen=True)
class Holder:
    """A holder of the lock as it described itself (run id, stage, partition, pid, host, since)."""

    info: dict[str, Any]

    def describe(self) -> str:
        i = self.info
        what = " ".join(str(i[k]) for k in ("stage", "partition") if i.get(k)) or "a process"
        run = f" run {str(i['run_id'])[:8]}" if i.get("run_id") else ""
        where = f" (pid {i.get('pid', '?')} on {i.get('host', '?')}, since {i.get('since', '?')})"
        return f"{what}{run}{where}"


@dataclass
class Acquired:
    """How the lock was obtained: how long the caller waited and for whom (empty: at once)."""

    waited_s: float = 0.0
    waited_for: list[Holder] = field(default_factory=list)

    def waited(self) -> bool:
        return self.waited_s > 0

    def describe(self) -> str:
        return "; ".join(h.describe() for h in self.waited_for) or "a holder that did not describe itself"


class LockBusy(Exception):
    """Still held by others after the bounded wait; ``holders`` says by whom."""

    def __init__(self, path: Path, mode: str, waited_s: float, holders: list[Holder]) -> None:
        self.path, self.mode, self.waited_s, self.holders = path, mode, waited_s, holders
        who = "; ".join(h.describe() for h in holders) or "a holder that did not describe itself"
        super().__init__(f"{path} still held after {waited_s:.0f} s ({mode} wanted) by: {who}")


def _info(info: dict[str, Any]) -> dict[str, Any]:
    return {
        **info,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _try(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class ReadersWriterLock:
    """The lock at ``path`` (created on first use) and its readers' folder ``<path>.readers``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.readers_dir = self.path.with_name(self.path.name + ".readers")

    # ------------------------------------------------------------------ who holds it

    def readers(self) -> list[Holder]:
        """The live readers; files left by readers that are gone are removed on the way."""
        out = []
        try:
            entries = sorted(self.readers_dir.glob("*.json"))
        except OSError:
            return out
        for path in entries:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # the reader just finished
            try:
                if _try(fd, fcntl.LOCK_SH):  # nobody holds it: its reader is gone
                    with contextlib.suppress(OSError):
                        path.unlink()
                    continue
                out.append(Holder(_read_json(fd)))
            finally:
                os.close(fd)
        return out

    def _tidy(self) -> None:
        """Under the exclusive lock no reader can be live: every file left belongs to one that is gone."""
        self.readers()
        for tmp in self.readers_dir.glob(".*.tmp") if self.readers_dir.is_dir() else ():
            with contextlib.suppress(OSError):
                tmp.unlink()

    def writer(self, fd: int) -> list[Holder]:
        """The writer, from what it wrote into the lock file (read through the caller's descriptor)."""
        info = _read_json(fd)
        return [Holder(info)] if info else []

    # ------------------------------------------------------------------ taking it

    def _wait(
        self,
        fd: int,
        how: int,
        mode: str,
        wait_s: float,
        holders: Callable[[], list[Holder]],
        log: Callable[[str], None] | None,
    ) -> Acquired:
        started = time.monotonic()
        if _try(fd, how):
            return Acquired()
        seen: dict[str, Holder] = {}
        told, told_at = "", 0.0
        while True:
            now = time.monotonic()
            current = holders()
            for h in current:
                seen.setdefault(json.dumps(h.info, sort_keys=True), h)
            text = "; ".join(h.describe() for h in current)
            if log is not None and text and (text != told or now - told_at >= RETELL_S):
                log(f"waiting up to {wait_s:g} s for the {mode} lock {self.path}, held by: {text}")
                told, told_at = text, now
            if now - started >= wait_s:
                raise LockBusy(self.path, mode, now - started, current or list(seen.values()))
            time.sleep(POLL_S)
            if _try(fd, how):
                return Acquired(time.monotonic() - started, list(seen.values()))

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.contextmanager
    def exclusive(
        self, info: dict[str, Any], wait_s: float, log: Callable[[str], None] | None = None
    ) -> Iterator[Acquired]:
        """Hold the lock alone (no reader, no other writer) for the block; LockBusy after ``wait_s``."""
        fd = self._open()
        try:
            got = self._wait(fd, fcntl.LOCK_EX, "exclusive", wait_s, self.readers, log)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_info(info), sort_keys=True) + "\n").encode(), 0)
            self._tidy()
            try:
                yield got
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def shared(
        self, info: dict[str, Any], wait_s: float, log: Callable[[str], None] | None = None
    ) -> Iterator[Acquired]:
        """Hold the lock with other readers for the block (waits while a writer holds it)."""
        fd = self._open()
        mine: Path | None = None
        mine_fd: int | None = None
        try:
            got = self._wait(fd, fcntl.LOCK_SH, "shared", wait_s, lambda: self.writer(fd), log)
            mine, mine_fd = self._announce(_info(info))
            yield got
        finally:
            if mine is not None:
                with contextlib.suppress(OSError):
                    mine.unlink()
            if mine_fd is not None:
                os.close(mine_fd)
            os.close(fd)

    def _announce(self, info: dict[str, Any]) -> tuple[Path, int]:
        """This reader's file, locked before it gets its final name (so it is never taken for a dead one)."""
        self.readers_dir.mkdir(parents=True, exist_ok=True)
        token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp = self.readers_dir / f".{token}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, (json.dumps(info, sort_keys=True) + "\n").encode())
            final = self.readers_dir / f"{token}.json"
            os.rename(tmp, final)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return final, fd


def _read_json(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8", errors="replace").strip()
        data = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
