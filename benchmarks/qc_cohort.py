"""The cohort-relative image QC gate on a large archive: what one judgement, the asset's figure,
`neuroflow qc rejudge --dry-run` and `neuroflow qc report` cost at 20,000 sessions.

Seeds the QC store (state/qc_cohort.sqlite3) with ``--sessions`` judged sessions, every numeric column
of QSIPrep 1.1.1's QC table per session (as the QC asset stores them), spread over ``--groups``
acquisition groups (1: the worst case, every session in one group), in one transaction. Then, each
``--repeat`` times: the QC asset's evaluation of one new session (its QC table and raw sidecar on disk:
read the table and sidecar, two indexed cohort queries, the statistics, the recorded verdict), the
cohort figure the asset attaches, and, once, `rejudge.plan` and `write_report` over the whole store;
for comparison, reading ``--scan-sample`` QC tables from disk (a judgement that scanned the archive's
tables would read all of them).

Usage::

    .venv/bin/python benchmarks/qc_cohort.py --sessions 20000 --groups 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def clock(fn):  # type: ignore[no-untyped-def]
    """(wall s, CPU s, result) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - w0, time.process_time() - c0, result


def summary(samples: list[tuple[float, float]]) -> dict[str, dict[str, float]]:
    walls, cpus = [s[0] for s in samples], [s[1] for s in samples]
    return {"wall_s": {"min": min(walls), "median": statistics.median(walls)},
            "cpu_s": {"min": min(cpus), "median": statistics.median(cpus)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20000)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--scan-sample", type=int, default=2000, help="QC tables read from disk for comparison")
    parser.add_argument("--json", default="", help="append the result to this JSON-lines file")
    args = parser.parse_args(argv)

    from neuroflow_dagster.config import NeuroflowConfig
    from neuroflow_dagster.qc import rejudge
    from neuroflow_dagster.qc.cohort import Group
    from neuroflow_dagster.qc.gate import Verdict, evaluate_session, judge_values, store_of
    from neuroflow_dagster.qc.report import session_figure, write_report
    from neuroflow_dagster.qc.store import SeriesMeasures, StoredVerdict
    from neuroflow_dagster.tools.qc_table import read_image_qc
    from neuroflow_dagster_tests.test_image_qc import REAL_TABLE_1_1_1
    from neuroflow_dagster_tests.test_qc_cohort import add_session

    out: dict = {"sessions": args.sessions, "groups": args.groups, "load_before": os.getloadavg()[0]}
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="nf-qc-cohort-") as tmp:
        root = Path(tmp)
        paths = {k: str(root / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}
        config = NeuroflowConfig.model_validate({"paths": paths})
        template = root / "template.tsv"
        template.write_text(REAL_TABLE_1_1_1)
        columns = read_image_qc(template)
        groups = [Group((("SeriesDescription", f"ep2d_diff_{g}"), ("ManufacturersModelName", "Prisma_fit")))
                  for g in range(args.groups)]
        store = store_of(config)
        t0 = time.perf_counter()
        with store._write() as conn:  # one transaction: a benchmark's seeding, not the asset's path
            for n in range(args.sessions):
                values = dict(columns)
                values["raw_masked_neighbor_corr"] = rng.gauss(0.93, 0.02)
                values["raw_num_bad_slices"] = float(max(0, int(rng.gauss(0, 1.5))))
                group = groups[n % len(groups)]
                scan_id, participant = f"SCAN{n:06d}", f"S{n:06d}"
                table = f"sub-{participant}_ses-01_space-ACPC_desc-image_qc.tsv"
                store._replace_measures(conn, scan_id, participant, "01", [SeriesMeasures(table, group, values)])
                judged = judge_values([(table, values)], config.qc)  # as judged while the group was small
                verdict = Verdict(judged.level, judged.metrics, (Path(table),))
                store._append(conn, StoredVerdict(scan_id, participant, "01", verdict.level, verdict.summary(), "t",
                                                  "s", record=verdict.to_record()))
        out["seed_s"] = time.perf_counter() - t0
        out["store_mb"] = store.path.stat().st_size / 1e6

        judge, figure = [], []
        for k in range(args.repeat):
            scan_id = add_session(config, 900000 + k, 0.80, judge=False, protocol="ep2d_diff_0")
            wall, cpu, evaluation = clock(lambda s=scan_id, k=k: evaluate_session(  # type: ignore[misc]
                config, s, f"S{900000 + k:03d}", "01", by="benchmark"))
            judge.append((wall, cpu))
            wall, cpu, _ = clock(lambda s=scan_id, e=evaluation: session_figure(config, s, e.groups))  # type: ignore[misc]
            figure.append((wall, cpu))
        out["reason"] = evaluation.gate.verdict.summary()
        out["judge_one_session"] = summary(judge)
        out["asset_figure"] = summary(figure)
        # what the alternative costs: reading every session's QC table from disk, per judgement
        sample = root / "scan"
        for n in range(args.scan_sample):
            folder = sample / f"sub-S{n:06d}" / "ses-01" / "dwi"
            folder.mkdir(parents=True)
            (folder / f"sub-S{n:06d}_ses-01_space-ACPC_desc-image_qc.tsv").write_text(REAL_TABLE_1_1_1)
        wall, cpu, _ = clock(lambda: [read_image_qc(t) for t in sample.glob("sub-*/ses-01/dwi/*_desc-image_qc.tsv")])
        out["table_scan"] = {"tables": args.scan_sample, "wall_s": wall, "cpu_s": cpu,
                             "extrapolated_wall_s": wall * args.sessions / max(args.scan_sample, 1)}
        wall, cpu, changes = clock(lambda: rejudge.plan(config))
        out["rejudge_plan"] = {"wall_s": wall, "cpu_s": cpu, "changes": len(changes)}
        wall, cpu, result = clock(lambda: write_report(config, root / "report"))
        out["report"] = {"wall_s": wall, "cpu_s": cpu, "index_kb": result.index.stat().st_size / 1e3,
                         "png_kb": sum(p.stat().st_size for p in result.images) / 1e3}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
