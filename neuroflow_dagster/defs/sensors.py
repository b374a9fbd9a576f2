"""The discovery sensor: new DICOM folders become partitions and `dicom_session` events.

A thin wrapper around the plain-Python discovery engine. Each tick:
1. runs discovery (stability wait, mapping, header reads only where needed),
2. adds the new subjects and session labels to the dynamic partition sets,
3. reports one `dicom_session` materialization per new or changed session
   (ScanID, path, series table, acquisition date, mapping source, and the protocol verdict),
4. records the blocking `protocol` check of each reported session: as an evaluation reported with
   the materialization when the partition has no check execution yet (no run: a run costs seconds
   of start-up per session), or by a run of the check otherwise.

Why a run in the second case: Dagster stores check executions unique per (check, run, partition),
and reported (runless) evaluations all share one empty run id, so a second report for the same
partition (an invalid session re-checked after its folder changed) is rejected by the database. A
check run also targets the latest materialization natively.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import dagster as dg

from neuroflow_dagster import stages
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.automation import PROTOCOL_VALID_KEY
from neuroflow_dagster.defs.diskguard import apply_pool_limits
from neuroflow_dagster.defs.graph import DICOM_KEY, stage_settings
from neuroflow_dagster.defs.partitions import session_labels_partitions, session_partitions, subjects_partitions
from neuroflow_dagster.discovery import engine
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.discovery.status_report import series_markdown, write_status_report
from neuroflow_dagster.naming.partitions import session_key
from neuroflow_dagster.naming.tags import DISCOVERY_TAG_VALUE, MAX_RUNTIME_TAG, PARTITION_TAG, SCAN_ID_TAG, STAGE_TAG

INSTANCE_MAX_RUNTIME_S = 48 * 3600
CURSOR_VERSION = 1


def decode_cursor(cursor: str | None) -> dict[str, Any]:
    """The sensor's cursor (engine state + held digest; encoded by discovery.engine), {} if not this version."""
    data = engine.decode_cursor(cursor) or {}
    return data if data.get("v") == CURSOR_VERSION else {}


def registration_metadata(reg: engine.Registration) -> dict[str, Any]:
    return {
        "scan_id": reg.scan_id,
        "dicom_path": dg.MetadataValue.path(reg.path),
        "participant_label": reg.participant_label,
        "session_label": reg.session_label,
        "recruitment_id": reg.recruitment_id,
        "acquisition": reg.acquisition or "unknown",
        "mapping_source": reg.mapping_source,
        "n_dicom_files": reg.n_dicom,
        "n_unreadable_files": reg.n_unreadable,
        "unreadable_examples": ", ".join(reg.unreadable_examples) or "none",
        "series": dg.MetadataValue.md(series_markdown(reg.series)),
        "protocol": reg.protocol.message,
        PROTOCOL_VALID_KEY: reg.protocol.valid,
    }


def ensure_pool_limits(instance: dg.DagsterInstance, config: NeuroflowConfig) -> list[str]:
    """Pool limits live in the instance database: the project sets them from config, not a person.

    The limit is ``pipelines.<stage>.max_concurrent``, or 0 while the disk guard holds new runs: one
    function decides both (defs/diskguard.py), so this sensor never undoes the guard. Returns what changed.
    """
    _decision, changed = apply_pool_limits(instance, config)
    return changed


def partitions_with_checks(instance: dg.DagsterInstance, partitions: list[str]) -> set[str]:
    """Partitions that already have a protocol check execution (a reported one cannot be repeated)."""
    if not partitions:
        return set()
    key = dg.AssetCheckKey(DICOM_KEY, stages.PROTOCOL_CHECK)
    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in range(0, len(partitions), 500):
            infos = instance.event_log_storage.get_asset_check_partition_info(
                [key], partition_keys=partitions[start : start + 500]
            )
            found.update(str(i.partition_key) for i in infos)
    return found


def protocol_evaluation(key: str, reg: engine.Registration) -> dg.AssetCheckEvaluation:
    """The registration's protocol verdict as a check evaluation (reported right after its materialization)."""
    return dg.AssetCheckEvaluation(
        asset_key=DICOM_KEY,
        check_name=stages.PROTOCOL_CHECK,
        passed=reg.protocol.valid,
        metadata={"reason": reg.protocol.message, "scan_id": reg.scan_id, "reported_by": "dicom_discovery"},
        severity=dg.AssetCheckSeverity.ERROR,
        description=reg.protocol.message,
        blocking=True,
        partition=key,
    )


def _tag_safe(text: str) -> str:
    """Run tag values must be short printable strings; the ScanID is shown, not used as a key."""
    return "".join(c if c.isprintable() else "?" for c in text)[:200]


protocol_check_job = dg.define_asset_job(
    "dicom_protocol_check",
    selection=dg.AssetSelection.checks(dg.AssetCheckKey(DICOM_KEY, stages.PROTOCOL_CHECK)),
    partitions_def=session_partitions,
    tags={STAGE_TAG: DISCOVERY_TAG_VALUE},
    description="Runs the blocking protocol check of a (re)registered DICOM session.",
)


def build_discovery_sensor(config: NeuroflowConfig) -> dg.SensorDefinition:
    @dg.sensor(
        name="dicom_discovery",
        job=protocol_check_job,
        minimum_interval_seconds=config.discovery.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Registers DICOM session folders once stable: partitions, dicom_session events, "
        "protocol verdicts (reported, or by a check run for a re-registered session).",
    )
    def dicom_discovery(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        started = time.monotonic()
        cursor = decode_cursor(context.cursor)
        changed_pools = ensure_pool_limits(context.instance, config)
        if changed_pools:
            context.log.info(f"pool limits set: {', '.join(changed_pools)} (config, or 0 while the disk guard holds)")

        events: list[Any] = []
        result = engine.run_discovery(config, cursor.get("engine"), excluded=set(load_exclusions(config).keys()))
        for warning in result.warnings:
            context.log.warning(warning)

        subjects: list[str] = []
        runs: list[dg.RunRequest] = []
        labels: list[str] = []
        checked = partitions_with_checks(
            context.instance,
            [str(session_key(r.participant_label, r.session_label)) for r in result.registrations],
        )
        for reg in result.registrations:
            key = session_key(reg.participant_label, reg.session_label)
            subjects.append(reg.participant_label)
            labels.append(reg.session_label)
            events.append(
                dg.AssetMaterialization(
                    asset_key=DICOM_KEY,
                    partition=key,
                    description=f"DICOM session {reg.scan_id}",
                    metadata=registration_metadata(reg),
                )
            )
            if str(key) not in checked:
                events.append(protocol_evaluation(str(key), reg))
                continue
            runs.append(
                dg.RunRequest(
                    run_key=None,
                    # A check-only job has no PartitionsDefinition of its own (Dagster derives it from
                    # assets), so the partition travels as the standard tag rather than partition_key.
                    tags={
                        PARTITION_TAG: key,
                        STAGE_TAG: DISCOVERY_TAG_VALUE,
                        SCAN_ID_TAG: _tag_safe(reg.scan_id),
                    },
                )
            )
            verdict = "valid" if reg.protocol.valid else "INVALID"
            context.log.info(
                f"registered {reg.scan_id!r} as sub-{reg.participant_label} ses-{reg.session_label} "
                f"({verdict}: {reg.protocol.message})"
            )

        held_digest = sorted(f"{h.scan_id}:{h.reason}" for h in result.held)
        held_digest += sorted(f"problem:{p.kind}:{p.key}" for p in result.problems)
        if held_digest != cursor.get("held"):
            for held in result.held:
                context.log.warning(f"held {held.scan_id!r} ({held.reason}): {held.message}")
            for problem in result.problems:
                context.log.warning(f"{problem.kind} problem: {problem.message}")
            for note in result.notes:
                context.log.info(f"mapping note: {note}")
        write_status_report(config, result)

        requests = []
        if subjects:
            requests.append(subjects_partitions.build_add_request(sorted(set(subjects))))
            requests.append(session_labels_partitions.build_add_request(sorted(set(labels))))
        new_cursor = {
            "v": CURSOR_VERSION,
            "engine": result.new_state,
            "held": held_digest,
        }
        context.log.debug(f"discovery tick {time.monotonic() - started:.2f}s: {result.stats}")
        return dg.SensorResult(
            dynamic_partitions_requests=requests,
            asset_events=events,
            run_requests=runs,
            cursor=engine.encode_cursor(new_cursor),
        )

    return dicom_discovery


def max_runtime_tags(config: NeuroflowConfig, stage: stages.Stage) -> dict[str, str]:
    """Run monitoring cancels a stage run after what its in-run retries can legitimately take.

    Retries happen inside the same run, so one attempt's timeout is too short: the budget is
    every attempt at its hard timeout plus the longest retry waits, capped at the 48 h after
    which the predecessor cancelled stale runs.
    """
    cfg = stage_settings(config, stage)
    r = cfg.retry
    budget = (r.max_retries + 1) * cfg.timeout_s + r.max_retries * r.max_delay_seconds * (1 + r.jitter) + 900
    return {MAX_RUNTIME_TAG: str(int(min(INSTANCE_MAX_RUNTIME_S, budget)))}
