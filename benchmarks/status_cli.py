"""`neuroflow status` on a large archive: the installed command, as an operator runs it.

Seeds a SQLite instance with `--subjects` x `--sessions-per-subject` fully processed sessions
(dicom_session, protocol check, BIDS, QSIPrep, recon + parcellation; see seeding.py) and the ScanID
registry, then times `neuroflow status` in its own process (`--repeat` times per format), and
`collect_status` in-process (with `--profile FILE`, profiled).

Usage::

    .venv/bin/python benchmarks/status_cli.py --subjects 10000 --sessions-per-subject 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import seeding  # noqa: E402


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall s, child CPU s, output bytes) of one command."""
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, env=env, check=False)
    wall = time.perf_counter() - t0
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu, len(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=10000)
    parser.add_argument("--sessions-per-subject", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", default="json,table,summary")
    parser.add_argument("--profile", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--code-root", default="", help="run the command from another checkout (PYTHONPATH)")
    parser.add_argument("--keep", default="", help="seed into this folder once and reuse it on later runs")
    args = parser.parse_args(argv)

    from neuroflow_dagster_tests.workspace_fixtures import make_workspace

    pairs = seeding.archive(args.subjects, args.sessions_per_subject)
    out: dict = {"sessions": len(pairs), "subjects": args.subjects, "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="nf-status-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        marker = base / f"seeded-{len(pairs)}"
        if marker.exists():
            from neuroflow_dagster.config import load_config

            config = load_config(base / "ws" / "neuroflow.yaml", environ={})
            home = seeding.Backend("sqlite", base / "home")
        else:
            base.mkdir(parents=True, exist_ok=True)
            config = make_workspace(base / "ws")
            home = seeding.write_home(base / "home", "sqlite")
            t0 = time.perf_counter()
            with home.instance() as instance, seeding.quiet():
                seeding.seed_sessions(instance, pairs, downstream=True)
            seeding.write_registry(config.paths.state, pairs)
            out["seed_s"] = time.perf_counter() - t0
            marker.write_text("")
        exe = str(Path(sys.executable).with_name("neuroflow"))
        env = dict(os.environ, DAGSTER_HOME=str(home.home))
        if args.code_root:
            env["PYTHONPATH"] = args.code_root
            out["code_root"] = args.code_root
        for fmt in args.formats.split(","):
            extra = ["--summary"] if fmt == "summary" else ["--format", fmt]
            cmd = [exe, "--config", str(config.source), "status", *extra, "--dagster-home", str(home.home)]
            runs = [timed(cmd, env) for _ in range(args.repeat)]
            out[fmt] = {
                "wall_s": {"min": min(r[0] for r in runs), "median": statistics.median(r[0] for r in runs)},
                "cpu_s": {"min": min(r[1] for r in runs), "median": statistics.median(r[1] for r in runs)},
                "output_bytes": runs[0][2],
            }
        if args.profile:
            import cProfile

            from neuroflow_dagster.control.status import collect_status

            with home.instance() as instance, seeding.quiet():
                prof = cProfile.Profile()
                prof.enable()
                collect_status(instance, config)
                prof.disable()
                prof.dump_stats(args.profile)
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
