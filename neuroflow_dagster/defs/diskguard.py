"""The disk-space guard in Dagster: held pools, its sensor, its alerts, and the refusal inside a run.

Below the floor (diskspace.py measures and decides) new stage runs must not
start, and queued work must wait rather than fail. Dagster's own mechanism
for that is the run queue's pools: every stage asset is in pool ``<stage>``
at run granularity, so a pool limit of 0 keeps that stage's queued runs in
the queue, whoever launched them (automation, a backfill, the UI), while the
runs already going finish. When space returns, the limits go back to
``pipelines.<stage>.max_concurrent`` and the queue drains by itself.

One function decides every stage pool's limit (`apply_pool_limits`): the
config's limit, or 0 while the guard holds. Both the discovery sensor (each
tick, as before) and the guard's own sensor call it, so neither can undo
the other. Whether the guard holds now is read back from the pools
themselves (a limit of 0 never comes from config), which gives the
hysteresis of diskspace.py a memory that every process shares.

The guard's sensor also alerts, once when it starts holding and once when it
lets go (its cursor remembers which was last sent). A run that starts anyway
(``dagster asset materialize`` runs in-process, past the queue) checks the
space itself before writing anything and fails as a ``resource`` failure.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any, Literal

import dagster as dg

from neuroflow_dagster import stages
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.alerts import deliver
from neuroflow_dagster.defs.execution import retryable_failure
from neuroflow_dagster.defs.graph import stage_settings
from neuroflow_dagster.defs.leftovers import prune_leftovers
from neuroflow_dagster.diskspace import DiskReport, gb, held_pools, measure
from neuroflow_dagster.runtimes.failures import FailureClass

SENSOR_NAME = "disk_guard"
HELD_LIMIT = 0


@dataclass(frozen=True)
class GuardDecision:
    report: DiskReport
    hold: bool
    was_holding: bool

    def line(self) -> str:
        return self.report.status_line(self.hold)


def stage_pools() -> list[str]:
    return sorted({stage.pool for stage in stages.stages()})


def decide(instance: dg.DagsterInstance, config: NeuroflowConfig) -> GuardDecision:
    """Measure now; hold if below a floor, or if already holding and not yet above floor + margin."""
    report = measure(config)
    was_holding = bool(held_pools(instance.event_log_storage, stage_pools()))
    return GuardDecision(report, report.should_hold(was_holding), was_holding)


def apply_pool_limits(instance: dg.DagsterInstance, config: NeuroflowConfig) -> tuple[GuardDecision, list[str]]:
    """Set every stage pool's limit: ``max_concurrent`` from config, or 0 while the guard holds.

    Returns the decision and the limits that changed (``pool=N``); unchanged limits are not written.
    """
    decision = decide(instance, config)
    storage = instance.event_log_storage
    changed = []
    for stage in stages.stages():
        limit = HELD_LIMIT if decision.hold else stage_settings(config, stage).max_concurrent
        try:
            info = storage.get_concurrency_info(stage.pool)
            current = (info.slot_count, info.limit)
        except Exception:  # pragma: no cover - storage without pool support
            current = None
        if current != (limit, limit):
            storage.set_concurrency_slots(stage.pool, limit)
            changed.append(f"{stage.pool}={limit}")
    return decision, changed


@dataclass(frozen=True)
class DiskAlert:
    """The guard's alert: it started holding new runs (``low``), or let go again (``recovered``)."""

    kind: Literal["low", "recovered"]
    report: DiskReport
    host: str

    @property
    def ref(self) -> str:
        return "the disk guard"

    def title(self) -> str:
        if self.kind == "low":
            return f"[neuroflow] disk space low on {self.host}: holding new runs ({self.report.low_text()})"
        return f"[neuroflow] disk space back on {self.host}: new runs resume"

    def text(self) -> str:
        lines = [self.title()]
        for folder in self.report.folders:
            if folder.guarded:
                lines.append(
                    f"{folder.key}: {folder.path}: {gb(folder.free_bytes)} free of "
                    f"{gb(folder.total_bytes)} (floor {folder.floor_gb:g} GB)"
                )
        lines += [f"cannot measure: {e}" for e in self.report.errors]
        if self.kind == "low":
            lines += [
                "New stage runs are held in the queue (the stage pools are set to 0); runs already going "
                "continue. Free space in the folder(s) above: the queued runs start by themselves once every "
                "folder is back above its floor plus a margin.",
                "`neuroflow status` shows the guard's state.",
            ]
        else:
            lines.append("The stage pools are back at their configured limits; queued runs start now.")
        return "\n".join(lines)


def build_disk_guard_sensor(config: NeuroflowConfig) -> dg.SensorDefinition:
    """The guard's sensor: applies the pool limits every tick and alerts once per episode."""

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=config.disk.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Holds new stage runs (pool limits 0) while a guarded folder is below its free-space "
        "floor (disk.min_free_gb); alerts once when it starts holding and once when it lets go; prunes "
        "the folders failed runs left behind (disk.keep_failed_runs).",
    )
    def disk_guard(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        decision, changed = apply_pool_limits(context.instance, config)
        if changed:
            context.log.info(f"pool limits set: {', '.join(changed)} ({decision.line()})")
        # What failed runs left behind, pruned by disk.keep_failed_runs (docs/operations.md).
        try:
            pruned = prune_leftovers(context.instance, config, log=context.log.info)
            context.log.debug(f"failed-run folders: {len(pruned.kept)} kept, {len(pruned.pruned)} pruned, "
                              f"{pruned.live} of live runs ({pruned.seconds:.3f}s)")
        except OSError as exc:  # the guard's own work (the pool limits) is done; say why and go on
            context.log.warning(f"pruning failed-run folders: {exc}")
        state = _cursor(context.cursor)
        alerted_holding = bool(state.get("holding"))
        if decision.hold != alerted_holding:
            alert = DiskAlert("low" if decision.hold else "recovered", decision.report, socket.gethostname())
            (context.log.warning if decision.hold else context.log.info)(alert.title())
            if config.alerts.slack is not None or config.alerts.email is not None:
                # Nothing delivered: AlertDeliveryError fails the tick with the reasons and the cursor
                # stays as it was, so the next tick sends again.
                sent = deliver(config, alert)
                context.log.info(f"disk guard alert sent via {', '.join(sent)}")
            context.update_cursor(json.dumps({"holding": decision.hold}))
        return dg.SkipReason(decision.line())

    return disk_guard


def _cursor(cursor: str | None) -> dict[str, Any]:
    try:
        data = json.loads(cursor or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def refuse_if_disk_low(context: dg.AssetExecutionContext, config: NeuroflowConfig, stage: str) -> None:
    """Before a stage writes anything: below a floor, fail as a ``resource`` failure (retried like one).

    The queue already holds new runs while the guard holds the pools; this catches the runs that start
    past it (in-process ``dagster asset materialize``, a run dequeued just before the guard's tick).
    """
    report = measure(config)
    if not report.low:
        return
    raise retryable_failure(
        context,
        stage_settings(config, stage).retry,
        stage,
        FailureClass.RESOURCE,
        f"not started, the disk is below its free-space floor: {report.low_text()} (disk.min_free_gb); "
        "nothing was written",
        {"disk": dg.MetadataValue.json(report.as_dict())},
    )
