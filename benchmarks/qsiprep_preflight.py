"""QSIPrep's preflight: what the pinned venvs cost to build and what a verdict costs per subject.

- ``--build DIR``: builds both venvs from scratch into DIR (``neuroflow_dagster.preflight.venvs``, the
  same code as ``neuroflow preflight install`` and scripts/qsiprep-preflight-venv.sh) and reports the
  time and size of each; without it the venvs of ``--venvs`` (default .venv-preflight, built by the
  script if missing) are used and the build is not timed.
- then, per QSIPrep version, ``--repeat`` preflights (one process each, as a run does) on a subject with
  1 and with ``--sessions`` sessions of T1w + 4D DWI (the ``dwi_t1w`` shape of the tests), and one on a
  subject without T1w (a refusal), reporting wall seconds and the runner's phases (import, parse, build).

Usage::

    .venv/bin/python benchmarks/qsiprep_preflight.py [--build /tmp/pf-venvs] [--repeat 3] [--sessions 3]

Results are appended to benchmarks/results/qsiprep_preflight.jsonl (with the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from neuroflow_dagster.config import NeuroflowConfig  # noqa: E402
from neuroflow_dagster.preflight import qsiprep as preflight  # noqa: E402
from neuroflow_dagster.preflight import venvs  # noqa: E402
from neuroflow_dagster.tools import qsiprep  # noqa: E402
from neuroflow_dagster_tests import bids_shapes  # noqa: E402


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def build(root: Path) -> list[dict]:
    rows = []
    for version in venvs.VERSIONS:
        shutil.rmtree(venvs.venv_dir(root, version), ignore_errors=True)
        load = os.getloadavg()[0]
        started = time.monotonic()
        venvs.build(root, version, log=lambda m: print(m, file=sys.stderr))
        seconds = time.monotonic() - started
        started = time.monotonic()
        venvs.build(root, version)  # the stamp: a second call returns at once
        rows.append({"what": "venv build", "qsiprep": version, "seconds": round(seconds, 1),
                     "again_seconds": round(time.monotonic() - started, 2),
                     "gb": round(du(venvs.venv_dir(root, version)) / 1e9, 2), "load": round(load, 1)})  # fmt: skip
    return rows


def one(tmp: Path, root: Path, version: str, sessions: int, shape: str) -> dict:
    paths = {k: str(tmp / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}
    qsiprep_cfg = {"image": f"pennlinc/qsiprep:{version}", "preflight": {"venvs_dir": str(root)}}
    config = NeuroflowConfig.model_validate({"paths": paths, "pipelines": {"qsiprep": qsiprep_cfg}})
    labels = [f"{n + 1:02d}" for n in range(sessions)]
    bids_shapes.write_subject(config.paths.bids_root, "0075", labels, shape)
    spec = qsiprep.build_spec(config, "0075", labels)
    load = os.getloadavg()[0]
    started = time.monotonic()
    verdict = preflight.run(config, spec, "0075", labels, log_path=tmp / "preflight.log")
    return {"qsiprep": version, "sessions": sessions, "shape": shape, "status": verdict.status,
            "seconds": round(time.monotonic() - started, 2), "timings": verdict.details.get("timings"),
            "nodes": verdict.details.get("nodes"), "max_rss_mb": verdict.details.get("max_rss_mb"),
            "cpu_s": verdict.details.get("cpu_s"),
            "load": round(load, 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", type=Path, help="build both venvs from scratch here and time it")
    parser.add_argument("--venvs", type=Path, default=ROOT / ".venv-preflight")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=3)
    args = parser.parse_args()
    rows: list[dict] = []
    if args.build:
        rows += build(args.build)
        root = args.build
    else:
        script = ROOT / "scripts" / "qsiprep-preflight-venv.sh"
        subprocess.run(["bash", str(script), str(args.venvs)], check=True, stdout=subprocess.DEVNULL)
        root = args.venvs
    for version in venvs.VERSIONS:
        cases = [(1, "dwi_t1w")] * args.repeat + [(args.sessions, "dwi_t1w")] * args.repeat + [(1, "dwi_only")]
        results = []
        for sessions, shape in cases:
            with tempfile.TemporaryDirectory(prefix="pf-bench-") as tmp:
                result = one(Path(tmp), root, version, sessions, shape)
            print(json.dumps(result), file=sys.stderr)
            results.append(result)
        for (sessions, shape), group in _groups(results).items():
            secs = [r["seconds"] for r in group]
            rows.append({"what": "preflight", "qsiprep": version, "sessions": sessions, "shape": shape,
                         "status": group[0]["status"], "n": len(secs), "min_s": min(secs),
                         "median_s": statistics.median(secs), "max_s": max(secs),
                         "median_import_s": statistics.median((r["timings"] or {}).get("import", 0) for r in group),
                         "median_build_s": statistics.median((r["timings"] or {}).get("build", 0) for r in group),
                         "nodes": group[0]["nodes"], "max_rss_mb": max(r["max_rss_mb"] or 0 for r in group),
                         "median_cpu_s": statistics.median(r.get("cpu_s") or 0 for r in group),
                         "load": group[0]["load"]})  # fmt: skip
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with (HERE / "results" / "qsiprep_preflight.jsonl").open("a", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps({"at": stamp, **row}) + "\n")
    for row in rows:
        print(json.dumps(row))
    return 0


def _groups(results: list[dict]) -> dict[tuple[int, str], list[dict]]:
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["sessions"], r["shape"]), []).append(r)
    return groups


if __name__ == "__main__":
    sys.exit(main())
