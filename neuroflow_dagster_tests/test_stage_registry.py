"""The stage registry is the one list of stages: a toy stage registered in stages.py shows up everywhere.

docs/architecture.md says a stage is its config section, its tool module, its
asset module and one registry entry. fakes/toy_stage.py is such a stage (no
tool), registered here for the duration of a test; the graph (serialized, as
the daemon sees it), the stage job, the automation sensor with its stage tag,
the pool limit, the failure alert, `neuroflow status`, `reprocess`, `logs` and
the CLI help must all know it without any other edit. Against a real
temporary Dagster instance; the toy asset is materialized by a real run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test

from neuroflow_dagster import cli, stages
from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.defs.alerts import alert_from_failure
from neuroflow_dagster.defs.graph import asset_key
from neuroflow_dagster.defs.sensors import ensure_pool_limits
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.errors import UsageError
from neuroflow_dagster.naming.tags import MAX_RUNTIME_TAG, PARTITION_TAG, STAGE_TAG
from neuroflow_dagster_tests.fakes.toy_stage import TOY, with_toy_section
from neuroflow_dagster_tests.test_definitions import serialized_graph
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

PARTITION = "01|SUBJA"


@pytest.fixture
def toy() -> Iterator[stages.Stage]:
    with stages.registered(TOY) as [record]:
        yield record
    assert "toyqc" not in stages.names()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def test_the_registry_lists_the_pipeline_in_order() -> None:
    assert stages.names() == ["bids_conversion", "qsiprep", "qsirecon", "qsiparc"]
    assert stages.stage("BIDS").name == "bids_conversion" and stages.by_asset("qsiprep_subject").per_subject
    with pytest.raises(UsageError, match="unknown stage 'mriqc'; accepted: bids_conversion, qsiprep"):
        stages.stage("mriqc")
    with pytest.raises(ValueError, match="already registered"):
        stages.register(stages.Stage("qsiprep", "other_asset", stages.SUBJECT, ("bids_conversion",), "m:f"))
    with pytest.raises(ValueError, match="register upstream stages first"):
        stages.register(stages.Stage("late", "late_session", stages.SESSION, ("nothing",), "m:f"))


def test_a_registered_stage_is_in_the_graph_jobs_sensors_pools_and_alerts(
    toy: stages.Stage, tmp_path: Path
) -> None:
    config = with_toy_section(make_workspace(tmp_path / "ws"))
    defs = build_definitions(config)
    graph = serialized_graph(defs)
    assert graph["assets"]["toyqc_session"]["parents"] == {"bids_session": "default (identity)"}
    assert graph["assets"]["toyqc_session"]["pools"] == ["toyqc"]
    assert "automation_toyqc (RUNNING)" in graph["sensors"] and "toyqc_job" in graph["jobs"]

    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def("automation_toyqc")
    assert repo.get_job("toyqc_job").tags[STAGE_TAG] == "toyqc"

    with dg.instance_for_test() as instance:
        # The toy stage has no rules of its own: it follows its upstream (FollowStage, eager-like).
        instance.add_dynamic_partitions("subjects", ["SUBJA"])
        instance.add_dynamic_partitions("session_labels", ["01"])
        assert not sensor(dg.build_sensor_context(instance=instance)).run_requests  # nothing converted yet
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key("bids_conversion"), partition=PARTITION))
        [request] = sensor(dg.build_sensor_context(instance=instance)).run_requests
        assert request.partition_key == PARTITION and request.asset_selection == [asset_key("toyqc")]
        assert request.tags[STAGE_TAG] == "toyqc" and int(request.tags[MAX_RUNTIME_TAG]) > 4 * 30 * 60

    with dg.instance_for_test() as instance:
        assert "toyqc=3" in ensure_pool_limits(instance, config)
        assert instance.event_log_storage.get_concurrency_info("toyqc").slot_count == 3
        run = create_run_for_test(instance, job_name="toyqc_job", tags={STAGE_TAG: "toyqc", PARTITION_TAG: PARTITION})
        alert = alert_from_failure(run, [], "the run failed")
        assert alert is not None and (alert.stage, alert.subject, alert.session) == ("toyqc", "SUBJA", "01")


def test_a_registered_stage_is_in_status_reprocess_logs_and_the_help(
    toy: stages.Stage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = with_toy_section(make_workspace(tmp_path / "ws"))
    defs = build_definitions(config)
    Registry(config.paths.state).assign("SCAN_A1", "SUBJA")
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        instance.add_dynamic_partitions("subjects", ["SUBJA"])
        instance.add_dynamic_partitions("session_labels", ["01"])
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key("bids_conversion"), partition=PARTITION))
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, asset_selection=[asset_key("toyqc")], partition_key=PARTITION,
            tags={STAGE_TAG: "toyqc"},
        )  # fmt: skip
        assert result.success

        base = ["--config", str(config.source)]
        code, out = run_cli(capsys, *base, "status", "--format", "json", "--dagster-home", str(home))
        report = json.loads(out)
        assert code == 0 and report["sessions"][0]["toyqc"] == "done" and report["totals"]["toyqc"] == {"done": 1}
        code, out = run_cli(capsys, *base, "status", "--stage", "toy", "--dagster-home", str(home))
        assert code == 0 and "TOYQC" in out and "toyqc: done 1" in out
        code, out = run_cli(capsys, *base, "reprocess", "--stage", "toyqc", "--all", "--dry-run")
        assert code == 0 and "toyqc (toyqc_session): would reprocess 1 partition(s)" in out and PARTITION in out

    log = config.paths.log_dir / "toyqc" / "01_SUBJA_20260101T000000_abcdefgh.log"
    log.parent.mkdir(parents=True)
    log.write_text("toy log line\n")
    code, out = run_cli(capsys, *base, "logs", "sub-SUBJA/ses-01", "--dagster-home", str(home))
    assert code == 0 and "toy log line" in out and "(toyqc)" in out

    for command in ("status", "reprocess"):
        code, out = run_cli(capsys, command, "--help")
        assert code == 0 and "toyqc (toy)" in out
