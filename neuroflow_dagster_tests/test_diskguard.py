"""The disk-space guard on a real small filesystem: measure, hold the pools, alert, refuse, clean up.

Real parts: a tmpfs of a few MB mounted for the test (small_fs.py) whose free
space is really taken by a ballast file; a real temporary Dagster instance
whose pool limits the guard sets; the project's own sensors, evaluated as the
daemon evaluates them; a local HTTP (Slack webhook) and SMTP server
(test_alerts.py); the real `bids_session` asset and a real process writing
until the kernel answers ENOSPC. The daemon's queue waiting on a held pool is
proven end to end in test_diskguard_e2e.py.
"""

from __future__ import annotations

import json
import socketserver
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from neuroflow_dagster import stages
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.defs import diskguard
from neuroflow_dagster.defs.execution import execute_spec, staging_for
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.diskspace import GB, DiskReport, FolderSpace, is_disk_full, measure
from neuroflow_dagster.tools import layout
from neuroflow_dagster.tools.publish import STAGING
from neuroflow_dagster.tools.spec import ToolSpec
from neuroflow_dagster_tests.small_fs import MB, fill, free_bytes, small_filesystem
from neuroflow_dagster_tests.test_alerts import (  # noqa: F401 - smtp_server and webhook are fixtures
    PASSWORD_ENV,
    USER_ENV,
    WEBHOOK_ENV,
    smtp_server,
    webhook,
    webhook_url,
)
from neuroflow_dagster_tests.test_sensor import sensor_for, tick
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

CONFIG_LIMITS = {"bids_conversion": 4, "qsiprep": 1, "qsirecon": 2, "qsiparc": 4}
FLOOR_GB = 8 * MB / GB  # 8 MB on a 16 MB filesystem
NO_RETRY = {"retry": {"max_retries": 0}}


def limits(instance: dg.DagsterInstance) -> dict[str, int]:
    storage = instance.event_log_storage
    return {s.pool: storage.get_concurrency_info(s.pool).slot_count for s in stages.stages()}


def run_pool_instance(home: Path) -> Any:
    """A real SQLite instance with the project's pool granularity (run), as dagster.yaml sets it."""
    home.mkdir(parents=True, exist_ok=True)
    return dg.instance_for_test(temp_dir=str(home), overrides={"concurrency": {"pools": {"granularity": "run"}}})


@pytest.fixture
def small_derivatives(tmp_path: Path) -> Any:
    with small_filesystem(tmp_path / "ws" / "derivatives", size_mb=16) as mount:
        yield mount


def guarded_workspace(tmp_path: Path, **alerts: Any) -> NeuroflowConfig:
    overrides: dict[str, Any] = {
        "disk": {"min_free_gb": 0, "per_path": {"derivatives": FLOOR_GB}, "interval_seconds": 5},
        "pipelines": dict.fromkeys(CONFIG_LIMITS, NO_RETRY),
    }
    if alerts:
        overrides["alerts"] = alerts
    return make_workspace(tmp_path / "ws", overrides=overrides, mapping={})


# --------------------------------------------------------------------------- measuring


def test_measure_reads_the_real_free_space_and_names_the_folder(tmp_path: Path, small_derivatives: Path) -> None:
    config = guarded_workspace(tmp_path)
    report = measure(config)
    assert report.low == [] and "disk guard: ok" in report.status_line(False)
    assert "derivatives" in report.status_line(False) and "work_dir" not in report.status_line(False)  # floor 0: off
    fill(small_derivatives, leave_bytes=2 * MB)
    report = measure(config)
    [low] = report.low
    assert low.key == "derivatives" and low.path == small_derivatives
    assert abs(low.free_bytes - free_bytes(small_derivatives)) < MB
    line = report.status_line(True)
    assert line.startswith(f"disk guard: holding new runs: {small_derivatives} has ")
    assert "MB free < 8.0 MB (derivatives)" in line


def test_hysteresis_holds_until_floor_plus_margin_and_off_switch() -> None:
    def report(free_gb: float) -> DiskReport:
        return DiskReport([FolderSpace("work_dir", Path("/w"), Path("/w"), int(free_gb * GB), 100 * GB, 20.0)])

    assert report(19.9).should_hold(holding=False) is True
    assert report(20.5).should_hold(holding=False) is False
    assert report(20.5).should_hold(holding=True) is True  # margin: 5 % of 20 GB = 1 GB
    assert "resumes at 21.0 GB" in report(20.5).status_line(True)
    assert report(21.0).should_hold(holding=True) is False
    off = DiskReport([FolderSpace("work_dir", Path("/w"), Path("/w"), 0, 100 * GB, 0.0)])
    assert off.should_hold(False) is False and off.status_line(False) == "disk guard: off (disk.min_free_gb is 0)"


def test_disk_full_is_recognised_from_errno_chain_and_tool_text() -> None:
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("publishing failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert is_disk_full("dcm2niix: Error: No space left on device")
    assert is_disk_full("OSError: [Errno 122] Disk quota exceeded")
    assert not is_disk_full("qsiprep failed with exit code 1") and not is_disk_full(None)


def test_disk_settings_are_validated_with_the_key_named(tmp_path: Path) -> None:
    from neuroflow_dagster.config import load_config
    from neuroflow_dagster.errors import ConfigError

    config = make_workspace(tmp_path / "ws", overrides={"disk": {"per_path": {"work_dir": 50}}})
    assert config.disk.per_path.work_dir == 50 and config.disk.per_path.derivatives is None
    with pytest.raises(ConfigError, match=r"disk\.min_free_gb: Input should be greater than or equal to 0"):
        load_config(config.source, environ={"NEUROFLOW_DISK__MIN_FREE_GB": "-1"})
    with pytest.raises(ConfigError, match=r"disk\.per_path\.scratch: unknown key"):
        load_config(config.source, environ={"NEUROFLOW_DISK__PER_PATH__SCRATCH": "5"})


# --------------------------------------------------------------------------- pools


def test_pools_are_held_while_low_and_given_back_and_discovery_does_not_undo_it(
    tmp_path: Path, small_derivatives: Path
) -> None:
    config = guarded_workspace(tmp_path)
    with run_pool_instance(tmp_path / "home") as instance:
        tick(sensor_for(config), instance, None)
        assert limits(instance) == CONFIG_LIMITS
        ballast = fill(small_derivatives, leave_bytes=2 * MB)
        decision, changed = diskguard.apply_pool_limits(instance, config)
        assert decision.hold and sorted(changed) == sorted(f"{p}=0" for p in CONFIG_LIMITS)
        assert limits(instance) == dict.fromkeys(CONFIG_LIMITS, 0)
        # The discovery sensor sets the pool limits on every tick: it must keep them held.
        tick(sensor_for(config), instance, None)
        assert limits(instance) == dict.fromkeys(CONFIG_LIMITS, 0)
        ballast.unlink()
        tick(sensor_for(config), instance, None)
        assert limits(instance) == CONFIG_LIMITS


def test_status_shows_the_guard_holding_and_why(
    tmp_path: Path, small_derivatives: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from neuroflow_dagster import cli

    config = guarded_workspace(tmp_path)
    home = tmp_path / "home"
    argv = ["--config", str(config.source), "status", "--dagster-home", str(home)]
    with run_pool_instance(home) as instance:
        assert cli.main(argv) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith("disk guard: ok: derivatives ")
        fill(small_derivatives, leave_bytes=2 * MB)
        assert cli.main(argv) == 0  # low, but the pools are not held yet (no guard tick since)
        assert "below the floor, new runs are refused and held at the next guard tick" in capsys.readouterr().out
        diskguard.apply_pool_limits(instance, config)
        assert cli.main(argv) == 0
        line = capsys.readouterr().out.splitlines()[-1]
        assert line.startswith(f"disk guard: holding new runs: {small_derivatives} has ")
        assert line.endswith("MB free < 8.0 MB (derivatives)")
        assert cli.main([*argv, "--format", "json"]) == 0
        view = json.loads(capsys.readouterr().out)["disk_guard"]
        assert view["holding"] is True and view["held_pools"] == sorted(CONFIG_LIMITS) and view["low"] is True
        assert [f["folder"] for f in view["folders"] if f["low"]] == ["derivatives"]


# --------------------------------------------------------------------------- the guard's sensor and alerts


def evaluate(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None) -> tuple[str, str | None]:
    """One tick as the daemon runs it: (skip message, the cursor it leaves)."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor)
    result = sensor(context)
    return str(getattr(result, "skip_message", result)), context.cursor


def test_guard_sensor_alerts_once_when_holding_and_once_when_space_returns(
    tmp_path: Path,
    small_derivatives: Path,
    webhook: ThreadingHTTPServer,  # noqa: F811
    smtp_server: socketserver.ThreadingTCPServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(WEBHOOK_ENV, webhook_url(webhook))
    monkeypatch.setenv(USER_ENV, "alerts@example.org")
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    config = guarded_workspace(
        tmp_path,
        slack={"webhook_url_env": WEBHOOK_ENV},
        email={"smtp_host": "127.0.0.1", "smtp_port": smtp_server.server_address[1], "sender": "nf@example.org",
               "recipients": ["mri@example.org"], "username_env": USER_ENV, "password_env": PASSWORD_ENV},
    )
    sensor = diskguard.build_disk_guard_sensor(config)
    with run_pool_instance(tmp_path / "home") as instance:
        message, cursor = evaluate(sensor, instance, None)
        assert message.startswith("disk guard: ok") and webhook.posts == []  # type: ignore[attr-defined]
        ballast = fill(small_derivatives, leave_bytes=2 * MB)
        message, cursor = evaluate(sensor, instance, cursor)
        assert message.startswith("disk guard: holding new runs")
        assert limits(instance) == dict.fromkeys(CONFIG_LIMITS, 0)
        evaluate(sensor, instance, cursor)  # still low: no second alert
        posts = [json.loads(p["body"])["text"] for p in webhook.posts]  # type: ignore[attr-defined]
        assert len(posts) == 1 and len(smtp_server.messages) == 1  # type: ignore[attr-defined]
        assert "disk space low" in posts[0] and str(small_derivatives) in posts[0] and "MB free" in posts[0]
        assert "holding new runs" in smtp_server.messages[0]["message"]["Subject"]  # type: ignore[attr-defined]
        ballast.unlink()
        message, cursor = evaluate(sensor, instance, cursor)
        evaluate(sensor, instance, cursor)
        posts = [json.loads(p["body"])["text"] for p in webhook.posts]  # type: ignore[attr-defined]
        assert len(posts) == 2 and "disk space back" in posts[1] and limits(instance) == CONFIG_LIMITS


def test_an_undelivered_alert_fails_the_tick_and_is_sent_on_the_next(
    tmp_path: Path, small_derivatives: Path, webhook: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setenv(WEBHOOK_ENV, webhook_url(webhook))
    config = guarded_workspace(tmp_path, slack={"webhook_url_env": WEBHOOK_ENV})
    sensor = diskguard.build_disk_guard_sensor(config)
    with run_pool_instance(tmp_path / "home") as instance:
        fill(small_derivatives, leave_bytes=2 * MB)
        webhook.status = 500  # type: ignore[attr-defined]
        with pytest.raises(Exception, match="not delivered"):
            evaluate(sensor, instance, None)
        assert limits(instance) == dict.fromkeys(CONFIG_LIMITS, 0)  # held all the same
        webhook.status = 200  # type: ignore[attr-defined]
        _, cursor = evaluate(sensor, instance, None)
        assert json.loads(cursor or "{}") == {"holding": True}
        assert len(webhook.posts) == 2  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- inside a run


def test_a_run_started_past_the_queue_refuses_before_writing_anything(tmp_path: Path) -> None:
    """In-process execution bypasses the queue: the stage itself refuses, class resource, nothing written."""
    with small_filesystem(tmp_path / "ws" / "work", size_mb=16) as work:
        config = make_workspace(
            tmp_path / "ws",
            overrides={"disk": {"min_free_gb": FLOOR_GB}, "pipelines": {"bids_conversion": NO_RETRY}},
        )
        Registry(config.paths.state).assign("SCAN_A1", "SUBJA", dicom_path=tmp_path / "nowhere")
        fill(work, leave_bytes=2 * MB)
        before = sorted(p.name for p in work.iterdir())
        with run_pool_instance(tmp_path / "home") as instance:
            instance.add_dynamic_partitions("subjects", ["SUBJA"])
            instance.add_dynamic_partitions("session_labels", ["01"])
            result = build_definitions(config).resolve_job_def("bids_conversion_job").execute_in_process(
                instance=instance, partition_key="01|SUBJA", raise_on_error=False
            )
        assert not result.success
        [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        user = failure.step_failure_data.user_failure_data
        assert user.metadata["neuroflow/failure_class"].value == "resource"
        assert f"{work} has " in user.description and "(work_dir)" in user.description
        assert "nothing was written" in user.description
        assert sorted(p.name for p in work.iterdir()) == before  # no bids_staging, no work folder
        assert not any(config.paths.bids_root.rglob("sub-*")) and not any(config.paths.log_dir.rglob("*.log"))


FILL_UNTIL_FULL = (
    "import pathlib, sys\n"
    "out = pathlib.Path(sys.argv[1]) / 'sub-A/ses-01'; out.mkdir(parents=True)\n"
    "(out / 'first.tsv').write_text('written before the disk filled')\n"
    "with open(out / 'big.nii', 'wb') as fh:\n"
    "    while True:\n"
    "        fh.write(b'x' * 65536); fh.flush()\n"
)


def test_a_run_that_fills_the_disk_deletes_its_staging_and_publishes_nothing(tmp_path: Path) -> None:
    """A real process writes until the kernel says ENOSPC; the space it took is given back at once."""
    with small_filesystem(tmp_path / "derivatives", size_mb=8) as derivatives:
        config = make_workspace(tmp_path / "ws", overrides={
            "paths": {"derivatives": str(derivatives)}, "disk": {"min_free_gb": 0},
            "pipelines": {"qsiparc": {"runtime": "local", "retry": {"max_retries": 0}}},
        })
        target = layout.qsiparc_dir(config)
        (target / "sub-A/ses-01").mkdir(parents=True)
        (target / "sub-A/ses-01/good.tsv").write_text("previous good")
        free_before = free_bytes(derivatives)

        @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["01|A"]))
        def parc(context) -> None:  # unannotated: Dagster checks the annotation, which postponed evaluation hides
            staging = staging_for(context, target)
            spec = ToolSpec(tool="qsiparc", argv=(sys.executable, "-c", FILL_UNTIL_FULL, str(staging)),
                            output_dir=staging, outputs=("sub-A/ses-01/*.tsv",),
                            **layout.publish_plan(staging, target, ["sub-A/ses-01"]))
            execute_spec(context, config, "qsiparc", spec)

        result = dg.materialize([parc], partition_key="01|A", raise_on_error=False)
        assert not result.success
        [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        user = failure.step_failure_data.user_failure_data
        assert user.metadata["neuroflow/failure_class"].value == "resource"
        assert "the disk is full: staging folder" in user.description
        assert "deleted to free the space" in user.description
        assert "partial outputs kept" not in user.description
        assert list((target / STAGING).glob("01_A.*")) == []
        assert (target / "sub-A/ses-01/good.tsv").read_text() == "previous good"
        assert sorted(p.name for p in (target / "sub-A/ses-01").iterdir()) == ["good.tsv"]
        assert free_bytes(derivatives) > free_before - MB  # the space is free again


def test_a_conversion_that_fills_the_disk_leaves_no_staging_and_no_session(tmp_path: Path) -> None:
    """Real HeudiConv + dcm2niix converting into a work folder too small for the session (ENOSPC)."""
    from neuroflow_dagster.demo import synth

    with small_filesystem(tmp_path / "ws" / "work", size_mb=1) as work:
        config = make_workspace(
            tmp_path / "ws",
            mapping={"20240115_1430": "SUBJ_A"},
            overrides={"disk": {"min_free_gb": 0}, "pipelines": {"bids_conversion": NO_RETRY}},
        )
        synth.write_session(config.paths.dicom_incoming / "20240115_1430", seed=1, n_directions=12)
        fill(work, leave_bytes=16 * 1024)  # HeudiConv runs out of space part-way (the session needs ~100 KB)
        with run_pool_instance(tmp_path / "home") as instance:
            tick(sensor_for(config), instance, None)
            result = build_definitions(config).resolve_job_def("bids_conversion_job").execute_in_process(
                instance=instance, partition_key="01|SUBJA", raise_on_error=False
            )
        assert not result.success
        [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        user = failure.step_failure_data.user_failure_data
        assert user.metadata["neuroflow/failure_class"].value == "resource", user.description
        assert "No space left on device" in user.description + str(user.metadata.get("log_tail"))
        assert sorted(p.name for p in work.iterdir()) == ["ballast.bin", "bids_staging"]
        assert list((work / "bids_staging").iterdir()) == []  # the half-converted session is gone
        assert not (config.paths.bids_root / "sub-SUBJA").exists()
