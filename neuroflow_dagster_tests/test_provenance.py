"""Provenance beside the data: every stage's real run leaves a file saying how its outputs were made.

Real parts: the discovery sensor (registration), HeudiConv + dcm2niix on
synthetic DICOM, the real BIDS validator (on the staged session, and on the
published bids_root with the provenance file in it), the embedded stand-ins
for QSIPrep/QSIRecon/QSIParc, and Dagster's execution of the project's own
stage jobs on a real (temporary, SQLite) instance. Headers are re-read with
pydicom and files re-hashed with hashlib to check what the documents claim.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pydicom
import pytest

from neuroflow_dagster import provenance as prov
from neuroflow_dagster.bids import validator
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.demo import synth
from neuroflow_dagster.tools import layout
from neuroflow_dagster_tests.test_sensor import sensor_for, tick
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

pytestmark = pytest.mark.slow

SCAN_ID = "20240115_1430"
SESSION, SUBJECT = "01|SUBJA", "SUBJA"
JOBS = [
    ("bids_conversion_job", SESSION),
    ("qsiprep_job", SUBJECT),
    ("qsirecon_job", SESSION),
    ("qsiparc_job", SESSION),
]
NO_RETRY = {"retry": {"max_retries": 0}}


@dataclass
class Pipeline:
    config: NeuroflowConfig
    instance: dg.DagsterInstance
    defs: dg.Definitions
    run_ids: dict[str, str]
    dicom_before: dict[str, tuple[int, int]]

    def document(self, job: str) -> tuple[Path, dict[str, Any]]:
        path = {
            "bids_conversion_job": self.config.paths.bids_root / "sub-SUBJA/ses-01/sub-SUBJA_ses-01_provenance.json",
            "qsiprep_job": layout.qsiprep_dir(self.config) / "sub-SUBJA/sub-SUBJA_desc-neuroflow_provenance.json",
            "qsirecon_job": layout.qsirecon_dir(self.config)
            / "sub-SUBJA/ses-01/sub-SUBJA_ses-01_desc-neuroflow_provenance.json",
            "qsiparc_job": layout.qsiparc_dir(self.config)
            / "sub-SUBJA/ses-01/sub-SUBJA_ses-01_desc-neuroflow_provenance.json",
        }[job]
        return path, json.loads(path.read_text())


def digest(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_job(defs: dg.Definitions, instance: dg.DagsterInstance, job: str, partition: str) -> dg.ExecuteInProcessResult:
    job_def = defs.resolve_job_def(job)
    return job_def.execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(str(e.message) for e in result.all_events if e.is_failure)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    root = tmp_path_factory.mktemp("provenance")
    config = make_workspace(
        root / "ws",
        mapping={SCAN_ID: "SUBJ_A"},
        overrides={"pipelines": {s: NO_RETRY for s in ("bids_conversion", "qsiprep", "qsirecon", "qsiparc")}},
    )
    synth.write_session(config.paths.dicom_incoming / SCAN_ID, seed=1, n_directions=12)
    dicom_before = digest(config.paths.dicom_incoming)
    defs = build_definitions(config)
    (root / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "home")) as instance:
        tick(sensor_for(config), instance, None)
        run_ids = {}
        for job, partition in JOBS:
            result = run_job(defs, instance, job, partition)
            assert result.success, failure_text(result)
            run_ids[job] = result.run_id
        yield Pipeline(config, instance, defs, run_ids, dicom_before)


def test_each_stage_writes_one_provenance_file_beside_its_published_outputs(pipeline: Pipeline) -> None:
    for job, partition in JOBS:
        path, doc = pipeline.document(job)
        assert doc["format"] == prov.FORMAT
        assert doc["partition"] == partition and doc["subject"] == "SUBJA" and doc["sessions"] == ["01"]
        assert doc["run"]["dagster_run_id"] == pipeline.run_ids[job]
        assert doc["run"]["exit_code"] == 0 and doc["run"]["host"] and doc["run"]["started"] <= doc["run"]["finished"]
        asset = doc["asset"]
        assert doc["code_version"] == pipeline.defs.resolve_assets_def(asset).code_versions_by_key[dg.AssetKey(asset)]
        assert doc["command"]["argv"] and doc["command"]["line"]
        # the materialization points at it, and nothing of it is left in a staging folder
        mat = pipeline.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
        ).records[0].asset_materialization
        assert mat is not None and mat.metadata["provenance"].value == str(path)
        # every file it lists is there with that content, and every published file of the unit is listed
        assert prov.verify_outputs(path) == []
        listed = {row["path"] for row in doc["outputs"]}
        tree_root = path.parents[2] if path.parent.name.startswith("ses-") else path.parents[1]
        unit = path.parent
        in_unit = {str(p.relative_to(tree_root)) for p in unit.rglob("*") if p.is_file() and p != path}
        assert in_unit <= listed, in_unit - listed
    qsiprep_doc = pipeline.document("qsiprep_job")[1]
    assert qsiprep_doc["tool"]["stand_in"] is True
    assert set(qsiprep_doc["tool"]["versions"]) >= {"neuroflow-dagster", "dipy", "nibabel"}


def test_conversion_names_the_dicom_series_it_converted(pipeline: Pipeline) -> None:
    _path, doc = pipeline.document("bids_conversion_job")
    dicom = doc["inputs"]["dicom"]
    folder = pipeline.config.paths.dicom_incoming / SCAN_ID
    headers: dict[str, tuple[str, int]] = {}
    for file in folder.rglob("*"):
        if file.is_file():
            ds = pydicom.dcmread(file, stop_before_pixels=True)
            desc, n = headers.get(ds.SeriesInstanceUID, (str(ds.SeriesDescription), 0))
            headers[ds.SeriesInstanceUID] = (desc, n + 1)
    assert {s["SeriesInstanceUID"]: (s["SeriesDescription"], s["n_files"]) for s in dicom["series"]} == headers
    assert dicom["n_dicom"] == sum(n for _, n in headers.values()) and dicom["path"] == str(folder)
    assert doc["tool"]["versions"]["heudiconv"] and doc["tool"]["versions"]["dcm2niix"]
    heuristic = doc["tool"]["heuristic"]
    assert heuristic["sha256"] == sha256(Path(heuristic["file"]))
    assert doc["tool"]["scan_id"] == SCAN_ID
    assert doc["upstream"][0]["asset"] == "dicom_session" and doc["upstream"][0]["scan_id"] == SCAN_ID
    assert digest(pipeline.config.paths.dicom_incoming) == pipeline.dicom_before  # DICOM never written


def test_later_stages_name_the_checksums_and_runs_they_read(pipeline: Pipeline) -> None:
    bids_root = pipeline.config.paths.bids_root
    qsiprep_dir = layout.qsiprep_dir(pipeline.config)
    _, prep = pipeline.document("qsiprep_job")
    files = {row["path"]: row["sha256"] for row in prep["inputs"]["files"]["bids_root"]}
    dwi = [str(p.relative_to(bids_root)) for p in bids_root.glob("sub-SUBJA/ses-01/dwi/*_dwi.nii.gz")]
    assert dwi and all(files[f] == sha256(bids_root / f) for f in dwi)
    assert any(p.endswith("_dwi.bvec") for p in files) and any(p.endswith("_T1w.nii.gz") for p in files)
    assert [(u["asset"], u["partition"], u["run_id"]) for u in prep["upstream"]] == [
        ("bids_session", SESSION, pipeline.run_ids["bids_conversion_job"])
    ]

    _, recon = pipeline.document("qsirecon_job")
    read = {row["path"]: row["sha256"] for row in recon["inputs"]["files"]["derivatives/qsiprep"]}
    prep_file = "sub-SUBJA/sub-SUBJA_desc-neuroflow_provenance.json"
    assert read[prep_file] == sha256(qsiprep_dir / prep_file)  # the chain: recon names QSIPrep's record
    assert any(p.endswith("desc-preproc_dwi.nii.gz") for p in read)
    assert {(u["asset"], u["run_id"]) for u in recon["upstream"]} == {
        ("qsiprep_subject", pipeline.run_ids["qsiprep_job"]),
        ("bids_session", pipeline.run_ids["bids_conversion_job"]),
    }
    assert recon["settings"]["recon_specs"] == pipeline.config.pipelines.qsirecon.recon_specs.model_dump()

    _, parc = pipeline.document("qsiparc_job")
    read = {row["path"] for row in parc["inputs"]["files"]["derivatives/qsirecon"]}
    assert any(p.endswith("_dwimap.nii.gz") for p in read) and any(p.startswith("atlases/") for p in read)
    upstream = [(u["asset"], u["run_id"]) for u in parc["upstream"]]
    assert upstream == [("qsirecon_session", pipeline.run_ids["qsirecon_job"])]
    for _, doc in (pipeline.document(j) for j, _ in JOBS):
        assert doc["cost"]["inputs_seconds"] >= 0 and doc["cost"]["outputs_hashed_bytes"] > 0


def test_the_bids_dataset_with_provenance_files_is_valid_and_needs_its_bidsignore(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    report = validator.validate_dataset(pipeline.config.paths.bids_root)
    assert report.passed, report.summary()
    # Without the .bidsignore line the real validator rejects the file: the line is what makes it valid.
    copy = tmp_path / "bids"
    shutil.copytree(pipeline.config.paths.bids_root, copy)
    ignore = copy / ".bidsignore"
    ignore.write_text("".join(line + "\n" for line in ignore.read_text().splitlines() if "provenance" not in line))
    bare = validator.validate_dataset(copy)
    assert not bare.passed
    assert any("provenance.json" in f for issue in bare.errors for f in issue.files), bare.summary()


def test_a_new_run_replaces_the_provenance_with_its_own(pipeline: Pipeline) -> None:
    result = run_job(pipeline.defs, pipeline.instance, "qsiparc_job", SESSION)
    assert result.success, failure_text(result)
    path, doc = pipeline.document("qsiparc_job")
    assert doc["run"]["dagster_run_id"] == result.run_id != pipeline.run_ids["qsiparc_job"]
    assert prov.verify_outputs(path) == []
    assert list(path.parent.glob("*provenance.json")) == [path]
