"""What registering a session's events costs per event, on SQLite and PostgreSQL (plain and pooled).

Per session: the discovery sensor's `dicom_session` materialization and protocol verdict (reported,
runless, as the daemon stores a sensor's asset events), then the conversion run's events
(`ASSET_MATERIALIZATION_PLANNED`, the check's planned event, the `bids_session` materialization and
the `bids_validator` evaluation), each stored through `DagsterInstance.handle_new_event`, the call a
run's log manager makes. Reports ms per event (median and min of `--repeat` batches of `--sessions`).

Usage::

    .venv/bin/python benchmarks/event_writes.py --sessions 100 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import dagster as dg  # noqa: E402
import seeding  # noqa: E402
from dagster._core.definitions.asset_checks.asset_check_evaluation import (  # noqa: E402
    AssetCheckEvaluationPlanned,
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.partitions.subset import DefaultPartitionsSubset  # noqa: E402
from dagster._core.events import AssetMaterializationPlannedData, DagsterEventType, StepMaterializationData  # noqa: E402


def write_session(instance: dg.DagsterInstance, subject: str, session: str) -> int:
    """The events one session registers up to its conversion; returns how many."""
    partition = seeding.key(subject, session)
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=seeding.DICOM, partition=partition, metadata=seeding.dicom_metadata(subject, session)
        )
    )
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(
            asset_key=seeding.DICOM, check_name=seeding.PROTOCOL, passed=True, partition=partition,
            description="Session valid", blocking=True,
        )
    )  # fmt: skip
    run_id = str(uuid.uuid4())
    job = "__ASSET_JOB"

    def emit(event_type: DagsterEventType, data: Any, step: str | None = None) -> None:
        instance.handle_new_event(seeding._entry(run_id, job, event_type, data, time.time(), step))

    emit(
        DagsterEventType.ASSET_MATERIALIZATION_PLANNED,
        AssetMaterializationPlannedData(asset_key=seeding.BIDS, partition=partition),
    )
    emit(
        DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED,
        AssetCheckEvaluationPlanned(
            asset_key=seeding.BIDS, check_name=seeding.VALIDATOR, partitions_subset=DefaultPartitionsSubset({partition})
        ),
    )
    mat = dg.AssetMaterialization(
        asset_key=seeding.BIDS, partition=partition, metadata=seeding.bids_metadata(subject, session)
    )
    emit(DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(mat), "bids_session")
    latest = instance.get_latest_storage_id_by_partition(
        seeding.BIDS, DagsterEventType.ASSET_MATERIALIZATION, {partition}
    )
    emit(
        DagsterEventType.ASSET_CHECK_EVALUATION,
        dg.AssetCheckEvaluation(
            asset_key=seeding.BIDS, check_name=seeding.VALIDATOR, passed=True, partition=partition, blocking=True,
            target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
                storage_id=latest[partition], run_id=run_id, timestamp=time.time()
            ),
        ),
        "bids_session",
    )  # fmt: skip
    return 6


def measure(home: seeding.Backend, sessions: int, repeat: int) -> dict[str, Any]:
    per_event: list[float] = []
    cpu: list[float] = []
    with home.instance() as instance:
        seeding.add_partitions(instance, [(seeding.subject_label(i), "01") for i in range(sessions * (repeat + 1))])
        write_session(instance, "WARMUP", "01")
        for r in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            n = sum(write_session(instance, seeding.subject_label(r * sessions + i), "01") for i in range(sessions))
            per_event.append((time.perf_counter() - t0) / n * 1000)
            cpu.append((time.process_time() - c0) / n * 1000)
    return {
        "ms_per_event": {"min": min(per_event), "median": statistics.median(per_event)},
        "cpu_ms_per_event": {"min": min(cpu), "median": statistics.median(cpu)},
    }


POOLED = {
    "storage": {
        "custom": {
            "module": "neuroflow_dagster.pooled_storage",
            "class": "PooledPostgresStorage",
            "config": {"postgres_url": "{url}"},
        }
    }
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--storages", default="sqlite,postgres,postgres-pooled")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    results = []
    with ExitStack() as stack, seeding.quiet():
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nf-events-")))
        pg = None
        for name in args.storages.split(","):
            load = os.getloadavg()[0]
            if name == "sqlite":
                home = seeding.write_home(tmp / name, "sqlite")
            else:
                if pg is None:
                    from neuroflow_dagster_tests.pg_server import pg_server

                    pg = stack.enter_context(pg_server())
                url = pg.create_database("ev_" + name.replace("-", "_"))
                storage = json.loads(json.dumps(POOLED).replace("{url}", url)) if name == "postgres-pooled" else None
                home = seeding.write_home(tmp / name, "postgres", url, storage)
            out = {
                "storage": name,
                **measure(home, args.sessions, args.repeat),
                "load_before": load,
                "load_after": os.getloadavg()[0],
            }
            results.append(out)
            print(json.dumps(out), flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
