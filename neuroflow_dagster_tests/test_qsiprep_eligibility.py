"""QSIPrep only when it can run: the anatomical rule (eligibility.py) and the qsiprep asset that applies it.

QSIPrep fails a whole subject without an image of its --anat-modality ("No T1w images found for
participant ..."), so such a subject is held: the automation never requests it (test_automation.py) and
the asset, launched by hand, refuses it at once (class validation, no tool started). The rule is plain
Python, decided on the sessions the run would be given; the asset test runs the real asset through
Dagster on a real BIDS tree and, once a T1w arrives, the real QSIPrep stand-in.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import nibabel as nib
import numpy as np
import pytest

from neuroflow_dagster.bids.verdicts import save_verdict
from neuroflow_dagster.config import QsiprepConfig
from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.eligibility import anatomical_hold, parse_suffixes, plan_qsiprep
from neuroflow_dagster_tests.bids_files import write_t1w
from neuroflow_dagster_tests.test_builtin_robustness import scheme, signal
from neuroflow_dagster_tests.workspace_fixtures import make_workspace


def test_anatomical_hold_is_the_shared_rule() -> None:
    assert anatomical_hold("T1w", {"01": {"dwi"}, "02": {"T1w", "dwi"}}) is None
    assert anatomical_hold("T1w", {"01": {"dwi"}, "02": {"dwi", "T2w"}}) == "no T1w in any session"
    assert anatomical_hold("T2w", {"01": ["T2w"]}) is None
    assert anatomical_hold("T1w", {}) == "no T1w in any session"
    assert anatomical_hold("none", {"01": {"dwi"}}) is None
    # sessionwise: one session must have both (each DWI session is a group of its own)
    assert anatomical_hold("T1w", {"01": {"dwi"}, "02": {"T1w"}}, sessionwise=True) == (
        "no session with both DWI and T1w (subject_anatomical_reference: sessionwise)")
    assert anatomical_hold("T1w", {"01": {"dwi"}, "02": {"T1w", "dwi"}}, sessionwise=True) is None
    # the metadata bids_session writes
    assert parse_suffixes("T1w, dwi, epi") == {"T1w", "dwi", "epi"} and parse_suffixes("none") == set()
    assert parse_suffixes(None) == set()


def test_plan_takes_dwi_sessions_and_lends_anatomy_only_sessions() -> None:
    stage = QsiprepConfig()
    plan = plan_qsiprep(stage, {"01": {"dwi"}, "02": {"T1w"}, "03": {"T1w", "dwi", "epi"}, "04": {"FLAIR"}})
    assert (plan.sessions, plan.anat_sessions, plan.hold) == (["01", "03"], ["02"], None)
    assert plan.left_out == {"04": "no dwi in BIDS"} and plan.all_sessions == ["01", "02", "03"]
    held = plan_qsiprep(stage, {"01": {"dwi"}, "04": {"FLAIR"}})
    assert held.hold == "no T1w in any session"
    # Nothing to preprocess: not held (the asset records "not applicable"), the anatomy session left out.
    empty = plan_qsiprep(stage, {"02": {"T1w"}})
    assert (empty.sessions, empty.anat_sessions, empty.hold) == ([], [], None)
    assert empty.left_out == {"02": "no dwi in BIDS"}
    sessionwise = plan_qsiprep(QsiprepConfig(subject_anatomical_reference="sessionwise"),
                               {"01": {"dwi"}, "02": {"T1w"}, "03": {"T1w", "dwi"}})
    assert (sessionwise.sessions, sessionwise.anat_sessions, sessionwise.hold) == (["03"], [], None)
    assert sessionwise.left_out == {
        "01": "no T1w in this session (subject_anatomical_reference: sessionwise)", "02": "no dwi in BIDS"}
    none = plan_qsiprep(QsiprepConfig(anat_modality="none"), {"01": {"dwi"}, "02": {"T1w"}})
    assert (none.sessions, none.anat_sessions, none.hold) == (["01"], [], None)


def write_dwi_session(bids: Path, participant: str, session: str) -> None:
    bvals, bvecs = scheme()
    d = bids / f"sub-{participant}" / f"ses-{session}" / "dwi"
    d.mkdir(parents=True)
    stem = d / f"sub-{participant}_ses-{session}_dwi"
    nib.save(nib.Nifti1Image(signal(bvals, bvecs), np.diag([2.0, 2.0, 2.5, 1.0])), f"{stem}.nii.gz")
    np.savetxt(f"{stem}.bval", bvals[None], fmt="%g")
    np.savetxt(f"{stem}.bvec", bvecs.T, fmt="%.6f")


def run_qsiprep(config, instance: dg.DagsterInstance, subject: str) -> dg.ExecuteInProcessResult:
    return build_definitions(config).resolve_job_def("qsiprep_job").execute_in_process(
        instance=instance, partition_key=subject, raise_on_error=False
    )


@pytest.mark.slow
def test_the_asset_refuses_a_subject_without_a_t1w_then_takes_the_t1w_of_a_later_visit(tmp_path: Path) -> None:
    config = make_workspace(tmp_path / "ws", overrides={"pipelines": {"qsiprep": {"retry": {"max_retries": 0}}}},
                            mapping={})
    registry = Registry(config.paths.state)
    registry.assign("SCAN_1", "SUBJA")
    bids = config.paths.bids_root
    write_dwi_session(bids, "SUBJA", "01")
    save_verdict(config.paths.state, "SUBJA", "01", True, "valid")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("subjects", ["SUBJA"])
        refused = run_qsiprep(config, instance, "SUBJA")
        assert not refused.success
        [failure] = [e for e in refused.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        user = failure.step_failure_data.user_failure_data
        assert user.metadata["neuroflow/failure_class"].value == "validation"
        assert user.description == ("sub-SUBJA: QSIPrep cannot run: no T1w in any session "
                                    "(pipelines.qsiprep.anat_modality: T1w); held until a session with it is "
                                    "converted")
        assert not (config.paths.work_dir / "qsiprep").exists()  # no tool started, nothing staged
        assert not list(config.paths.log_dir.rglob("*.log"))

        # A second visit brings only a T1w (no DWI): it lends it to the subject's reference.
        registry.reload()
        registry.assign("SCAN_2", "SUBJA")
        write_t1w(bids, "SUBJA", "02")
        save_verdict(config.paths.state, "SUBJA", "02", True, "valid")
        done = run_qsiprep(config, instance, "SUBJA")
        assert done.success
        [mat] = done.asset_materializations_for_node("qsiprep_subject")
        meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        assert meta["neuroflow/status"] == "done"
        assert meta["sessions"] == "01" and meta["anat_only_sessions"] == "02"
        assert "--session-label 01 02" in meta["command"] and "--anat-modality T1w" in meta["command"]
        out = config.paths.derivatives / "qsiprep" / "sub-SUBJA"
        assert list((out / "ses-01" / "dwi").glob("*_desc-preproc_dwi.nii.gz"))
        assert not (out / "ses-02").exists()  # no DWI, no DWI outputs
