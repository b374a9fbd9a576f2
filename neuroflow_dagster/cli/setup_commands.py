"""Set-up commands: `neuroflow init`, `config validate`, `scan` and `demo` (no Dagster instance needed)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from neuroflow_dagster.cli.exits import EXIT_CONFIG, EXIT_OK, Parser
from neuroflow_dagster.cli.output import add_format_option, print_rows
from neuroflow_dagster.config import check_paths, load_config
from neuroflow_dagster.scaffold import dagster_home, init_workspace


def cmd_init(args: argparse.Namespace) -> int:
    target = init_workspace(Path(args.dir), force=args.force)
    print(f"wrote {target}")
    print("next: put ScanID,SubjectCode rows in mapping.csv, then")
    print(f"  NEUROFLOW_CONFIG={target} dagster dev -m neuroflow_dagster.definitions")
    return EXIT_OK


def cmd_config_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    problems = check_paths(config)
    if problems:
        print(f"{config.source}: not usable:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{config.source}: ok")
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    from neuroflow_dagster.discovery import engine
    from neuroflow_dagster.discovery.exclusions import load_exclusions

    config = load_config(args.config)
    result = engine.dry_run_discovery(config, excluded=set(load_exclusions(config)))
    rows: list[dict[str, Any]] = []
    for reg in result.registrations:
        rows.append(
            {
                "scan_id": reg.scan_id,
                "decision": "register",
                "subject": reg.participant_label,
                "session": reg.session_label,
                "reason": reg.protocol.message,
            }
        )
    for held in result.held:
        rows.append(
            {
                "scan_id": held.scan_id,
                "decision": f"held: {held.reason}",
                "subject": "",
                "session": "",
                "reason": held.message,
            }
        )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print_rows(rows, args.format, ["scan_id", "decision", "subject", "session", "reason"])
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from neuroflow_dagster.demo.workspace import build_demo_workspace

    directory = Path(args.dir).resolve()
    config_path = build_demo_workspace(directory, reset=args.reset)
    home = dagster_home(directory)
    env = dict(os.environ, DAGSTER_HOME=str(home), NEUROFLOW_CONFIG=str(config_path))
    print(f"demo workspace: {directory}")
    print(
        f"  DICOM in {directory / 'incoming'}; BIDS in {directory / 'bids'}; derivatives in {directory / 'derivatives'}"
    )
    print(f"  Dagster UI: http://{args.host}:{args.port}  (Ctrl-C stops it)")
    if args.no_ui:
        return EXIT_OK
    dagster = Path(sys.executable).with_name("dagster")
    argv = [str(dagster), "dev", "-m", "neuroflow_dagster.definitions", "-h", args.host, "-p", str(args.port)]
    if args.late_session_after is not None:
        from neuroflow_dagster.demo.workspace import schedule_late_session

        schedule_late_session(directory, args.late_session_after)
    return subprocess.call(argv, env=env, cwd=directory)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write DIR/neuroflow.yaml, a commented starter config")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("config", help="configuration commands")
    csub = p.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    v = csub.add_parser("validate", help="load, validate and check the paths of the configuration")
    v.set_defaults(func=cmd_config_validate)

    p = sub.add_parser("scan", help="what discovery would register now, and why other folders are held")
    p.add_argument(
        "--dry-run",
        action="store_true",
        default=True,
        help="(always) nothing is written; the sensor does the real registration",
    )
    add_format_option(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("demo", help="build a demo workspace with real and synthetic DICOM and start dagster dev")
    p.add_argument("--dir", default="demo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--reset", action="store_true", help="start from an empty workspace")
    p.add_argument("--no-ui", action="store_true", help="only build the workspace")
    p.add_argument(
        "--late-session-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="drop a late third session of the first subject after SECONDS",
    )
    p.set_defaults(func=cmd_demo)
