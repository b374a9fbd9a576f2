"""Runs a real `dagster dev` (webserver + daemon + code server) on a temporary DAGSTER_HOME.

Used where the daemon's own behaviour is the claim: sensors ticking by
themselves, automation over the serialized asset graph, the run queue's
limits. Nothing is triggered by hand in those tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dagster_dev(
    config_file: Path, home: Path, extra_env: dict[str, str] | None = None, dagster_yaml: Path | None = None
) -> Iterator[dict[str, Any]]:
    """Start `dagster dev` for the project's code location; yields {port, log, home}; always stops it."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dagster_yaml or REPO / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    log = home / "dagster-dev.log"
    env = dict(os.environ, DAGSTER_HOME=str(home), NEUROFLOW_CONFIG=str(config_file), **(extra_env or {}))
    dagster = Path(sys.executable).with_name("dagster")
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [str(dagster), "dev", "-m", "neuroflow_dagster.definitions", "-h", "127.0.0.1", "-p", str(port)],
            env=env,
            cwd=config_file.parent,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # Open nothing before the webserver answers: opening the SQLite instance while `dagster dev`
        # is still creating it can race with its schema migration.
        wait_for("the webserver", lambda: _answers(port) or proc.poll() is not None, timeout=180, log=log)
        if proc.poll() is not None:
            raise AssertionError(f"dagster dev exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        yield {"port": port, "log": log, "home": home, "proc": proc}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def wait_for(
    what: str, predicate: Callable[[], Any], timeout: float, log: Path | None = None, interval: float = 2.0
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    tail = log.read_text(errors="replace")[-6000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n--- dagster dev log tail ---\n{tail}")


def materialized(instance: dg.DagsterInstance, key: str) -> dict[str, int]:
    """partition -> number of materializations of asset `key`."""
    records = instance.fetch_materializations(dg.AssetKey(key), limit=10_000).records
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r.partition_key)] = counts.get(str(r.partition_key), 0) + 1
    return counts


def latest_metadata(instance: dg.DagsterInstance, key: str, partition: str) -> dict[str, Any]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition]), limit=1
    ).records
    if not records:
        return {}
    mat = records[0].asset_materialization
    return {k: getattr(v, "value", v) for k, v in (mat.metadata if mat else {}).items()}
