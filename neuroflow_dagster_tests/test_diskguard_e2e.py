"""The disk guard end to end through a real `dagster dev`: a queued run waits for space, then runs.

Real parts: the Dagster daemon (discovery, the disk_guard sensor, automation,
the run queue with the project's pools at run granularity), a 16 MB tmpfs as
`paths.derivatives` whose space a ballast file really takes, HeudiConv +
dcm2niix, a local HTTP server as the Slack webhook (test_alerts.py), and the
installed `neuroflow` command. Nothing is launched by hand: the test writes
a session folder, takes the space away and gives it back.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from http.server import ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

from neuroflow_dagster_tests.daemon_harness import dagster_dev, materialized, wait_for
from neuroflow_dagster_tests.small_fs import MB, fill, small_filesystem
from neuroflow_dagster_tests.test_alerts import WEBHOOK_ENV, webhook, webhook_url  # noqa: F401 - webhook: a fixture
from neuroflow_dagster_tests.test_daemon_e2e import drop, run_cli
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

pytestmark = pytest.mark.slow

GB = 1024**3
STAGES = ("bids_conversion", "qsiprep", "qsirecon", "qsiparc")


def pool_limits(instance: dg.DagsterInstance) -> dict[str, int]:
    return {p: instance.event_log_storage.get_concurrency_info(p).slot_count for p in STAGES}


def conversion_runs(instance: dg.DagsterInstance, status: dg.DagsterRunStatus) -> list[dg.DagsterRun]:
    return list(instance.get_runs(dg.RunsFilter(statuses=[status], tags={"neuroflow/stage": "bids_conversion"})))


def alerts(server: ThreadingHTTPServer) -> list[str]:
    return [json.loads(p["body"])["text"] for p in server.posts]  # type: ignore[attr-defined]


def test_a_queued_run_waits_while_the_disk_is_low_and_runs_when_space_returns(
    tmp_path: Path, webhook: ThreadingHTTPServer  # noqa: F811
) -> None:
    with small_filesystem(tmp_path / "ws" / "derivatives", size_mb=16) as derivatives:
        config = make_workspace(
            tmp_path / "ws",
            mapping={"20240115_1430": "SUBJ_A"},
            overrides={
                "discovery": {"stability_wait_minutes": 0, "interval_seconds": 5},
                "disk": {"min_free_gb": 0, "per_path": {"derivatives": 8 * MB / GB}, "interval_seconds": 5},
                "alerts": {"slack": {"webhook_url_env": WEBHOOK_ENV}},
            },
        )
        ballast = fill(derivatives, leave_bytes=2 * MB)
        drop(config.paths.dicom_incoming, "20240115_1430", 1, datetime(2024, 1, 15, 14, 30))
        home = tmp_path / "home"
        with dagster_dev(config.source, home, extra_env={WEBHOOK_ENV: webhook_url(webhook)}) as dev:
            instance = dg.DagsterInstance.from_config(str(home))
            wait_for("the disk guard's alert", lambda: alerts(webhook), timeout=240, log=dev["log"])
            assert "disk space low" in alerts(webhook)[0] and str(derivatives) in alerts(webhook)[0]
            queued = wait_for(
                "automation to queue the conversion",
                lambda: conversion_runs(instance, dg.DagsterRunStatus.QUEUED),
                timeout=300,
                log=dev["log"],
            )
            assert pool_limits(instance) == dict.fromkeys(STAGES, 0)
            status = run_cli(["--config", str(config.source), "status", "--format", "json",
                              "--dagster-home", str(home)])
            guard = status["disk_guard"]
            assert guard["holding"] is True and guard["message"].startswith("disk guard: holding new runs:")
            row = status["sessions"][0]  # the state model: queued while the guard holds = held (disk_guard)
            assert (row["bids_conversion"], row["why"]["bids_conversion"]["cause"]) == ("held", "disk_guard")
            # The queue daemon dequeues every few seconds and the guard ticks every 5 s: half a minute later
            # the run is still waiting, nothing converted, and no second alert was sent.
            time.sleep(30)
            assert [r.run_id for r in conversion_runs(instance, dg.DagsterRunStatus.QUEUED)] == [queued[0].run_id]
            assert "01|SUBJA" not in materialized(instance, "bids_session")
            assert len(alerts(webhook)) == 1

            ballast.unlink()  # space is back
            wait_for(
                "the waiting conversion to run and materialize",
                lambda: "01|SUBJA" in materialized(instance, "bids_session"),
                timeout=300,
                log=dev["log"],
            )
            record = instance.get_run_record_by_id(queued[0].run_id)
            assert record is not None and record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
            assert pool_limits(instance) == {"bids_conversion": 4, "qsiprep": 1, "qsirecon": 2, "qsiparc": 4}
            wait_for("the recovery alert", lambda: len(alerts(webhook)) >= 2, timeout=60, log=dev["log"])
            assert "disk space back" in alerts(webhook)[1]
