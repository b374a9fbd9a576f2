"""`image_qc_session` and its blocking `image_qc` check, executed by Dagster in-process.

The real definitions (build_definitions of a real workspace), the real asset job, a real
instance: a session whose QC table fails is recorded with each measure, level and threshold;
in the run that also selects reconstruction and parcellation, those steps are skipped (not
failed, not run); after an approval the check is a warning that names who approved it and
reconstruction runs (here it then refuses for want of real QSIPrep data, as a *tool* failure,
which shows it was attempted). Launched alone, reconstruction refuses an unapproved session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from neuroflow_dagster import stages
from neuroflow_dagster.control.status import collect_status
from neuroflow_dagster.control.summary import summary_rows
from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.defs import alerts
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.qc import approvals
from neuroflow_dagster_tests.test_qc_gate import write_session
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

QC, RECON, PARC = dg.AssetKey("image_qc_session"), dg.AssetKey("qsirecon_session"), dg.AssetKey("qsiparc_session")
CHECK = dg.AssetCheckKey(QC, "image_qc")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Any, dg.Definitions, dg.DagsterInstance]]:
    config = make_workspace(tmp_path / "ws")
    registry = Registry(config.paths.state)
    registry.assign("SCAN_GOOD", "75")
    registry.assign("SCAN_POOR", "75")
    write_session(config, "0075", "01", 0.95, 0)
    write_session(config, "0075", "02", 0.17, 39)
    figures = config.paths.derivatives / "qsiprep" / "sub-0075" / "figures"
    figures.mkdir()
    (figures / "sub-0075_ses-02_desc-carpetplot_dwi.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    for ses in ("01", "02"):  # converted DWI (recon checks for it before the gate)
        dwi = config.paths.bids_root / "sub-0075" / f"ses-{ses}" / "dwi"
        dwi.mkdir(parents=True)
        (dwi / f"sub-0075_ses-{ses}_dwi.nii.gz").write_bytes(b"")
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions("subjects", ["0075"])
        instance.add_dynamic_partitions("session_labels", ["01", "02", "03"])
        yield config, build_definitions(config), instance


def run(defs: dg.Definitions, instance: dg.DagsterInstance, partition: str,
        assets: list[dg.AssetKey]) -> dg.ExecuteInProcessResult:
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(instance=instance, asset_selection=assets, partition_key=partition,
                                  raise_on_error=False, tags={"neuroflow/stage": "qsirecon"})


def step_events(result: dg.ExecuteInProcessResult, step: str) -> list[str]:
    return [e.event_type_value for e in result.all_events if e.step_key == step]


def test_failing_qc_skips_recon_and_parcellation_in_its_run_until_approved(world: Any) -> None:
    config, defs, instance = world
    result = run(defs, instance, "02|0075", [QC, RECON, PARC])
    assert not result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    meta = {k: v.value for k, v in evaluation.metadata.items()}
    assert meta["neuroflow/qc"] == "failed"
    assert meta["raw_masked_neighbor_corr"] == pytest.approx(0.17)
    assert meta["raw_masked_neighbor_corr level"] == "failed"
    assert meta["raw_masked_neighbor_corr thresholds"] == "fail < 0.5, warn < 0.8"
    assert meta["raw_num_bad_slices"] == 39 and meta["raw_num_bad_slices thresholds"] == "fail > 5, warn > 0"
    assert "raw_masked_neighbor_corr 0.17 < 0.5" in evaluation.description
    # a study of two sessions: the fixed thresholds judge, and the reason says so (the cohort rule needs 20)
    assert evaluation.description.endswith("fewer than qc.cohort.min_sessions (20))")
    assert "(absolute thresholds: 0 other sessions of protocol unknown" in evaluation.description
    assert meta["raw_masked_neighbor_corr rule"] == "absolute"
    (mat,) = result.asset_materializations_for_node("image_qc_session")
    assert "data:image/svg+xml;base64," in mat.metadata["figures"].value
    assert mat.metadata["qc_table"].value.endswith("sub-0075_ses-02_space-ACPC_desc-image_qc.tsv")
    # recon and parcellation were skipped, never started
    assert "STEP_START" not in step_events(result, "qsirecon_session")
    assert "STEP_START" not in step_events(result, "qsiparc_session")

    # The failed run is a QC alert (class qc, the measures, the way out)
    dagster_run = instance.get_run_by_id(result.run_id)
    steps = instance.get_records_for_run(result.run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    alert = alerts.alert_from_failure(dagster_run, [r.event_log_entry.dagster_event for r in steps], "failed",
                                      evaluation.description)
    assert alert is not None and (alert.stage, alert.failure_class) == ("image QC", "qc")
    assert "sub-0075 ses-02" in alert.title() and "raw_num_bad_slices 39 > 5" in alert.text()
    assert "neuroflow qc approve '02|0075' --reason" in alert.text()

    # Launched alone (a UI materialization, `reprocess --stage qsirecon`): refused with the reason.
    alone = run(defs, instance, "02|0075", [RECON])
    failure = next(e for e in alone.all_events if e.event_type_value == "STEP_FAILURE")
    assert "failed image QC" in str(failure.event_specific_data.error.message)
    assert failure.event_specific_data.user_failure_data.metadata["neuroflow/failure_class"].value == "qc"

    status = collect_status(instance, config)
    row = next(r for r in status["sessions"] if r["scan_id"] == "SCAN_POOR")
    assert row["qc"] == "FAILED" and "raw_num_bad_slices 39 > 5" in row["note"]
    assert "neuroflow qc approve SCAN_POOR" in row["note"] and status["totals"]["qc"] == {"FAILED": 1}
    assert [r["scan_id"] for r in collect_status(instance, config, failed_only=True)["sessions"]] == ["SCAN_POOR"]
    summary = {r["stage"]: r for r in summary_rows(status["totals"], [s.name for s in stages.stages()])[0]}
    assert (summary["qc"]["total"], summary["qc"]["failed"]) == (1, 1)  # status --summary counts the gate

    approvals.approve(config, "SCAN_POOR", "0075", "02", "dropouts confined to 3 volumes", by="dr.who")
    assert next(r for r in collect_status(instance, config)["sessions"] if r["scan_id"] == "SCAN_POOR")["qc"] == \
        "approved"  # approved, its relaunch still to come
    after = run(defs, instance, "02|0075", [QC, RECON, PARC])
    (evaluation,) = after.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert "approved by dr.who at " in evaluation.description
    assert evaluation.metadata["neuroflow/qc"].value == "approved"
    assert "STEP_START" in step_events(after, "qsirecon_session")  # the gate let it through
    assert next(r for r in collect_status(instance, config)["sessions"] if r["scan_id"] == "SCAN_POOR")["qc"] == \
        "approved"


def test_passing_session_goes_on_and_a_session_without_qsiprep_is_not_applicable(world: Any) -> None:
    config, defs, instance = world
    result = run(defs, instance, "01|0075", [QC, RECON])
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.metadata["neuroflow/qc"].value == "passed"
    rows = {r["scan_id"]: r["qc"] for r in collect_status(instance, config)["sessions"]}
    assert rows == {"SCAN_GOOD": "passed", "SCAN_POOR": "-"}
    assert "STEP_START" in step_events(result, "qsirecon_session")
    Registry(config.paths.state).assign("SCAN_NODWI", "75")
    result = run(defs, instance, "03|0075", [QC])
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.metadata["neuroflow/qc"].value == "not_applicable"
    rows = {r["scan_id"]: r["qc"] for r in collect_status(instance, config)["sessions"]}
    assert rows["SCAN_NODWI"] == "-"  # nothing to judge: not shown as passed
