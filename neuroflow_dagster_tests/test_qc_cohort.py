"""The cohort rule of the image QC gate: statistics, acquisition groups, reasons, floors, fixed verdicts.

Sessions are QSIPrep-shaped (test_qc_gate.write_session: QSIPrep 1.1.1's real QC table layout) with the
raw BIDS sidecar dcm2niix writes next to the DWI (SeriesDescription, ProtocolName,
ManufacturersModelName), which is where the gate reads a session's acquisition group.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

from neuroflow_dagster.config import NeuroflowConfig, load_config
from neuroflow_dagster.discovery.exclusions import exclude
from neuroflow_dagster.qc import approvals, rejudge
from neuroflow_dagster.qc.cohort import MAD_TO_SIGMA, Group, GroupValues, acquisition_group, median_without
from neuroflow_dagster.qc.gate import (
    FAILED,
    PASSED,
    WARN,
    evaluate_session,
    session_gate,
    session_verdict,
    store_of,
)
from neuroflow_dagster.qc.store import Store
from neuroflow_dagster_tests.test_qc_gate import config_file, write_session

PROTOCOL, MODEL = "ep2d_diff_mddw_12dir", "Prisma_fit"


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., NeuroflowConfig]:
    """Factory: each call a workspace of its own (its own store), ``qc`` settings given."""
    count = iter(range(100))

    def build(qc: dict | None = None) -> NeuroflowConfig:
        root = tmp_path / f"ws{next(count)}"
        paths = {k: str(root / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}
        return NeuroflowConfig.model_validate({"paths": paths, "qc": qc or {}})

    return build


def add_session(config: NeuroflowConfig, n: int, corr: float, bad: float = 0, *, protocol: str = PROTOCOL,
                model: str | None = MODEL, judge: bool = True) -> str:
    """Session ``n`` (subject S<n>, ScanID SCAN<n>) with its QC table and raw DWI sidecar; judged by the
    QC asset's evaluation unless ``judge`` is false. Returns the ScanID."""
    participant, scan_id = f"S{n:03d}", f"SCAN{n:03d}"
    write_session(config, participant, "01", corr, bad)
    dwi = config.paths.bids_root / f"sub-{participant}" / "ses-01" / "dwi"
    dwi.mkdir(parents=True, exist_ok=True)
    sidecar = {"SeriesDescription": protocol, "ProtocolName": protocol, "Manufacturer": "Siemens"}
    if model is not None:
        sidecar["ManufacturersModelName"] = model
    (dwi / f"sub-{participant}_ses-01_dwi.json").write_text(json.dumps(sidecar))
    if judge:
        evaluate_session(config, scan_id, participant, "01", by="test")
    return scan_id


def cohort(config: NeuroflowConfig, values: list[float], start: int = 100, **kw: object) -> None:
    for i, value in enumerate(values):
        add_session(config, start + i, value, **kw)  # type: ignore[arg-type]


def spread_values(n: int, centre: float = 0.93, step: float = 0.004) -> list[float]:
    """n values around centre, evenly spaced (median centre, MAD about n/4 steps)."""
    return [round(centre + (i - (n - 1) / 2) * step, 4) for i in range(n)]


# --------------------------------------------------------------------------- statistics


def test_median_and_mad_without_one_session_match_a_direct_computation() -> None:
    rng = random.Random(3)
    values = GroupValues("g")
    for k in range(41):
        for _ in range(1 if k % 7 else 2):  # some sessions have two series in the group
            values.add(f"S{k}", round(rng.gauss(0.9, 0.03), 2))  # rounded: duplicates
    for scan_id in values.by_scan:
        rest = [v for s, vs in values.by_scan.items() if s != scan_id for v in vs]
        median = statistics.median(rest)
        mad = statistics.median(abs(v - median) for v in rest)
        stats = values.stats(without=scan_id)
        assert stats is not None
        assert stats.median == pytest.approx(median) and stats.mad == pytest.approx(mad), scan_id
        assert stats.spread == pytest.approx(MAD_TO_SIGMA * mad)
        assert (stats.n, stats.sessions) == (len(rest), len(values.by_scan) - 1)
    whole = values.stats()
    assert whole is not None and whole.median == pytest.approx(statistics.median(values.values))
    assert values.stats(min_spread=1.0).spread == 1.0  # type: ignore[union-attr]
    assert median_without([1.0, 2.0, 2.0, 3.0], [2.0, 2.0]) == 2.0
    assert median_without([1.0], [1.0]) is None
    with pytest.raises(ValueError, match="not among"):
        median_without([1.0, 2.0], [5.0])
    lonely = GroupValues("g")
    lonely.add("A", 0.5)
    assert lonely.stats(without="A") is None


# --------------------------------------------------------------------------- acquisition groups


def test_the_group_comes_from_the_raw_sidecars_of_the_series_the_table_was_made_from(tmp_path: Path) -> None:
    dwi = tmp_path / "sub-01" / "ses-01" / "dwi"
    dwi.mkdir(parents=True)
    prisma = {"ManufacturersModelName": "Prisma"}
    for name, data in {
        "sub-01_ses-01_acq-multishell_dir-AP_dwi.json": {"SeriesDescription": "dMRI_AP", **prisma},
        "sub-01_ses-01_acq-multishell_dir-PA_dwi.json": {"SeriesDescription": "dMRI_PA", **prisma},
        "sub-01_ses-01_acq-b1000_dwi.json": {"SeriesDescription": "DTI_30", "MagneticFieldStrength": 3},
    }.items():
        (dwi / name).write_text(json.dumps(data))
    keys = ["SeriesDescription", "ManufacturersModelName"]
    merged = acquisition_group(tmp_path, "01", "01", "sub-01_ses-01_acq-multishell_space-ACPC_desc-image_qc.tsv", keys)
    assert merged.fields == (("SeriesDescription", "dMRI_AP + dMRI_PA"), ("ManufacturersModelName", "Prisma"))
    assert merged.label == "protocol dMRI_AP + dMRI_PA on Prisma"
    one = acquisition_group(tmp_path, "01", "01", "sub-01_ses-01_acq-b1000_space-ACPC_desc-image_qc.tsv", keys)
    assert one.label == "protocol DTI_30 on an unknown scanner model"
    field = acquisition_group(tmp_path, "01", "01", "sub-01_ses-01_acq-b1000_space-ACPC_desc-image_qc.tsv",
                              ["MagneticFieldStrength"])
    assert field.label == "MagneticFieldStrength 3"
    nothing = acquisition_group(tmp_path, "02", "01", "sub-02_ses-01_space-ACPC_desc-image_qc.tsv", keys)
    assert nothing.label == "protocol unknown on an unknown scanner model"
    assert Group.from_key(merged.key) == merged


# --------------------------------------------------------------------------- configuration


def test_cohort_defaults_and_environment(tmp_path: Path) -> None:
    """Bad cohort settings are refused with their key: test_qc_gate.test_bad_qc_section_names_the_key."""
    file = config_file(tmp_path)
    qc = load_config(file, environ={}).qc
    assert qc.mode == "cohort" and qc.cohort.min_sessions == 20
    assert (qc.cohort.warn_mads, qc.cohort.fail_mads) == (3, 4)
    assert qc.cohort.group_by == ["SeriesDescription", "ManufacturersModelName"]
    qc = load_config(file, environ={"NEUROFLOW_QC__COHORT__MIN_SESSIONS": "50",
                                    "NEUROFLOW_QC__COHORT__GROUP_BY": "[ProtocolName]"}).qc
    assert qc.cohort.min_sessions == 50 and qc.cohort.group_by == ["ProtocolName"]


# --------------------------------------------------------------------------- the rule


def test_an_outlier_of_its_cohort_is_held_and_the_reason_names_the_cohort(
    make_config: Callable[..., NeuroflowConfig],
) -> None:
    config = make_config()
    cohort(config, spread_values(24))  # median 0.93, MAD 0.024 -> spread 0.0356
    scan = add_session(config, 1, 0.78, judge=False)
    verdict = session_verdict(config, "S001", "01", scan)
    corr = next(m for m in verdict.metrics if m.metric == "raw_masked_neighbor_corr")
    assert verdict.level == FAILED and corr.level == FAILED and corr.basis == "cohort"
    assert corr.reason == ("raw_masked_neighbor_corr 0.78 is 4.2 MADs below the median 0.93 of 24 sessions of "
                           f"protocol {PROTOCOL} on {MODEL}")
    assert corr.score == pytest.approx((0.78 - 0.93) / (MAD_TO_SIGMA * 0.024), abs=0.01)
    assert "warn > 3 MADs below the median 0.93" in corr.rule and "floor fail < 0.5" in corr.rule
    assert verdict.summary().startswith(f"QC failed: {corr.reason}")
    # the same value 3.x MADs out warns; inside 3 MADs it passes, though below the absolute warn_below 0.8
    add_session(config, 2, 0.82, judge=False)
    assert session_verdict(config, "S002", "01", "SCAN002").level == WARN
    low = make_config()
    cohort(low, spread_values(24, centre=0.76))
    add_session(low, 3, 0.74, judge=False)
    passed = session_verdict(low, "S003", "01", "SCAN003")
    assert passed.level == PASSED, passed.summary()  # 0.74 < absolute warn 0.8: the cohort decides
    assert "0.6 MADs below the median 0.76" in passed.metrics[0].reason


def test_absolute_floors_always_apply(make_config: Callable[..., NeuroflowConfig]) -> None:
    config = make_config()
    cohort(config, spread_values(24, centre=0.46, step=0.002))  # a whole protocol below the floor 0.5
    add_session(config, 1, 0.46, judge=False)
    verdict = session_verdict(config, "S001", "01", "SCAN001")
    corr = verdict.metrics[0]
    assert verdict.level == FAILED and corr.basis == "floor"
    assert corr.reason.startswith("raw_masked_neighbor_corr 0.46 < 0.5 (floor; 0.0 MADs above the median 0.46 of 24")
    only_warn = make_config(qc={"cohort": {"fail_mads": None}})
    cohort(only_warn, spread_values(24))
    add_session(only_warn, 2, 0.6, judge=False)  # 9 MADs below, above the floor: the cohort only warns
    assert session_verdict(only_warn, "S002", "01", "SCAN002").level == WARN
    add_session(only_warn, 3, 0.4, judge=False)
    assert session_verdict(only_warn, "S003", "01", "SCAN003").level == FAILED


def test_below_the_minimum_group_size_the_absolute_thresholds_apply_and_say_so(
    make_config: Callable[..., NeuroflowConfig],
) -> None:
    config = make_config()
    cohort(config, spread_values(19))
    add_session(config, 1, 0.78, judge=False)  # an outlier of the 19, but 0.78 is only an absolute warning
    verdict = session_verdict(config, "S001", "01", "SCAN001")
    assert verdict.level == WARN and verdict.metrics[0].basis == "absolute"
    note = (f"absolute thresholds: 19 other sessions of protocol {PROTOCOL} on {MODEL}, fewer than "
            "qc.cohort.min_sessions (20)")
    assert verdict.notes == (note,)
    assert verdict.summary() == f"QC warn: raw_masked_neighbor_corr 0.78 < 0.8 ({note})"
    add_session(config, 120, 0.93)  # the 20th other session: the cohort rule takes over
    assert session_verdict(config, "S001", "01", "SCAN001").level == FAILED
    absolute = make_config(qc={"mode": "absolute"})
    cohort(absolute, spread_values(24))
    add_session(absolute, 1, 0.78, judge=False)
    verdict = session_verdict(absolute, "S001", "01", "SCAN001")
    assert verdict.level == WARN and verdict.notes == ()
    assert verdict.summary() == "QC warn: raw_masked_neighbor_corr 0.78 < 0.8"


def test_sessions_are_compared_within_their_protocol_and_scanner_model(
    make_config: Callable[..., NeuroflowConfig],
) -> None:
    config = make_config()
    cohort(config, spread_values(22, centre=0.95, step=0.002), start=100)  # Prisma: tight and high
    cohort(config, spread_values(22, centre=0.85, step=0.004), start=200, model="Skyra")  # Skyra: lower
    cohort(config, spread_values(22, centre=0.88, step=0.004), start=300, protocol="DTI_64dir")
    add_session(config, 1, 0.86, judge=False)  # ordinary on a Skyra, an outlier on a Prisma
    add_session(config, 2, 0.86, judge=False, model="Skyra")
    add_session(config, 3, 0.86, judge=False, protocol="DTI_64dir")
    prisma = session_verdict(config, "S001", "01", "SCAN001")
    skyra = session_verdict(config, "S002", "01", "SCAN002")
    other = session_verdict(config, "S003", "01", "SCAN003")
    assert prisma.level == FAILED and f"22 sessions of protocol {PROTOCOL} on {MODEL}" in prisma.summary()
    assert skyra.level == PASSED and f"of 22 sessions of protocol {PROTOCOL} on Skyra" in skyra.metrics[0].reason
    assert other.level == PASSED and "protocol DTI_64dir on Prisma_fit" in other.metrics[0].reason
    by_protocol = make_config(qc={"cohort": {"group_by": ["SeriesDescription"]}})
    cohort(by_protocol, spread_values(11, centre=0.95, step=0.002), start=100)
    cohort(by_protocol, spread_values(11, centre=0.85, step=0.004), start=200, model="Skyra")
    add_session(by_protocol, 1, 0.86, judge=False)
    merged = session_verdict(by_protocol, "S001", "01", "SCAN001")
    assert merged.level == PASSED and f"of 22 sessions of protocol {PROTOCOL}" in merged.metrics[0].reason


def test_no_spread_and_excluded_sessions(make_config: Callable[..., NeuroflowConfig]) -> None:
    config = make_config(qc={"metrics": {"raw_num_bad_slices": {"fail_above": 5, "warn_above": 0}}})
    cohort(config, [0.93] * 22)  # 0 bad slices everywhere, and no min_spread
    add_session(config, 1, 0.93, bad=2, judge=False)
    verdict = session_verdict(config, "S001", "01", "SCAN001")
    assert verdict.level == WARN and verdict.metrics[0].reason == "raw_num_bad_slices 2 > 0"
    assert verdict.notes == (f"absolute thresholds for raw_num_bad_slices: the 22 sessions of protocol {PROTOCOL} on "
                             f"{MODEL} all measure 0 (no spread; qc.metrics.raw_num_bad_slices.min_spread sets one)",)
    default = make_config()  # the default min_spread of 2 bad slices: 2 is within 3 MADs
    cohort(default, [0.93] * 22)
    add_session(default, 1, 0.93, bad=2, judge=False)
    assert session_verdict(default, "S001", "01", "SCAN001").level == PASSED
    # an excluded session is not part of anyone's cohort
    for n in range(100, 103):
        exclude(default, f"SCAN{n:03d}", "phantom scans")
    add_session(default, 2, 0.93, judge=False)
    assert "absolute thresholds: 19 other sessions" in session_verdict(default, "S002", "01", "SCAN002").summary()


# --------------------------------------------------------------------------- fixed verdicts, explicit re-judgement


def test_a_verdict_is_kept_for_the_same_tables_and_only_an_operator_rejudges_it(
    make_config: Callable[..., NeuroflowConfig],
) -> None:
    config = make_config()
    first = evaluate_session(config, add_session(config, 1, 0.82, judge=False), "S001", "01", by="run 1")
    assert first.gate.state == PASSED and not first.kept  # alone: absolute thresholds, 0.82 passes
    assert "absolute thresholds: 0 other sessions" in first.gate.describe()
    cohort(config, spread_values(24))  # the study grows: 0.82 is now 3.1 MADs below its median
    again = evaluate_session(config, "SCAN001", "S001", "01", by="run 2")
    assert again.kept and again.gate.state == PASSED and again.stored is not None
    assert again.stored.id == first.stored.id  # type: ignore[union-attr]  # nothing new recorded
    assert again.today is not None and again.today.level == WARN
    assert "under today's cohort it would be warn" in again.describe_origin()
    assert session_gate(config, "SCAN001", "S001", "01").state == PASSED



def test_a_held_session_is_released_only_by_an_operator_rejudgement(
    make_config: Callable[..., NeuroflowConfig],
) -> None:
    held_config = make_config()
    cohort(held_config, spread_values(24))
    verdict = evaluate_session(held_config, add_session(held_config, 1, 0.78, judge=False), "S001", "01")
    assert verdict.gate.state == FAILED
    cohort(held_config, spread_values(60, centre=0.85, step=0.004), start=300)  # the cohort widens
    assert session_gate(held_config, "SCAN001", "S001", "01").state == FAILED  # still held: nothing silent
    assert "SCAN001" in {c.standing.scan_id for c in rejudge.plan(held_config)}
    changes = rejudge.plan(held_config, only={"SCAN001"})
    assert [(c.standing.scan_id, c.standing.level, c.today.level, c.released) for c in changes] == [
        ("SCAN001", FAILED, PASSED, True)]
    before = store_of(held_config).standing("SCAN001")
    recorded = rejudge.apply(held_config, changes, "the protocol's spread is wider than first seen", by="dr.who")
    assert [(r.scan_id, r.level, r.action, r.by) for r in recorded] == [("SCAN001", PASSED, "rejudge", "dr.who")]
    assert session_gate(held_config, "SCAN001", "S001", "01").state == PASSED
    kept = evaluate_session(held_config, "SCAN001", "S001", "01")
    assert kept.kept and kept.gate.state == PASSED and "re-judged by dr.who" in kept.describe_origin()
    assert rejudge.plan(held_config, only={"SCAN001"}) == []  # nothing left to change
    audit = [json.loads(line) for line in (held_config.paths.state / rejudge.AUDIT).read_text().splitlines()]
    assert [(a["scan_id"], a["before"], a["after"], a["by"]) for a in audit] == [("SCAN001", FAILED, PASSED, "dr.who")]
    history = store_of(held_config).history("SCAN001")
    assert [h.level for h in history] == [FAILED, PASSED] and history[0].id == before.id  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="needs a reason"):
        rejudge.apply(held_config, changes, " ")


def test_new_tables_or_new_settings_are_judged_again_and_approvals_stay(
    make_config: Callable[..., NeuroflowConfig],
) -> None:
    config = make_config()
    cohort(config, spread_values(24))
    scan = add_session(config, 1, 0.78)
    assert session_gate(config, scan, "S001", "01").state == FAILED
    approvals.approve(config, scan, "S001", "01", "looked at it", by="dr.who")
    add_session(config, 1, 0.93, judge=False)  # QSIPrep ran again: new values
    fresh = evaluate_session(config, scan, "S001", "01")
    assert not fresh.kept and fresh.gate.verdict.level == PASSED
    assert evaluate_session(config, scan, "S001", "01").kept
    looser = config.model_copy(update={"qc": config.qc.model_copy(update={"cohort": config.qc.cohort.model_copy(
        update={"fail_mads": 10.0})})})  # the same workspace and tables under other settings
    assert not evaluate_session(looser, scan, "S001", "01").kept
    assert approvals.approval_for(config, scan) is not None  # approvals are not touched by any of this
    assert len(Store(config.paths.state).history(scan)) == 3
