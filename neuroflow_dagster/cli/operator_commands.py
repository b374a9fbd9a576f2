"""Operator commands that read Dagster's own records (status, failures, reprocess, ...).

status / failures / logs read the instance (event log, runs, check
executions) of --dagster-home, else $DAGSTER_HOME, else
<folder of neuroflow.yaml>/.dagster_home; reprocess / retry launch a backfill
through the running webserver's GraphQL API, as the UI does; exclude /
include edit the exclusion list (with its audit trail) through
discovery/exclusions.py; rekey moves remapped ScanIDs (discovery/rekey.py). Exit codes: cli/exits.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from neuroflow_dagster import stages
from neuroflow_dagster.cli.exits import EXIT_ERROR, EXIT_OK, records_errors_exit_1
from neuroflow_dagster.cli.output import FORMATS, add_format_option, print_json, print_rows
from neuroflow_dagster.config import NeuroflowConfig, load_config
from neuroflow_dagster.errors import UsageError

STATUS_COLUMNS = ["subject", "session", "scan_id", "mapping", "protocol"]
HELD_COLUMNS = ["scan_id", "state", "registered", "reason"]
CELL_WIDTH = 90  # table cells are cut here (held folders: 110, failures: 70)
FAILURE_COLUMNS = ["stage", "partition", "scan_id", "failure_class", "attempts", "last_error", "log_path"]


def _config(args: argparse.Namespace) -> NeuroflowConfig:
    return load_config(getattr(args, "config", None))


def _instance(args: argparse.Namespace, config: NeuroflowConfig) -> Any:
    from neuroflow_dagster.control.instance import open_instance, resolve_dagster_home

    return open_instance(resolve_dagster_home(getattr(args, "dagster_home", None), config))


def _stage(value: str | None) -> str | None:
    return stages.stage(value).name if value else None


# --------------------------------------------------------------------------- status


with_qc = stages.with_qc


def _render_status(report: dict[str, Any], fmt: str, names: list[str]) -> None:
    if fmt == "json":
        print_json(report)
        return
    from neuroflow_dagster.control.status import cell_text

    columns = [*STATUS_COLUMNS, *with_qc(names), "note"]
    # Table and CSV spell each cell with its cause: held (qc), blocked (qsirecon), failed (validation).
    spelled = [{**r, **{n: cell_text(r, n) for n in r["why"] if n in r}} if r.get("why") else r
               for r in report["sessions"]]  # fmt: skip
    if fmt == "csv":
        rows = list(spelled)
        rows += [
            {"scan_id": h["scan_id"], "mapping": f"held: {h['state']}", "note": h["reason"]} for h in report["held"]
        ]
        print_rows(rows, "csv", columns)
        return
    rows = [
        {**r, "note": r["note"] or (f"protocol: {r['protocol_reason']}" if r["protocol"] == "failed" else "")}
        for r in spelled
    ]
    print_rows(rows, "table", columns, max_width=CELL_WIDTH)
    _render_totals(report, names)


def _render_totals(report: dict[str, Any], names: list[str]) -> None:
    if report["held"]:
        print()
        print("held folders (REGISTERED: the labels of a registered session held for a new reason):")
        print_rows(report["held"], "table", HELD_COLUMNS, max_width=110)
    problems = [p["message"] for p in report.get("problems", [])]
    for title, items in (("problems", problems), ("notes", report.get("notes", []))):
        if items:
            print()
            print(f"{title}:")
            for item in items:
                print(f"  - {item}")
    totals = report["totals"]
    print()
    print(
        f"totals: {totals['sessions']} session(s), {totals['held']} held folder(s)"
        + (f" {totals['held_by_reason']}" if totals["held_by_reason"] else "")
    )
    print("  protocol: " + _counts(totals["protocol"]))
    if "qc" in with_qc(names):
        print("  qc: " + _counts(totals.get("qc", {})))
    for name in names:
        unit = " (per subject)" if stages.stage(name).per_subject else ""
        causes = totals.get("causes", {}).get(name)
        print(f"  {name}{unit}: " + _counts(totals[name]) + (f"  [{_counts(causes)}]" if causes else ""))
    _render_disk_lines(report)


def _render_disk_lines(report: dict[str, Any]) -> None:
    """The failed-run folders kept (control/kept.py), then the disk guard's line, last."""
    for key in ("failed_runs_kept", "disk_guard"):
        if report.get(key):
            print(report[key]["message"])


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "-"


def _render_summary(report: dict[str, Any], fmt: str, names: list[str]) -> None:
    """`status --summary`: counts per stage and state, held folders and the disk guard; no session rows."""
    from neuroflow_dagster.control.summary import summary_rows

    totals = report["totals"]
    rows, states = summary_rows(totals, names)
    if fmt == "json":
        print_json({"stages": rows, "sessions": totals["sessions"], "held": totals["held"],
                    "held_by_reason": totals["held_by_reason"], "disk_guard": report.get("disk_guard"),
                    "failed_runs_kept": report.get("failed_runs_kept"), "totals": totals})
        return
    print_rows(rows, fmt, ["stage", "unit", "total", *states], max_width=None if fmt == "csv" else CELL_WIDTH)
    if fmt == "table":
        causes = totals.get("causes", {})
        if causes:
            print()
            print("held, blocked and failed, by cause:")
            for name, counted in causes.items():
                print(f"  {name}: {_counts(counted)}")
        print()
        print(f"{totals['sessions']} session(s); {totals['held']} held folder(s)"
              + (f": {_counts(totals['held_by_reason'])}" if totals["held_by_reason"] else ""))
        _render_disk_lines(report)


def _export_nipoppy(args: argparse.Namespace, config: NeuroflowConfig, instance: Any) -> int:
    """`status --format nipoppy --output DIR`: Nipoppy's curation and processing status files (+ manifest)."""
    from neuroflow_dagster.control import nipoppy
    from neuroflow_dagster.control.status import collect_status

    if not args.output:
        raise UsageError("--format nipoppy writes files: give the folder with --output DIR")
    refused = [flag for flag, on in (("--watch", args.watch is not None), ("--failed", args.failed),
                                     ("--stage", args.stage), ("--summary", args.summary)) if on]  # fmt: skip
    if refused:
        raise UsageError(f"--format nipoppy exports every stage of every session; drop {', '.join(refused)}")
    report = collect_status(instance, config, subject=args.subject)
    tables = nipoppy.build_tables(report, config, nipoppy.recorded_tools(instance))
    files = nipoppy.write_tables(tables, Path(args.output))
    counts = nipoppy.summary(tables)
    print(f"wrote Nipoppy {nipoppy.NIPOPPY_VERSION} status files to {Path(args.output)}:")
    for name, path in files.items():
        print(f"  {path.name}: {len(tables[name])} row(s)")
    cur = counts["curation"]
    print(f"curation ({counts['sessions']} session(s)): in_pre_reorg {cur['in_pre_reorg']}, "
          f"in_post_reorg {cur['in_post_reorg']}, in_bids {cur['in_bids']}")
    for pipeline, by_status in counts["processing"].items():
        print(f"  {pipeline}: {_counts(by_status)}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """One row per registered session (state per stage), one per held folder, and totals."""
    from neuroflow_dagster.control.disk import disk_guard_view
    from neuroflow_dagster.control.kept import kept_folders_view
    from neuroflow_dagster.control.status import collect_status

    config = _config(args)
    if args.output and args.format != "nipoppy":
        raise UsageError("--output is for --format nipoppy (the other formats print)")
    stage = _stage(args.stage)
    names = [stage] if stage else stages.names()
    render = _render_summary if args.summary else _render_status
    if args.format == "nipoppy":
        with _instance(args, config) as instance:
            return _export_nipoppy(args, config, instance)
    from neuroflow_dagster.control.instance import open_db, resolve_dagster_home

    # The instance's tables, read directly: this path never imports dagster (control/dagster_db.py).
    with open_db(resolve_dagster_home(getattr(args, "dagster_home", None), config)) as db:
        while True:
            report = collect_status(db, config, subject=args.subject, stage=stage, failed_only=args.failed)
            report["disk_guard"] = disk_guard_view(db, config)
            report["failed_runs_kept"] = kept_folders_view(config)
            if args.watch is None:
                render(report, args.format, names)
                return EXIT_OK
            if sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(f"neuroflow status - {time.strftime('%Y-%m-%d %H:%M:%S')} (every {args.watch:g}s, Ctrl-C stops)")
            render(report, args.format, names)
            sys.stdout.flush()
            try:
                time.sleep(args.watch)
            except KeyboardInterrupt:
                return EXIT_OK


# --------------------------------------------------------------------------- failures


def _failures(args: argparse.Namespace) -> tuple[NeuroflowConfig, str | None, list[dict[str, Any]]]:
    """The config, the chosen stage (None: all) and the failure rows (`failures`, `retry`)."""
    from neuroflow_dagster.control.failures import collect_failures

    config = _config(args)
    stage = _stage(args.stage)
    with _instance(args, config) as instance:
        return config, stage, collect_failures(instance, config, stage)


def cmd_failures(args: argparse.Namespace) -> int:
    """The dead-letter list: cells whose state is failed (never held or blocked), with class, attempts and log."""
    _, _, rows = _failures(args)
    if args.format == "json":
        print_json(rows)
    elif args.format == "csv":
        print_rows(rows, "csv", [*FAILURE_COLUMNS, "subject", "session", "failed_runs", "run_id", "at"])
    else:
        print_rows(rows, "table", FAILURE_COLUMNS, max_width=70)
        print(f"\n{len(rows)} failed partition(s)" + ("" if not rows else "; `neuroflow retry` relaunches them"))
    return EXIT_OK


# --------------------------------------------------------------------------- reprocess / retry


def _launch(args: argparse.Namespace, command: str, stage: str, asset: str, partitions: list[str]) -> dict[str, Any]:
    from neuroflow_dagster.control.backfill import default_title, graphql_url, launch_backfill

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
    from neuroflow_dagster.control.backfill import select_partitions

    config = _config(args)
    stage = _stage(args.stage)
    assert stage is not None
    selection = select_partitions(config, stage, subject=args.subject, session=args.session, all_sessions=args.all)
    result = _launch(args, "reprocess", stage, selection.asset, selection.partitions)
    result["skipped"] = selection.skipped
    if args.format == "json":
        print_json(result)
    else:
        _print_launch(result, args.format)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    """Relaunch the partitions listed by `failures` (one backfill per stage); excluded sessions stay out."""
    from neuroflow_dagster.discovery.exclusions import load_exclusions

    config, stage, rows = _failures(args)
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
    for record in stages.stages():
        name = record.name
        if name in by_stage:
            result = _launch(args, "retry", name, record.asset, sorted(by_stage[name]))
            result["skipped"] = skipped.get(name, {})
            results.append(result)
    if args.format == "json":
        print_json(results)
    elif not results:
        print("no failed partitions to retry" + (f" for {stage}" if stage else ""))
    else:
        for result in results:
            _print_launch(result, args.format)
    return EXIT_OK


# --------------------------------------------------------------------------- exclude / include


def _resolve_scan_id(config: NeuroflowConfig, text: str) -> tuple[str, str]:
    """(ScanID, description): a registered session, or a folder discovery holds back (never registered)."""
    from neuroflow_dagster.control.targets import resolve_session
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.discovery.status_report import read_status_report

    registry = Registry(config.paths.state)
    try:
        entry = resolve_session(registry, text)
    except UsageError:
        held = {str(h.get("scan_id")): h for h in read_status_report(config).get("held", [])}
        if text in held:
            return text, f"held folder {held[text].get('path', text)} ({held[text].get('reason')})"
        raise
    return entry.scan_id, f"sub-{entry.participant_id} ses-{entry.session_id}"


def cmd_exclude(args: argparse.Namespace) -> int:
    """Exclude a session (ScanID or sub-X/ses-Y) with a reason: every stage refuses it; discovery skips it."""
    from neuroflow_dagster.discovery import exclusions

    config = _config(args)
    if not args.reason.strip():
        raise UsageError("--reason must say why the session is excluded")
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


def cmd_rekey(args: argparse.Namespace) -> int:
    """Move ScanIDs held as `remapped` to what the mapping says now: correct the code, or retire + re-register."""
    from neuroflow_dagster.discovery import rekey
    from neuroflow_dagster.discovery.exclusions import load_exclusions
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.discovery.mapping import load_mapping

    config = _config(args)
    registry = Registry(config.paths.state)
    try:
        steps = rekey.plan_rekey(config, registry, args.scan_ids, load_mapping(config, write=False), args.reason)
    except rekey.RekeyError as exc:
        raise UsageError(str(exc)) from exc
    excluded = load_exclusions(config)
    for step in steps:
        print(step.describe())
        if step.action == "retire" and step.scan_id in excluded:
            print(f"  note: {step.scan_id!r} is excluded: discovery holds it until `neuroflow include {step.scan_id}`")
    if args.dry_run:
        print("dry run: the registry is unchanged")
        return EXIT_OK
    rekey.apply_rekey(config, registry, steps, args.reason)
    print(f"registry {registry.path} updated; audit trail: {registry.audit_path}")
    return EXIT_OK


# --------------------------------------------------------------------------- logs


def cmd_logs(args: argparse.Namespace) -> int:
    """A run id: its tool log files (else its Dagster event log). A partition: its newest tool log(s)."""
    from neuroflow_dagster.control import logs
    from neuroflow_dagster.control.targets import parse_partition

    config = _config(args)
    stage = _stage(args.stage)
    target = args.target.strip()
    if logs.looks_like_run_id(target):
        with _instance(args, config) as instance:
            if instance.get_run_by_id(target) is None:
                raise UsageError(f"no run {target} in this Dagster instance")
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
            add_format_option(p)

    p = sub.add_parser("status", help="every session's state per stage, held folders and totals")
    common(p, fmt=False)
    p.add_argument(
        "--format",
        choices=[*FORMATS, "nipoppy"],
        default="table",
        help="nipoppy: write Nipoppy's curation_status.tsv, processing_status.tsv and manifest.tsv to --output",
    )
    p.add_argument("--output", metavar="DIR", help="the folder --format nipoppy writes its files to")
    p.add_argument("--summary", action="store_true", help="only the counts per stage and state")
    p.add_argument("--subject", help="only this participant label (with or without sub-)")
    p.add_argument("--stage", help=f"only this stage's column: {stages.help_names()}")
    p.add_argument("--failed", action="store_true", help="only sessions with a failed stage")
    p.add_argument(
        "--watch",
        nargs="?",
        type=_watch_seconds,
        const=10.0,
        default=None,
        metavar="SECS",
        help="redraw every SECS seconds (default 10) until Ctrl-C",
    )
    p.set_defaults(func=records_errors_exit_1(cmd_status))

    p = sub.add_parser("failures", help="partitions whose latest attempt failed (the dead-letter list)")
    common(p)
    p.add_argument("--stage")
    p.set_defaults(func=records_errors_exit_1(cmd_failures))

    p = sub.add_parser("reprocess", help="backfill a stage for chosen sessions through the Dagster webserver")
    common(p, home=False)
    p.add_argument("--stage", required=True, help=stages.help_names(" or "))
    p.add_argument("--subject")
    p.add_argument("--session", help="a session label (01 / ses-01) or a ScanID")
    p.add_argument("--all", action="store_true", help="every registered, non-excluded session")
    p.add_argument("--dry-run", action="store_true", help="list the partitions; launch nothing")
    p.add_argument("--url", default=None, help="the webserver (default http://127.0.0.1:3000/graphql)")
    p.set_defaults(func=records_errors_exit_1(cmd_reprocess))

    p = sub.add_parser("retry", help="relaunch the partitions `failures` lists (one backfill per stage)")
    common(p)
    p.add_argument("--stage")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--url", default=None, help="the webserver (default http://127.0.0.1:3000/graphql)")
    p.set_defaults(func=records_errors_exit_1(cmd_retry))

    p = sub.add_parser("exclude", help="exclude a session (ScanID or sub-X/ses-Y) with a reason")
    p.add_argument("session", metavar="SESSION")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=records_errors_exit_1(cmd_exclude))

    p = sub.add_parser("include", help="lift an exclusion")
    p.add_argument("session", metavar="SESSION")
    p.set_defaults(func=records_errors_exit_1(cmd_include))

    p = sub.add_parser("rekey", help="move ScanIDs held as remapped to the subject the mapping names now")
    p.add_argument("scan_ids", nargs="+", metavar="SCAN_ID")
    p.add_argument("--reason", required=True)
    p.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    p.set_defaults(func=records_errors_exit_1(cmd_rekey))

    p = sub.add_parser("logs", help="tool logs of a run id, or the newest of a partition")
    common(p, fmt=False)
    p.add_argument("target", metavar="RUN_OR_PARTITION", help="run id, '01|SUBJA', 'sub-SUBJA/ses-01' or a subject")
    p.add_argument("--stage")
    p.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N lines of each file")
    p.set_defaults(func=records_errors_exit_1(cmd_logs))
