"""`neuroflow qc approve | revoke | list` on a real workspace (ScanID registry, QC tables on disk).

The relaunch is checked against a recorder that answers like Dagster's webserver (the mutation
itself is executed by Dagster's real GraphQL schema in test_operator_cli and, end to end, in
test_qc_gate_e2e.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuroflow_dagster import cli
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.qc import approvals
from neuroflow_dagster_tests.test_operator_cli import fake_webserver  # noqa: F401  (fixture)
from neuroflow_dagster_tests.test_qc_gate import write_session
from neuroflow_dagster_tests.workspace_fixtures import make_workspace


@pytest.fixture
def workspace(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = make_workspace(tmp_path / "ws")
    registry = Registry(config.paths.state)
    registry.assign("SCAN_GOOD", "75")
    registry.assign("SCAN_POOR", "75")
    write_session(config, "0075", "01", 0.95, 0)
    write_session(config, "0075", "02", 0.17, 39)
    return config


def run(capsys: pytest.CaptureFixture[str], config, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    code = cli.main(["--config", str(config.source), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_failing_then_approved(workspace, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, workspace, "qc", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["SUBJECT", "SESSION", "SCAN_ID", "QC"]
    assert lines[1].split()[:4] == ["0075", "02", "SCAN_POOR", "FAILED"]
    assert "raw_masked_neighbor_corr 0.17 < 0.5; raw_num_bad_slices 39 > 5" in lines[1]
    assert "SCAN_GOOD" not in out and "1 session(s) held by image QC, 0 approved" in out
    rows = json.loads(run(capsys, workspace, "qc", "list", "--all", "--format", "json")[1])
    assert {r["scan_id"]: r["qc"] for r in rows} == {"SCAN_GOOD": "passed", "SCAN_POOR": "FAILED"}
    assert {m["metric"]: m["level"] for m in rows[1]["metrics"]} == {
        "raw_masked_neighbor_corr": "failed", "raw_num_bad_slices": "failed"}

    code, out, err = run(capsys, workspace, "qc", "approve", "02|0075", "--reason", "dropouts in 3 of 30 volumes",
                         "--by", "dr.who", "--no-launch")
    assert code == 0, err
    assert "sub-0075 ses-02 (ScanID 'SCAN_POOR'): QC failed: raw_masked_neighbor_corr 0.17 < 0.5" in out
    assert "approved by dr.who at " in out and "not relaunched (--no-launch)" in out
    rows = json.loads(run(capsys, workspace, "qc", "list", "--format", "json")[1])
    assert [(r["scan_id"], r["qc"], r["approved_by"], r["reason"]) for r in rows] == [
        ("SCAN_POOR", "approved", "dr.who", "dropouts in 3 of 30 volumes")]
    code, out, _ = run(capsys, workspace, "qc", "revoke", "SCAN_POOR", "--reason", "second opinion")
    assert code == 0 and "withdrawn" in out
    assert json.loads(run(capsys, workspace, "qc", "list", "--format", "json")[1])[0]["qc"] == "FAILED"


def test_approve_refusals(workspace, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, workspace, "qc", "approve", "SCAN_POOR", "--reason", "  ", "--no-launch")
    assert code == 5 and "--reason must say" in err
    code, _, err = run(capsys, workspace, "qc", "approve", "SCAN_POOR", "--no-launch")
    assert code == 5 and "--reason" in err  # argparse: required
    code, _, err = run(capsys, workspace, "qc", "approve", "SCAN_GOOD", "--reason", "x", "--no-launch")
    assert code == 5 and "did not fail image QC (passed" in err
    code, _, err = run(capsys, workspace, "qc", "approve", "NOPE", "--reason", "x", "--no-launch")
    assert code == 5 and "'NOPE' is neither a registered ScanID" in err
    assert approvals.history(workspace) == []


def test_approve_relaunches_qc_recon_and_parcellation_as_one_backfill(
    workspace, capsys: pytest.CaptureFixture[str], fake_webserver  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    url = f"http://127.0.0.1:{fake_webserver.server_address[1]}"
    code, out, err = run(capsys, workspace, "qc", "approve", "sub-0075/ses-02", "--reason", "looked at it",
                         "--url", url)
    assert code == 0, err
    assert "relaunched image_qc_session, qsirecon_session, qsiparc_session for 02|0075: backfill abcdefgh" in out
    (body,) = fake_webserver.bodies
    params = body["variables"]["backfillParams"]
    assert params["assetSelection"] == [{"path": ["image_qc_session"]}, {"path": ["qsirecon_session"]},
                                         {"path": ["qsiparc_session"]}]
    assert params["partitionNames"] == ["02|0075"]
    assert params["tags"] == [{"key": "neuroflow/stage", "value": "qsirecon"}]
    assert approvals.approval_for(workspace, "SCAN_POOR") is not None


def test_approval_is_recorded_even_when_the_webserver_is_down(workspace, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, workspace, "qc", "approve", "SCAN_POOR", "--reason", "ok", "--url",
                       "http://127.0.0.1:9/graphql")
    assert code == 1 and "cannot reach the Dagster webserver" in err and "The approval is recorded" in err
    assert approvals.approval_for(workspace, "SCAN_POOR") is not None
