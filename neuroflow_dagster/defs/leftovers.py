"""Pruning what failed runs leave behind (retention.py), on each tick of the disk_guard sensor.

The plain module finds the folders and decides; this one tells it which runs are queued or running
(Dagster's run records), so that nothing of theirs is ever pruned.
"""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg

from neuroflow_dagster import retention, stages
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.naming.tags import PARTITION_TAG, STAGE_TAG

LIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def live_runs(instance: dg.DagsterInstance) -> retention.Active:
    """The queued and running runs: their ids, and the (stage, partition)s they work on. A run without a
    partition (a ranged backfill run) protects every partition of its stages."""
    run_ids: set[str] = set()
    partitions: set[tuple[str, str]] = set()
    whole: set[str] = set()
    for record in instance.get_run_records(dg.RunsFilter(statuses=LIVE)):
        run = record.dagster_run
        run_ids.add(run.run_id)
        names = {s.name for s in map(stages.by_asset, (k.to_user_string() for k in run.asset_selection or ())) if s}
        if not run.asset_selection:
            tagged = stages.by_tag(run.tags.get(STAGE_TAG, ""))
            names |= {tagged.name} if tagged else set()
        partition = run.tags.get(PARTITION_TAG)
        if partition:
            partitions |= {(name, partition) for name in names}
        else:
            whole |= names
    return retention.Active(frozenset(run_ids), frozenset(partitions), frozenset(whole))


def prune_leftovers(
    instance: dg.DagsterInstance, config: NeuroflowConfig, log: Callable[[str], None] | None = None
) -> retention.Pass:
    """One pruning pass (the folders are listed before the runs are read: retention.prune_pass)."""
    return retention.prune_pass(config, lambda: live_runs(instance), log=log)
