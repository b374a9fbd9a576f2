"""Automation tick benchmark: what one tick of the four stage sensors costs on a large archive.

Seeds an instance (SQLite, or a real PostgreSQL started here) with registered sessions whose
dicom_session, protocol check and bids_session are recorded (bulk-inserted, see seeding.py), then
measures each variant in its own process on its own copy of that instance:

1. a first tick (cold),
2. `--repeat` ticks with nothing changed,
3. `--repeat` ticks, each after `--new` newly registered sessions (new subjects, protocol passed).

Each tick's requests are checked (nothing on a no-change tick, exactly the new sessions' BIDS after
new sessions), so a fast but wrong variant cannot pass. Variants:

- `project`: the automation of the code under test (its automation sensors, whatever they are:
  declarative conditions evaluated with Dagster's `evaluate_automation_conditions`, one selection
  and cursor per stage sensor as the daemon does, or plain sensors evaluated with their cursor);
- `eager`: the same graph and partitions with Dagster's plain `AutomationCondition.eager()` on every
  stage asset (the yardstick of issue 12);
- `project+dp-cache`: `project` with dynamic-partition membership answered from one read of the set.

`--code-root DIR` runs a variant against another checkout of the project (e.g. the commit before the
redesign, `git worktree add --detach /tmp/nf-baseline <commit>`), so before/after run side by side.

Usage::

    .venv/bin/python benchmarks/automation_tick.py --subjects 10000 --sessions-per-subject 2 \
        --storage sqlite --variants project,eager
    .venv/bin/python benchmarks/automation_tick.py --subjects 1999 --extra-subject-sessions 10 ...

Prints one JSON object per variant (`--json FILE` appends them to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGE_ASSETS = ("bids_session", "qsiprep_subject", "qsirecon_session", "qsiparc_session")


def _code_path(code_root: Path) -> None:
    for p in (str(HERE), str(code_root)):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)


# --------------------------------------------------------------------------------------------------
# Child: one variant on one instance


def apply_experiment(name: str) -> None:
    """Monkeypatched variants measured while choosing the design (not used by the project)."""
    if name == "dp-cache":
        from dagster._utils.caching_instance_queryer import CachingInstanceQueryer

        def has_dynamic_partition(self: Any, partitions_def_name: str, partition_key: str) -> bool:
            return partition_key in self._dynamic_partition_key_set(partitions_def_name=partitions_def_name)

        CachingInstanceQueryer.has_dynamic_partition = has_dynamic_partition  # type: ignore[method-assign]
    elif name:
        raise SystemExit(f"unknown experiment {name!r}")


class DeclarativeTicker:
    """One cursor per stage sensor, evaluated one after the other like the daemon's sensors."""

    def caught_up(self) -> bool:
        return True  # every evaluation covers the whole partition space

    def __init__(self, defs: Any, instance: Any) -> None:
        self.defs = defs
        self.instance = instance
        self.cursors: dict[str, Any] = {}

    def tick(self) -> dict[str, Any]:
        import dagster as dg
        import seeding

        per_stage: dict[str, float] = {}
        requested: dict[str, set[str]] = {}
        for stage in STAGE_ASSETS:
            key = dg.AssetKey(stage)
            s0 = time.perf_counter()
            with seeding.quiet():
                result = dg.evaluate_automation_conditions(
                    defs=self.defs,
                    instance=self.instance,
                    asset_selection=dg.AssetSelection.assets(key),
                    cursor=self.cursors.get(stage),
                )
            per_stage[stage] = time.perf_counter() - s0
            self.cursors[stage] = result.cursor
            parts = result.get_requested_partitions(key)
            if parts:
                requested[stage] = {str(p) for p in parts}
        return {"per_stage_s": per_stage, "requested": requested}


class SensorTicker:
    """The project's plain stage sensors (if it has them), ticked in order with their cursors."""

    def caught_up(self) -> bool:
        """Every sensor's cursor is at the event-log head (a long backlog is taken in pages)."""
        head = int(self.instance.event_log_storage.get_maximum_record_id() or 0)
        return all(json.loads(c or "{}").get("seen") == head for c in self.cursors.values())

    def __init__(self, defs: Any, instance: Any, sensors: list[Any]) -> None:
        self.defs = defs
        self.instance = instance
        self.sensors = sensors
        self.cursors: dict[str, str | None] = {}

    def tick(self) -> dict[str, Any]:
        import dagster as dg
        import seeding

        per_stage: dict[str, float] = {}
        requested: dict[str, set[str]] = {}
        for sensor in self.sensors:
            s0 = time.perf_counter()
            with seeding.quiet():
                context = dg.build_sensor_context(
                    instance=self.instance,
                    cursor=self.cursors.get(sensor.name),
                    definitions=self.defs,
                    sensor_name=sensor.name,
                )
                result = sensor(context)
            per_stage[sensor.name] = time.perf_counter() - s0
            self.cursors[sensor.name] = result.cursor if isinstance(result, dg.SensorResult) else context.cursor
            for request in getattr(result, "run_requests", None) or []:
                for asset in request.asset_selection or []:
                    requested.setdefault(asset.to_user_string(), set()).add(
                        request.partition_key or request.tags.get("dagster/partition", "")
                    )
        return {"per_stage_s": per_stage, "requested": requested}


def build_ticker(workspace: Path, instance: Any, conditions: str) -> Any:
    import dagster as dg

    from neuroflow_dagster.definitions import build_definitions
    from neuroflow_dagster_tests.workspace_fixtures import make_workspace

    config = make_workspace(workspace)
    defs = build_definitions(config)
    if conditions == "eager":
        eager = dg.AutomationCondition.eager()
        stage_keys = {dg.AssetKey(a) for a in STAGE_ASSETS}
        defs = defs.map_asset_specs(
            func=lambda spec: spec.replace_attributes(automation_condition=eager) if spec.key in stage_keys else spec
        )
        return DeclarativeTicker(defs, instance)
    stage_sensors = [
        s
        for s in defs.sensors or []
        if s.name.startswith("automation_") and not isinstance(s, dg.AutomationConditionSensorDefinition)
    ]
    if stage_sensors:
        return SensorTicker(defs, instance, stage_sensors)
    return DeclarativeTicker(defs, instance)


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def timed_tick(ticker: Any) -> dict[str, Any]:
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    out = ticker.tick()
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_s"] = time.process_time() - cpu0
    return out


def child(args: argparse.Namespace) -> dict[str, Any]:
    _code_path(Path(args.code_root))
    import seeding

    conditions, _, experiment = args.variant.partition("+")
    apply_experiment(experiment)
    home = seeding.Backend(args.storage, Path(args.home), None)
    out: dict[str, Any] = {"variant": args.variant, "code_root": args.code_root, "load_before": os.getloadavg()[0]}
    with home.instance() as instance, tempfile.TemporaryDirectory(prefix="nf-ws-") as ws:
        ticker = build_ticker(Path(ws), instance, conditions)
        out["mechanism"] = type(ticker).__name__
        out["package"] = str(Path(sys.modules["neuroflow_dagster"].__file__ or "").parent)
        first = timed_tick(ticker)
        out["first_tick_s"] = first["wall_s"]
        out["first_requested"] = {k: len(v) for k, v in first["requested"].items()}
        # Catch-up: the stage sensors take a long backlog in pages; tick until they reach the head.
        catch_up = [first]
        while not ticker.caught_up() and len(catch_up) < 100:
            catch_up.append(timed_tick(ticker))
            for k, v in catch_up[-1]["requested"].items():
                out["first_requested"][k] = out["first_requested"].get(k, 0) + len(v)
        out["catch_up_ticks"] = len(catch_up)
        out["catch_up_s"] = sum(t["wall_s"] for t in catch_up)
        out["catch_up_max_tick_s"] = max(t["wall_s"] for t in catch_up)
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        quiet_ticks = [timed_tick(ticker) for _ in range(args.repeat)]
        if args.profile:
            prof.disable()
            prof.dump_stats(args.profile)
        stages = list(quiet_ticks[0]["per_stage_s"])
        out["no_change"] = {
            "wall": summary([t["wall_s"] for t in quiet_ticks]),
            "cpu": summary([t["cpu_s"] for t in quiet_ticks]),
            "per_stage_median": {s: statistics.median(t["per_stage_s"][s] for t in quiet_ticks) for s in stages},
        }
        problems = [
            f"no-change tick requested { ({k: len(v) for k, v in t['requested'].items()}) }"
            for t in quiet_ticks
            if t["requested"]
        ]
        new_ticks = []
        for round_ in range(args.repeat if args.new else 0):
            fresh = [(seeding.subject_label(900_000 + round_ * 1000 + i), "01") for i in range(args.new)]
            with seeding.quiet():
                seeding.seed_sessions(instance, fresh, converted=False)
            t = timed_tick(ticker)
            new_ticks.append(t)
            want = {seeding.key(s, n) for s, n in fresh}
            got = t["requested"].get("bids_session", set())
            if got != want or set(t["requested"]) - {"bids_session"}:
                counts = {k: len(v) for k, v in t["requested"].items()}
                problems.append(f"after new sessions, round {round_}: requested {counts}")
        if new_ticks:
            out["after_new"] = {
                "wall": summary([t["wall_s"] for t in new_ticks]),
                "cpu": summary([t["cpu_s"] for t in new_ticks]),
                "per_stage_median": {s: statistics.median(t["per_stage_s"][s] for t in new_ticks) for s in stages},
            }
        out["problems"] = problems
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_after"] = os.getloadavg()[0]
    return out


# --------------------------------------------------------------------------------------------------
# Parent: seed once, run each variant on a copy


def parent(args: argparse.Namespace) -> list[dict[str, Any]]:
    _code_path(ROOT)
    import seeding

    pairs = seeding.archive(args.subjects, args.sessions_per_subject, args.extra_subject_sessions)
    common = {
        "sessions": len(pairs),
        "subjects": args.subjects + (1 if args.extra_subject_sessions else 0),
        "labels": max(args.sessions_per_subject, args.extra_subject_sessions),
        "storage": args.storage,
        "storage_yaml": args.storage_yaml,
        "processed": args.processed,
    }
    results = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nf-autobench-")))
        pg = None
        if args.storage == "postgres":
            from neuroflow_dagster_tests.pg_server import pg_server

            pg = stack.enter_context(pg_server())
        storage = json.loads(args.storage_yaml) if args.storage_yaml else None
        if pg is not None:
            url = pg.create_database("seeded")
            if storage is not None:
                storage = json.loads(json.dumps(storage).replace("{url}", url))
            seeded = seeding.write_home(tmp / "seeded", "postgres", url, storage)
        else:
            seeded = seeding.write_home(tmp / "seeded", "sqlite", None, storage)
        t0 = time.perf_counter()
        with seeded.instance() as instance, seeding.quiet():
            common["seed"] = seeding.seed_sessions(instance, pairs, downstream=args.processed)
        common["seed_s"] = time.perf_counter() - t0
        for i, variant in enumerate(args.variants.split(",")):
            name, _, code_root = variant.partition("@")
            copy = seeding.clone_backend(seeded, tmp / f"v{i}", pg, f"v{i}")
            argv = [
                sys.executable, str(Path(__file__).resolve()), "--child", "--home", str(copy.home),
                "--storage", args.storage, "--variant", name, "--code-root", code_root or str(ROOT),
                "--repeat", str(args.repeat), "--new", str(args.new),
            ]  # fmt: skip
            if args.profile:
                argv += ["--profile", f"{args.profile}.{name}.prof"]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            try:
                out = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                out = {"variant": variant, "problems": [f"child failed ({proc.returncode}): {proc.stderr[-3000:]}"]}
            out.update(common)
            out["variant"] = variant
            results.append(out)
            print(json.dumps(out, default=str), flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(out, default=str) + "\n")
            if copy.home.exists():
                shutil.rmtree(copy.home, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=500)
    parser.add_argument("--sessions-per-subject", type=int, default=2)
    parser.add_argument(
        "--extra-subject-sessions", type=int, default=0, help="one more subject with this many sessions"
    )
    parser.add_argument("--storage", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--storage-yaml", default="", help="JSON merged into dagster.yaml ({url} = the PG url)")
    parser.add_argument(
        "--variants", default="project,eager", help="comma list; VARIANT@CODE_ROOT for another checkout"
    )
    parser.add_argument(
        "--processed", action="store_true", help="seed every stage done (QSIPrep, recon, parcellation), not only BIDS"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--new", type=int, default=50)
    parser.add_argument("--profile", default="", help="cProfile the no-change ticks into PREFIX.<variant>.prof")
    parser.add_argument("--json", default="", help="append results to this file (JSON lines)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--code-root", default=str(ROOT), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        out = child(args)
        print(json.dumps(out, default=str))
        return 0
    results = parent(args)
    return 1 if any(r.get("problems") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
