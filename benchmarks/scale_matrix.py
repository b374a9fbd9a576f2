"""Run the automation-tick matrix of issue 12 and render it as the table in docs/benchmarks.md.

Each case is one `automation_tick.py` run (one seeded instance, the variants side by side on copies
of it). `--baseline DIR` adds the declarative automation of an earlier checkout as variant
`before` (e.g. `git archive <commit> | tar -x -C /tmp/nf-baseline`). Results are appended to
`--json` (JSON lines) and `--render` turns such a file into the Markdown table.

Usage::

    .venv/bin/python benchmarks/scale_matrix.py --json benchmarks/results/scale.jsonl --baseline /tmp/nf-baseline
    .venv/bin/python benchmarks/scale_matrix.py --render benchmarks/results/scale.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# name -> (automation_tick.py arguments, variants; "before" = the baseline checkout)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "1k-sqlite": (["--subjects", "500"], ["project", "eager", "before"]),
    "5k-sqlite": (["--subjects", "2500"], ["project", "eager", "before"]),
    "20k-sqlite": (["--subjects", "10000"], ["project", "eager", "before"]),
    "phantom-sqlite": (["--subjects", "1999", "--extra-subject-sessions", "10"], ["project", "eager", "before"]),
    "20k-sqlite-processed": (["--subjects", "10000", "--processed"], ["project", "eager"]),
    "5k-postgres": (["--subjects", "2500", "--storage", "postgres"], ["project", "eager", "before"]),
    "20k-postgres": (["--subjects", "10000", "--storage", "postgres"], ["project", "eager"]),
    "20k-postgres-pooled": (
        ["--subjects", "10000", "--storage", "postgres", "--storage-yaml", "POOLED"],
        ["project", "eager"],
    ),
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


def run_case(name: str, baseline: str, out: str, repeat: int) -> None:
    args, variants = CASES[name]
    args = [json.dumps(POOLED) if a == "POOLED" else a for a in args]
    names = [f"project@{baseline}" if v == "before" else v for v in variants if v != "before" or baseline]
    argv = [
        sys.executable,
        str(HERE / "automation_tick.py"),
        *args,
        "--repeat",
        str(repeat),
        "--variants",
        ",".join(names),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    with open(out, "a") as fh:
        for line in proc.stdout.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            row["case"] = name
            fh.write(json.dumps(row) + "\n")
    if proc.returncode:
        print(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}", file=sys.stderr)


def _variant(row: dict[str, Any]) -> str:
    v = str(row.get("variant", ""))
    return (
        "before (declarative)" if "@" in v else {"project": "after (stage sensors)", "eager": "plain eager()"}.get(v, v)
    )


_VARIANT_ORDER = {"after (stage sensors)": 0, "plain eager()": 1, "before (declarative)": 2}


def _fmt(stats: dict[str, float] | None) -> str:
    if not stats:
        return "-"
    return f"{stats['min']:.3f} / {stats['median']:.3f}"


def render(path: str) -> str:
    latest: dict[tuple[str, str], dict[str, Any]] = {}  # a re-measured (case, variant) replaces the earlier row
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest.pop((row.get("case", ""), _variant(row)), None)
            latest[(row.get("case", ""), _variant(row))] = row
    order = list(CASES)
    rows = sorted(
        latest.values(),
        key=lambda r: (
            order.index(r["case"]) if r.get("case") in order else len(order),
            _VARIANT_ORDER.get(_variant(r), 9),
        ),
    )
    lines = [
        "| case | sessions (subjects x labels) | storage | automation | no-change tick wall s | CPU s | "
        "tick after 50 new sessions wall s | CPU s | catch-up: ticks, longest tick s | load before/after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        storage = r.get("storage", "")
        if r.get("storage_yaml"):
            storage += " (pooled)"
        nc, an = r.get("no_change", {}), r.get("after_new", {})
        longest = r.get("catch_up_max_tick_s", r.get("first_tick_s", 0))
        lines.append(
            f"| {r.get('case', '')} | {r.get('sessions')} ({r.get('subjects')} x {r.get('labels')}) | {storage} | "
            f"{_variant(r)} | {_fmt(nc.get('wall'))} | {_fmt(nc.get('cpu'))} | {_fmt(an.get('wall'))} | "
            f"{_fmt(an.get('cpu'))} | {r.get('catch_up_ticks', 1)}, {longest:.1f} | "
            f"{r.get('load_before', 0):.1f} / {r.get('load_after', 0):.1f} |"
            + (f" PROBLEMS: {r['problems']}" if r.get("problems") else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--baseline", default="", help="checkout of the declarative automation (variant 'before')")
    parser.add_argument("--json", default="benchmarks/results/scale.jsonl")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--render", default="", help="print the Markdown table of this JSON-lines file")
    args = parser.parse_args(argv)
    if args.render:
        print(render(args.render))
        return 0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for name in args.cases.split(","):
        run_case(name, args.baseline, args.json, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
