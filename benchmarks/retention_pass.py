"""Retention pass benchmark: what the disk_guard sensor adds to each tick by pruning failed runs' folders.

Builds a workspace with ``--work`` failed-run work folders (``work_dir/qsiprep/sub-*``, one file each)
and ``--staging`` failed-run staging folders (``derivatives/qsirecon-neuroflow/.neuroflow-staging``),
all younger than the retention so every pass keeps them all, then times `retention.prune_pass`:

1. the first pass, which measures the kept folders' sizes (at most MEASURE_BUDGET_S of it per pass);
2. the steady-state pass (sizes remembered), ``--repeat`` times: listings, one stat per entry, the
   report written;
3. `retention.tree_size` on one work folder of ``--tree-files`` files (how fast a size is measured).

No Dagster: the live runs are given as an empty set (reading them is one run-table query). Prints a
table and, unless ``--no-docs``, writes it to docs/benchmarks.md (section "Retention pass"). Usage::

    .venv/bin/python benchmarks/retention_pass.py [--work 10000 --staging 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION = "## Retention pass"


def build(base: Path, work: int, staging: int, tree_files: int) -> tuple[object, Path]:
    from neuroflow_dagster.tools import layout
    from neuroflow_dagster.tools.publish import STAGING
    from neuroflow_dagster_tests.workspace_fixtures import make_workspace

    config = make_workspace(base / "ws", mapping={})
    prep_work = config.paths.work_dir / "qsiprep"
    for i in range(work):
        folder = prep_work / f"sub-S{i:05d}"
        folder.mkdir(parents=True)
        (folder / "node.pklz").write_bytes(b"x" * 4096)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    root = layout.qsirecon_dir(config) / STAGING
    for i in range(staging):
        folder = root / f"01_S{i:05d}.{stamp}.{i:08x}"
        folder.mkdir(parents=True)
        (folder / "partial.nii.gz").write_bytes(b"y" * 4096)
    tree = base / "tree"
    for i in range(tree_files):
        sub = tree / f"node{i // 100:04d}"
        if i % 100 == 0:
            sub.mkdir(parents=True)
        (sub / f"f{i}.txt").write_bytes(b"z" * 512)
    return config, tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=int, default=10000)
    parser.add_argument("--staging", type=int, default=2000)
    parser.add_argument("--tree-files", type=int, default=50000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)

    from neuroflow_dagster.retention import Active, prune_pass, report_path, tree_size

    base = Path(tempfile.mkdtemp(prefix="nf-retention-bench-"))
    try:
        started = time.perf_counter()
        config, tree = build(base, args.work, args.staging, args.tree_files)
        build_s = time.perf_counter() - started
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        first = prune_pass(config, lambda: Active())  # type: ignore[arg-type]
        first_s = time.perf_counter() - t0
        steady = []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            result = prune_pass(config, lambda: Active())  # type: ignore[arg-type]
            steady.append((time.perf_counter() - t0, time.process_time() - c0))
        assert not result.pruned and len(result.kept) == args.work + args.staging
        t0 = time.perf_counter()
        size, files = tree_size(tree)
        size_s = time.perf_counter() - t0
        report_bytes = report_path(config).stat().st_size  # type: ignore[arg-type]
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(base, ignore_errors=True)

    walls = [w for w, _ in steady]
    cpus = [c for _, c in steady]
    kept = args.work + args.staging
    measured = sum(1 for r in first.kept if r["bytes"] is not None)
    machine = (
        f"{platform.node()} ({os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()})"
    )
    command = (
        f"benchmarks/retention_pass.py --work {args.work} --staging {args.staging} --tree-files {args.tree_files}"
    )
    steady_cell = f"{statistics.median(walls):.3f} (min {min(walls):.3f}, max {max(walls):.3f})"
    lines = [
        SECTION,
        "",
        f"Measured {date.today().isoformat()} on {machine}, local disk; 1-min load average {load_before:.1f} "
        f"before and {load_after:.1f} after (the machine was shared: CPU seconds are the steadier figure).",
        f"Command: `.venv/bin/python {command}`",
        "",
        "What the `disk_guard` sensor adds to each tick by pruning failed runs' folders (`retention.prune_pass`, "
        f"docs/operations.md \"What a run leaves behind\"), with {args.work} failed-run work folders and "
        f"{args.staging} failed-run staging folders on disk, all within the retention (so every pass keeps all "
        f"{kept}; a real archive keeps far fewer). Built in {build_s:.1f} s.",
        "",
        "| pass | seconds (wall) | CPU s | folders kept | sizes measured |",
        "|---|---|---|---|---|",
        f"| first (measures sizes, at most 5 s per pass) | {first_s:.3f} | - | {len(first.kept)} | {measured} |",
        f"| steady state (sizes remembered), median of {args.repeat} | {steady_cell} | "
        f"{statistics.median(cpus):.3f} | {kept} | 0 |",
        "",
        "The steady-state pass lists the staging roots and `work_dir/<stage>`, stats each entry once and "
        f"rewrites `state_dir/retention.json` ({report_bytes / 1e6:.1f} MB for {kept} kept folders). Measuring "
        f"a folder's size (`tree_size`, like `du`): {files} files in {size_s:.2f} s ({files / size_s:,.0f} "
        f"files/s, {size / 1e6:.1f} MB allocated), so a real QSIPrep work folder (~10^5 files) is measured once "
        "in a second or two.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_docs:
        from benchmarks.discovery_tick import write_docs

        write_docs(text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
