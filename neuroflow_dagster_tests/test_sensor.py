"""The discovery sensor as Dagster sees it: partitions, dicom_session events, protocol checks, cursor.

Calling a sensor function returns its SensorResult without applying it, so
`tick()` applies it to a real (temporary, SQLite) Dagster instance the way
the daemon does: asset events, then partition requests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.defs.assets.common import session_context
from neuroflow_dagster.defs.assets.dicom import dicom_protocol_check, dicom_session
from neuroflow_dagster.defs.graph import DICOM_KEY as DICOM
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.defs.sensors import build_discovery_sensor, decode_cursor, protocol_check_job
from neuroflow_dagster.discovery.engine import encode_cursor
from neuroflow_dagster.discovery.exclusions import exclude
from neuroflow_dagster.discovery.status_report import read_status_report
from neuroflow_dagster.stages import PROTOCOL_CHECK
from neuroflow_dagster_tests.discovery_fixtures import make_session, write_corrupt
from neuroflow_dagster_tests.workspace_fixtures import make_workspace, write_mapping


def tick(
    sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None, run_checks: bool = True
) -> dg.SensorResult:
    """One tick applied as the daemon does: events, partitions, then the requested check runs."""
    result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor))
    assert isinstance(result, dg.SensorResult)
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    if run_checks and result.run_requests:
        defs = dg.Definitions(
            assets=[dicom_session],
            asset_checks=[dicom_protocol_check],
            jobs=[protocol_check_job],
            resources={"neuroflow": NeuroflowResource(config_file=CONFIG_FILES[id(sensor)])},
        )
        job = defs.resolve_job_def("dicom_protocol_check")
        for request in result.run_requests:
            job.execute_in_process(instance=instance, tags=request.tags, raise_on_error=False)
    return result


CONFIG_FILES: dict[int, str] = {}


def sensor_for(config: Any) -> dg.SensorDefinition:
    sensor = build_discovery_sensor(config)
    CONFIG_FILES[id(sensor)] = str(config.source)
    return sensor


def materialized_partitions(instance: dg.DagsterInstance) -> set[str]:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=DICOM), limit=1000).records
    return {r.partition_key for r in records if r.partition_key}


def check_results(instance: dg.DagsterInstance) -> dict[str, tuple[bool, str]]:
    key = dg.AssetCheckKey(DICOM, PROTOCOL_CHECK)
    out = {}
    for record in instance.event_log_storage.get_asset_check_execution_history(key, limit=1000):
        evaluation = record.event.dagster_event.event_specific_data  # type: ignore[union-attr]
        if evaluation.partition not in out:  # newest first
            out[evaluation.partition] = (evaluation.passed, evaluation.description)
    return out


@pytest.fixture
def workspace(tmp_path: Path) -> Any:
    config = make_workspace(tmp_path, mapping={"20240115_1430": "CLM_L_01", "20240301_0900": "75"})
    return config


def test_new_folders_become_partitions_events_and_checks(workspace: Any) -> None:
    incoming = workspace.paths.dicom_incoming
    make_session(incoming, "20240115_1430", [("T1_MPRAGE", 12), ("ep2d_DTI", 14)])
    make_session(incoming, "20240301_0900", [("T1_MPRAGE", 4)])  # too few files: invalid
    make_session(incoming, "20240501_1200", [("T1_MPRAGE", 12)])  # not in the mapping
    sensor = sensor_for(workspace)
    with dg.instance_for_test() as instance:
        first = tick(sensor, instance, None)
        assert sorted(instance.get_dynamic_partitions("subjects")) == ["0075", "CLML01"]
        assert instance.get_dynamic_partitions("session_labels") == ["01"]
        assert materialized_partitions(instance) == {"01|0075", "01|CLML01"}
        # New sessions: the protocol verdict is reported with the registration, no check run (issue 12).
        assert not first.run_requests
        reported = [e for e in first.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
        assert sorted((e.partition, e.passed) for e in reported) == [("01|0075", False), ("01|CLML01", True)]
        mats = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=DICOM), limit=10).records
        meta = {r.partition_key: r.asset_materialization.metadata for r in mats}  # type: ignore[union-attr]
        assert meta["01|CLML01"]["scan_id"].value == "20240115_1430"
        assert meta["01|CLML01"]["recruitment_id"].value == "CLM_L_01"
        assert meta["01|CLML01"]["n_dicom_files"].value == 26
        assert "ep2d_DTI" in meta["01|CLML01"]["series"].value

        second = tick(sensor, instance, first.cursor)
        assert not second.run_requests
        assert check_results(instance) == {
            "01|CLML01": (True, "Session valid: 1 scan types found"),
            "01|0075": (False, "Session has 4 DICOM files (minimum: 10)"),
        }
        assert not [e for e in second.asset_events if isinstance(e, dg.AssetMaterialization)]
        held = read_status_report(workspace)["held"]
        assert [(h["scan_id"], h["reason"]) for h in held] == [("20240501_1200", "unmapped")]


def test_unmapped_then_mapped_is_registered_without_rereading_others(workspace: Any) -> None:
    incoming = workspace.paths.dicom_incoming
    make_session(incoming, "20240115_1430", [("T1_MPRAGE", 12)])
    make_session(incoming, "20240501_1200", [("T1_MPRAGE", 12)])
    sensor = sensor_for(workspace)
    with dg.instance_for_test() as instance:
        r1 = tick(sensor, instance, None)
        assert materialized_partitions(instance) == {"01|CLML01"}
        r2 = tick(sensor, instance, r1.cursor)
        write_mapping(workspace.mapping.csv_file, {"20240115_1430": "CLM_L_01", "20240501_1200": "CLM_L_01"})
        r3 = tick(sensor, instance, r2.cursor)
        assert materialized_partitions(instance) == {"01|CLML01", "02|CLML01"}
        new = [e for e in r3.asset_events if isinstance(e, dg.AssetMaterialization)]
        assert [e.partition for e in new] == ["02|CLML01"]
        assert check_results(instance)["02|CLML01"][0] is True


def test_invalid_then_fixed_is_rereported_and_rechecked(workspace: Any) -> None:
    incoming = workspace.paths.dicom_incoming
    folder = make_session(incoming, "20240301_0900", [("T1_MPRAGE", 4)])
    sensor = sensor_for(workspace)
    with dg.instance_for_test() as instance:
        r2 = tick(sensor, instance, None)
        assert check_results(instance)["01|0075"][0] is False
        make_session(folder.parent, folder.name, [("ep2d_DTI", 10)])  # the rest of the files arrive
        r3 = tick(sensor, instance, r2.cursor)
        assert [e.partition for e in r3.asset_events if isinstance(e, dg.AssetMaterialization)] == ["01|0075"]
        # A second verdict for the same partition cannot be reported (one runless execution per
        # partition): it comes from a run of the check.
        assert [r.tags["dagster/partition"] for r in r3.run_requests] == ["01|0075"]
        assert not [e for e in r3.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
        assert check_results(instance)["01|0075"] == (True, "Session valid: 1 scan types found")
        assert instance.get_dynamic_partitions("session_labels") == ["01"]  # same labels, not a new session


def test_corrupt_files_are_counted_and_all_corrupt_session_fails_its_check(workspace: Any) -> None:
    incoming = workspace.paths.dicom_incoming
    good = make_session(incoming, "20240115_1430", [("T1_MPRAGE", 12)])
    write_corrupt(good / "broken.dcm")
    bad = incoming / "20240301_0900"
    bad.mkdir()
    for i in range(5):
        write_corrupt(bad / f"x{i}.dcm")
    sensor = sensor_for(workspace)
    with dg.instance_for_test() as instance:
        tick(sensor, instance, None)
        mats = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=DICOM), limit=10).records
        meta = {r.partition_key: r.asset_materialization.metadata for r in mats}  # type: ignore[union-attr]
        assert meta["01|CLML01"]["n_unreadable_files"].value == 1
        assert meta["01|0075"]["n_unreadable_files"].value == 5
        passed, reason = check_results(instance)["01|0075"]
        assert not passed and reason == (
            "Session has 0 DICOM files (minimum: 10); 5 files are not readable DICOM (e.g. x0.dcm: not DICOM (no DICM "
            "preamble))"
        )


@pytest.mark.parametrize("name", ["scan 01", "scän_ü", "a|b", "c,d"])
def test_odd_folder_names_never_reach_partition_keys(tmp_path: Path, name: str) -> None:
    config = make_workspace(tmp_path, mapping={name: "S|1,x"})
    make_session(config.paths.dicom_incoming, name, [("T1_MPRAGE", 12)])
    sensor = sensor_for(config)
    with dg.instance_for_test() as instance:
        tick(sensor, instance, None)
        assert instance.get_dynamic_partitions("subjects") == ["S1x"]  # letters: never zero-padded
        assert materialized_partitions(instance) == {"01|S1x"}
        mats = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=DICOM), limit=1).records
        assert mats[0].asset_materialization.metadata["scan_id"].value == name  # type: ignore[union-attr]


def test_excluded_scan_is_held_with_its_reason(workspace: Any) -> None:
    make_session(workspace.paths.dicom_incoming, "20240115_1430", [("T1_MPRAGE", 12)])
    exclude(workspace, "20240115_1430", "withdrew consent")
    sensor = sensor_for(workspace)
    with dg.instance_for_test() as instance:
        tick(sensor, instance, None)
        assert materialized_partitions(instance) == set()
        assert read_status_report(workspace)["held"][0]["reason"] == "excluded"


def test_pool_limits_come_from_config(workspace: Any) -> None:
    sensor = sensor_for(workspace)
    with dg.instance_for_test() as instance:
        tick(sensor, instance, None)
        limits = {
            p: instance.event_log_storage.get_concurrency_info(p).slot_count
            for p in ("bids_conversion", "qsiprep", "qsirecon", "qsiparc")
        }
        assert limits == {"bids_conversion": 4, "qsiprep": 1, "qsirecon": 2, "qsiparc": 4}


def test_cursor_round_trip_and_garbage() -> None:
    data = {"v": 1, "engine": {"folders": {"x": [1, 2]}}, "pending_checks": []}
    assert decode_cursor(encode_cursor(data)) == data
    assert decode_cursor("znot-base64!") == {}
    assert decode_cursor('{"v": 99}') == {}


# --------------------------------------------------------------------------- faults and real-world input


def registered_events(result: dg.SensorResult) -> list[str]:
    return [str(e.partition) for e in result.asset_events if isinstance(e, dg.AssetMaterialization)]


def test_symlink_loop_in_incoming_does_not_stop_discovery(workspace: Any, capfd: pytest.CaptureFixture[str]) -> None:
    incoming = workspace.paths.dicom_incoming
    make_session(incoming, "20240115_1430", [("T1_MPRAGE", 12)])
    os.symlink("LOOP", incoming / "LOOP")  # ln -s LOOP incoming/LOOP
    sensor = sensor_for(workspace)
    with dg.instance_for_test() as instance:
        first = tick(sensor, instance, None)
        assert materialized_partitions(instance) == {"01|CLML01"}
        err = capfd.readouterr().err
        assert "nothing scanned" not in err
        assert "held 'LOOP' (unreadable): cannot be read: a symbolic link loop (ELOOP)" in err
        held = {h["scan_id"]: h for h in read_status_report(workspace)["held"]}
        assert held["LOOP"]["reason"] == "unreadable"
        # Later folders are still registered while the loop stays.
        make_session(incoming, "20240301_0900", [("T1_MPRAGE", 12)])
        second = tick(sensor, instance, first.cursor)
        assert registered_events(second) == ["01|0075"]
        assert "held 'LOOP'" not in capfd.readouterr().err  # logged when the held set changes, not every tick


def test_identity_conflict_is_held_logged_and_reported(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    config = make_workspace(tmp_path, mapping={"A": "CLM_L_01", "B": "CLML01"})
    make_session(config.paths.dicom_incoming, "A", [("T1_MPRAGE", 12)], acq_date="20240101")
    make_session(config.paths.dicom_incoming, "B", [("T1_MPRAGE", 12)], acq_date="20240201")
    sensor = sensor_for(config)
    with dg.instance_for_test() as instance:
        tick(sensor, instance, None)
        assert materialized_partitions(instance) == {"01|CLML01"}  # never 02|CLML01
        assert instance.get_dynamic_partitions("subjects") == ["CLML01"]
        err = capfd.readouterr().err
        assert "held 'B' (identity_conflict)" in err and "'CLM_L_01'" in err
        [held] = read_status_report(config)["held"]
        assert held["scan_id"] == "B" and "SubjectCode 'CLML01'" in held["message"]


def test_file_rewritten_in_place_is_rereported_and_rechecked(workspace: Any) -> None:
    """The rewrite check's path end to end: a new dicom_session materialization and a new check run."""
    incoming = workspace.paths.dicom_incoming
    folder = make_session(incoming, "20240115_1430", [("T1_MPRAGE", 12)])
    sensor = sensor_for(workspace)
    with dg.instance_for_test() as instance:
        first = tick(sensor, instance, None)
        assert check_results(instance)["01|CLML01"][0] is True
        # A PACS re-send rewrites ten files in place with a truncated export: same names, same folders.
        for victim in sorted((folder / "001_T1_MPRAGE").iterdir())[:10]:
            with open(victim, "r+b") as fh:
                fh.truncate(0)
                fh.write(b"not DICOM any more")
        second = tick(sensor, instance, first.cursor)
        assert registered_events(second) == ["01|CLML01"]
        assert check_results(instance)["01|CLML01"] == (False, "Session has 2 DICOM files (minimum: 10); 10 files are "
                                                        "not readable DICOM (e.g. 001_T1_MPRAGE/s001_i0001.dcm: not "
                                                        "DICOM (no DICM preamble))")  # fmt: skip
        assert instance.get_dynamic_partitions("session_labels") == ["01"]  # the same session, re-checked
        third = tick(sensor, instance, second.cursor)
        assert registered_events(third) == []


def test_remapped_session_is_held_and_refused_by_every_stage(workspace: Any) -> None:
    incoming = workspace.paths.dicom_incoming
    make_session(incoming, "20240115_1430", [("T1_MPRAGE", 12)])
    sensor = sensor_for(workspace)
    with dg.instance_for_test() as instance:
        first = tick(sensor, instance, None)
        write_mapping(workspace.mapping.csv_file, {"20240115_1430": "99", "20240301_0900": "75"})
        second = tick(sensor, instance, first.cursor)
        assert registered_events(second) == []
        [held] = read_status_report(workspace)["held"]
        assert (held["reason"], held["registered"], held["blocks"]) == ("remapped", "sub-CLML01 ses-01", True)
        with pytest.raises(dg.Failure) as refused:
            session_context(workspace, "01|CLML01")
        assert refused.value.metadata["neuroflow/failure_class"].value == "identity"
        assert "mapping" in refused.value.description and "SubjectCode '99'" in refused.value.description
        with pytest.raises(dg.Failure, match="identity is in question"):
            dg.materialize(
                [build_definitions(workspace).resolve_assets_def("qsiprep_subject")],
                instance=instance,
                partition_key="CLML01",
            )
        # The mapping fixed back: nothing held, the stages take it again.
        write_mapping(workspace.mapping.csv_file, {"20240115_1430": "CLM_L_01"})
        tick(sensor, instance, second.cursor)
        assert read_status_report(workspace)["held"] == []
        assert session_context(workspace, "01|CLML01").entry.scan_id == "20240115_1430"


def test_registered_folder_that_vanishes_is_reported(workspace: Any, tmp_path: Path) -> None:
    incoming = workspace.paths.dicom_incoming
    make_session(incoming, "20240115_1430", [("T1_MPRAGE", 12)])
    sensor = sensor_for(workspace)
    with dg.instance_for_test() as instance:
        first = tick(sensor, instance, None)
        (incoming / "20240115_1430").rename(tmp_path / "moved")
        second = tick(sensor, instance, first.cursor)
        [held] = read_status_report(workspace)["held"]
        assert (held["reason"], held["registered"]) == ("missing", "sub-CLML01 ses-01")
        (tmp_path / "moved").rename(incoming / "20240115_1430")
        third = tick(sensor, instance, second.cursor)
        assert registered_events(third) == [] and read_status_report(workspace)["held"] == []
