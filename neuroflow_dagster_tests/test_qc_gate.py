"""The image QC gate's domain: the `qc` config section, verdicts from QC tables, the approvals store.

Tables are QSIPrep 1.1.1's real layout (test_image_qc.REAL_TABLE_1_1_1, written by QSIPrep's own
code) with the two gated measures set to the values measured on the demo: good sessions
raw_masked_neighbor_corr 0.90-0.99 and 0 bad slices, the poor session 0.17 and 39.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from neuroflow_dagster.config import QC_METRIC_NAME, NeuroflowConfig, load_config
from neuroflow_dagster.errors import ConfigError
from neuroflow_dagster.qc import approvals
from neuroflow_dagster.qc.gate import FAILED, NOT_APPLICABLE, PASSED, WARN, session_gate, session_verdict
from neuroflow_dagster.tools.qc_table import DSI_STUDIO_MEASURES, MOTION_COLUMNS, image_qc_name
from neuroflow_dagster_tests.test_image_qc import REAL_TABLE_1_1_1

GOOD = (0.991714, 0.0)  # masked neighbour correlation, bad slices in REAL_TABLE_1_1_1


def write_session(config: NeuroflowConfig, participant: str, session: str, corr: float | str | None,
                  bad: float | str | None, *, table: bool = True) -> Path:
    """A QSIPrep-shaped session: a preprocessed DWI and (optionally) its QC table with the two values."""
    dwi = config.paths.derivatives / "qsiprep" / f"sub-{participant}" / f"ses-{session}" / "dwi"
    dwi.mkdir(parents=True, exist_ok=True)
    (dwi / f"sub-{participant}_ses-{session}_space-ACPC_desc-preproc_dwi.nii.gz").write_bytes(b"")
    path = dwi / image_qc_name(participant, session)
    if table:
        header, row = REAL_TABLE_1_1_1.split("\n")[:2]
        names, cells = header.split("\t"), row.split("\t")
        for name, value in (("raw_masked_neighbor_corr", corr), ("raw_num_bad_slices", bad)):
            cells[names.index(name)] = "n/a" if value is None else str(value)
        path.write_text("\t".join(names) + "\n" + "\t".join(cells) + "\n")
    return path


# --------------------------------------------------------------------------- config


def test_defaults_are_the_measured_thresholds(make_config: Callable[..., NeuroflowConfig]) -> None:
    qc = make_config().qc
    assert qc.enabled and qc.missing_table == "fail" and qc.missing_metric == "warn"
    corr, bad = qc.metrics["raw_masked_neighbor_corr"], qc.metrics["raw_num_bad_slices"]
    assert (corr.fail_below, corr.warn_below, corr.fail_above, corr.warn_above) == (0.5, 0.8, None, None)
    assert (bad.fail_above, bad.warn_above, bad.fail_below, bad.warn_below) == (5, 0, None, None)


@pytest.mark.parametrize(
    ("qc", "message"),
    [
        ({"metrics": {"raw_masked_neigbor_corr": {"fail_below": 0.5}}},
         "qc.metrics: Value error, 'raw_masked_neigbor_corr': not a measure of QSIPrep's image QC table"),
        ({"metrics": {"mean_fd": {}}}, "qc.metrics.mean_fd: Value error, give at least one of"),
        ({"metrics": {"raw_masked_neighbor_corr": {"fail_below": 0.9, "warn_below": 0.8}}},
         "qc.metrics.raw_masked_neighbor_corr: Value error, fail_below (0.9) is above warn_below (0.8)"),
        ({"metrics": {"raw_num_bad_slices": {"fail_above": 1, "warn_above": 3}}},
         "qc.metrics.raw_num_bad_slices: Value error, fail_above (1) is below warn_above (3)"),
        ({"metrics": {"raw_num_bad_slices": {"fail_abov": 1}}}, "qc.metrics.raw_num_bad_slices.fail_abov: unknown key"),
        ({"missing_table": "maybe"}, "qc.missing_table: Input should be 'pass', 'warn' or 'fail'"),
        ({"thresholds": {}}, "qc.thresholds: unknown key"),
        # the cohort rule's settings
        ({"cohort": {"min_sessions": 3}}, "qc.cohort.min_sessions: Input should be greater than or equal to 5"),
        ({"cohort": {"warn_mads": 4, "fail_mads": 3}}, "qc.cohort: Value error, fail_mads (3) is below warn_mads (4)"),
        ({"cohort": {"group_by": ["Series Description"]}},
         "qc.cohort.group_by: Value error, 'Series Description': not a BIDS sidecar key"),
        ({"cohort": {"min_session": 20}}, "qc.cohort.min_session: unknown key"),
        ({"mode": "relative"}, "qc.mode: Input should be 'cohort' or 'absolute'"),
        ({"metrics": {"raw_num_bad_slices": {"fail_above": 5, "min_spread": -1}}},
         "qc.metrics.raw_num_bad_slices.min_spread: Input should be greater than or equal to 0"),
    ],
)
def test_bad_qc_section_names_the_key(tmp_path: Path, qc: dict, message: str) -> None:
    file = config_file(tmp_path, qc)
    with pytest.raises(ConfigError) as err:
        load_config(file, environ={})
    assert str(file) in str(err.value) and message in str(err.value)


def config_file(tmp_path: Path, qc: dict | None = None) -> Path:
    """A neuroflow.yaml with this `qc` section (none: the defaults)."""
    import yaml

    file = tmp_path / "neuroflow.yaml"
    paths = {k: str(tmp_path / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}
    file.write_text(yaml.safe_dump({"paths": paths, **({"qc": qc} if qc is not None else {})}))
    return file


def test_env_override_of_a_threshold(tmp_path: Path) -> None:
    file = config_file(tmp_path)
    config = load_config(file, environ={"NEUROFLOW_QC__METRICS__RAW_MASKED_NEIGHBOR_CORR__FAIL_BELOW": "0.3"})
    assert config.qc.metrics["raw_masked_neighbor_corr"].fail_below == 0.3


def test_every_numeric_column_of_the_table_is_a_valid_measure_name() -> None:
    names = [f"{p}_{m}" for p in ("raw", "t1") for m in DSI_STUDIO_MEASURES] + [*MOTION_COLUMNS, "t1_dice_distance"]
    names += ["CNR0_mean", "fieldmap_hz_mean", "t1post_neighbor_corr", "raw_gradient_table_ratio"]
    assert [n for n in names if not QC_METRIC_NAME.match(n)] == []
    header = REAL_TABLE_1_1_1.split("\n")[0].split("\t")
    assert all(QC_METRIC_NAME.match(n) for n in header[:33])


# --------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("corr", "bad", "level", "reason"),
    [
        (0.991714, 0.0, PASSED, ""),
        (0.90, 0.0, PASSED, ""),
        (0.8, 0.0, PASSED, ""),  # equal to a threshold is within it
        (0.75, 0.0, WARN, "raw_masked_neighbor_corr 0.75 < 0.8"),
        (0.95, 2.0, WARN, "raw_num_bad_slices 2 > 0"),
        (0.95, 5.0, WARN, "raw_num_bad_slices 5 > 0"),
        (0.17, 39.0, FAILED, "raw_masked_neighbor_corr 0.17 < 0.5; raw_num_bad_slices 39 > 5"),  # the demo's poor one
        (0.45, 0.0, FAILED, "raw_masked_neighbor_corr 0.45 < 0.5"),
        (0.95, 6.0, FAILED, "raw_num_bad_slices 6 > 5"),
        (None, 0.0, WARN, "raw_masked_neighbor_corr not measured"),
    ],
)
def test_session_verdict(make_config: Callable[..., NeuroflowConfig], corr: float | None, bad: float,
                         level: str, reason: str) -> None:
    config = make_config()
    write_session(config, "0075", "01", corr, bad)
    verdict = session_verdict(config, "0075", "01")
    assert verdict.level == level, verdict
    assert reason in verdict.summary()
    assert {m.metric for m in verdict.metrics} == {"raw_masked_neighbor_corr", "raw_num_bad_slices"}
    assert verdict.blocking == (level == FAILED)


def test_missing_and_damaged_tables(make_config: Callable[..., NeuroflowConfig]) -> None:
    config = make_config()
    assert session_verdict(config, "0075", "01").level == NOT_APPLICABLE  # nothing preprocessed
    write_session(config, "0075", "01", None, None, table=False)
    verdict = session_verdict(config, "0075", "01")
    assert verdict.level == FAILED and "no image QC table" in verdict.summary()
    assert session_verdict(make_config(qc={"missing_table": "warn"}), "0075", "01").level == WARN
    path = write_session(config, "0075", "01", 0.9, 0)
    path.write_text(path.read_text() + "1\t2\n")  # a second row: not QSIPrep's table
    verdict = session_verdict(config, "0075", "01")
    assert verdict.level == FAILED and "cannot read" in verdict.summary()


def test_worst_table_decides_and_thresholds_come_from_config(make_config: Callable[..., NeuroflowConfig]) -> None:
    config = make_config()
    write_session(config, "0075", "01", 0.95, 0)
    run2 = write_session(config, "0075", "01", 0.3, 0)
    run2.rename(run2.with_name("sub-0075_ses-01_run-2_space-ACPC_desc-image_qc.tsv"))
    write_session(config, "0075", "01", 0.95, 0)
    verdict = session_verdict(config, "0075", "01")
    assert verdict.level == FAILED and len(verdict.tables) == 2
    failed = [m.table for m in verdict.metrics if m.level == FAILED]
    assert failed == ["sub-0075_ses-01_run-2_space-ACPC_desc-image_qc.tsv"]
    strict = make_config(qc={"metrics": {"raw_masked_neighbor_corr": {"fail_below": 0.99}}})
    write_session(strict, "0076", "01", 0.95, 39)
    verdict = session_verdict(strict, "0076", "01")
    assert verdict.level == FAILED and [m.metric for m in verdict.metrics] == ["raw_masked_neighbor_corr"]
    off = make_config(qc={"enabled": False})
    assert session_verdict(off, "0076", "01").level == PASSED


def test_figures_of_the_session_are_found(make_config: Callable[..., NeuroflowConfig]) -> None:
    config = make_config()
    write_session(config, "0075", "01", 0.9, 0)
    figures = config.paths.derivatives / "qsiprep" / "sub-0075" / "figures"
    figures.mkdir()
    for name in ("sub-0075_ses-01_desc-carpetplot_dwi.svg", "sub-0075_ses-02_desc-carpetplot_dwi.svg",
                 "sub-0075_ses-01_desc-sampling_scheme_dwi.gif", "sub-0075_ses-01_notes.txt"):
        (figures / name).write_text("x")
    assert [p.name for p in session_verdict(config, "0075", "01").figures] == [
        "sub-0075_ses-01_desc-carpetplot_dwi.svg", "sub-0075_ses-01_desc-sampling_scheme_dwi.gif"]


# --------------------------------------------------------------------------- approvals


def test_approval_lets_a_failed_session_through_and_is_append_only(make_config: Callable[..., NeuroflowConfig]) -> None:
    config = make_config()
    write_session(config, "0075", "01", 0.17, 39)
    gate = session_gate(config, "SCAN1", "0075", "01")
    assert gate.state == FAILED and gate.blocks
    with pytest.raises(ValueError, match="needs a reason"):
        approvals.approve(config, "SCAN1", "0075", "01", "   ")
    assert not approvals.path(config).exists()
    approvals.approve(config, "SCAN1", "0075", "01", "dropouts in 3 volumes only; usable", by="dr.who",
                      qc=gate.describe())
    gate = session_gate(config, "SCAN1", "0075", "01")
    assert gate.state == "approved" and not gate.blocks
    assert gate.approval is not None
    assert gate.describe().endswith(f"approved by dr.who at {gate.approval.at}: dropouts in 3 volumes only; usable")
    assert session_gate(config, "SCAN2", "0075", "01").state == FAILED  # another ScanID: not approved
    assert approvals.revoke(config, "SCAN1", "second look: not usable", by="dr.no")
    assert session_gate(config, "SCAN1", "0075", "01").state == FAILED
    assert not approvals.revoke(config, "SCAN1", "again")
    lines = [json.loads(line) for line in approvals.path(config).read_text().splitlines()]
    assert [(e["action"], e["by"]) for e in lines] == [("approve", "dr.who"), ("revoke", "dr.no")]
    assert "raw_num_bad_slices 39 > 5" in lines[0]["qc"]


def test_approvals_survive_a_new_process_and_a_cut_line(make_config: Callable[..., NeuroflowConfig]) -> None:
    config = make_config()
    approvals.approve(config, "SCAN1", "0075", "01", "looked at it")
    with approvals.path(config).open("a") as fh:
        fh.write('{"action": "approve", "scan_id": "SCAN2", "rea')  # a crash mid-write
    code = ("import sys; from neuroflow_dagster.config import NeuroflowConfig; "
            "from neuroflow_dagster.qc import approvals; c = NeuroflowConfig.model_validate_json(sys.argv[1]); "
            "print(sorted(approvals.load_approvals(c)))")
    out = subprocess.run([sys.executable, "-c", code, config.model_dump_json()], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "['SCAN1']"


def test_warn_is_not_approved(make_config: Callable[..., NeuroflowConfig]) -> None:
    config = make_config()
    write_session(config, "0075", "01", 0.7, 0)
    approvals.approve(config, "SCAN1", "0075", "01", "fine")
    assert session_gate(config, "SCAN1", "0075", "01").state == WARN
