"""QSIPrep runs one at a time whichever way they are launched: measured on a real `dagster dev`.

Four launch paths compete for the same two subjects at the same moment:
1. automation - the `automation_qsiprep` sensor, once both subjects' sessions are converted;
2. a UI backfill - GraphQL `launchPartitionBackfill` on the asset, WITHOUT tags (as the UI sends it);
3. a CLI job backfill - `dagster job backfill -j qsiprep_job --partitions ... --noprompt`;
4. manual launches - GraphQL `launchRun` of the asset (the UI's "Materialize", no tags) and
   `dagster job launch -j qsiprep_job` from a shell.
Only the paths that go through the run queue are covered; `dagster asset materialize` executes in
the CLI's own process, outside the queue (see docs/deployment.md).

Real parts: the daemon (sensors, automation, backfills, run queue with tag limits and pools whose
slot counts the discovery sensor sets from neuroflow.yaml), HeudiConv + dcm2niix on synthetic
DICOM, and a real Slurm cluster (engines/slurm_cluster.py): QSIPrep runs with `runtime: slurm`,
so each run is a Slurm job (the embedded stand-in inside it), and the same measurement shows that
the stage's limits cap its jobs in flight - on a cluster with room for two at once. The recon and
parc automation sensors are stopped (as an operator would, via GraphQL) so that only QSIPrep
competes, and the QSIPrep sensor is paused until both sessions are converted (so its two runs compete).

Overlap = the largest number of QSIPrep runs between their start and end at the same moment (run
records), and of QSIPrep Slurm jobs between their submission and end (sacct). Every path must also
show contention - its runs were waiting at the same time - or a limit of 1 would prove nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from neuroflow_dagster.demo import synth
from neuroflow_dagster_tests.daemon_harness import dagster_dev, wait_for
from neuroflow_dagster_tests.engines.slurm_cluster import SlurmCluster
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

pytestmark = pytest.mark.slow

LOCATION = "neuroflow_dagster.definitions"  # the location name `dagster dev -m` gives
REPOSITORY = "__repository__"
QSIPREP = dg.AssetKey("qsiprep_subject")
MAPPING = {"20240105_0900": "P0001", "20240106_0900": "P0002"}
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


# --------------------------------------------------------------------------- GraphQL, as the UI sends it


def gql(port: int, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.loads(response.read())
    if body.get("errors"):
        raise AssertionError(f"GraphQL errors: {body['errors']}")
    return body["data"]


def graphql_ready(port: int, location: str = LOCATION) -> bool:
    try:
        data = gql(
            port,
            """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
                 locationOrLoadError { __typename ... on PythonError { message } } } } } }""",
        )
    except OSError:
        return False
    for entry in data["workspaceOrError"]["locationEntries"]:
        if entry["name"] == location and entry["loadStatus"] == "LOADED":
            loaded = entry["locationOrLoadError"] or {}
            assert loaded.get("__typename") == "RepositoryLocation", f"code location failed to load: {loaded}"
            return True
    return False


def stop_sensor(port: int, name: str, location: str = LOCATION) -> None:
    data = gql(
        port,
        """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
             __typename ... on Sensor { id } ... on Error { message } } }""",
        {"s": {"repositoryLocationName": location, "repositoryName": REPOSITORY, "sensorName": name}},
    )["sensorOrError"]
    assert data["__typename"] == "Sensor", data
    result = gql(
        port,
        """mutation($id: String) { stopSensor(id: $id) { __typename
             ... on StopSensorMutationResult { instigationState { status } } ... on Error { message } } }""",
        {"id": data["id"]},
    )["stopSensor"]
    assert result.get("instigationState", {}).get("status") == "STOPPED", result


def start_sensor(port: int, name: str, location: str = LOCATION) -> None:
    result = gql(
        port,
        """mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename
             ... on Sensor { sensorState { status } } ... on Error { message } } }""",
        {"s": {"repositoryLocationName": location, "repositoryName": REPOSITORY, "sensorName": name}},
    )["startSensor"]
    assert result.get("sensorState", {}).get("status") == "RUNNING", result


def launch_ui_backfill(port: int, asset: str, partitions: list[str]) -> str:
    """What the UI's "Materialize selected partitions" sends: no tags at all."""
    result = gql(
        port,
        """mutation($b: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $b) {
             __typename ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }""",
        {"b": {"assetSelection": [{"path": [asset]}], "partitionNames": partitions, "title": "ui-style backfill"}},
    )["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return result["backfillId"]


def launch_ui_run(
    port: int,
    asset: str | None,
    partition: str,
    tags: dict[str, str] | None = None,
    job: str = "__ASSET_JOB",
    location: str = LOCATION,
) -> str:
    """What the UI's "Materialize" of one partition sends: the implicit asset job, the partition tag."""
    all_tags = {"dagster/partition": partition, **(tags or {})}
    selector: dict[str, Any] = {"repositoryLocationName": location, "repositoryName": REPOSITORY, "jobName": job}
    if asset:
        selector["assetSelection"] = [{"path": [asset]}]
    result = gql(
        port,
        """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
             __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message } } }""",
        {
            "p": {
                "selector": selector,
                "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in all_tags.items()]},
                "runConfigData": "{}",
            }
        },
    )["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def dagster_cli(dev: dict[str, Any], config_file: Path, *args: str) -> subprocess.Popen[str]:
    """A `dagster` CLI process on the same instance and code as the running `dagster dev`."""
    env = dict(os.environ, DAGSTER_HOME=str(dev["home"]), NEUROFLOW_CONFIG=str(config_file))
    dagster = Path(sys.executable).with_name("dagster")
    return subprocess.Popen(
        [str(dagster), *args, "-m", LOCATION],
        env=env,
        cwd=config_file.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], what: str, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{out[-3000:]}"
    return out


def automation_ticked(log: Path) -> bool:
    """Every automation sensor has finished one evaluation (the daemon's log line for a sensor tick).

    Kept from the declarative conditions, whose first evaluation treated what already happened as
    handled; the stage sensors catch up by themselves (test_automation.py), but the tests still drop
    their sessions after it so that each tick's requests are the ones they check.
    """
    text = log.read_text(errors="replace") if log.exists() else ""
    stages = ("bids_conversion", "qsiprep", "qsirecon", "qsiparc")
    return all(
        re.search(
            rf"(Tick produced .* for automation_{stage} in|Sensor automation_{stage} skipped"
            rf"|No run requests returned for automation_{stage},|Completed launch of run \S+ for automation_{stage})",
            text,
        )
        for stage in stages
    )


# --------------------------------------------------------------------------- measuring


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


def overlap(spans: Iterable[tuple[float, float]]) -> int:
    """Largest number of intervals open at the same moment (an end before a start at the same instant)."""
    points = sorted([p for s, e in spans for p in ((s, 1), (e, -1))], key=lambda p: (p[0], p[1]))
    best = current = 0
    for _, delta in points:
        current += delta
        best = max(best, current)
    return best


def qsiprep_runs(instance: dg.DagsterInstance) -> list[Any]:
    """Every run that materializes qsiprep_subject, tagged or not."""
    records = instance.get_run_records()
    return [
        r
        for r in records
        if QSIPREP in (r.dagster_run.asset_selection or ()) or r.dagster_run.job_name == "qsiprep_job"
    ]


def is_automation(record: Any) -> bool:
    return record.dagster_run.tags.get("dagster/sensor_name") == "automation_qsiprep"


def launch_path(record: Any, ui_run_ids: set[str], ui_backfill: str) -> str:
    run = record.dagster_run
    if is_automation(record):
        return "automation"
    backfill = run.tags.get("dagster/backfill")
    if run.run_id in ui_run_ids or (run.job_name == "qsiprep_job" and not backfill):
        return "manual"  # GraphQL launchRun (the UI's Materialize) or `dagster job launch`
    if backfill == ui_backfill:
        return "ui_backfill"
    if backfill:
        return "cli_job_backfill"
    return "other"


def measure(records: list[Any]) -> dict[str, int]:
    running = [(r.start_time, r.end_time) for r in records]
    waiting = [(r.create_timestamp.timestamp(), r.end_time) for r in records]
    return {"runs": len(records), "max_running": overlap(running), "max_waiting_or_running": overlap(waiting)}


# --------------------------------------------------------------------------- the test


def slurm_jobs(cluster: SlurmCluster, names: list[str], since: datetime, at_least: int) -> list[dict[str, str]]:
    """sacct's jobs with these names submitted since ``since`` (waits up to 30 s for slurmdbd to catch up)."""
    keys = ["id", "name", "state", "submit", "start", "end", "reqmem", "cpus"]
    deadline = time.monotonic() + 30
    while True:
        fields = "JobIDRaw,JobName,State,Submit,Start,End,ReqMem,AllocCPUS"
        out = cluster.client("sacct", "-X", "-n", "-P", "-S", since.strftime("%Y-%m-%dT%H:%M:%S"),
                             "--name", ",".join(names), "-o", fields).stdout
        jobs = [dict(zip(keys, line.split("|"), strict=False)) for line in out.splitlines() if line.strip()]
        if len(jobs) >= at_least or time.monotonic() > deadline:
            return jobs
        time.sleep(1)


def test_qsiprep_runs_one_at_a_time_on_every_launch_path(tmp_path: Path, slurm: SlurmCluster) -> None:
    since = datetime.now().replace(microsecond=0)
    config = make_workspace(
        tmp_path / "ws",
        overrides={
            "discovery": {"stability_wait_minutes": 0, "interval_seconds": 5},
            # The job's CPUs and memory follow the tool's nprocs/mem_mb (the test node has 2 CPUs).
            "pipelines": {"qsiprep": {"runtime": "slurm", "nprocs": 1, "mem_mb": 500, "slurm": {"poll_seconds": 1}}},
        },
        mapping=MAPPING,
    )
    exports = config.paths.work_dir / "exports"
    for seed, scan_id in enumerate(MAPPING):
        synth.write_session(exports / scan_id, seed=seed, n_directions=12, acquired=datetime(2024, 1, 5 + seed, 9))

    with dagster_dev(config.source, tmp_path / "home", extra_env=slurm.env) as dev:
        port, log = dev["port"], dev["log"]
        wait_for("the code location to load", lambda: graphql_ready(port), timeout=180, log=log)
        # Only now: opening the SQLite storage while dagster dev's processes create it can break its
        # schema version table ("more than one head"), seen on this machine.
        instance = dg.DagsterInstance.from_config(str(dev["home"]))
        wait_for("the automation sensors' first ticks", lambda: automation_ticked(log), timeout=180, log=log)
        for sensor in ("automation_qsirecon", "automation_qsiparc", "automation_qsiprep"):
            stop_sensor(port, sensor)
        for scan_id in MAPPING:  # both sessions arrive together (a rename each, as a careful export does)
            (exports / scan_id).rename(config.paths.dicom_incoming / scan_id)
        # The QSIPrep sensor is paused until both sessions are converted, so that its two requests come
        # in one tick and its runs compete (otherwise the first subject's QSIPrep may end before the
        # second subject's conversion does, and a limit of 1 on the automation path proves nothing).
        wait_for(
            "both sessions converted",
            lambda: len(instance.fetch_materializations(dg.AssetKey("bids_session"), limit=10).records) >= 2,
            timeout=300,
            log=log,
        )
        start_sensor(port, "automation_qsiprep")
        # The automation requests QSIPrep for each subject, both converted.
        wait_for(
            "the automation to request QSIPrep for both subjects",
            lambda: len([r for r in qsiprep_runs(instance) if is_automation(r)]) == 2,
            timeout=300,
            log=log,
        )
        subjects = sorted(instance.get_dynamic_partitions("subjects"))
        assert len(subjects) == 2
        # The pool limit is set by the discovery sensor from pipelines.qsiprep.max_concurrent, not by hand.
        assert instance.event_log_storage.get_concurrency_info("qsiprep").slot_count == 1

        # All other paths fire now, while the automation's runs are queued or running.
        cli_backfill = dagster_cli(dev, config.source, "job", "backfill", "-j", "qsiprep_job",
                                   "--partitions", ",".join(subjects), "--noprompt")  # fmt: skip
        cli_launch = dagster_cli(dev, config.source, "job", "launch", "-j", "qsiprep_job",
                                 "--tags", json.dumps({"dagster/partition": subjects[1]}))  # fmt: skip
        ui_backfill = launch_ui_backfill(port, "qsiprep_subject", subjects)
        manual = {launch_ui_run(port, "qsiprep_subject", subjects[0])}
        finish(cli_backfill, "dagster job backfill")
        finish(cli_launch, "dagster job launch")

        def all_done() -> list[Any] | None:
            runs = qsiprep_runs(instance)
            finished = [r for r in runs if r.dagster_run.status in TERMINAL]
            return runs if len(runs) >= 8 and len(finished) == len(runs) else None

        runs = wait_for("8 QSIPrep runs (2 per launch path) to finish", all_done, timeout=420, log=log)

    failed = [(r.dagster_run.run_id, r.dagster_run.status.value) for r in runs
              if r.dagster_run.status != dg.DagsterRunStatus.SUCCESS]  # fmt: skip
    assert not failed, failed
    by_path: dict[str, list[Any]] = {}
    for record in runs:
        by_path.setdefault(launch_path(record, manual, ui_backfill), []).append(record)
    numbers = {path: measure(records) for path, records in sorted(by_path.items())}
    numbers["all paths together"] = measure(runs)
    (tmp_path / "throttling.json").write_text(json.dumps(numbers, indent=2))
    print("QSIPrep overlap by launch path:", json.dumps(numbers, indent=2))

    # Each QSIPrep run was one Slurm job, and never more than one was queued or running at once.
    jobs = slurm_jobs(slurm, [f"nf-qsiprep-{s}" for s in subjects], since, at_least=len(runs))
    assert len(jobs) == len(runs) and {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    assert {(j["reqmem"], j["cpus"]) for j in jobs} == {("1524M", "1")}, jobs  # nprocs; mem_mb + 1024 MB
    in_flight = [(stamp(j["submit"]), stamp(j["end"])) for j in jobs]
    print("QSIPrep Slurm jobs:", json.dumps(jobs, indent=1))
    assert overlap(in_flight) == 1, f"{overlap(in_flight)} QSIPrep Slurm jobs in flight at once: {jobs}"

    assert set(by_path) == {"automation", "ui_backfill", "cli_job_backfill", "manual"}
    untagged = [r for r in by_path["ui_backfill"] + by_path["manual"] if "neuroflow/stage" not in r.dagster_run.tags]
    assert len(untagged) >= 3  # UI launches carry no stage tag: only the pool holds them
    for path, n in numbers.items():
        assert n["runs"] >= 2, (path, n)  # 2 per path, 8 in all
        assert n["max_waiting_or_running"] >= 2, f"{path}: its runs never competed, nothing was measured: {n}"
        assert n["max_running"] == 1, f"{path}: {n['max_running']} QSIPrep runs at once"
