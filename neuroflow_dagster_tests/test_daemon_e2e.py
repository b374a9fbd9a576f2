"""End to end through a real `dagster dev`: folders dropped in, every stage runs by itself.

Real parts: the Dagster daemon (sensors, declarative automation over the
serialized asset graph, run queue with tag limits and pools), HeudiConv +
dcm2niix, the BIDS validator. QSIPrep and QSIRecon cannot run without their
containers here, so the embedded stand-ins run instead (the default config).
Nothing is launched by hand: the test only writes folders and a mapping.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from neuroflow_dagster.demo import synth
from neuroflow_dagster.discovery.status_report import read_status_report
from neuroflow_dagster_tests.daemon_harness import dagster_dev, latest_metadata, materialized, wait_for
from neuroflow_dagster_tests.workspace_fixtures import make_workspace, write_mapping

pytestmark = pytest.mark.slow

MAPPING = {"20240115_1430": "SUBJ_A", "20240301_0900": "SUBJ_A", "20240212_1015": "B", "20240305_0800": "C"}


def drop(incoming: Path, scan_id: str, seed: int, when: datetime) -> None:
    """Write a session in a hidden folder, then rename it into place (as a careful export does)."""
    staging = incoming / f".tmp-{scan_id}"
    synth.write_session(staging, seed=seed, n_directions=12, acquired=when)
    staging.rename(incoming / scan_id)


def run_cli(argv: list[str], parse: bool = True) -> Any:
    """The installed `neuroflow` command in its own process, as an operator runs it."""
    exe = Path(sys.executable).with_name("neuroflow")
    out = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if parse else out.stdout


def tree_digest(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file: the inputs must come out exactly as they went in."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def overlapping(instance: dg.DagsterInstance, stage: str) -> int:
    """Largest number of runs of `stage` that were running at the same moment."""
    records = instance.get_run_records(dg.RunsFilter(tags={"neuroflow/stage": stage}))
    spans = [(r.start_time, r.end_time or float("inf")) for r in records if r.start_time]
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda p: (p[0], p[1]))
    best = current = 0
    for _, delta in points:
        current += delta
        best = max(best, current)
    return best


def test_sessions_flow_through_all_stages_and_a_late_session_reruns_its_subject(tmp_path: Path) -> None:
    config = make_workspace(
        tmp_path / "ws",
        overrides={"discovery": {"stability_wait_minutes": 0, "interval_seconds": 5}},
        mapping=MAPPING,
    )
    incoming = config.paths.dicom_incoming
    drop(incoming, "20240115_1430", 1, datetime(2024, 1, 15, 14, 30))
    drop(incoming, "20240301_0900", 2, datetime(2024, 3, 1, 9, 0))
    drop(incoming, "20240212_1015", 3, datetime(2024, 2, 12, 10, 15))
    corrupt = incoming / "20240305_0800"
    synth.write_corrupt_files(corrupt, 12)
    drop(incoming, "20240410_1200", 4, datetime(2024, 4, 10, 12, 0))  # not mapped yet
    before = tree_digest(incoming)

    with dagster_dev(config.source, tmp_path / "home") as dev:
        instance = dg.DagsterInstance.from_config(str(dev["home"]))
        done = {"01|SUBJA", "02|SUBJA", "01|B"}
        wait_for(
            "qsiparc_session of the three good sessions",
            lambda: done <= set(materialized(instance, "qsiparc_session")),
            timeout=600,
            log=dev["log"],
        )
        assert materialized(instance, "qsiprep_subject") == {"SUBJA": 1, "B": 1}  # once per subject
        assert "01|C" in materialized(instance, "dicom_session")  # the corrupt one is registered...
        assert "01|C" not in materialized(instance, "bids_session")  # ...but never converted
        held = {h["scan_id"]: h["reason"] for h in read_status_report(config)["held"]}
        assert held == {"20240410_1200": "unmapped"}
        bids = latest_metadata(instance, "bids_session", "01|SUBJA")
        assert bids["validator_errors"] == 0
        assert "dwi" in bids["bids_suffixes"]
        assert latest_metadata(instance, "qsiprep_subject", "SUBJA")["stand_in"] is True
        parc = latest_metadata(instance, "qsiparc_session", "01|SUBJA")
        assert parc["neuroflow/status"] == "done" and parc["n_tables"] >= 1

        # The operator maps the held ScanID to SUBJ_A: it becomes A's third session.
        write_mapping(config.mapping.csv_file, {**MAPPING, "20240410_1200": "SUBJ_A"})
        wait_for(
            "the late session's parcellation and the re-run of all of SUBJ_A's sessions",
            lambda: (
                materialized(instance, "qsiparc_session").get("03|SUBJA")
                and all(materialized(instance, "qsiparc_session").get(k, 0) >= 2 for k in ("01|SUBJA", "02|SUBJA"))
            ),
            timeout=480,
            log=dev["log"],
        )
        assert materialized(instance, "qsiprep_subject") == {"SUBJA": 2, "B": 1}
        # The stand-in QSIPrep's work folder is reclaimed after each publish, measured; nothing is left.
        prep = latest_metadata(instance, "qsiprep_subject", "SUBJA")
        assert prep["work_dir_freed_bytes"] > 0 and prep["publish_waited_s"] == 0
        assert [p for stage in ("qsiprep", "qsirecon") for p in (config.paths.work_dir / stage).glob("sub-*/")] == []
        recon = materialized(instance, "qsirecon_session")
        assert recon["01|SUBJA"] == recon["02|SUBJA"] == 2 and recon["03|SUBJA"] == 1
        assert recon["01|B"] == 1  # the other subject is left alone
        assert overlapping(instance, "qsiprep") <= 1

        # The operator's view comes from Dagster's records (issue 7's "done when").
        home = ["--config", str(config.source)]
        status = run_cli([*home, "status", "--format", "json", "--dagster-home", str(dev["home"])])
        rows = {(r["subject"], r["session"]): r for r in status["sessions"]}
        assert [rows[("SUBJA", "03")][stage] for stage in ("bids_conversion", "qsiprep", "qsirecon", "qsiparc")] == [
            "done"
        ] * 4
        corrupt = rows[("C", "01")]
        assert corrupt["protocol"] == "failed" and "0 DICOM files" in corrupt["protocol_reason"]
        assert "files are not readable DICOM" in corrupt["protocol_reason"]  # it is not an empty folder
        assert corrupt["bids_conversion"] == "blocked" and corrupt["why"]["qsiparc"]["cause"] == "protocol"
        assert status["held"] == []  # the once-unmapped ScanID is now a session
        # Reprocess B's reconstruction through the webserver, as the UI would (a GraphQL backfill).
        run_cli(
            [
                *home,
                "reprocess",
                "--stage",
                "qsirecon",
                "--subject",
                "B",
                "--url",
                f"http://127.0.0.1:{dev['port']}/graphql",
            ],
            parse=False,
        )
        wait_for(
            "the reprocessed reconstruction of 01|B",
            lambda: materialized(instance, "qsirecon_session").get("01|B", 0) >= 2,
            timeout=300,
            log=dev["log"],
        )
    assert tree_digest(incoming) == before  # DICOM is never written
