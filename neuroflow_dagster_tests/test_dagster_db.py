"""`neuroflow status` reads Dagster's tables directly (control/dagster_db.py): is that still what Dagster says?

- The enum values the SQL names (event types, run and check statuses) equal Dagster's own enums: a
  Dagster upgrade that renames one fails here, not silently in status.
- On real instances holding every state status shows (materialized, planned-and-failed with a real
  failed run, queued and started runs, protocol check passed / failed with its reason, not applicable,
  a held pool), the direct reader's answers equal an oracle built from Dagster's public APIs: on the
  operator scenario's SQLite instance (test_operator_cli.py's `world`) and on a real PostgreSQL
  server, through `storage: postgres` and this project's pooled `storage: custom`.
- `neuroflow status` (json, table, --summary) never imports dagster (a subprocess's sys.modules).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.test_utils import create_run_for_test

from neuroflow_dagster import cli, stages
from neuroflow_dagster.control import dagster_db
from neuroflow_dagster.control.dagster_db import Db
from neuroflow_dagster.control.instance import open_db
from neuroflow_dagster.control.records import metadata_values
from neuroflow_dagster.control.status import load_views
from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.diskspace import held_pools
from neuroflow_dagster.stages import QC_ASSET, QC_CHECK
from neuroflow_dagster_tests.pg_server import PgServer, pg_database, postgres  # noqa: F401 (fixtures)
from neuroflow_dagster_tests.test_operator_cli import (  # noqa: F401 (world is a fixture)
    BIDS,
    QSIPARC,
    QSIPREP,
    QSIRECON,
    World,
    report,
    report_protocol,
    run_bids,
    world,
)
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

ASSETS = ["dicom_session", *(s.asset for s in stages.stages()), QC_ASSET]
CHECKS = [("dicom_session", "protocol"), (QC_ASSET, QC_CHECK)]


def report_qc(instance: dg.DagsterInstance, partition: str, passed: bool) -> None:
    """An image QC verdict (as the QC gate reports it: its state, summary and a measure in metadata)."""
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey(QC_ASSET),
            check_name=QC_CHECK,
            passed=passed,
            partition=partition,
            metadata={"neuroflow/qc": "passed" if passed else "failed", "qc_summary": "low SNR", "snr": 3.5,
                      "details": dg.MetadataValue.json({"b0": [1, 2]}), "none": None},
        )
    )


def test_names_match_dagsters_enums() -> None:
    assert dagster_db.ASSET_MATERIALIZATION == dg.DagsterEventType.ASSET_MATERIALIZATION.value
    assert dagster_db.ASSET_MATERIALIZATION_PLANNED == dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED.value
    assert dagster_db.STEP_FAILURE == dg.DagsterEventType.STEP_FAILURE.value
    assert dagster_db.RUN_FAILURE == dg.DagsterEventType.RUN_FAILURE.value
    run = dg.DagsterRunStatus
    in_progress = {s.value for s in (run.QUEUED, run.NOT_STARTED, run.STARTING, run.STARTED)}
    assert set(dagster_db.RUN_IN_PROGRESS) == in_progress
    assert set(dagster_db.RUN_RUNNING) == {run.STARTING.value, run.STARTED.value}
    assert set(dagster_db.RUN_FAILED) == {run.FAILURE.value, run.CANCELED.value, run.CANCELING.value}
    # Every status Dagster has is either in progress, failed, or one status treats as neither.
    neither = {s.value for s in run} - set(dagster_db.RUN_IN_PROGRESS) - set(dagster_db.RUN_FAILED)
    assert neither == {"SUCCESS", "MANAGED", "SUSPENDED"}
    assert dagster_db.CHECK_SUCCEEDED == AssetCheckExecutionRecordStatus.SUCCEEDED.value
    assert dagster_db.CHECK_FAILED == AssetCheckExecutionRecordStatus.FAILED.value
    for name in ("dicom_session", "a/b"):
        assert dagster_db.asset_key_string(name) == dg.AssetKey.from_user_string(name).to_string()


# --------------------------------------------------------------------------- the oracle: Dagster's own API


def oracle(instance: dg.DagsterInstance, pools: list[str]) -> dict[str, Any]:
    """What status needs, read through Dagster's public APIs (slow, per-row objects; the reference)."""
    out: dict[str, Any] = {"assets": {}}
    in_progress = [s.value for s in (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
                                     dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED)]  # fmt: skip
    storage = instance.event_log_storage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for asset in ASSETS:
            key = dg.AssetKey(asset)
            mats = dict(instance.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION))
            planned = dict(
                instance.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED)
            )
            attempts = storage.get_latest_asset_partition_materialization_attempts_without_materializations(key)
            full = instance.fetch_materializations(key, limit=10_000).records
            na = {
                r.partition_key
                for r in full
                if mats.get(r.partition_key) == r.storage_id
                and getattr(r.asset_materialization.metadata.get("neuroflow/status"), "value", "") == "not_applicable"
            }
            out["assets"][asset] = {
                "mats": mats,
                "planned": planned,
                "attempts": {p: [run_id, sid] for p, (run_id, sid) in attempts.items()},
                "na": sorted(na),
            }
        run_ids = {run_id for a in out["assets"].values() for run_id, _ in a["attempts"].values()}
        runs = instance.get_run_records(dg.RunsFilter(run_ids=sorted(run_ids))) if run_ids else []
        out["statuses"] = {r.dagster_run.run_id: r.dagster_run.status.value for r in runs}
        out["in_progress"] = sorted(
            (
                r.dagster_run.run_id,
                r.dagster_run.status.value,
                json.dumps(dict(r.dagster_run.tags), sort_keys=True),
                sorted(k.to_user_string() for k in r.dagster_run.asset_selection or ()),
                sorted([k.asset_key.to_user_string(), k.name] for k in r.dagster_run.asset_check_selection or ()),
            )
            for r in instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus(s) for s in in_progress]))
        )
        out["checks"] = {}
        for asset, name in CHECKS:
            check_key = dg.AssetCheckKey(dg.AssetKey(asset), name)
            checks = {
                str(i.partition_key): [i.latest_execution_status.value, "", {}]
                for i in storage.get_asset_check_partition_info([check_key])
                if i.partition_key
            }
            seen: set[str] = set()
            for rec in storage.get_asset_check_execution_history(check_key, limit=1000):  # newest first
                state = checks.get(str(rec.partition))
                if state and rec.partition not in seen and state[0] == "FAILED" and rec.evaluation is not None:
                    meta = metadata_values(rec.evaluation.metadata)
                    state[1:] = [rec.evaluation.description or meta.get("reason") or "", meta]
                seen.add(str(rec.partition))
            out["checks"][name] = checks
    out["held"] = held_pools(storage, pools)
    out["failures"] = {}
    for run_id, status in out["statuses"].items():
        if status != "FAILURE":
            continue
        steps = {}
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
            data = entry.dagster_event.step_failure_data
            user = data.user_failure_data
            meta = metadata_values(user.metadata if user else {})
            error = data.error.cause if data.error and data.error.cause and data.error.cls_name.endswith(
                "StepExecutionError") else data.error  # fmt: skip
            steps[entry.step_key] = [str(meta.get("neuroflow/failure_class") or ""), error.cls_name if error else ""]
        out["failures"][run_id] = steps
    out["reasons"] = {}
    for asset, found in out["assets"].items():
        mats = instance.fetch_materializations(dg.AssetKey(asset), limit=10_000).records
        out["reasons"][asset] = {str(r.partition_key): str(r.asset_materialization.metadata["reason"].value)
                                 for r in mats if r.partition_key in found["na"]
                                 and r.storage_id == found["mats"][r.partition_key]}  # fmt: skip
    return out


def direct(db: Db, pools: list[str]) -> dict[str, Any]:
    """The same, read by control/dagster_db.py."""
    out: dict[str, Any] = {"assets": {}}
    for asset in ASSETS:
        mats, planned = db.latest_ids(asset)
        attempts = db.open_attempts(asset, mats, planned)
        out["assets"][asset] = {
            "mats": mats,
            "planned": planned,
            "attempts": {p: [run_id, sid] for p, (run_id, sid) in attempts.items()},
            "na": sorted(db.not_applicable_partitions(asset, mats)),
        }
    run_ids = {run_id for a in out["assets"].values() for run_id, _ in a["attempts"].values()}
    out["statuses"] = db.run_statuses(run_ids)
    out["in_progress"] = sorted(
        (
            r.run_id,
            r.status,
            json.dumps(dict(r.tags), sort_keys=True),
            sorted(r.assets),
            sorted(list(c) for c in r.checks),
        )
        for r in db.in_progress_runs()
    )
    out["checks"] = {
        name: {p: [s.status, s.reason, s.metadata] for p, s in db.latest_check_states(asset, name).items()}
        for asset, name in CHECKS
    }
    out["held"] = db.held_pools(pools)
    failed = [r for r, status in out["statuses"].items() if status == "FAILURE"]
    out["failures"] = {
        run_id: {step: [f.failure_class, f.error_class] for step, f in found.steps.items()}
        for run_id, found in db.run_failures(failed, "neuroflow/failure_class").items()
    }
    out["reasons"] = {}
    for asset, found in out["assets"].items():
        meta = db.materialization_metadata(found["mats"][p] for p in found["na"])
        out["reasons"][asset] = {p: str(meta[found["mats"][p]]["reason"]) for p in found["na"]}
    return out


def assert_reader_agrees(instance: dg.DagsterInstance, home: Path) -> dict[str, Any]:
    pools = sorted({s.pool for s in stages.stages()})
    expected = oracle(instance, pools)
    # Every state is there (a scenario that lost one would make this comparison toothless).
    assert any(a["attempts"] for a in expected["assets"].values()), "no open attempt"
    assert "FAILURE" in expected["statuses"].values(), "no failed run"
    assert {r[1] for r in expected["in_progress"]} >= {"NOT_STARTED", "STARTED"}
    assert {s for s, _, _ in expected["checks"]["protocol"].values()} == {"SUCCEEDED", "FAILED"}
    assert [s for s, _, meta in expected["checks"][QC_CHECK].values() if meta.get("snr") == 3.5] == ["FAILED"]
    assert any(a["na"] for a in expected["assets"].values()) and expected["held"]
    assert any(steps for steps in expected["failures"].values()), "no step failure"
    assert any(r for r in expected["reasons"].values()), "no not-applicable reason"
    with open_db(home) as db:
        assert direct(db, pools) == expected
    with Db.from_instance(instance) as db:
        assert direct(db, pools) == expected
    return expected


# --------------------------------------------------------------------------- SQLite: the operator scenario


def test_direct_reader_agrees_with_dagster_on_sqlite(world: World) -> None:  # noqa: F811
    pools = sorted({s.pool for s in stages.stages()})
    world.instance.event_log_storage.set_concurrency_slots(pools[0], 0)  # the disk guard's hold
    report_qc(world.instance, "01|SUBJA", True)
    report_qc(world.instance, "02|SUBJA", False)
    try:
        assert_reader_agrees(world.instance, world.home)
    finally:
        world.instance.event_log_storage.set_concurrency_slots(pools[0], 1)


def test_status_command_does_not_import_dagster(world: World) -> None:  # noqa: F811
    """json, table and --summary in a fresh interpreter: `dagster` never enters sys.modules."""
    code = (
        "import sys, io, contextlib\n"
        "from neuroflow_dagster.cli import main\n"
        "for extra in (['--format', 'json'], ['--format', 'table'], ['--summary']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        f"        rc = main(['--config', {str(world.config_file)!r}, 'status', *extra,\n"
        f"                   '--dagster-home', {str(world.home)!r}])\n"
        "    assert rc == 0, (extra, rc)\n"
        "loaded = sorted(m for m in sys.modules if m == 'dagster' or m.startswith(('dagster.', 'dagster_')))\n"
        "print(loaded)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


# --------------------------------------------------------------------------- PostgreSQL (plain and pooled)


def pg_home(tmp_path: Path, storage: dict[str, Any]) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({"storage": storage, "telemetry": {"enabled": False}}))
    return home


def populate(instance: dg.DagsterInstance, defs: dg.Definitions, registry: Registry) -> None:
    """Every state status reads, on this instance (as the operator scenario builds them)."""
    instance.add_dynamic_partitions("subjects", ["SUBJA", "SUBJB", "SUBJC", "SUBJF"])
    instance.add_dynamic_partitions("session_labels", ["01", "02"])
    for scan_id, code in [("SCAN_A1", "SUBJA"), ("SCAN_A2", "SUBJA"), ("SCAN_B1", "SUBJB"), ("SCAN_F1", "SUBJF")]:
        registry.assign(scan_id, code)
    report_protocol(instance, "01|SUBJA", True, "protocol ok")
    report(instance, BIDS, "01|SUBJA")
    report(instance, QSIPREP, "SUBJA", **{"neuroflow/status": "done"})
    report(instance, QSIRECON, "01|SUBJA", **{"neuroflow/status": "done"})
    report(instance, QSIPARC, "01|SUBJA", **{"neuroflow/status": "not_applicable", "reason": "no recon"})
    report_protocol(instance, "02|SUBJA", True, "protocol ok")
    report(instance, BIDS, "02|SUBJA")
    report_protocol(instance, "01|SUBJB", False, "required scan T1w missing (0 series matched)")
    report_protocol(instance, "01|SUBJF", True, "protocol ok")
    for status, partition, asset, stage in [
        (dg.DagsterRunStatus.NOT_STARTED, "01|SUBJF", BIDS, "bids_conversion"),
        (dg.DagsterRunStatus.STARTED, "02|SUBJA", QSIRECON, "qsirecon"),
    ]:
        create_run_for_test(instance, job_name=f"{stage}_job", status=status, asset_selection=frozenset({asset}),
                            tags={"dagster/partition": partition, "neuroflow/stage": stage})  # fmt: skip
    assert not run_bids(defs, instance, "01|SUBJC").success  # refused: not registered yet -> a real failed run
    registry.assign("SCAN_C1", "SUBJC")
    report_qc(instance, "01|SUBJA", True)
    report_qc(instance, "02|SUBJA", False)
    instance.event_log_storage.set_concurrency_slots(sorted({s.pool for s in stages.stages()})[0], 0)


@pytest.mark.parametrize("kind", ["postgres", "pooled"])
def test_direct_reader_agrees_with_dagster_on_postgres(
    kind: str, pg_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    config = make_workspace(tmp_path / "ws")
    if kind == "postgres":
        storage: dict[str, Any] = {"postgres": {"postgres_url": pg_database}}
    else:
        storage = {"custom": {"module": "neuroflow_dagster.pooled_storage", "class": "PooledPostgresStorage",
                              "config": {"postgres_url": pg_database, "pool_size": 1, "max_overflow": 2}}}  # fmt: skip
    home = pg_home(tmp_path, storage)
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        populate(instance, build_definitions(config), Registry(config.paths.state))
        assert_reader_agrees(instance, home)
        # The command itself on this storage: the states the scenario made.
        with open_db(home) as db:
            views, checks, _ = load_views(db)
        assert views["bids_session"].failed and views["bids_session"].active == {"01|SUBJF": "queued"}
        assert checks["01|SUBJB"].status == "FAILED" and "T1w missing" in checks["01|SUBJB"].reason
        capsys.readouterr()
        argv = ["--config", str(config.source), "status", "--format", "json", "--dagster-home", str(home)]
        assert cli.main(argv) == 0
        rows = {r["partition"]: r for r in json.loads(capsys.readouterr().out)["sessions"]}
        assert rows["01|SUBJC"]["bids_conversion"] == "failed"
        assert rows["02|SUBJA"]["qsirecon"] == "running"
        # Queued while the disk guard holds the conversion pool (limit 0): held, with the cause.
        assert (rows["01|SUBJF"]["bids_conversion"], rows["01|SUBJF"]["why"]["bids_conversion"]["cause"]) == (
            "held", "disk_guard")  # fmt: skip
        assert rows["01|SUBJA"]["qsiparc"] == "not_applicable" and rows["01|SUBJB"]["protocol"] == "failed"
        assert rows["01|SUBJA"]["qc"] == "passed" and rows["02|SUBJA"]["qc"] == "FAILED"
        assert rows["02|SUBJA"]["note"].startswith("low SNR;")
