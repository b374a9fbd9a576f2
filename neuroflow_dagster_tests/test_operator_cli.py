"""The operator's CLI against real Dagster records: status, failures, reprocess/retry, exclude/include, logs.

One real temporary Dagster instance (SQLite, on disk, opened by the CLI from
its folder as in production) holds: sessions registered in the real ScanID
registry; materializations and `protocol` check evaluations reported as the
discovery sensor and the stages report them; real failed runs of the real
`bids_session` asset (refused partitions, and one real HeudiConv run on a
folder without DICOM); queued/running run records. The CLI is called
in-process through `neuroflow_dagster.cli.main` (one test goes through the
installed console script).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.test_utils import create_run_for_test

from neuroflow_dagster import cli
from neuroflow_dagster.config import NeuroflowConfig, load_config
from neuroflow_dagster.control.backfill import (
    LAUNCH_BACKFILL_MUTATION,
    BackfillError,
    backfill_variables,
    parse_launch_response,
)
from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.defs.assets.common import session_context
from neuroflow_dagster.discovery import engine
from neuroflow_dagster.discovery.exclusions import audit_trail, exclude
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.discovery.status_report import write_status_report
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

DICOM, BIDS = dg.AssetKey("dicom_session"), dg.AssetKey("bids_session")
QSIPREP, QSIRECON, QSIPARC = (
    dg.AssetKey("qsiprep_subject"),
    dg.AssetKey("qsirecon_session"),
    dg.AssetKey("qsiparc_session"),
)


@dataclass
class World:
    root: Path
    config: NeuroflowConfig
    config_file: Path
    home: Path
    instance: dg.DagsterInstance
    defs: dg.Definitions
    tool_failure_run: str
    refused_run: str

    def cli(self, capsys: pytest.CaptureFixture[str], *argv: str, home: bool = True) -> tuple[int, str, str]:
        """`neuroflow --config <ws> <argv...> [--dagster-home <home>]` in-process: (exit code, stdout, stderr)."""
        capsys.readouterr()
        extra = ["--dagster-home", str(self.home)] if home else []
        code = cli.main(["--config", str(self.config_file), *argv, *extra])
        out, err = capsys.readouterr()
        return code, out, err

    def json(self, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
        code, out, err = self.cli(capsys, *argv, "--format", "json", home=argv[0] != "reprocess")
        assert code == 0, err
        return json.loads(out)


def report(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str, **metadata: Any) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=partition, metadata=metadata))


def report_protocol(instance: dg.DagsterInstance, partition: str, passed: bool, reason: str) -> None:
    """The DICOM session event plus its `protocol` check evaluation, targeting that event (as the sensor's run does)."""
    report(instance, DICOM, partition)
    record = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=DICOM, asset_partitions=[partition]), limit=1
    ).records[0]
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(
            asset_key=DICOM,
            check_name="protocol",
            passed=passed,
            partition=partition,
            blocking=True,
            description=reason,
            metadata={"reason": reason},
            target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
                storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
            ),
        )
    )


def run_bids(world_defs: dg.Definitions, instance: dg.DagsterInstance, partition: str) -> dg.ExecuteInProcessResult:
    """The real bids_session asset, in-process, tagged like a stage run; failures are recorded, not raised."""
    job = world_defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance,
        asset_selection=[BIDS],
        partition_key=partition,
        raise_on_error=False,
        tags={"neuroflow/stage": "bids_conversion"},
    )


REFUSED_RECON = "validation error: sub-SUBJR ses-01 has 1 diffusion direction(s); the tensor model needs at least 6"


def recon_run(
    config: NeuroflowConfig, instance: dg.DagsterInstance, partition: str, *, recon_error: str | None = None
) -> dg.ExecuteInProcessResult:
    """The recon sensor's combined run, in-process: the real `image_qc_session` with its real blocking check
    (reading the session's QSIPrep QC table), then stand-ins with the real keys for reconstruction (refused
    with class `validation` when `recon_error` is given, as the stand-in refuses a 1-direction series) and
    parcellation, tagged as the sensor tags it."""
    from neuroflow_dagster.defs.assets.common import refuse
    from neuroflow_dagster.defs.assets.image_qc import build_image_qc_asset
    from neuroflow_dagster.defs.partitions import session_partitions
    from neuroflow_dagster.defs.resources import NeuroflowResource

    qc = build_image_qc_asset(config)

    @dg.asset(key=QSIRECON, partitions_def=session_partitions, deps=[qc.key])
    def recon_stand_in() -> dg.MaterializeResult:
        if recon_error:
            raise refuse(recon_error)
        return dg.MaterializeResult(metadata={"neuroflow/status": "done"})

    @dg.asset(key=QSIPARC, partitions_def=session_partitions, deps=[QSIRECON])
    def parc_stand_in() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"neuroflow/status": "done"})

    return dg.materialize(
        [qc, recon_stand_in, parc_stand_in], partition_key=partition, instance=instance, raise_on_error=False,
        resources={"neuroflow": NeuroflowResource(config_file=str(config.source))},
        tags={"neuroflow/stage": "qsirecon", "dagster/partition": partition},
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("operator")
    config = make_workspace(root / "ws")
    assert config.source is not None
    defs = build_definitions(config)
    registry = Registry(config.paths.state)
    for scan_id, code in [
        ("SCAN_A1", "SUBJA"),
        ("SCAN_A2", "SUBJA"),
        ("SCAN_B1", "SUBJB"),
        ("SCAN_D1", "SUBJD"),
        ("SCAN_F1", "SUBJF"),
    ]:
        registry.assign(scan_id, code)
    not_dicom = root / "ws" / "incoming" / "SCAN_E1"
    not_dicom.mkdir(parents=True)
    (not_dicom / "notes.txt").write_text("a scanner export that holds no DICOM file\n")
    registry.assign("SCAN_E1", "SUBJE", dicom_path=not_dicom)

    home = root / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        instance.add_dynamic_partitions("subjects", ["SUBJA", "SUBJB", "SUBJC", "SUBJD", "SUBJE", "SUBJF", "SUBJG"])
        instance.add_dynamic_partitions("session_labels", ["01", "02"])

        # SUBJA: session 01 went all the way (parcellation not applicable); 02 converted after QSIPrep.
        report_protocol(instance, "01|SUBJA", True, "protocol ok: T1w 176 files, DWI 1 series")
        report(instance, BIDS, "01|SUBJA")
        report(instance, QSIPREP, "SUBJA", **{"neuroflow/status": "done"})
        report(instance, QSIRECON, "01|SUBJA", **{"neuroflow/status": "done"})
        report(instance, QSIPARC, "01|SUBJA", **{"neuroflow/status": "not_applicable", "reason": "no recon"})
        report_protocol(instance, "02|SUBJA", True, "protocol ok")
        report(instance, BIDS, "02|SUBJA")
        # SUBJB: blocked by the protocol check.
        report_protocol(instance, "01|SUBJB", False, "required scan T1w missing (0 series matched)")
        # SUBJF: converting (queued); SUBJA 02's recon running.
        report_protocol(instance, "01|SUBJF", True, "protocol ok")
        for job, status, partition, asset, stage in [
            ("bids_conversion_job", dg.DagsterRunStatus.NOT_STARTED, "01|SUBJF", BIDS, "bids_conversion"),
            ("qsirecon_job", dg.DagsterRunStatus.STARTED, "02|SUBJA", QSIRECON, "qsirecon"),
        ]:
            create_run_for_test(
                instance,
                job_name=job,
                status=status,
                tags={"dagster/partition": partition, "neuroflow/stage": stage},
                asset_selection=frozenset({asset}),
            )
        # SUBJC: two real refused runs (the partition was not registered then), registered afterwards.
        refused = [run_bids(defs, instance, "01|SUBJC") for _ in range(2)]
        assert not any(r.success for r in refused)
        registry.assign("SCAN_C1", "SUBJC")
        # SUBJG: refused once, registered, then converted: no longer a failure.
        assert not run_bids(defs, instance, "01|SUBJG").success
        registry.assign("SCAN_G1", "SUBJG")
        report(instance, BIDS, "01|SUBJG")
        # SUBJE: a real HeudiConv run on a folder without DICOM: exits 0, writes nothing -> class "tool".
        tool_failure = run_bids(defs, instance, "01|SUBJE")
        assert not tool_failure.success
        # SUBJD: excluded by an operator.
        exclude(config, "SCAN_D1", "motion artefacts in every series")
        # SUBJA 01's DICOM folder changed and was re-registered: its BIDS is now stale.
        report(instance, DICOM, "01|SUBJA")

        # The states of the held and blocked kinds (the state model, neuroflow_dagster/states.py).
        from neuroflow_dagster.bids.verdicts import save_verdict
        from neuroflow_dagster_tests.test_qc_gate import write_session

        instance.add_dynamic_partitions("subjects", ["SUBJH", "SUBJR", "SUBJN", "SUBJI"])
        for scan_id, code in [("SCAN_H1", "SUBJH"), ("SCAN_R1", "SUBJR"), ("SCAN_N1", "SUBJN"), ("SCAN_I1", "SUBJI")]:
            registry.assign(scan_id, code)
            partition = f"01|{code}"
            report_protocol(instance, partition, True, "protocol ok")
            report(instance, BIDS, partition, bids_suffixes="dwi" if code == "SUBJN" else "T1w, dwi", scan_id=scan_id)
            save_verdict(config.paths.state, code, "01", True, "valid")  # what the conversion records
        # SUBJH fails image QC: the real QC asset's blocking check stops recon and parcellation in that run.
        # SUBJR passes QC and its reconstruction is refused: parcellation is skipped in the same run.
        for code, corr, bad in (("SUBJH", 0.128, 52), ("SUBJR", 0.95, 0)):
            report(instance, QSIPREP, code, **{"neuroflow/status": "done"})
            write_session(config, code, "01", corr, bad)
        assert not recon_run(config, instance, "01|SUBJH").success
        assert not recon_run(config, instance, "01|SUBJR", recon_error=REFUSED_RECON).success
        # The last discovery tick held three folders back (one of them the excluded, registered SCAN_D1).
        held = [
            engine.Held("SCAN_X", str(root / "ws" / "incoming" / "SCAN_X"), "unmapped", "no SubjectCode for SCAN_X"),
            engine.Held("SCAN_Y", str(root / "ws" / "incoming" / "SCAN_Y"), "unstable", "still being copied? 2 min"),
            engine.Held("SCAN_D1", str(root / "ws" / "incoming" / "SCAN_D1"), "excluded", "excluded by an operator"),
            # SUBJN has no T1w in any session: QSIPrep is held. SUBJI's ScanID is now mapped to another subject.
            engine.Held("SCAN_I1", str(root / "ws" / "incoming" / "SCAN_I1"), "remapped",
                        "ScanID 'SCAN_I1' is registered as sub-SUBJI ses-01 but the mapping now says SUBJZ",
                        registered="sub-SUBJI ses-01", blocks=True),
        ]
        write_status_report(config, engine.TickResult(held=held, mapping_source="csv"))
        yield World(root, config, Path(config.source), home, instance, defs, tool_failure.run_id, refused[-1].run_id)


# --------------------------------------------------------------------------- status


def test_status_json_states_per_stage(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """Every state of the state model, with its cause, on real records (neuroflow_dagster/states.py)."""
    data = world.json(capsys, "status")
    rows = {r["partition"]: r for r in data["sessions"]}
    stages = ["bids_conversion", "qsiprep", "qsirecon", "qsiparc"]

    def cells(partition: str) -> list[str]:
        """The cells as the table spells them: state (cause)."""
        row = rows[partition]
        return [f"{row[s]} ({row['why'][s]['cause']})" if row["why"].get(s, {}).get("cause") else row[s]
                for s in stages]  # fmt: skip

    assert list(rows) == [
        "01|SUBJA", "02|SUBJA", "01|SUBJB", "01|SUBJC", "01|SUBJD", "01|SUBJE", "01|SUBJF", "01|SUBJG",
        "01|SUBJH", "01|SUBJI", "01|SUBJN", "01|SUBJR",
    ]  # fmt: skip
    # bids waits (stale): its DICOM was re-registered after; qsiprep waits (stale): session 02 converted after it.
    assert cells("01|SUBJA") == ["waiting (stale)", "waiting (stale)", "done", "not_applicable"]
    assert rows["01|SUBJA"]["why"]["qsiparc"]["reason"] == "no recon"  # the reason recorded with it
    assert cells("02|SUBJA") == ["done", "waiting (stale)", "running", "waiting"]
    assert cells("01|SUBJB") == ["blocked (protocol)"] * 4
    assert rows["01|SUBJB"]["why"]["qsirecon"]["reason"].startswith("protocol failed: required scan T1w missing")
    assert cells("01|SUBJC") == ["failed (validation)"] + ["blocked (bids_conversion)"] * 3
    assert cells("01|SUBJD") == ["held (excluded)"] * 4
    assert rows["01|SUBJD"]["note"] == "excluded: motion artefacts in every series"
    assert cells("01|SUBJE") == ["failed (tool)"] + ["blocked (bids_conversion)"] * 3
    assert cells("01|SUBJF") == ["queued", "waiting", "waiting", "waiting"]
    assert cells("01|SUBJG") == ["done", "waiting", "waiting", "waiting"]  # failed once, converted since
    # Held by the image QC gate: its skipped recon and parcellation are not failures.
    assert cells("01|SUBJH") == ["done", "done", "held (qc)", "held (qc)"] and rows["01|SUBJH"]["qc"] == "FAILED"
    assert "raw_masked_neighbor_corr 0.128 < 0.5" in rows["01|SUBJH"]["why"]["qsirecon"]["reason"]
    assert cells("01|SUBJI") == ["held (identity)"] * 4
    assert cells("01|SUBJN") == ["done", "held (no_anat)", "held (no_anat)", "held (no_anat)"]
    assert rows["01|SUBJN"]["why"]["qsiprep"]["reason"].endswith("no T1w in any session")
    # The refused reconstruction is the failure; its parcellation, skipped in that run, is blocked by it.
    assert cells("01|SUBJR") == ["done", "done", "failed (validation)", "blocked (qsirecon)"]
    assert rows["01|SUBJR"]["why"]["qsirecon"]["reason"] == REFUSED_RECON

    assert rows["01|SUBJA"]["protocol"] == "passed"
    assert (rows["01|SUBJB"]["protocol"], rows["01|SUBJB"]["protocol_reason"]) == (
        "failed",
        "required scan T1w missing (0 series matched)",
    )
    assert rows["01|SUBJC"]["protocol"] == "unchecked"
    assert rows["01|SUBJA"]["scan_id"] == "SCAN_A1" and rows["01|SUBJA"]["mapping"] == "mapped (SUBJA)"

    # Held folders; the excluded SCAN_D1 is registered, so it is listed once, as a session.
    assert [(h["scan_id"], h["state"]) for h in data["held"]] == [
        ("SCAN_X", "unmapped"), ("SCAN_Y", "unstable"), ("SCAN_I1", "remapped")]  # fmt: skip
    totals = data["totals"]
    assert totals["sessions"] == 12 and totals["held"] == 3
    assert totals["held_by_reason"] == {"unmapped": 1, "unstable": 1, "remapped": 1}
    assert totals["bids_conversion"] == {"waiting": 1, "done": 5, "blocked": 1, "failed": 2, "held": 2, "queued": 1}
    # QSIPrep is one run per subject: SUBJA counted once.
    assert totals["qsiprep"] == {"waiting": 3, "blocked": 3, "held": 3, "done": 2}
    assert totals["causes"]["qsiparc"] == {
        "blocked (protocol)": 1, "blocked (bids_conversion)": 2, "held (excluded)": 1, "held (qc)": 1,
        "held (identity)": 1, "held (no_anat)": 1, "blocked (qsirecon)": 1}  # fmt: skip
    assert totals["protocol"] == {"passed": 7, "failed": 1, "unchecked": 4}
    assert set(totals) >= {"bids_conversion", "qsiprep", "qsirecon", "qsiparc", "qc", "causes"}


def test_status_disk_guard_holds_queued_runs(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """A run queued while the disk guard holds its stage's pool (limit 0) is held (disk_guard), not queued."""
    world.instance.event_log_storage.set_concurrency_slots("bids_conversion", 0)
    try:
        row = next(r for r in world.json(capsys, "status")["sessions"] if r["partition"] == "01|SUBJF")
        assert (row["bids_conversion"], row["why"]["bids_conversion"]["cause"]) == ("held", "disk_guard")
        code, out, _ = world.cli(capsys, "status", "--format", "csv")
        assert code == 0 and "held (disk_guard)" in out
    finally:
        world.instance.event_log_storage.set_concurrency_slots("bids_conversion", 4)
    row = next(r for r in world.json(capsys, "status")["sessions"] if r["partition"] == "01|SUBJF")
    assert row["bids_conversion"] == "queued"


def test_not_applicable_is_found_without_reading_every_event(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SQL lookup answers on SQLite; reading every materialization's metadata is only a fallback."""
    from neuroflow_dagster.control import records

    def no_full_read(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("with_metadata", True):
            raise AssertionError("read every materialization's metadata")
        return original(*args, **kwargs)

    original = records.latest_materializations
    parc, _ = records.latest_ids(world.instance, "qsiparc_session")
    recon, _ = records.latest_ids(world.instance, "qsirecon_session")
    monkeypatch.setattr(records, "latest_materializations", no_full_read)
    assert records.not_applicable_partitions(world.instance, "qsiparc_session", parc) == {"01|SUBJA"}
    assert records.not_applicable_partitions(world.instance, "qsirecon_session", recon) == set()


def test_status_summary_is_the_totals_without_rows(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """`status --summary`: the archive at a glance (issue 12), the same totals as the full view."""
    full = world.json(capsys, "status")
    summary = world.json(capsys, "status", "--summary")
    assert "sessions" not in summary or isinstance(summary["sessions"], int)  # counts, no row per session
    assert summary["totals"] == full["totals"] and summary["held"] == len(full["held"])
    code, out, _ = world.cli(capsys, "status", "--summary")
    assert code == 0 and "01|SUBJA" not in out and "12 session(s); 3 held folder(s)" in out
    assert "held, blocked and failed, by cause:" in out and "qsiparc: blocked (bids_conversion) 2" in out
    stages = {r["stage"]: r for r in summary["stages"]}
    assert (stages["qsirecon"]["held"], stages["qsirecon"]["failed"], stages["qsiparc"]["blocked"]) == (4, 1, 4)
    from neuroflow_dagster.states import STATES

    assert set(STATES) <= set(stages["qsirecon"]) | set(stages["qsiparc"]) | set(stages["bids_conversion"])
    assert summary["totals"]["causes"]["qsirecon"]["held (qc)"] == 1


def test_status_filters_and_formats(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    only_a = world.json(capsys, "status", "--subject", "sub-SUBJA")
    assert [r["partition"] for r in only_a["sessions"]] == ["01|SUBJA", "02|SUBJA"]
    assert only_a["held"] == []

    failed = world.json(capsys, "status", "--failed")
    assert [r["partition"] for r in failed["sessions"]] == ["01|SUBJC", "01|SUBJE", "01|SUBJH", "01|SUBJR"]

    recon = world.json(capsys, "status", "--stage", "qsirecon")
    assert all("qsirecon" in r and "bids_conversion" not in r for r in recon["sessions"])
    assert set(recon["totals"]) >= {"qsirecon"} and "qsiprep" not in recon["totals"]

    code, out, _ = world.cli(capsys, "status", "--stage", "bids", "--format", "csv")
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    spelled = {r["scan_id"]: r["bids_conversion"] for r in table if r["bids_conversion"]}
    assert spelled["SCAN_C1"] == "failed (validation)"
    # Every cell of every state, spelled as the JSON's state and cause say.
    code, out, _ = world.cli(capsys, "status", "--format", "csv")
    by_scan = {r["scan_id"]: r for r in csv.DictReader(io.StringIO(out)) if r["mapping"].startswith("mapped")}
    for row in world.json(capsys, "status")["sessions"]:
        for name in ("bids_conversion", "qsiprep", "qsirecon", "qsiparc"):
            cause = row["why"].get(name, {}).get("cause")
            assert by_scan[row["scan_id"]][name] == (f"{row[name]} ({cause})" if cause else row[name])
    assert by_scan["SCAN_H1"]["qsiparc"] == "held (qc)" and by_scan["SCAN_R1"]["qsiparc"] == "blocked (qsirecon)"
    assert any(r["mapping"] == "held: unmapped" and r["scan_id"] == "SCAN_X" for r in table)

    code, out, _ = world.cli(capsys, "status")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["SUBJECT", "SESSION", "SCAN_ID", "MAPPING", "PROTOCOL"]
    assert any(line.startswith("SUBJB") and "required scan T1w missing" in line for line in lines)
    assert any(line.startswith("held folders") for line in lines)
    assert any(line.startswith("totals: 12 session(s), 3 held folder(s)") for line in lines)
    assert any(line.startswith("SUBJR") and "failed (validation)" in line and "blocked (qsirecon)" in line
               for line in lines)  # fmt: skip
    assert any(line.startswith("SUBJH") and line.count("held (qc)") == 2 for line in lines)


def test_status_watch_redraws_until_interrupted(
    world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from neuroflow_dagster.cli import operator_commands as operator_cli

    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(operator_cli.time, "sleep", fake_sleep)
    code, out, _ = world.cli(capsys, "status", "--watch", "3")
    assert code == 0
    assert sleeps == [3.0, 3.0]
    assert out.count("neuroflow status - ") == 2 and out.count("totals: 12 session(s)") == 2


def test_status_through_the_console_script(world: World) -> None:
    """The installed `neuroflow` entry point, in its own process, reading the same instance from disk."""
    exe = Path(sys.executable).with_name("neuroflow")
    proc = subprocess.run(
        [str(exe), "--config", str(world.config_file), "status", "--dagster-home", str(world.home), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["totals"]["sessions"] == 12


# --------------------------------------------------------------------------- failures / logs


def test_failures_lists_only_partitions_whose_latest_attempt_failed(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only failed cells of the state model: never a held one (SUBJH's recon and parcellation, skipped by the
    QC gate's blocking check in a failed run) or a blocked one (SUBJR's parcellation, skipped because its
    reconstruction failed in the same run)."""
    listed = world.json(capsys, "failures")
    rows = {r["partition"]: r for r in listed}
    assert sorted((r["stage"], r["partition"]) for r in listed) == [
        ("bids_conversion", "01|SUBJC"), ("bids_conversion", "01|SUBJE"), ("qsirecon", "01|SUBJR")]  # fmt: skip
    # 01|SUBJG failed once but was converted since
    recon = rows["01|SUBJR"]
    assert (recon["failure_class"], recon["attempts"], recon["last_error"]) == ("validation", 1, REFUSED_RECON)
    assert all(r["failure_class"] != "unclassified" for r in listed)
    refused = rows["01|SUBJC"]
    assert (refused["stage"], refused["failure_class"], refused["attempts"], refused["failed_runs"]) == (
        "bids_conversion",
        "validation",
        2,
        2,
    )
    assert "is not a registered session" in refused["last_error"]
    assert refused["scan_id"] == "SCAN_C1" and refused["log_path"] == ""
    tool = rows["01|SUBJE"]
    assert (tool["failure_class"], tool["attempts"], tool["run_id"]) == ("tool", 1, world.tool_failure_run)
    assert "expected outputs are missing" in tool["last_error"]
    assert Path(tool["log_path"]).is_file()
    assert Path(tool["log_path"]).parent == world.config.paths.log_dir / "bids_conversion"

    assert world.json(capsys, "failures", "--stage", "qsiprep") == []
    assert world.json(capsys, "failures", "--stage", "qsiparc") == []
    code, out, _ = world.cli(capsys, "failures")
    assert code == 0 and "3 failed partition(s)" in out and "validation" in out


def test_logs_of_a_run_and_of_a_partition(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = world.cli(capsys, "logs", world.tool_failure_run)
    assert code == 0
    assert out.startswith("==> ") and "heudiconv --files" in out and "Need to process 0 study sessions" in out

    # A run that was refused before any tool started: its Dagster event log instead.
    code, out, _ = world.cli(capsys, "logs", world.refused_run)
    assert code == 0
    assert "wrote no tool log file" in out and "STEP_FAILURE" in out and "not a registered session" in out

    for spelling in ("01|SUBJE", "sub-SUBJE/ses-01", "SUBJE/01"):
        code, out, _ = world.cli(capsys, "logs", spelling, "--stage", "bids", "--tail", "3")
        assert code == 0, spelling
        assert out.startswith("==> ") and "(bids_conversion)" in out and len(out.splitlines()) == 4

    code, _, err = world.cli(capsys, "logs", "sub-SUBJB/ses-01")
    assert code == 1 and "no tool log for 01|SUBJB" in err
    code, _, err = world.cli(capsys, "logs", "00000000-0000-0000-0000-000000000000")
    assert code == 5 and "no run" in err


# --------------------------------------------------------------------------- reprocess / retry


def test_reprocess_dry_run_partitions(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    every = world.json(capsys, "reprocess", "--stage", "bids", "--all", "--dry-run")
    assert every["stage"] == "bids_conversion" and every["asset"] == "bids_session" and every["dry_run"]
    assert every["partitions"] == ["01|SUBJA", "02|SUBJA", "01|SUBJB", "01|SUBJC", "01|SUBJE", "01|SUBJF", "01|SUBJG",
                                   "01|SUBJH", "01|SUBJI", "01|SUBJN", "01|SUBJR"]
    assert every["skipped"] == {"SCAN_D1": "excluded: motion artefacts in every series"}

    subject = world.json(capsys, "reprocess", "--stage", "qsiprep", "--subject", "SUBJA", "--dry-run")
    assert subject["partitions"] == ["SUBJA"]  # QSIPrep is per subject
    by_label = world.json(capsys, "reprocess", "--stage", "qsirecon", "--session", "ses-02", "--dry-run")
    assert by_label["partitions"] == ["02|SUBJA"]
    by_scan = world.json(capsys, "reprocess", "--stage", "qsiparc", "--session", "SCAN_B1", "--dry-run")
    assert by_scan["partitions"] == ["01|SUBJB"]

    code, out, _ = world.cli(capsys, "reprocess", "--stage", "qsirecon", "--subject", "SUBJA", "--dry-run", home=False)
    assert code == 0 and "would reprocess 2 partition(s)" in out and "dry run: no backfill launched" in out


def test_retry_dry_run_lists_the_failures(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """retry relaunches exactly what failures lists: never the QC-held or the blocked cells."""
    plans = world.json(capsys, "retry", "--dry-run")
    assert [(p["stage"], p["partitions"]) for p in plans] == [
        ("bids_conversion", ["01|SUBJC", "01|SUBJE"]), ("qsirecon", ["01|SUBJR"])]  # fmt: skip
    assert world.json(capsys, "retry", "--stage", "qsiparc", "--dry-run") == []


class _GraphQLRecorder(BaseHTTPRequestHandler):
    """Answers POST /graphql like Dagster's webserver answers launchPartitionBackfill, recording each body."""

    bodies: list[dict[str, Any]]
    answer: dict[str, Any]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.server.bodies.append(  # type: ignore[attr-defined]
            {"path": self.path, "type": self.headers.get("Content-Type"), **json.loads(self.rfile.read(length))}
        )
        payload = json.dumps(self.server.answer).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def fake_webserver() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GraphQLRecorder)
    server.bodies = []  # type: ignore[attr-defined]
    server.answer = {  # type: ignore[attr-defined]
        "data": {"launchPartitionBackfill": {"__typename": "LaunchBackfillSuccess", "backfillId": "abcdefgh"}}
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_reprocess_and_retry_send_the_ui_backfill_mutation(
    world: World, capsys: pytest.CaptureFixture[str], fake_webserver: ThreadingHTTPServer
) -> None:
    """Against a local recording server (loopback) that answers like Dagster's GraphQL endpoint.

    That the same mutation and variables are accepted by Dagster's real schema
    and create the backfill is shown by test_mutation_is_accepted_by_dagsters_graphql.
    """
    url = f"http://127.0.0.1:{fake_webserver.server_address[1]}"
    code, out, err = world.cli(
        capsys, "reprocess", "--stage", "qsirecon", "--subject", "SUBJA", "--url", url, home=False
    )
    assert code == 0, err
    assert "launched backfill abcdefgh" in out
    body = fake_webserver.bodies[-1]  # type: ignore[attr-defined]
    assert body["path"] == "/graphql" and body["type"] == "application/json"
    assert body["query"] == LAUNCH_BACKFILL_MUTATION and body["operationName"] == "LaunchPartitionBackfill"
    params = body["variables"]["backfillParams"]
    assert params["assetSelection"] == [{"path": ["qsirecon_session"]}]
    assert params["partitionNames"] == ["01|SUBJA", "02|SUBJA"]
    assert params["tags"] == [{"key": "neuroflow/stage", "value": "qsirecon"}]
    assert params["title"].startswith("neuroflow reprocess qsirecon: 2 partition(s)")

    data = world.json(capsys, "retry", "--url", url + "/graphql")
    assert data[0]["backfill_id"] == "abcdefgh"
    params = fake_webserver.bodies[-2]["variables"]["backfillParams"]  # type: ignore[attr-defined]
    assert params["assetSelection"] == [{"path": ["bids_session"]}]
    assert params["partitionNames"] == ["01|SUBJC", "01|SUBJE"]
    assert params["tags"] == [{"key": "neuroflow/stage", "value": "bids_conversion"}]
    params = fake_webserver.bodies[-1]["variables"]["backfillParams"]  # type: ignore[attr-defined]
    assert (params["assetSelection"], params["partitionNames"]) == ([{"path": ["qsirecon_session"]}], ["01|SUBJR"])

    # The webserver refuses: the CLI says why and exits 1.
    fake_webserver.answer = {  # type: ignore[attr-defined]
        "data": {
            "launchPartitionBackfill": {
                "__typename": "PartitionKeysNotFoundError",
                "message": "Partition keys `['01|SUBJA']` could not be found.",
            }
        }
    }
    code, _, err = world.cli(capsys, "reprocess", "--stage", "qsiparc", "--subject", "SUBJA", "--url", url, home=False)
    assert code == 1 and "PartitionKeysNotFoundError" in err and "could not be found" in err


def test_reprocess_without_a_webserver_fails_clearly(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from neuroflow_dagster_tests.daemon_harness import free_port

    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = world.cli(capsys, "reprocess", "--stage", "bids", "--subject", "SUBJA", "--url", url, home=False)
    assert code == 1
    assert f"cannot reach the Dagster webserver at {url}/graphql" in err


def test_mutation_is_accepted_by_dagsters_graphql(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact mutation text and variables the CLI sends, executed by dagster_graphql on the real code location.

    In-process workspace (the webserver's own GraphQL schema and resolvers, no
    HTTP): the backfill it creates in the instance must carry the partitions,
    the stage tag and the title.
    """
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    monkeypatch.setenv("NEUROFLOW_CONFIG", str(world.config_file))
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="neuroflow_dagster.definitions", working_directory=str(world.root / "ws")),
        location_name="neuroflow",
    )
    with WorkspaceProcessContext(world.instance, InProcessWorkspaceLoadTarget(origin)) as process_context:
        context = process_context.create_request_context()
        assert context.get_code_location_error("neuroflow") is None
        variables = backfill_variables("qsirecon_session", ["01|SUBJA", "02|SUBJA"], "qsirecon", "from the test")
        result = execute_dagster_graphql(context, LAUNCH_BACKFILL_MUTATION, variables)
        launched = parse_launch_response({"data": result.data})
        backfill = world.instance.get_backfill(launched["backfill_id"])
        assert backfill is not None
        assert backfill.tags == {"neuroflow/stage": "qsirecon"} and backfill.title == "from the test"
        assert backfill.asset_selection == [QSIRECON]
        target = backfill.asset_backfill_data.target_subset.partitions_subsets_by_asset_key[QSIRECON]
        assert set(target.get_partition_keys()) == {"01|SUBJA", "02|SUBJA"}

        # A partition Dagster does not know: the real schema's refusal is turned into a clear error.
        refused = execute_dagster_graphql(
            context, LAUNCH_BACKFILL_MUTATION, backfill_variables("qsirecon_session", ["01|NOPE"], "qsirecon", "x")
        )
        with pytest.raises(BackfillError, match=r"PartitionKeysNotFoundError.*01\|NOPE"):
            parse_launch_response({"data": refused.data})


# --------------------------------------------------------------------------- exclude / include


def test_exclude_include_round_trip_with_audit_trail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also: without --dagster-home or $DAGSTER_HOME, the CLI uses <config folder>/.dagster_home (`neuroflow demo`)."""
    config = make_workspace(tmp_path / "ws")
    config_file = str(config.source)
    Registry(config.paths.state).assign("SCAN_Z1", "SUBJZ")
    write_status_report(
        config,
        engine.TickResult(held=[engine.Held("SCAN_Q", str(tmp_path / "q"), "unmapped", "no SubjectCode")]),
    )
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = tmp_path / "ws" / ".dagster_home"
    home.mkdir()

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["--config", config_file, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    with dg.instance_for_test(temp_dir=str(home)):
        code, out, err = run("exclude", "sub-SUBJZ/ses-01", "--reason", "consent withdrawn")
        assert code == 0, err
        assert "excluded ScanID 'SCAN_Z1' (sub-SUBJZ ses-01): consent withdrawn" in out
        code, out, _ = run("status", "--format", "json")
        row = json.loads(out)["sessions"][0]
        assert (row["bids_conversion"], row["why"]["bids_conversion"]["cause"]) == ("held", "excluded")
        assert row["note"] == "excluded: consent withdrawn"
        code, _, err = run("reprocess", "--stage", "bids", "--all", "--dry-run")
        assert code == 5 and "no registered, non-excluded session" in err

        code, out, _ = run("include", "SUBJZ/01")
        assert code == 0 and "included ScanID 'SCAN_Z1'" in out
        code, out, _ = run("status", "--format", "json")
        assert json.loads(out)["sessions"][0]["bids_conversion"] == "waiting"
        code, out, _ = run("include", "SCAN_Z1")
        assert code == 0 and "was not excluded" in out

        # A folder discovery holds back (never registered) can be excluded by its ScanID.
        code, out, _ = run("exclude", "SCAN_Q", "--reason", "phantom scan")
        assert code == 0 and "held folder" in out

        code, _, err = run("exclude", "SCAN_NOPE", "--reason", "x")
        assert code == 5 and "SCAN_NOPE" in err
        code, _, err = run("exclude", "SCAN_Z1", "--reason", "  ")
        assert code == 5 and "--reason" in err

    trail = [(e["action"], e["scan_id"], e["reason"]) for e in audit_trail(config)]
    assert trail == [
        ("exclude", "SCAN_Z1", "consent withdrawn"),
        ("include", "SCAN_Z1", ""),
        ("exclude", "SCAN_Q", "phantom scan"),
    ]


# --------------------------------------------------------------------------- exit codes


def test_exit_codes(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert world.cli(capsys, "status", "--stage", "nope")[0] == 5
    assert world.cli(capsys, "reprocess", "--stage", "nope", "--all", "--dry-run", home=False)[0] == 5
    assert world.cli(capsys, "reprocess", "--stage", "bids", "--dry-run", home=False)[0] == 5  # no selection
    assert world.cli(capsys, "status", "--watch", "0")[0] == 5
    code, _, err = world.cli(capsys, "status", "--stage", "recon")
    assert code == 5 and "accepted: bids_conversion, qsiprep" in err

    capsys.readouterr()
    assert cli.main(["--config", str(tmp_path / "missing.yaml"), "status"]) == 2
    assert "configuration error" in capsys.readouterr().err
    code = cli.main(["--config", str(world.config_file), "failures", "--dagster-home", str(tmp_path / "no_home")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_session_key_is_dagsters_multi_partition_key() -> None:
    from neuroflow_dagster.naming.partitions import session_key

    for subject, session in [("SUBJA", "01"), ("0075", "12"), ("A", "3")]:
        assert session_key(subject, session) == str(
            dg.MultiPartitionKey({"subject": subject, "session": session})
        )


# --------------------------------------------------------------------------- held cases, rekey


def _tick(config: NeuroflowConfig, state: Any = None) -> Any:
    """One discovery tick as the sensor runs it: the engine, then the status report."""
    result = engine.run_discovery(config, state)
    write_status_report(config, result)
    return result


def test_scan_and_status_name_every_held_case_and_rekey_moves_a_remapped_session(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from neuroflow_dagster_tests.discovery_fixtures import make_session
    from neuroflow_dagster_tests.workspace_fixtures import write_mapping

    config = make_workspace(tmp_path / "ws")
    incoming, csv_file = config.paths.dicom_incoming, config.mapping.csv_file
    for name, date in [("A", "20240101"), ("B", "20240102"), ("C", "20240103"), ("D", "20240104"), ("E", "20240105")]:
        make_session(incoming, name, [("T1_MPRAGE", 12)], acq_date=date)
    write_mapping(csv_file, {"A": "CLM_L_01", "D": "80", "E": "81"})
    first = _tick(config)
    assert sorted(r.scan_id for r in first.registrations) == ["A", "D", "E"]
    csv_file.write_text("ScanID,SubjectCode\nA,CLM_L_01\nB,CLML01\nC,90\nC,91\nD,80\nE,82\n", encoding="utf-8")
    (incoming / "D").rename(tmp_path / "D")
    os.symlink("LOOP", incoming / "LOOP")
    second = _tick(config, first.new_state)
    home = tmp_path / "home"
    home.mkdir()

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["--config", str(config.source), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("scan", "--format", "json")
    assert code == 0, err
    rows = {r["scan_id"]: r for r in json.loads(out)}
    assert {k: r["decision"] for k, r in rows.items()} == {
        "A": "register",
        "B": "held: identity_conflict",
        "C": "held: mapping_error",
        "D": "held: missing",
        "E": "held: remapped",
        "LOOP": "held: unreadable",
    }
    assert "'CLML01'" in rows["B"]["reason"] and "'CLM_L_01'" in rows["B"]["reason"]
    assert "row 4 (SubjectCode '90') and row 5 (SubjectCode '91')" in rows["C"]["reason"]
    assert (rows["E"]["subject"], rows["E"]["session"]) == ("0081", "01")
    assert "SubjectCode '82'" in rows["E"]["reason"] and "neuroflow rekey E" in rows["E"]["reason"]

    with dg.instance_for_test(temp_dir=str(home)):
        code, out, err = run("status", "--dagster-home", str(home), "--format", "json")
        assert code == 0, err
        data = json.loads(out)
        held = {h["scan_id"]: (h["state"], h["registered"]) for h in data["held"]}
        assert held == {
            "B": ("identity_conflict", ""),
            "C": ("mapping_error", ""),
            "D": ("missing", "sub-0080 ses-01"),
            "E": ("remapped", "sub-0081 ses-01"),
            "LOOP": ("unreadable", ""),
        }
        notes = {r["scan_id"]: r["note"] for r in data["sessions"]}
        assert notes == {"A": "", "D": "held: missing (see held folders)", "E": "held: remapped (see held folders)"}
        code, out, _ = run("status", "--dagster-home", str(home))
        assert "held folders" in out and "identity_conflict" in out and "sub-0080 ses-01" in out

        # The operator's way out for E: the sheet is right, the session moves to 82.
        code, _, err = run("rekey", "A", "--reason", "x")
        assert code == 5 and "nothing to re-key" in err
        code, _, err = run("rekey", "B", "--reason", "x")
        assert code == 5 and "'B': not a registered ScanID" in err
        code, _, err = run("rekey", "E", "--reason", "  ")
        assert code == 5 and "--reason" in err
        code, out, err = run("rekey", "E", "--reason", "sheet corrected", "--dry-run")
        assert code == 0, err
        assert "'E': sub-0081 ses-01 (SubjectCode '81') is retired" in out and "as sub-0082" in out
        assert "dry run" in out and Registry(config.paths.state).lookup("E") is not None
        code, out, err = run("rekey", "E", "--reason", "sheet corrected")
        assert code == 0, err
        assert "neuroflow reprocess --stage qsiprep --subject 0081" in out and "audit trail" in out
        registry = Registry(config.paths.state)
        assert registry.lookup("E") is None and registry.retired_entry("0081", "01").note.endswith("sheet corrected")
        audit = [json.loads(line) for line in registry.audit_path.read_text().splitlines()]
        assert [(a["action"], a["scan_id"], a["after"]["subject_code"]) for a in audit] == [("retire", "E", "82")]

        third = _tick(config, second.new_state)
        assert [(r.scan_id, r.participant_label, r.session_label) for r in third.registrations] == [("E", "0082", "01")]
        code, out, _ = run("status", "--dagster-home", str(home), "--format", "json")
        rows = {(r["subject"], r["session"]): r for r in json.loads(out)["sessions"]}
        assert (rows[("0081", "01")]["bids_conversion"], rows[("0081", "01")]["why"]["bids_conversion"]["cause"]) == (
            "not_applicable", "retired")  # fmt: skip
        assert rows[("0081", "01")]["note"].startswith("re-keyed:")
        assert rows[("0082", "01")]["scan_id"] == "E"
        with pytest.raises(dg.Failure, match="was re-keyed"):
            session_context(config, "01|0081")


def test_rekey_resolves_a_merge_from_an_older_registry_either_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from neuroflow_dagster_tests.discovery_fixtures import make_session
    from neuroflow_dagster_tests.test_discovery_identity import write_legacy_registry
    from neuroflow_dagster_tests.workspace_fixtures import write_mapping

    def run(config: NeuroflowConfig, *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["--config", str(config.source), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    for way in ("same person", "two people"):
        config = make_workspace(tmp_path / way.replace(" ", "_"))
        legacy = [("S1", "CLML01", "01", "CLM_L_01"), ("S2", "CLML01", "02", "CLML01")]
        write_legacy_registry(config.paths.state, [*legacy, ("S3", "CLML01", "03", "CLML01")])
        for name in ("S1", "S2", "S3"):
            make_session(config.paths.dicom_incoming, name, [("T1_MPRAGE", 12)])
        write_mapping(config.mapping.csv_file, {"S1": "CLM_L_01", "S2": "CLML01", "S3": "CLML01"})
        first = _tick(config)
        assert [p.kind for p in first.problems] == ["registry"]
        with pytest.raises(dg.Failure, match="two people may have been merged"):
            session_context(config, "01|CLML01")
        if way == "same person":
            write_mapping(config.mapping.csv_file, {"S1": "CLM_L_01", "S2": "CLM_L_01", "S3": "CLM_L_01"})
            code, _, err = run(config, "rekey", "S2", "--reason", "one person")
            assert code == 5 and "re-key them together: neuroflow rekey S2 S3" in err
            code, out, err = run(config, "rekey", "S2", "S3", "--reason", "one person, one code")
            assert code == 0, err
            assert "'S2': sub-CLML01 ses-02 stays; its SubjectCode 'CLML01' is corrected to 'CLM_L_01'" in out
            after = _tick(config, first.new_state)
            assert after.problems == [] and after.held == [] and after.registrations == []
            assert session_context(config, "02|CLML01").entry.recruitment_id == "CLM_L_01"
        else:
            path = Path(config.source)
            path.write_text(path.read_text().replace("label_overrides: {}", 'label_overrides: {"CLML01": "CLML01B"}'))
            config = load_config(path, environ={})
            held = _tick(config, first.new_state)
            assert {h.scan_id: h.reason for h in held.held} == {"S2": "remapped", "S3": "remapped"}
            code, out, err = run(config, "rekey", "S2", "S3", "--reason", "two people")
            assert code == 0, err
            assert out.count("is retired") == 2
            after = _tick(config, held.new_state)
            assert [(r.scan_id, r.participant_label, r.session_label) for r in after.registrations] == [
                ("S2", "CLML01B", "01"),
                ("S3", "CLML01B", "02"),
            ]
            assert after.problems == [] and after.held == []
            assert session_context(config, "01|CLML01").entry.scan_id == "S1"
