"""The asset graph as the daemon, the UI and backfills see it: serialized, then read back.

A snapshot test (as dagster-open-platform keeps them): the golden file lists
every asset, its partitions, its parents with the partition mapping that
survives serialization, its pool, group, the automation sensor(s) that
launch it, and checks. A change to the graph shows up as a diff of that file; refresh it
with NEUROFLOW_UPDATE_SNAPSHOTS=1 after reviewing the change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster_shared.serdes import deserialize_value, serialize_value

from neuroflow_dagster.config import ConfigError
from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


def serialized_graph(defs: dg.Definitions) -> dict[str, Any]:
    repo = defs.get_repository_def()
    snap = deserialize_value(serialize_value(RepositorySnap.from_def(repo)), RepositorySnap)
    asset_graph = defs.resolve_asset_graph()
    launched_by: dict[str, list[str]] = {}
    for sensor in snap.sensors:
        if sensor.name.startswith("automation_") and sensor.asset_selection is not None:
            for key in sensor.asset_selection.resolve(asset_graph):
                launched_by.setdefault(key.to_user_string(), []).append(sensor.name)
    graph: dict[str, Any] = {}
    for node in sorted(snap.asset_nodes, key=lambda n: n.asset_key.to_user_string()):
        partitions = node.partitions
        graph[node.asset_key.to_user_string()] = {
            "group": node.group_name,
            "partitions": type(partitions).__name__ if partitions else None,
            "parents": {
                edge.parent_asset_key.to_user_string(): type(edge.partition_mapping).__name__
                if edge.partition_mapping
                else "default (identity)"
                for edge in node.parent_edges
            },
            "pools": sorted(node.pools or []),
            "executable": node.execution_type.value,
            "automation": sorted(launched_by.get(node.asset_key.to_user_string(), [])),
            "condition": node.automation_condition.get_label() if node.automation_condition else None,
        }
    checks = sorted(
        f"{c.asset_key.to_user_string()}:{c.name} (blocking={c.blocking})" for c in snap.asset_check_nodes or []
    )
    sensors = sorted(f"{s.name} ({s.default_status.value if s.default_status else 'default'})" for s in snap.sensors)
    descriptions = {s.name: s.description for s in snap.sensors}
    return {
        "assets": graph,
        "checks": checks,
        "sensors": sensors,
        "sensor_descriptions": descriptions,
        "jobs": sorted(j.name for j in snap.job_datas or []),
    }


@pytest.fixture(scope="module")
def defs(tmp_path_factory: pytest.TempPathFactory) -> dg.Definitions:
    return build_definitions(make_workspace(tmp_path_factory.mktemp("ws")))


def test_serialized_asset_graph_matches_the_snapshot(defs: dg.Definitions) -> None:
    graph = serialized_graph(defs)
    if os.environ.get("NEUROFLOW_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(graph, indent=2) + "\n")
    assert graph == json.loads(SNAPSHOT.read_text())


def test_subject_mappings_survive_serialization(defs: dg.Definitions) -> None:
    """The mapping limit from the findings: only built-in mappings reach the daemon's graph."""
    assets = serialized_graph(defs)["assets"]
    assert assets["qsiprep_subject"]["parents"] == {"bids_session": "MultiToSingleDimensionPartitionMapping"}
    assert assets["qsirecon_session"]["parents"]["qsiprep_subject"] == "MultiToSingleDimensionPartitionMapping"
    assert assets["image_qc_session"]["parents"] == {"qsiprep_subject": "MultiToSingleDimensionPartitionMapping"}
    assert set(assets) == {"dicom_session", "bids_session", "qsiprep_subject", "image_qc_session", "qsirecon_session",
                           "qsiparc_session"}


def test_definitions_validate_and_sensors_run_by_default(defs: dg.Definitions) -> None:
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    statuses = {s.name: s.default_status for s in repo.sensor_defs}
    assert statuses and all(v == dg.DefaultSensorStatus.RUNNING for v in statuses.values())


def test_a_broken_workspace_stops_loading_with_the_reason(tmp_path: Path) -> None:
    config = make_workspace(tmp_path)
    (tmp_path / "incoming").rmdir()
    with pytest.raises(ConfigError, match=r"paths\.dicom_incoming: .* does not exist"):
        build_definitions(config)


def test_cron_mode_changes_only_qsiprep(tmp_path: Path) -> None:
    """The trigger mode lives in the QSIPrep automation sensor (its behaviour: test_automation.py)."""
    eager = serialized_graph(build_definitions(make_workspace(tmp_path / "a")))
    cron = serialized_graph(
        build_definitions(make_workspace(tmp_path / "b", {"pipelines": {"qsiprep": {"trigger": "cron"}}}))
    )
    assert eager["assets"] == cron["assets"]
    before, after = eager["sensor_descriptions"], cron["sensor_descriptions"]
    assert {name for name in before if before[name] != after[name]} == {"automation_qsiprep"}
    assert "cron 0 2 */3 * *" in after["automation_qsiprep"]


def test_shipped_dagster_yaml_is_the_project_one() -> None:
    """`neuroflow demo` from an installed package copies templates/dagster.yaml: it must not drift."""
    root = Path(__file__).resolve().parent.parent
    assert (root / "neuroflow_dagster" / "templates" / "dagster.yaml").read_text() == (
        root / "dagster.yaml"
    ).read_text()
