"""The reconstruction stage per shell scheme, end to end through the project's own Dagster jobs.

One subject, two sessions: a single-shell one (b=1000) and a multi-shell one (b=1000 and 2000). Real
parts: the discovery sensor, HeudiConv + dcm2niix on synthetic DICOM, the stand-ins for QSIPrep and
QSIRecon (dipy) and QSIParc (parcellate), Dagster's execution of the stage jobs on a temporary SQLite
instance. QSIRecon itself only runs in its container: the stand-in writes what the chosen default spec
writes, and the check before a run calls dipy's own model constructors, as QSIRecon's nodes do.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from neuroflow_dagster.config import NeuroflowConfig, load_config
from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.defs import resources
from neuroflow_dagster.demo import synth
from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY, STATUS_KEY, STATUS_NOT_APPLICABLE
from neuroflow_dagster.tools import layout
from neuroflow_dagster_tests.test_provenance import failure_text, run_job
from neuroflow_dagster_tests.test_sensor import sensor_for, tick
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

pytestmark = pytest.mark.slow

SCANS = {"20240115_1430": {}, "20240116_1430": {"shells": (1000.0, 2000.0)}}  # single-shell, multi-shell
NO_RETRY = {"retry": {"max_retries": 0}}


@dataclass
class Subject:
    config: NeuroflowConfig
    instance: dg.DagsterInstance
    label: dict[str, str]  # ScanID -> session label

    def partition(self, scan_id: str) -> str:
        return f"{self.label[scan_id]}|SUBJA"

    def latest(self, asset: str, scan_id: str) -> dict:
        record = self.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[self.partition(scan_id)]), limit=1
        ).records[0]
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}

    def reconfigure(self, qsirecon: dict) -> dg.Definitions:
        """Rewrite the workspace's qsirecon section (the run workers read the file) and rebuild the graph."""
        path = self.config.source
        raw = yaml.safe_load(path.read_text())
        raw["pipelines"]["qsirecon"].update(qsirecon)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.config = load_config(path, environ={})
        resources._load.cache_clear()  # a run worker is a new process; this test's runs share one
        return build_definitions(self.config)


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Subject]:
    root = tmp_path_factory.mktemp("recon_asset")
    config = make_workspace(
        root / "ws",
        mapping=dict.fromkeys(SCANS, "SUBJ_A"),
        overrides={"pipelines": {s: NO_RETRY for s in ("bids_conversion", "qsiprep", "qsirecon", "qsiparc")}},
    )
    for seed, (scan_id, kw) in enumerate(SCANS.items()):
        synth.write_session(config.paths.dicom_incoming / scan_id, seed=seed, n_directions=12,
                            series=("t1w", "dwi"), **kw)
    defs = build_definitions(config)
    (root / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "home")) as instance:
        tick(sensor_for(config), instance, None)
        with (config.paths.state / "registry.tsv").open() as fh:
            label = {row["scan_id"]: row["session_id"] for row in csv.DictReader(fh, delimiter="\t")}
        ses = Subject(config, instance, label)
        for scan_id in SCANS:
            result = run_job(defs, instance, "bids_conversion_job", ses.partition(scan_id))
            assert result.success, failure_text(result)
        result = run_job(defs, instance, "qsiprep_job", "SUBJA")
        assert result.success, failure_text(result)
        for job in ("qsirecon_job", "qsiparc_job"):
            for scan_id in SCANS:
                result = run_job(defs, instance, job, ses.partition(scan_id))
                assert result.success, failure_text(result)
        yield ses


def test_each_session_is_reconstructed_with_the_spec_of_its_scheme(subject: Subject) -> None:
    single, multi = SCANS
    expect = {single: ("single_shell", "ss3t_fod_autotrack", "SS3TAutoTrack", 7),
              multi: ("multi_shell", "dipy_dki", "DKI", 12)}
    recon_root = layout.qsirecon_dir(subject.config)
    for scan_id, (scheme, spec, suffix, n_maps) in expect.items():
        meta = subject.latest("qsirecon_session", scan_id)
        assert (meta["shell_scheme"], meta["recon_spec"]) == (scheme, spec), meta
        assert meta["shells"].endswith(scheme.replace("_", "-"))
        ses = subject.label[scan_id]
        maps = layout.qsirecon_maps(recon_root, "SUBJA", ses)
        assert {p.parts[-5] for p in maps} == {f"qsirecon-{suffix}"} and len(maps) == n_maps
        tables = list((layout.qsiparc_dir(subject.config) / "sub-SUBJA" / f"ses-{ses}").rglob("*_diffmap.tsv"))
        assert len(tables) == n_maps  # one table per map and atlas (the stand-in's one atlas)


def test_no_spec_for_the_scheme_is_not_applicable_and_so_is_the_parcellation(subject: Subject) -> None:
    single, multi = SCANS
    defs = subject.reconfigure({"recon_specs": {"single_shell": None, "multi_shell": "dipy_dki",
                                                "cartesian": "dsi_studio_gqi"}})
    for job in ("qsirecon_job", "qsiparc_job"):
        result = run_job(defs, subject.instance, job, subject.partition(single))
        assert result.success, failure_text(result)
    recon = subject.latest("qsirecon_session", single)
    assert recon[STATUS_KEY] == STATUS_NOT_APPLICABLE and recon["shell_scheme"] == "single_shell"
    assert recon["reason"].startswith(f"sub-SUBJA ses-{subject.label[single]} is single-shell (b=0 x1, b=1000 x12")
    assert recon["reason"].endswith("pipelines.qsirecon.recon_specs.single_shell is not set: no reconstruction "
                                    "for that scheme")
    parc = subject.latest("qsiparc_session", single)
    assert parc[STATUS_KEY] == STATUS_NOT_APPLICABLE and parc["reason"] == f"no reconstruction: {recon['reason']}"
    # The multi-shell session still has its spec: reconstructed again, not touched by the other's state.
    result = run_job(defs, subject.instance, "qsirecon_job", subject.partition(multi))
    assert result.success, failure_text(result)
    assert subject.latest("qsirecon_session", multi)["recon_spec"] == "dipy_dki"


def test_a_new_spec_for_the_scheme_replaces_the_sessions_old_workflow(subject: Subject) -> None:
    """single_shell: ss3t_fod_autotrack -> dsi_studio_gqi: the session's maps move from qsirecon-SS3TAutoTrack
    to qsirecon-DSIStudio, and the old ones go (QSIParc would parcellate both)."""
    single, multi = SCANS
    ses = subject.label[single]
    recon_root = layout.qsirecon_dir(subject.config)
    old = recon_root / "derivatives/qsirecon-SS3TAutoTrack/sub-SUBJA" / f"ses-{ses}"
    assert old.is_dir()
    defs = subject.reconfigure({"recon_specs": {"single_shell": "dsi_studio_gqi", "multi_shell": "dipy_dki",
                                                "cartesian": "dsi_studio_gqi"}})
    for job in ("qsirecon_job", "qsiparc_job"):
        result = run_job(defs, subject.instance, job, subject.partition(single))
        assert result.success, failure_text(result)
    meta = subject.latest("qsirecon_session", single)
    assert meta["recon_spec"] == "dsi_studio_gqi"
    assert meta["removed_stale"] == f"derivatives/qsirecon-SS3TAutoTrack/sub-SUBJA/ses-{ses}"
    assert not old.exists()
    assert {p.parts[-5] for p in layout.qsirecon_maps(recon_root, "SUBJA", ses)} == {"qsirecon-DSIStudio"}
    tables = list((layout.qsiparc_dir(subject.config) / "sub-SUBJA" / f"ses-{ses}").rglob("*_diffmap.tsv"))
    assert len(tables) == 7 and all("software-DSIStudio" in t.name for t in tables)
    # The other session's workflow folder is its own: untouched.
    assert (recon_root / "derivatives/qsirecon-DKI/sub-SUBJA" / f"ses-{subject.label[multi]}").is_dir()


def test_what_dipy_refuses_fails_at_once_as_validation_with_dipys_words(subject: Subject, tmp_path: Path) -> None:
    """A site spec file that fits DKI, chosen for single-shell data: refused before any tool starts."""
    single, _ = SCANS
    spec = tmp_path / "site_dki.yaml"
    spec.write_text(yaml.safe_dump({"name": "site_dki", "nodes": [
        {"action": "DKI_reconstruction", "input": "qsirecon", "name": "dki", "software": "Dipy",
         "qsirecon_suffix": "SiteDKI"}]}))
    # runtime local: QSIRecon is not installed here, so a started tool would fail differently (configuration).
    specs = {"single_shell": str(spec), "multi_shell": "dipy_dki", "cartesian": "dsi_studio_gqi"}
    defs = subject.reconfigure({"runtime": "local", "recon_specs": specs})
    logs_before = set((subject.config.paths.log_dir / "qsirecon").glob("*"))
    result = run_job(defs, subject.instance, "qsirecon_job", subject.partition(single))
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    data = failures[0].step_failure_data.user_failure_data
    assert data is not None and data.metadata[FAILURE_CLASS_KEY].value == "validation"
    text = str(data.description)
    assert (f"sub-SUBJA ses-{subject.label[single]}: {spec} cannot reconstruct "
            f"sub-SUBJA_ses-{subject.label[single]}_space-ACPC_desc-preproc_dwi.nii.gz (b=0 x1, b=1000 x12: "
            "single-shell): dipy's DiffusionKurtosisModel refuses its gradient table: DKI requires at least 3 "
            "b-values (which can include b=0).") in text
    assert set((subject.config.paths.log_dir / "qsirecon").glob("*")) == logs_before  # no tool was started
