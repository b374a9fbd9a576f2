"""Operator subcommands that read Dagster's own records (status, failures, reprocess, ...).

status / failures / logs read the instance (event log, runs, check
executions) of --dagster-home, else $DAGSTER_HOME, else
<folder of neuroflow.yaml>/.dagster_home; reprocess / retry launch a backfill
through the running webserver's GraphQL API, as the UI does; exclude /
include edit the exclusion list (with its audit trail) through
discovery/exclusions.py. Exit codes: 0 ok, 1 error, 2 configuration, 5 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from neuroflow_dagster.config import ConfigError, NeuroflowConfig, load_config

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_USAGE = 0, 1, 2, 5

STATUS_COLUMNS = ["subject", "session", "scan_id", "mapping", "protocol"]
HELD_COLUMNS = ["scan_id", "state", "reason"]
FAILURE_COLUMNS = ["stage", "partition", "scan_id", "failure_class", "attempts", "last_error", "log_path"]


# --------------------------------------------------------------------------- plumbing


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map the helpers' errors onto the CLI's exit codes (usage 5, configuration 2, anything else 1)."""

    def run(args: argparse.Namespace) -> int:
        from neuroflow_dagster.cli import UsageError
        from neuroflow_dagster.discovery.identity import RegistryError
        from neuroflow_dagster.ops.backfill import BackfillError
        from neuroflow_dagster.ops.common import OpsConfigError, OpsUsageError

        try:
            return func(args)
        except OpsUsageError as exc:
            raise UsageError(str(exc)) from exc
        except OpsConfigError as exc:
            raise ConfigError(str(exc)) from exc
        except (BackfillError, RegistryError, RuntimeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR

    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


def _config(args: argparse.Namespace) -> NeuroflowConfig:
    return load_config(getattr(args, "config", None))


def _instance(args: argparse.Namespace, config: NeuroflowConfig) -> Any:
    from neuroflow_dagster.ops.common import open_instance, resolve_dagster_home

    return open_instance(resolve_dagster_home(getattr(args, "dagster_home", None), config))


def _stage(value: str | None) -> str | None:
    from neuroflow_dagster.ops.common import normalize_stage

    return normalize_stage(value) if value else None


def _print_rows(rows: list[dict[str, Any]], fmt: str, columns: list[str], *, max_width: int = 90) -> None:
    if fmt in ("json", "csv"):
        from neuroflow_dagster.cli import _print_rows as print_rows

        print_rows(rows, fmt, columns)
        return
    cells = [{c: _cell(row.get(c, ""), max_width) for c in columns} for row in rows]
    widths = {c: max([len(c)] + [len(r[c]) for r in cells]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in cells:
        print("  ".join(r[c].ljust(widths[c]) for c in columns).rstrip())


def _cell(value: Any, max_width: int) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= max_width else text[: max_width - 3] + "..."


def _json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# --------------------------------------------------------------------------- status


def _render_status(report: dict[str, Any], fmt: str, stages: list[str], summary: bool = False) -> None:
    if summary:  # the archive at a glance: totals and held folders, no row per session
        report = {"held": report["held"], "totals": report["totals"]}
        if fmt == "json":
            _json(report)
            return
        _render_totals(report, stages)
        return
    if fmt == "json":
        _json(report)
        return
    columns = [*STATUS_COLUMNS, *stages, "note"]
    if fmt == "csv":
        rows = list(report["sessions"])
        rows += [
            {"scan_id": h["scan_id"], "mapping": f"held: {h['state']}", "note": h["reason"]} for h in report["held"]
        ]
        _print_rows(rows, "csv", columns)
        return
    rows = [
        {**r, "note": r["note"] or (f"protocol: {r['protocol_reason']}" if r["protocol"] == "failed" else "")}
        for r in report["sessions"]
    ]
    _print_rows(rows, "table", columns)
    _render_totals(report, stages)


def _render_totals(report: dict[str, Any], stages: list[str]) -> None:
    if report["held"]:
        print()
        print("held folders (not registered):")
        _print_rows(report["held"], "table", HELD_COLUMNS, max_width=110)
    totals = report["totals"]
    print()
    print(
        f"totals: {totals['sessions']} session(s), {totals['held']} held folder(s)"
        + (f" {totals['held_by_reason']}" if totals["held_by_reason"] else "")
    )
    print("  protocol: " + _counts(totals["protocol"]))
    for name in stages:
        unit = " (per subject)" if name == "qsiprep" else ""
        print(f"  {name}{unit}: " + _counts(totals[name]))


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "-"


def cmd_status(args: argparse.Namespace) -> int:
    """One row per registered session (state per stage), one per held folder, and totals."""
    from neuroflow_dagster.ops.common import STAGE_ASSETS
    from neuroflow_dagster.ops.status import collect_status

    config = _config(args)
    stage = _stage(args.stage)
    stages = [stage] if stage else list(STAGE_ASSETS)
    with _instance(args, config) as instance:
        while True:
            report = collect_status(instance, config, subject=args.subject, stage=stage, failed_only=args.failed)
            if args.watch is None:
                _render_status(report, args.format, stages, args.summary)
                return EXIT_OK
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(f"neuroflow status - {time.strftime('%Y-%m-%d %H:%M:%S')} (every {args.watch:g}s, Ctrl-C stops)")
            _render_status(report, args.format, stages, args.summary)
            sys.stdout.flush()
            try:
                time.sleep(args.watch)
            except KeyboardInterrupt:
                return EXIT_OK


# --------------------------------------------------------------------------- failures


def cmd_failures(args: argparse.Namespace) -> int:
    """The dead-letter list: partitions whose latest attempt failed, with class, attempts and log."""
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.ops.failures import collect_failures

    config = _config(args)
    stage = _stage(args.stage)
    with _instance(args, config) as instance:
        rows = collect_failures(instance, Registry(config.paths.state), stage)
    if args.format == "json":
        _json(rows)
    elif args.format == "csv":
        _print_rows(rows, "csv", [*FAILURE_COLUMNS, "subject", "session", "failed_runs", "run_id", "at"])
    else:
        _print_rows(rows, "table", FAILURE_COLUMNS, max_width=70)
        print(f"\n{len(rows)} failed partition(s)" + ("" if not rows else "; `neuroflow retry` relaunches them"))
    return EXIT_OK


# --------------------------------------------------------------------------- reprocess / retry


def _launch(args: argparse.Namespace, command: str, stage: str, asset: str, partitions: list[str]) -> dict[str, Any]:
    from neuroflow_dagster.ops.backfill import default_title, graphql_url, launch_backfill

    result: dict[str, Any] = {"stage": stage, "asset": asset, "partitions": partitions, "dry_run": args.dry_run}
    if args.dry_run:
        return result
    title = default_title(command, stage, partitions)
    launched = launch_backfill(args.url, asset, partitions, stage, title)
    result.update(launched, url=graphql_url(args.url), title=title)
    return result


def _print_launch(result: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        return
    verb = "would reprocess" if result["dry_run"] else "reprocessing"
    print(f"{result['stage']} ({result['asset']}): {verb} {len(result['partitions'])} partition(s)")
    for key in result["partitions"]:
        print(f"  {key}")
    for scan_id, why in result.get("skipped", {}).items():
        print(f"  skipped {scan_id}: {why}")
    if result["dry_run"]:
        print("dry run: no backfill launched")
    else:
        print(f"launched backfill {result['backfill_id']} via {result['url']} (watch it under Overview > Backfills)")


def cmd_reprocess(args: argparse.Namespace) -> int:
    """Backfill a stage for chosen sessions (or subjects, for QSIPrep) through the webserver."""
    from neuroflow_dagster.ops.backfill import select_partitions

    config = _config(args)
    stage = _stage(args.stage)
    assert stage is not None
    selection = select_partitions(config, stage, subject=args.subject, session=args.session, all_sessions=args.all)
    result = _launch(args, "reprocess", stage, selection.asset, selection.partitions)
    result["skipped"] = selection.skipped
    if args.format == "json":
        _json(result)
    else:
        _print_launch(result, args.format)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """Relaunch the partitions listed by `failures` (one backfill per stage); excluded sessions stay out."""
    from neuroflow_dagster.discovery.exclusions import load_exclusions
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.ops.common import STAGE_ASSETS
    from neuroflow_dagster.ops.failures import collect_failures

    config = _config(args)
    stage = _stage(args.stage)
    with _instance(args, config) as instance:
        rows = collect_failures(instance, Registry(config.paths.state), stage)
    excluded = load_exclusions(config)
    by_stage: dict[str, list[str]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for row in rows:
        if row["scan_id"] and row["scan_id"] in excluded:
            skipped.setdefault(row["stage"], {})[row["scan_id"]] = "excluded"
            continue
        keys = by_stage.setdefault(row["stage"], [])
        if row["partition"] not in keys:
            keys.append(row["partition"])
    results = []
    for name in STAGE_ASSETS:
        if name in by_stage:
            result = _launch(args, "retry", name, STAGE_ASSETS[name], sorted(by_stage[name]))
            result["skipped"] = skipped.get(name, {})
            results.append(result)
    if args.format == "json":
        _json(results)
    elif not results:
        print("no failed partitions to retry" + (f" for {stage}" if stage else ""))
    else:
        for result in results:
            _print_launch(result, args.format)
    return EXIT_OK


# --------------------------------------------------------------------------- exclude / include


def _resolve_scan_id(config: NeuroflowConfig, text: str) -> tuple[str, str]:
    """(ScanID, description): a registered session, or a folder discovery holds back (never registered)."""
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.discovery.status_report import read_status_report
    from neuroflow_dagster.ops.common import OpsUsageError, resolve_session

    registry = Registry(config.paths.state)
    try:
        entry = resolve_session(registry, text)
    except OpsUsageError:
        held = {str(h.get("scan_id")): h for h in read_status_report(config).get("held", [])}
        if text in held:
            return text, f"held folder {held[text].get('path', text)} ({held[text].get('reason')})"
        raise
    return entry.scan_id, f"sub-{entry.participant_id} ses-{entry.session_id}"


def cmd_exclude(args: argparse.Namespace) -> int:
    """Exclude a session (ScanID or sub-X/ses-Y) with a reason: every stage refuses it; discovery skips it."""
    from neuroflow_dagster.discovery import exclusions
    from neuroflow_dagster.ops.common import OpsUsageError

    config = _config(args)
    if not args.reason.strip():
        raise OpsUsageError("--reason must say why the session is excluded")
    scan_id, what = _resolve_scan_id(config, args.session)
    exclusions.exclude(config, scan_id, args.reason)
    print(f"excluded ScanID {scan_id!r} ({what}): {args.reason.strip()}")
    print(f"audit trail: {config.paths.state / 'exclusions_audit.jsonl'}")
    return EXIT_OK


def cmd_include(args: argparse.Namespace) -> int:
    """Lift an exclusion (the audit trail keeps both entries)."""
    from neuroflow_dagster.discovery import exclusions

    config = _config(args)
    try:
        scan_id, what = _resolve_scan_id(config, args.session)
    except Exception:
        if args.session not in exclusions.load_exclusions(config):
            raise
        scan_id, what = args.session, "not registered"
    if exclusions.include(config, scan_id):
        print(f"included ScanID {scan_id!r} ({what}) again; reprocess it with `neuroflow reprocess`")
        print(f"audit trail: {config.paths.state / 'exclusions_audit.jsonl'}")
    else:
        print(f"ScanID {scan_id!r} ({what}) was not excluded; nothing to do")
    return EXIT_OK


# --------------------------------------------------------------------------- logs


def cmd_logs(args: argparse.Namespace) -> int:
    """A run id: its tool log files (else its Dagster event log). A partition: its newest tool log(s)."""
    from neuroflow_dagster.ops import logs
    from neuroflow_dagster.ops.common import OpsUsageError, parse_partition

    config = _config(args)
    stage = _stage(args.stage)
    target = args.target.strip()
    if logs.looks_like_run_id(target):
        with _instance(args, config) as instance:
            if instance.get_run_by_id(target) is None:
                raise OpsUsageError(f"no run {target} in this Dagster instance")
            paths = logs.run_log_paths(instance, target)
            messages = [] if paths else logs.run_event_messages(instance, target)
        if not paths:
            print(f"run {target} wrote no tool log file; its Dagster event log:")
            print("\n".join(messages))
            return EXIT_OK
        return _print_files([("run " + target[:8], p) for p in paths], args.tail)
    ref = parse_partition(target)
    found = logs.partition_log_files(config, ref, stage)
    if not found:
        where = config.paths.log_dir / (stage or "<stage>")
        print(f"no tool log for {ref.key} under {where}", file=sys.stderr)
        return EXIT_ERROR
    return _print_files([(name, str(path)) for name, path in found], args.tail)


def _print_files(files: list[tuple[str, str]], tail: int | None) -> int:
    from pathlib import Path

    status = EXIT_OK
    for label, name in files:
        path = Path(name)
        print(f"==> {path} ({label}) <==")
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            print(f"(cannot read: {exc.strerror})")
            status = EXIT_ERROR
            continue
        print("\n".join(lines[-tail:] if tail else lines))
    return status


# --------------------------------------------------------------------------- parser


def _watch_seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("--watch needs a positive number of seconds")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser, *, fmt: bool = True, home: bool = True) -> None:
        if home:
            p.add_argument(
                "--dagster-home",
                help="the Dagster instance folder (default: $DAGSTER_HOME, else <config folder>/.dagster_home)",
            )
        if fmt:
            p.add_argument("--format", choices=["table", "csv", "json"], default="table")

    p = sub.add_parser("status", help="every session's state per stage, held folders and totals")
    common(p)
    p.add_argument("--subject", help="only this participant label (with or without sub-)")
    p.add_argument("--stage", help="only this stage's column: bids_conversion (bids), qsiprep, qsirecon, qsiparc")
    p.add_argument("--failed", action="store_true", help="only sessions with a failed stage")
    p.add_argument("--summary", action="store_true", help="only the totals per stage and state, and the held folders")
    p.add_argument(
        "--watch",
        nargs="?",
        type=_watch_seconds,
        const=10.0,
        default=None,
        metavar="SECS",
        help="redraw every SECS seconds (default 10) until Ctrl-C",
    )
    p.set_defaults(func=_guard(cmd_status))

    p = sub.add_parser("failures", help="partitions whose latest attempt failed (the dead-letter list)")
    common(p)
    p.add_argument("--stage")
    p.set_defaults(func=_guard(cmd_failures))

    p = sub.add_parser("reprocess", help="backfill a stage for chosen sessions through the Dagster webserver")
    common(p, home=False)
    p.add_argument("--stage", required=True, help="bids_conversion (bids), qsiprep, qsirecon or qsiparc")
    p.add_argument("--subject")
    p.add_argument("--session", help="a session label (01 / ses-01) or a ScanID")
    p.add_argument("--all", action="store_true", help="every registered, non-excluded session")
    p.add_argument("--dry-run", action="store_true", help="list the partitions; launch nothing")
    p.add_argument("--url", default=None, help="the webserver (default http://127.0.0.1:3000/graphql)")
    p.set_defaults(func=_guard(cmd_reprocess))

    p = sub.add_parser("retry", help="relaunch the partitions `failures` lists (one backfill per stage)")
    common(p)
    p.add_argument("--stage")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--url", default=None, help="the webserver (default http://127.0.0.1:3000/graphql)")
    p.set_defaults(func=_guard(cmd_retry))

    p = sub.add_parser("exclude", help="exclude a session (ScanID or sub-X/ses-Y) with a reason")
    p.add_argument("session", metavar="SESSION")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=_guard(cmd_exclude))

    p = sub.add_parser("include", help="lift an exclusion")
    p.add_argument("session", metavar="SESSION")
    p.set_defaults(func=_guard(cmd_include))

    p = sub.add_parser("logs", help="tool logs of a run id, or the newest of a partition")
    common(p, fmt=False)
    p.add_argument("target", metavar="RUN_OR_PARTITION", help="run id, '01|SUBJA', 'sub-SUBJA/ses-01' or a subject")
    p.add_argument("--stage")
    p.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N lines of each file")
    p.set_defaults(func=_guard(cmd_logs))
