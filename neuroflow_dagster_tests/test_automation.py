"""Tick-by-tick automation: what each stage requests as sessions arrive, convert, fail or are blocked.

Ticks the project's real stage sensors (`automation_<stage>`, from the real
Definitions) with their cursors on a temporary instance, one after the other
as the daemon does. Stage runs are simulated by reporting their
materializations and check results, so each tick's decision is seen in
isolation; the requests a tick makes are not launched (the sensor remembers
them, as it does until the daemon has created their runs). A recon request
also parcellates in the same run; it is listed under its stage's asset,
`qsirecon_session`. (The daemon itself is exercised by test_daemon_e2e.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.defs.assets.bids import VALIDATOR_CHECK
from neuroflow_dagster.defs.graph import DICOM_KEY as DICOM
from neuroflow_dagster.defs.graph import asset_key
from neuroflow_dagster.defs.partitions import session_partitions
from neuroflow_dagster.stages import PROTOCOL_CHECK
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

BIDS, QSIPREP, QSIRECON, QSIPARC = (asset_key(s) for s in ("bids_conversion", "qsiprep", "qsirecon", "qsiparc"))

CHECK_OF = {DICOM: PROTOCOL_CHECK, BIDS: VALIDATOR_CHECK}
STAGE_OF = {"bids_conversion": BIDS, "qsiprep": QSIPREP, "qsirecon": QSIRECON, "qsiparc": QSIPARC}


def run_check(instance: dg.DagsterInstance, asset: dg.AssetKey, name: str, partition: str, passed: bool) -> None:
    """Record a check result through a real run, as production does (a check run or the asset's run).

    A stand-in check body with the real check's key; the verdict comes from the test. The run carries
    the stage tag production's runs carry (the discovery sensor's check job, the conversion run).
    """

    @dg.asset_check(asset=asset, name=name, blocking=True, partitions_def=session_partitions)
    def stand_in_check() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=passed)

    job = dg.define_asset_job("check", selection=dg.AssetSelection.checks(dg.AssetCheckKey(asset, name)))
    defs = dg.Definitions(
        assets=[dg.AssetSpec(asset, partitions_def=session_partitions)], asset_checks=[stand_in_check], jobs=[job]
    )
    stage = "discovery" if asset == DICOM else "bids_conversion"
    defs.resolve_job_def("check").execute_in_process(
        instance=instance, tags={"dagster/partition": partition, "neuroflow/stage": stage}, raise_on_error=False
    )


class Harness:
    """A temporary instance plus the project's definitions and the automation sensors' cursors."""

    def __init__(self, instance: dg.DagsterInstance, defs: dg.Definitions, config: Any = None) -> None:
        self.instance = instance
        self.defs = defs
        self.config = config
        # One cursor per automation sensor: like the daemon, each stage's sensor decides only its
        # own stage, so a stage never sees what another stage requests in the same tick.
        self.cursors: dict[str, str | None] = {}
        self.sensors = {s.name: s for s in defs.sensors or [] if s.name.startswith("automation_")}

    def arrive(self, subject: str, session: str, *, protocol_ok: bool = True) -> None:
        self.instance.add_dynamic_partitions("subjects", [subject])
        self.instance.add_dynamic_partitions("session_labels", [session])
        self.done(DICOM, f"{session}|{subject}", check_passed=protocol_ok)

    def done(self, key: dg.AssetKey, partition: str, *, check_passed: bool = True) -> None:
        self.instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition=partition))
        check = CHECK_OF.get(key)
        if check is not None:
            run_check(self.instance, key, check, partition, check_passed)

    def tick_requests(self) -> dict[str, list[dg.RunRequest]]:
        """sensor name -> the run requests of one tick of each stage sensor, in pipeline order."""
        return {stage: list(result.run_requests or []) for stage, result in self.tick_results().items()}

    def tick_results(self) -> dict[str, dg.SensorResult]:
        """stage -> the SensorResult of one tick of its sensor (run requests and observations)."""
        out: dict[str, dg.SensorResult] = {}
        for stage in STAGE_OF:
            sensor = self.sensors[f"automation_{stage}"]
            result = sensor(dg.build_sensor_context(instance=self.instance, cursor=self.cursors.get(sensor.name)))
            assert isinstance(result, dg.SensorResult)
            self.cursors[sensor.name] = result.cursor
            out[stage] = result
        return out

    def tick(self) -> dict[str, set[str]]:
        """asset of each stage -> partitions its sensor requested this tick."""
        requested: dict[str, set[str]] = {}
        for stage, requests in self.tick_requests().items():
            for request in requests:
                assert request.tags["neuroflow/stage"] == stage
                requested.setdefault(STAGE_OF[stage].to_user_string(), set()).add(str(request.partition_key))
        return requested


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    config = make_workspace(tmp_path)
    defs = build_definitions(config)
    with dg.instance_for_test() as instance:
        yield Harness(instance, defs, config)


def test_two_subjects_three_sessions_then_a_late_one(harness: Harness) -> None:
    h = harness
    h.tick()  # first evaluation: nothing exists yet
    h.arrive("A", "01")
    h.arrive("A", "02")
    h.arrive("B", "01")
    assert h.tick() == {"bids_session": {"01|A", "02|A", "01|B"}}  # no phantom "02|B"

    h.done(BIDS, "01|A")
    h.done(BIDS, "01|B")
    # B's only session is converted; A still waits for its second one.
    assert h.tick() == {"qsiprep_subject": {"B"}}
    h.done(BIDS, "02|A")
    assert h.tick() == {"qsiprep_subject": {"A"}}  # once per subject, after its whole wave
    assert h.tick() == {}

    h.done(QSIPREP, "A")
    h.done(QSIPREP, "B")
    assert h.tick() == {"qsirecon_session": {"01|A", "02|A", "01|B"}}
    for key in ("01|A", "02|A", "01|B"):
        h.done(QSIRECON, key)
    assert h.tick() == {"qsiparc_session": {"01|A", "02|A", "01|B"}}
    for key in ("01|A", "02|A", "01|B"):
        h.done(QSIPARC, key)
    assert h.tick() == {}

    # A late third session of A: its BIDS, then A's QSIPrep again, then recon/parc of ALL of A's sessions.
    h.arrive("A", "03")
    assert h.tick() == {"bids_session": {"03|A"}}
    assert h.tick() == {}  # QSIPrep waits for the new session's conversion; recon never runs on stale QSIPrep
    h.done(BIDS, "03|A")
    assert h.tick() == {"qsiprep_subject": {"A"}}
    h.done(QSIPREP, "A")
    assert h.tick() == {"qsirecon_session": {"01|A", "02|A", "03|A"}}
    for key in ("01|A", "02|A", "03|A"):
        h.done(QSIRECON, key)
    assert h.tick() == {"qsiparc_session": {"01|A", "02|A", "03|A"}}


def test_failed_protocol_check_blocks_the_session_but_not_its_subject(harness: Harness) -> None:
    h = harness
    h.tick()
    h.arrive("A", "01")
    h.arrive("A", "02", protocol_ok=False)
    assert h.tick() == {"bids_session": {"01|A"}}
    h.done(BIDS, "01|A")
    assert h.tick() == {"qsiprep_subject": {"A"}}  # the blocked session does not hold the subject back
    h.done(QSIPREP, "A")
    assert h.tick() == {"qsirecon_session": {"01|A"}}


def test_invalid_bids_blocks_recon_of_that_session(harness: Harness) -> None:
    h = harness
    h.tick()
    h.arrive("A", "01")
    h.arrive("A", "02")
    h.tick()
    h.done(BIDS, "01|A")
    h.done(BIDS, "02|A", check_passed=False)
    assert h.tick() == {"qsiprep_subject": {"A"}}
    h.done(QSIPREP, "A")
    assert h.tick() == {"qsirecon_session": {"01|A"}}


def test_fixed_session_is_converted_after_its_check_passes(harness: Harness) -> None:
    h = harness
    h.tick()
    h.arrive("A", "01", protocol_ok=False)
    assert h.tick() == {}
    h.arrive("A", "01", protocol_ok=True)  # the folder changed, was re-reported and passed
    assert h.tick() == {"bids_session": {"01|A"}}


def test_failed_conversion_settles_and_lets_qsiprep_run(harness: Harness) -> None:
    """A conversion whose run failed for good counts as settled for its subject's QSIPrep."""
    h = harness
    h.tick()
    h.arrive("A", "01")
    h.arrive("A", "02")
    h.tick()
    h.done(BIDS, "01|A")
    assert h.tick() == {}
    # A real failed run of the real asset: 02|A is not in the registry, so bids_session refuses it.
    job = h.defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=h.instance,
        asset_selection=[BIDS],
        partition_key="02|A",
        raise_on_error=False,
    )
    assert not result.success
    assert h.tick() == {"qsiprep_subject": {"A"}}


def test_work_registered_before_the_first_automation_tick_is_not_forgotten(harness: Harness) -> None:
    """The discovery sensor may register sessions (and their checks may pass) before the automation
    sensors' first tick; and a deployment may start on sessions converted earlier."""
    h = harness
    h.arrive("A", "01")
    h.arrive("A", "02")
    h.done(BIDS, "02|A")
    h.arrive("B", "01")
    h.done(BIDS, "01|B")
    assert h.tick() == {"bids_session": {"01|A"}, "qsiprep_subject": {"B"}}
    h.done(BIDS, "01|A")
    assert h.tick() == {"qsiprep_subject": {"A"}}
    assert h.tick() == {}


def test_check_passing_after_the_first_tick_triggers_conversion(harness: Harness) -> None:
    h = harness
    h.instance.add_dynamic_partitions("subjects", ["A"])
    h.instance.add_dynamic_partitions("session_labels", ["01"])
    h.instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=DICOM, partition="01|A"))
    assert h.tick() == {}  # registered, its check run has not finished yet
    run_check(h.instance, DICOM, PROTOCOL_CHECK, "01|A", True)
    assert h.tick() == {"bids_session": {"01|A"}}
    assert h.tick() == {}


def test_a_check_run_ending_long_after_the_registration_still_converts(harness: Harness) -> None:
    """The check run's end brings the session back, however many ticks passed (not only the last window)."""
    h = harness
    h.instance.add_dynamic_partitions("subjects", ["A"])
    h.instance.add_dynamic_partitions("session_labels", ["01"])
    h.instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=DICOM, partition="01|A"))
    for _ in range(3):
        assert h.tick() == {}  # no verdict yet; the registration leaves the sensors' re-read window
    run_check(h.instance, DICOM, PROTOCOL_CHECK, "01|A", True)
    assert h.tick() == {"bids_session": {"01|A"}}


def test_a_registration_before_its_partitions_are_added_waits_for_them(harness: Harness) -> None:
    """The daemon stores a discovery tick's events before it adds the tick's partitions; a run request
    for an unknown partition would fail the whole automation tick."""
    h = harness
    verdict = {"protocol_valid": True}  # the discovery sensor's verdict travels with the registration
    h.instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=DICOM, partition="01|A", metadata=verdict))
    assert h.tick() == {}
    h.instance.add_dynamic_partitions("subjects", ["A"])
    h.instance.add_dynamic_partitions("session_labels", ["01"])
    assert h.tick() == {"bids_session": {"01|A"}}
    assert h.tick() == {}


def test_a_long_backlog_is_taken_in_pages(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first tick on an existing archive is paged (oldest first), so no tick outlasts the sensor timeout."""
    from neuroflow_dagster.defs import automation

    monkeypatch.setattr(automation, "MAX_CANDIDATES", 2)
    h = harness
    for subject in ("A", "B", "C", "D", "E"):
        h.arrive(subject, "01")
    assert h.tick() == {"bids_session": {"01|A", "01|B"}}
    assert h.tick() == {"bids_session": {"01|C", "01|D"}}
    assert h.tick() == {"bids_session": {"01|E"}}
    assert h.tick() == {}


def stand_in_run(
    instance: dg.DagsterInstance, partition: str, *, recon: bool = True, parc: bool = True, parc_fails: bool = False
) -> None:
    """A real run of stand-ins with the real keys: planned events, materializations, run end, as production."""

    @dg.asset(key=QSIRECON, partitions_def=session_partitions)
    def recon_stand_in() -> None:
        return None

    @dg.asset(key=QSIPARC, partitions_def=session_partitions, deps=[QSIRECON])
    def parc_stand_in() -> None:
        if parc_fails:
            raise dg.Failure("stand-in parcellation failure")

    selection = [key for key, on in ((QSIRECON, recon), (QSIPARC, parc)) if on]
    dg.materialize(
        [recon_stand_in, parc_stand_in],
        selection=selection,
        partition_key=partition,
        instance=instance,
        raise_on_error=False,
    )


def test_recon_and_parcellation_of_a_session_run_together(harness: Harness) -> None:
    """One run per session for QC, recon and parcellation (issue 12: fewer run start-ups); parcellation
    alone after a recon-only run."""
    h = harness
    h.arrive("A", "01")
    h.done(BIDS, "01|A")
    h.done(QSIPREP, "A")
    requests = h.tick_requests()
    assert [
        (r.partition_key, sorted(k.to_user_string() for k in r.asset_selection or [])) for r in requests["qsirecon"]
    ] == [("01|A", ["image_qc_session", "qsiparc_session", "qsirecon_session"])]  # QC first, same run
    assert requests["qsiparc"] == []
    stand_in_run(h.instance, "01|A")
    assert h.tick() == {}  # the run parcellated what it reconstructed
    h.done(QSIPREP, "A")
    assert h.tick() == {"qsirecon_session": {"01|A"}}
    stand_in_run(h.instance, "01|A", parc_fails=True)
    assert h.tick() == {}  # a failed parcellation is not retried by itself (as any failed request)
    stand_in_run(h.instance, "01|A", parc=False)  # e.g. an operator reprocesses the reconstruction
    assert h.tick() == {"qsiparc_session": {"01|A"}}
    assert h.tick() == {}


def test_cron_mode_waits_for_the_next_cron_tick(tmp_path: Path) -> None:
    """pipelines.qsiprep.trigger: cron -- a wave is taken at the first cron tick after it is converted."""
    from datetime import datetime, timezone

    from neuroflow_dagster.defs.automation import Cursor, QsiprepStage, run_stage_tick

    config = make_workspace(tmp_path, {"pipelines": {"qsiprep": {"trigger": "cron", "cron": "0 2 * * *"}}})
    with dg.instance_for_test() as instance:
        h = Harness(instance, build_definitions(config), config)
        h.arrive("A", "01")
        h.done(BIDS, "01|A")
        stage = QsiprepStage(config)
        start = datetime(2030, 1, 1, 3, 0, tzinfo=timezone.utc).timestamp()  # an hour after a cron tick

        def requested(result: Any) -> list[str]:
            return [d.key for d in result.decisions if d.action == "request"]

        first = run_stage_tick(stage, instance, Cursor(), now=start)
        assert requested(first) == [] and list(first.cursor.pending) == ["A"]
        later = run_stage_tick(stage, instance, first.cursor, now=start + 12 * 3600)
        assert requested(later) == []
        after_cron = run_stage_tick(stage, instance, later.cursor, now=start + 24 * 3600)
        assert requested(after_cron) == ["A"]
        assert requested(run_stage_tick(stage, instance, after_cron.cursor, now=start + 24 * 3600 + 60)) == []


def test_a_quiet_tick_reads_nothing_but_the_event_log_head(harness: Harness) -> None:
    """The cost of a tick follows the change: with nothing new, no partition is examined (issue 12)."""
    from neuroflow_dagster.defs.automation import Cursor, QsiprepStage, run_stage_tick

    h = harness
    h.arrive("A", "01")
    h.done(BIDS, "01|A")
    stage = QsiprepStage(h.config)
    busy = run_stage_tick(stage, h.instance, Cursor())
    assert busy.candidates == 1 and [d.key for d in busy.decisions if d.action == "request"] == ["A"]
    overlap = run_stage_tick(stage, h.instance, busy.cursor)  # the previous window, re-read once
    assert [d.action for d in overlap.decisions] == ["none"]
    quiet = run_stage_tick(stage, h.instance, overlap.cursor)
    assert quiet.candidates == 0 and quiet.decisions == []


def qc_run(h: Harness, request: dg.RunRequest, *, parc: bool = True) -> dg.ExecuteInProcessResult:
    """Execute a recon request as the daemon would: the real `image_qc_session` with its real blocking
    check (reading the session's QSIPrep QC table), stand-ins for recon and parcellation downstream of it."""
    from neuroflow_dagster.defs.assets.image_qc import build_image_qc_asset
    from neuroflow_dagster.defs.resources import NeuroflowResource

    qc = build_image_qc_asset(h.config)

    @dg.asset(key=QSIRECON, partitions_def=session_partitions, deps=[qc.key])
    def recon_stand_in() -> None:
        return None

    @dg.asset(key=QSIPARC, partitions_def=session_partitions, deps=[QSIRECON])
    def parc_stand_in() -> None:
        return None

    selection = [k for k in request.asset_selection or [] if parc or k != QSIPARC]
    return dg.materialize(
        [qc, recon_stand_in, parc_stand_in],
        selection=selection,
        partition_key=str(request.partition_key),
        instance=h.instance,
        resources={"neuroflow": NeuroflowResource(config_file=str(h.config.source))},
        tags=dict(request.tags),
        raise_on_error=False,
    )


def test_a_session_failing_qc_gets_the_qc_gate_alone_then_is_re_judged_and_approved(harness: Harness) -> None:
    """The recon sensor judges QC (qc/gate.py, the verdict the QC asset records) before it requests: a session
    that passes gets QC + recon + parcellation in one run; a session the gate holds gets the QC gate alone
    (its verdict, figures and alert are recorded), never a reconstruction or parcellation that can only be
    refused, so no cell of it ever fails (states.py: held (qc)); the UI gets an observation on each held
    cell; it is not requested again until the subject's next QSIPrep (judged again), and an approval's
    relaunch lets it through without the sensors adding runs."""
    from neuroflow_dagster.control.status import collect_status
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.qc import approvals
    from neuroflow_dagster_tests.test_qc_gate import write_session

    h = harness
    qc_key = dg.AssetKey("image_qc_session")
    registry = Registry(h.config.paths.state)
    for scan in ("SCAN_GOOD", "SCAN_POOR"):
        registry.assign(scan, "75")
    write_session(h.config, "0075", "01", 0.95, 0)  # passes
    write_session(h.config, "0075", "02", 0.17, 39)  # fails the default thresholds
    h.tick()
    h.arrive("0075", "01")
    h.arrive("0075", "02")
    assert h.tick() == {"bids_session": {"01|0075", "02|0075"}}
    h.done(BIDS, "01|0075")
    h.done(BIDS, "02|0075")
    assert h.tick() == {"qsiprep_subject": {"0075"}}
    h.done(QSIPREP, "0075")
    ticked = h.tick_results()
    requests = {str(r.partition_key): r for r in ticked["qsirecon"].run_requests or []}
    assert {k: sorted(a.to_user_string() for a in r.asset_selection or []) for k, r in requests.items()} == {
        "01|0075": ["image_qc_session", "qsiparc_session", "qsirecon_session"],  # one run when QC passes
        "02|0075": ["image_qc_session"],  # the QC gate alone: recon and parcellation are not requested
    }
    assert "held by image QC" in requests["02|0075"].tags["neuroflow/trigger"]
    # The UI: an observation on each held cell, with the state model's words.
    notes = {(e.asset_key.to_user_string(), e.partition): e.metadata for e in ticked["qsirecon"].asset_events}
    assert set(notes) == {("qsirecon_session", "02|0075"), ("qsiparc_session", "02|0075")}
    assert all(m["neuroflow/state"].value == "held" and m["neuroflow/cause"].value == "qc" for m in notes.values())
    assert "raw_masked_neighbor_corr 0.17 < 0.5" in notes[("qsirecon_session", "02|0075")]["reason"].value

    good, poor = qc_run(h, requests["01|0075"]), qc_run(h, requests["02|0075"])
    assert good.success
    (failed,) = poor.get_asset_check_evaluations()
    assert not failed.passed and failed.severity == dg.AssetCheckSeverity.ERROR
    for key in (QSIRECON, QSIPARC):
        planned = h.instance.get_latest_planned_materialization_info(key, "02|0075")
        assert planned is None  # never requested: nothing to skip, nothing failed
    # The QC run counts as handled: the held session is not requested on later ticks, no note is repeated.
    for _ in range(3):
        again = h.tick_results()
        assert again["qsirecon"].run_requests == [] and again["qsirecon"].asset_events == []
    report = collect_status(h.instance, h.config)
    row = next(r for r in report["sessions"] if r["partition"] == "02|0075")
    assert (row["qsirecon"], row["qsiparc"], row["why"]["qsiparc"]["cause"]) == ("held", "held", "qc")

    # A third session and the subject's next QSIPrep: QC is judged again for every session of it.
    registry.assign("SCAN_LATE", "75")
    write_session(h.config, "0075", "03", 0.9, 0)
    h.arrive("0075", "03")
    assert h.tick() == {"bids_session": {"03|0075"}}
    h.done(BIDS, "03|0075")
    assert h.tick() == {"qsiprep_subject": {"0075"}}
    h.done(QSIPREP, "0075")
    requests = {str(r.partition_key): r for r in h.tick_requests()["qsirecon"]}
    assert sorted(requests) == ["01|0075", "02|0075", "03|0075"]
    assert [k for k, r in requests.items() if list(r.asset_selection or []) == [qc_key]] == ["02|0075"]
    for request in requests.values():
        qc_run(h, request)
    assert h.tick() == {}

    # The operator approves; `neuroflow qc approve` relaunches QC + recon + parcellation for the session
    # (tagged qsirecon); the sensors add nothing afterwards.
    approvals.approve(h.config, "SCAN_POOR", "0075", "02", "dropouts confined to 3 volumes", by="dr.who")
    relaunch = dg.RunRequest(partition_key="02|0075", asset_selection=[qc_key, QSIRECON, QSIPARC],
                             tags={"neuroflow/stage": "qsirecon"})
    approved = qc_run(h, relaunch)
    assert approved.success
    assert {e.asset_key for e in approved.get_asset_materialization_events()} == {qc_key, QSIRECON, QSIPARC}
    assert h.tick() == {}


def test_excluded_or_remapped_sessions_are_never_requested(harness: Harness) -> None:
    """Every stage refuses an excluded session or one whose identity is in question: the sensors never
    request its runs (they could only fail); status shows it held."""
    from neuroflow_dagster.discovery import engine
    from neuroflow_dagster.discovery.exclusions import exclude
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.discovery.status_report import write_status_report

    h = harness
    registry = Registry(h.config.paths.state)
    for scan, code in (("S1", "A"), ("S2", "A"), ("S3", "A")):
        registry.assign(scan, code)
    h.tick()
    for label in ("01", "02", "03"):
        h.arrive("A", label)
    exclude(h.config, "S2", "consent withdrawn")
    held = engine.Held("S3", "/x/S3", "remapped", "S3 now maps to another subject", registered="sub-A ses-03",
                       blocks=True)  # fmt: skip
    write_status_report(h.config, engine.TickResult(held=[held]))
    assert h.tick() == {"bids_session": {"01|A"}}


def test_a_refused_reconstruction_blocks_its_parcellation_visibly(harness: Harness) -> None:
    """A recon that fails in the combined run skips the parcellation: the parcellation sensor requests
    nothing and records one observation saying it is blocked by qsirecon."""
    h = harness
    h.tick()
    h.arrive("A", "01")
    h.done(BIDS, "01|A")
    h.done(QSIPREP, "A")
    assert h.tick() == {"qsirecon_session": {"01|A"}}
    assert h.tick() == {}

    @dg.asset(key=QSIRECON, partitions_def=session_partitions)
    def recon_refused() -> None:
        raise dg.Failure("validation error: 1 diffusion direction", allow_retries=False)

    @dg.asset(key=QSIPARC, partitions_def=session_partitions, deps=[QSIRECON])
    def parc_stand_in() -> None:
        return None

    assert not dg.materialize([recon_refused, parc_stand_in], partition_key="01|A", instance=h.instance,
                              tags={"neuroflow/stage": "qsirecon"}, raise_on_error=False).success  # fmt: skip
    first = h.tick_results()
    assert first["qsiparc"].run_requests == []
    (note,) = first["qsiparc"].asset_events
    assert (note.asset_key, note.partition) == (QSIPARC, "01|A")
    assert (note.metadata["neuroflow/state"].value, note.metadata["neuroflow/cause"].value) == ("blocked", "qsirecon")
    assert h.tick_results()["qsiparc"].asset_events == []  # once


def converted(h: Harness, partition: str, suffixes: str, *, valid: bool = True) -> None:
    """A conversion as the real `bids_session` records it: `bids_suffixes` and `scan_id` in its metadata,
    the validator's verdict in state (what QSIPrep's eligibility reads; its check run, which only the
    recon rule reads, is left out: these tests stop at QSIPrep)."""
    from neuroflow_dagster.bids.verdicts import save_verdict

    session, subject = partition.split("|")
    save_verdict(h.config.paths.state, subject, session, valid, "test verdict")
    metadata = {"bids_suffixes": suffixes, "scan_id": f"SCAN_{subject}{session}"}
    h.instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=BIDS, partition=partition,
                                                                  metadata=metadata))


def registered(h: Harness, subject: str, session: str) -> None:
    """A registration with its protocol verdict in the metadata, as the discovery sensor reports it (no run)."""
    h.instance.add_dynamic_partitions("subjects", [subject])
    h.instance.add_dynamic_partitions("session_labels", [session])
    h.instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=DICOM, partition=f"{session}|{subject}", metadata={"protocol_valid": True})
    )


def qsiprep_decisions(h: Harness) -> dict[str, tuple[str, str]]:
    """One tick of the QSIPrep sensor through its own rules: subject -> (action, reason)."""
    from neuroflow_dagster.defs.automation import Cursor, QsiprepStage, run_stage_tick

    cursor = Cursor.decode(h.cursors.get("automation_qsiprep"))
    result = run_stage_tick(QsiprepStage(h.config), h.instance, cursor)
    h.cursors["automation_qsiprep"] = result.cursor.encode()
    return {d.key: (d.action, d.reason) for d in result.decisions}


def test_a_subject_without_a_t1w_is_held_until_a_session_brings_one(harness: Harness, capfd) -> None:
    """QSIPrep (anat_modality T1w) fails a subject with no T1w in its sessions: such a subject is held with
    the reason and never requested; a later session with a T1w gets it requested as usual."""
    h = harness
    h.tick()
    h.arrive("A", "01")
    h.arrive("B", "01")
    assert h.tick() == {"bids_session": {"01|A", "01|B"}}
    converted(h, "01|A", "dwi")
    converted(h, "01|B", "T1w, dwi")
    capfd.readouterr()
    ticked = h.tick_results()
    assert [r.partition_key for r in ticked["qsiprep"].run_requests or []] == ["B"]
    assert "hold qsiprep_subject A: no T1w in any session" in capfd.readouterr().err  # the sensor's tick log
    # The UI: an observation on the held cell, in the state model's words (states.py).
    (note,) = ticked["qsiprep"].asset_events
    assert (note.asset_key, note.partition) == (QSIPREP, "A")
    assert (note.metadata["neuroflow/state"].value, note.metadata["neuroflow/cause"].value) == ("held", "no_anat")
    assert h.tick() == {}  # held, not failed, not requested on later ticks
    # A second session with a T1w lifts the hold; its T1w serves the subject's DWI-only session too.
    h.arrive("A", "02")
    assert h.tick() == {"bids_session": {"02|A"}}
    converted(h, "02|A", "T1w, dwi")
    assert h.tick() == {"qsiprep_subject": {"A"}}


def test_anatomy_rules_follow_the_sessions_qsiprep_would_be_given(harness: Harness) -> None:
    h = harness
    for subject, sessions in {"A": ("01", "02"), "B": ("01", "02"), "C": ("01",)}.items():
        for session in sessions:
            registered(h, subject, session)
    converted(h, "01|A", "dwi")
    converted(h, "02|A", "T1w")  # an anatomical-only visit: its T1w serves A's reference
    converted(h, "01|B", "dwi")
    converted(h, "02|B", "T1w, dwi", valid=False)  # the only T1w is in a session QSIPrep leaves out
    converted(h, "01|C", "T1w")  # no DWI at all: nothing to hold, QSIPrep records "not applicable"
    assert qsiprep_decisions(h) == {
        "A": ("request", "its sessions are converted (a new wave)"),
        "B": ("hold", "no T1w in any session"),
        "C": ("request", "its sessions are converted (a new wave)"),
    }


@pytest.mark.parametrize(("settings", "expected"), [
    ({"anat_modality": "none"}, ("request", "its sessions are converted (a new wave)")),
    ({"anat_modality": "T2w"}, ("hold", "no T2w in any session")),
    ({"subject_anatomical_reference": "sessionwise"},
     ("hold", "no session with both DWI and T1w (subject_anatomical_reference: sessionwise)")),
])
def test_the_hold_follows_anat_modality_and_the_reference(tmp_path: Path, settings: dict, expected: tuple) -> None:
    config = make_workspace(tmp_path, {"pipelines": {"qsiprep": settings}})
    with dg.instance_for_test() as instance:
        h = Harness(instance, dg.Definitions(), config)  # the QSIPrep rules alone (qsiprep_decisions)
        registered(h, "A", "01")
        registered(h, "A", "02")
        converted(h, "01|A", "dwi")
        converted(h, "02|A", "T1w")
        assert qsiprep_decisions(h) == {"A": expected}
