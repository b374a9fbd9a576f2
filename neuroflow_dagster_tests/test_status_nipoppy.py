"""`neuroflow status --format nipoppy` read by Nipoppy itself, and `neuroflow status --summary`.

A real temporary Dagster instance holds sessions in every state the export maps
(reported materializations and check evaluations as the sensor and the stages
report them - their tool metadata made by the stages' own ``record_metadata`` -
plus real runs of the real ``bids_session`` and ``qsirecon_session`` assets: refused
ones that fail, and one that finds no DWI in BIDS and records "not applicable").
The CLI writes the files; they are then loaded with nipoppy's OWN classes
(``CurationStatusTable``, ``ProcessingStatusTable``, ``Manifest``, validation on)
and read by nipoppy's own ``nipoppy status`` in a dataset made by ``nipoppy init``,
in a separate venv built by scripts/nipoppy-venv.sh (nipoppy 0.4.8; ~7 s once,
then cached in .venv-nipoppy). A venv that cannot be built fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test

from neuroflow_dagster import cli
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.control import nipoppy
from neuroflow_dagster.control.status import STATES
from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.defs.execution import record_metadata
from neuroflow_dagster.discovery import engine
from neuroflow_dagster.discovery.exclusions import exclude
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.discovery.status_report import write_status_report
from neuroflow_dagster.runtimes.base import RunRecord
from neuroflow_dagster.tools.layout import package_version
from neuroflow_dagster.tools.spec import ToolSpec
from neuroflow_dagster_tests.test_operator_cli import BIDS, QSIPARC, QSIPREP, QSIRECON, report, report_protocol
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "nipoppy-venv.sh"
STANDIN = f"standin-{package_version()}"

# Runs in the nipoppy venv: nipoppy's own table classes load (and validate) the three files, and its
# own query methods answer from them. A validation error raises, and the process exits non-zero.
READER = r"""
import json, sys
from pathlib import Path
from importlib.metadata import version
from nipoppy.tabular.curation_status import CurationStatusTable
from nipoppy.tabular.manifest import Manifest
from nipoppy.tabular.processing_status import ProcessingStatusTable

folder = Path(sys.argv[1])
curation = CurationStatusTable.load(folder / "curation_status.tsv")
processing = ProcessingStatusTable.load(folder / "processing_status.tsv")
manifest = Manifest.load(folder / "manifest.tsv")
print(json.dumps({
    "nipoppy": version("nipoppy"),
    "curation": curation.to_dict(orient="records"),
    "processing": processing.to_dict(orient="records"),
    "manifest": manifest.to_dict(orient="records"),
    "bidsified": sorted(map(list, curation.get_bidsified_participants_sessions())),
    "qsiprep_done": sorted(map(list, processing.get_completed_participants_sessions("qsiprep", "1.1.1", "default"))),
}, default=str))
"""


@dataclass
class World:
    root: Path
    config: NeuroflowConfig
    config_file: Path
    home: Path
    instance: dg.DagsterInstance

    def cli(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["--config", str(self.config_file), *argv, "--dagster-home", str(self.home)])
        out, err = capsys.readouterr()
        return code, out, err


def run_asset(defs: dg.Definitions, instance: dg.DagsterInstance, asset: dg.AssetKey, partition: str,
              stage: str) -> dg.ExecuteInProcessResult:
    """A real stage asset, in-process, tagged like a stage run; failures are recorded, not raised."""
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(instance=instance, asset_selection=[asset], partition_key=partition,
                                  raise_on_error=False, tags={"neuroflow/stage": stage})  # fmt: skip


def tool_metadata(root: Path, tool: str, *, image: str | None, stand_in: bool) -> dict[str, Any]:
    """The metadata a stage's materialization carries about its tool run (defs/execution.py)."""
    record = RunRecord(tool=tool, runtime="builtin" if stand_in else "docker", command=f"{tool} ...",
                       output_dir=str(root), log_path=str(root / f"{tool}.log"), started=0.0, ended=1.0,
                       exit_code=0, image=image, image_digest=None if stand_in else "sha256:" + "ab" * 32)  # fmt: skip
    spec = ToolSpec(tool=tool, argv=(tool,), output_dir=root, image=image, stand_in=stand_in)
    return {**record_metadata(record, spec), "neuroflow/status": "done"}


def bids_session(config: NeuroflowConfig, participant: str, session: str, suffixes: dict[str, list[str]]) -> None:
    """A converted session in bids_root: one (empty) NIfTI per suffix, in its datatype folder."""
    folder = config.paths.bids_root / f"sub-{participant}" / f"ses-{session}"
    for datatype, names in suffixes.items():
        (folder / datatype).mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / datatype / f"sub-{participant}_ses-{session}_{name}.nii.gz").write_bytes(b"")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("nipoppy")
    config = make_workspace(root / "ws")
    assert config.source is not None
    defs = build_definitions(config)
    registry = Registry(config.paths.state)
    incoming = config.paths.dicom_incoming

    def register(scan_id: str, code: str, *, folder: bool = True) -> None:
        path = incoming / scan_id
        if folder:
            path.mkdir(parents=True)
            (path / "IM0001.dcm").write_bytes(b"\0" * 132 + b"DICM")
        registry.assign(scan_id, code, dicom_path=path)

    home = root / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        subjects = ["SUBJA", "SUBJB", "SUBJC", "SUBJD", "SUBJE", "SUBJF", "SUBJH"]
        instance.add_dynamic_partitions("subjects", subjects)
        instance.add_dynamic_partitions("session_labels", ["01", "02"])
        standin_prep = tool_metadata(root, "qsiprep", image=None, stand_in=True)
        standin_recon = tool_metadata(root, "qsirecon", image=None, stand_in=True)
        real_prep = tool_metadata(root, "qsiprep", image="pennlinc/qsiprep:1.1.1", stand_in=False)

        # SUBJA 01: all the way, by the stand-ins. SUBJA 02: converted without DWI, so QSIPrep left it
        # out and QSIRecon (a real run) recorded "not applicable".
        for scan_id in ("SCAN_A1", "SCAN_A2"):
            register(scan_id, "SUBJA")
        bids_session(config, "SUBJA", "01", {"anat": ["T1w"], "dwi": ["dwi"]})
        bids_session(config, "SUBJA", "02", {"anat": ["T1w"]})
        for partition in ("01|SUBJA", "02|SUBJA"):
            report_protocol(instance, partition, True, "protocol ok")
            report(instance, BIDS, partition)
        report(instance, QSIPREP, "SUBJA", **standin_prep, sessions="01", left_out='{"02": "no dwi in BIDS"}')
        report(instance, QSIRECON, "01|SUBJA", **standin_recon, recon_spec="dipy_dki")
        report(instance, QSIPARC, "01|SUBJA", **tool_metadata(root, "qsiparc", image=None, stand_in=True))
        not_applicable = run_asset(defs, instance, QSIRECON, "02|SUBJA", "qsirecon")
        assert not_applicable.success

        # SUBJB: blocked by the protocol check (required scan missing): nothing can run.
        register("SCAN_B1", "SUBJB")
        report_protocol(instance, "01|SUBJB", False, "required scan T1w missing (0 series matched)")

        # SUBJC: conversion refused (a real failed run of bids_session), registered afterwards.
        assert not run_asset(defs, instance, BIDS, "01|SUBJC", "bids_conversion").success
        register("SCAN_C1", "SUBJC")
        report_protocol(instance, "01|SUBJC", True, "protocol ok")

        # SUBJD: converted, then excluded by an operator.
        register("SCAN_D1", "SUBJD")
        report_protocol(instance, "01|SUBJD", True, "protocol ok")
        bids_session(config, "SUBJD", "01", {"anat": ["T1w"], "dwi": ["dwi"]})
        report(instance, BIDS, "01|SUBJD")
        exclude(config, "SCAN_D1", "motion artefacts in every series")

        # SUBJE: conversion queued; its DICOM folder has left incoming since it was registered.
        register("SCAN_E1", "SUBJE", folder=False)
        report_protocol(instance, "01|SUBJE", True, "protocol ok")
        create_run_for_test(instance, job_name="bids_conversion_job", status=dg.DagsterRunStatus.NOT_STARTED,
                            tags={"dagster/partition": "01|SUBJE", "neuroflow/stage": "bids_conversion"},
                            asset_selection=frozenset({BIDS}))  # fmt: skip

        # SUBJF: QSIPrep done, then the session was converted again: QSIPrep is stale.
        register("SCAN_F1", "SUBJF")
        report_protocol(instance, "01|SUBJF", True, "protocol ok")
        bids_session(config, "SUBJF", "01", {"anat": ["T1w"], "dwi": ["dwi"]})
        report(instance, BIDS, "01|SUBJF")
        report(instance, QSIPREP, "SUBJF", **standin_prep, sessions="01")
        report(instance, BIDS, "01|SUBJF")

        # SUBJH: the real QSIPrep 1.1.1 image; QSIRecon refused (a real failed run, before registration).
        assert not run_asset(defs, instance, QSIRECON, "01|SUBJH", "qsirecon").success
        register("SCAN_H1", "SUBJH")
        report_protocol(instance, "01|SUBJH", True, "protocol ok")
        bids_session(config, "SUBJH", "01", {"anat": ["T1w"], "dwi": ["dwi"], "fmap": ["epi"]})
        report(instance, BIDS, "01|SUBJH")
        report(instance, QSIPREP, "SUBJH", **real_prep, sessions="01")

        # Discovery holds a folder it could not map: not a session, so in no Nipoppy table.
        held = [engine.Held("SCAN_X", str(incoming / "SCAN_X"), "unmapped", "no SubjectCode for SCAN_X")]
        write_status_report(config, engine.TickResult(held=held, mapping_source="csv"))
        yield World(root, config, Path(config.source), home, instance)


@pytest.fixture(scope="module")
def nipoppy_venv() -> Path:
    """nipoppy's own venv (scripts/nipoppy-venv.sh); cannot be built -> the test fails, never skips."""
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"cannot build nipoppy's venv with {SCRIPT.name}:\n{proc.stderr[-3000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])


def nipoppy_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({"COLUMNS": "200", "NO_COLOR": "1", "HOME": env.get("HOME", "/tmp")})
    return env


def read_with_nipoppy(venv: Path, folder: Path) -> dict[str, Any]:
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", READER, str(folder)], capture_output=True,
                          text=True, timeout=300, check=False, env=nipoppy_env())  # fmt: skip
    assert proc.returncode == 0, f"nipoppy rejected the files:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the export, read by nipoppy


def test_nipoppy_files_load_with_nipoppys_own_tables(
    world: World, nipoppy_venv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = world.root / "export"
    code, out, err = world.cli(capsys, "status", "--format", "nipoppy", "--output", str(out_dir))
    assert code == 0, err
    assert f"wrote Nipoppy {nipoppy.NIPOPPY_VERSION} status files to {out_dir}" in out
    assert "processing_status.tsv: 24 row(s)" in out and "curation_status.tsv: 8 row(s)" in out

    data = read_with_nipoppy(nipoppy_venv, out_dir)
    assert data["nipoppy"] == nipoppy.NIPOPPY_VERSION

    # processing_status.tsv: one row per session x pipeline, nipoppy's ids (participant_id without sub-).
    status = {(r["participant_id"], r["session_id"], r["pipeline_name"]): r for r in data["processing"]}
    assert len(status) == len(data["processing"]) == 8 * 3
    row = status[("SUBJA", "01", "qsiprep")]
    assert (row["bids_participant_id"], row["bids_session_id"], row["pipeline_step"]) == ("sub-SUBJA", "ses-01",
                                                                                          "default")
    expected = {
        # participant, session: qsiprep, qsirecon, qsiparc
        ("SUBJA", "01"): ["SUCCESS", "SUCCESS", "SUCCESS"],
        ("SUBJA", "02"): ["UNAVAILABLE", "UNAVAILABLE", "UNAVAILABLE"],  # no DWI: left out, not applicable
        ("SUBJB", "01"): ["UNAVAILABLE"] * 3,  # protocol failed: conversion never starts
        ("SUBJC", "01"): ["UNAVAILABLE"] * 3,  # blocked by the failed conversion: no input until it is fixed
        ("SUBJD", "01"): ["UNAVAILABLE"] * 3,  # excluded
        ("SUBJE", "01"): ["INCOMPLETE"] * 3,  # conversion queued
        ("SUBJF", "01"): ["INCOMPLETE", "INCOMPLETE", "INCOMPLETE"],  # QSIPrep stale
        ("SUBJH", "01"): ["SUCCESS", "FAIL", "UNAVAILABLE"],  # QSIRecon failed: parcellation blocked by it
    }
    assert {k: [status[(*k, p)]["status"] for p in ("qsiprep", "qsirecon", "qsiparc")] for k in expected} == expected

    # Versions: what made the outputs (a stand-in is never filed under QSIPrep's version), else what will run.
    assert status[("SUBJA", "01", "qsiprep")]["pipeline_version"] == STANDIN
    assert status[("SUBJH", "01", "qsiprep")]["pipeline_version"] == "1.1.1"
    assert status[("SUBJB", "01", "qsiprep")]["pipeline_version"] == STANDIN  # configured: runtime builtin
    # The spec a session's reconstruction ran (its shell scheme's); before that QSIRecon's step is not known yet.
    steps = {(r["participant_id"], r["session_id"]): r["pipeline_step"] for r in data["processing"]
             if r["pipeline_name"] == "qsirecon"}
    assert steps[("SUBJA", "01")] == "dipy_dki" and set(steps.values()) == {"dipy_dki", "default"}
    assert data["qsiprep_done"] == [["SUBJH", "01"]]  # nipoppy's own query: the real 1.1.1 only

    # curation_status.tsv: DICOM present / organised and ready (protocol passed) / in BIDS.
    curation = {(r["participant_id"], r["session_id"]): r for r in data["curation"]}
    flags = {k: (r["in_pre_reorg"], r["in_post_reorg"], r["in_bids"]) for k, r in curation.items()}
    assert flags == {
        ("SUBJA", "01"): (True, True, True),
        ("SUBJA", "02"): (True, True, True),
        ("SUBJB", "01"): (True, False, False),
        ("SUBJC", "01"): (True, True, False),
        ("SUBJD", "01"): (True, True, True),
        ("SUBJE", "01"): (False, False, False),  # its folder left incoming
        ("SUBJF", "01"): (True, True, True),
        ("SUBJH", "01"): (True, True, True),
    }
    assert curation[("SUBJH", "01")]["datatype"] == ["anat", "dwi", "fmap"]  # nipoppy parsed the list
    assert curation[("SUBJB", "01")]["datatype"] is None  # nothing converted: left empty
    assert curation[("SUBJH", "01")]["participant_dicom_dir"] == "SCAN_H1"
    assert curation[("SUBJH", "01")]["visit_id"] == "01"
    assert data["bidsified"] == [["SUBJA", "01"], ["SUBJA", "02"], ["SUBJD", "01"], ["SUBJF", "01"], ["SUBJH", "01"]]
    assert [(r["participant_id"], r["session_id"]) for r in data["manifest"]] == list(curation)


def test_nipoppy_status_reads_the_exported_site(
    world: World, nipoppy_venv: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """nipoppy's own `nipoppy status` on a dataset made by `nipoppy init` with neuroflow's three files in place."""
    study = tmp_path / "study"
    init = subprocess.run([str(nipoppy_venv / "bin" / "nipoppy"), "init", "--study", str(study)],
                          capture_output=True, text=True, timeout=300, check=False, env=nipoppy_env())  # fmt: skip
    assert init.returncode == 0, init.stderr + init.stdout
    export = tmp_path / "export"
    code, _, err = world.cli(capsys, "status", "--format", "nipoppy", "--output", str(export))
    assert code == 0, err
    shutil.copy(export / "manifest.tsv", study / "manifest.tsv")
    shutil.copy(export / "curation_status.tsv", study / "sourcedata" / "imaging" / "curation_status.tsv")
    shutil.copy(export / "processing_status.tsv", study / "derivatives" / "processing_status.tsv")
    proc = subprocess.run([str(nipoppy_venv / "bin" / "nipoppy"), "status", "--study", str(study)],
                          capture_output=True, text=True, timeout=300, check=False, env=nipoppy_env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    text = proc.stdout + proc.stderr
    assert "Participant counts by session at each Nipoppy checkpoint" in text
    lines = [line.split() for line in text.splitlines() if line.strip().startswith(("01", "02"))]
    assert lines, text
    cells = {line[0]: [c for c in line[1:] if c.isdigit()] for line in lines}
    # in_manifest, in_pre_reorg, in_post_reorg, in_bids, then the SUCCESS count of each pipeline column:
    # qsiparc standin, qsiprep 1.1.1, qsiprep standin, qsirecon standin (nipoppy's order).
    assert cells["01"] == ["7", "6", "5", "4", "1", "1", "1", "1"], text
    assert cells["02"] == ["1", "1", "1", "1", "0", "0", "0", "0"], text
    assert text.count(STANDIN) == 3 and "1.1.1" in text and "dipy_dki" in text, text


def test_export_covers_every_state_and_refuses_what_it_cannot_map(world: World) -> None:
    """Every state of the state model has a Nipoppy status (retired rows are left out, not mapped)."""
    assert set(STATES) == set(nipoppy.STATUS_OF_STATE)
    report = {"sessions": [
        {"subject": "SUBJA", "session": "01", "scan_id": "SCAN_A1", "mapping": "mapped (SUBJA)", "protocol": "passed",
         "bids_conversion": "done", "qsiprep": "done", "qsirecon": "done", "qsiparc": "done"},
        {"subject": "SUBJZ", "session": "01", "scan_id": "SCAN_Z1", "mapping": "retired (SUBJZ)", "protocol": "-",
         "bids_conversion": "not_applicable", "qsiprep": "not_applicable", "qsirecon": "not_applicable",
         "qsiparc": "not_applicable"},
    ]}  # fmt: skip
    tables = nipoppy.build_tables(report, world.config)
    assert {r["participant_id"] for r in tables["processing"]} == {"SUBJA"}
    assert [r["participant_id"] for r in tables["curation"]] == ["SUBJA"]
    # A session held by the image QC gate: its recon and parcellation cannot run until approved. A run queued
    # while the disk guard holds new runs runs by itself once there is space: INCOMPLETE, not UNAVAILABLE.
    qc = {"cause": "qc", "reason": "image QC failed"}
    held = {**report["sessions"][0], "session": "02", "scan_id": "SCAN_A2", "qc": "FAILED", "qsirecon": "held",
            "qsiparc": "held", "why": {"qsirecon": qc, "qsiparc": qc}}  # fmt: skip
    disk = {**report["sessions"][0], "session": "03", "scan_id": "SCAN_A3", "qsirecon": "held", "qsiparc": "waiting",
            "why": {"qsirecon": {"cause": "disk_guard", "reason": "queued while the disk guard holds"}}}  # fmt: skip
    status = {(r["session_id"], r["pipeline_name"]): r["status"] for r in
              nipoppy.build_tables({"sessions": [*report["sessions"], held, disk]}, world.config)["processing"]}
    assert (status[("02", "qsiprep")], status[("02", "qsirecon")], status[("02", "qsiparc")]) == (
        "SUCCESS", "UNAVAILABLE", "UNAVAILABLE")  # fmt: skip
    assert (status[("03", "qsirecon")], status[("03", "qsiparc")]) == ("INCOMPLETE", "INCOMPLETE")
    report["sessions"][0]["qsiparc"] = "sleeping"
    with pytest.raises(ValueError, match="qsiparc state 'sleeping' of sub-SUBJA ses-01 has no Nipoppy status"):
        nipoppy.build_tables(report, world.config)


def test_versions_name_the_tool_that_made_the_outputs() -> None:
    assert nipoppy.recorded_version({"image": "pennlinc/qsiprep:1.1.1", "stand_in": False}) == "1.1.1"
    assert nipoppy.recorded_version({"image": "registry:5000/pennlinc/qsiprep:26.1.1@sha256:" + "c" * 64}) == "26.1.1"
    assert nipoppy.recorded_version({"image": "pennlinc/qsiprep@sha256:" + "c" * 64}) == "sha256-cccccccccccc"
    assert nipoppy.recorded_version({"image": "/images/qsiprep_1.1.1.sif"}) == "1.1.1"
    assert nipoppy.recorded_version({"image": "x", "stand_in": True, "stand_in_version": "0.3.0"}) == "standin-0.3.0"
    # Recorded before stand_in_version existed: still marked as a stand-in, never as the image it names.
    assert nipoppy.recorded_version({"image": "builtin stand-in (not the real tool)"}) == "standin"
    assert nipoppy.recorded_version({"image": "local"}) is None
    assert nipoppy.recorded_version({}) is None


def test_nipoppy_format_usage_errors(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = world.cli(capsys, "status", "--format", "nipoppy")
    assert code == 5 and "--output DIR" in err
    code, _, err = world.cli(capsys, "status", "--output", str(world.root / "x"))
    assert code == 5 and "--output is for --format nipoppy" in err
    code, _, err = world.cli(capsys, "status", "--format", "nipoppy", "--output", str(world.root / "x"), "--failed")
    assert code == 5 and "drop --failed" in err
    assert not (world.root / "x").exists()


# --------------------------------------------------------------------------- the summary


def test_status_summary_counts_per_stage_and_state(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = world.cli(capsys, "status", "--summary", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    rows = {r["stage"]: r for r in data["stages"]}
    assert list(rows) == ["protocol", "bids_conversion", "qsiprep", "qc", "qsirecon", "qsiparc"]
    assert (rows["qc"]["unit"], rows["qc"]["total"]) == ("sessions", 0)  # the image QC gate judged none yet
    assert (data["sessions"], data["held"], data["held_by_reason"]) == (8, 1, {"unmapped": 1})
    bids = rows["bids_conversion"]
    assert (bids["unit"], bids["total"]) == ("sessions", 8)
    assert {k: v for k, v in bids.items() if k in STATES and v} == {
        "done": 4, "failed": 1, "queued": 1, "blocked": 1, "held": 1}  # fmt: skip
    prep = rows["qsiprep"]
    assert (prep["unit"], prep["total"]) == ("subjects", 7)  # one run per subject
    assert {k: v for k, v in prep.items() if k in STATES and v} == {"done": 2, "waiting": 2, "blocked": 2,
                                                                    "held": 1}  # fmt: skip
    assert data["totals"]["causes"]["qsiprep"] == {"blocked (protocol)": 1, "blocked (bids_conversion)": 1,
                                                   "held (excluded)": 1}  # fmt: skip
    assert rows["protocol"]["passed"] == 7 and rows["protocol"]["failed"] == 1

    code, out, _ = world.cli(capsys, "status", "--summary")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["STAGE", "UNIT", "TOTAL", "PASSED"]
    assert lines[2].split()[:3] == ["bids_conversion", "sessions", "8"]
    assert "8 session(s); 1 held folder(s): unmapped 1" in out
    assert not any(line.startswith("SUBJA") for line in lines)  # no session rows
