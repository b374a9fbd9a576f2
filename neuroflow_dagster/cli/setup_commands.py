"""Set-up commands: `neuroflow init`, `config validate`, `scan`, `instance init`, `start` and `demo`."""

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
from neuroflow_dagster.errors import ConfigError, UsageError
from neuroflow_dagster.scaffold import dagster_home, init_workspace


def cmd_init(args: argparse.Namespace) -> int:
    target = init_workspace(Path(args.dir), force=args.force)
    print(f"wrote {target}")
    print("next: put ScanID,SubjectCode rows in mapping.csv, then")
    print(f"  neuroflow --config {target} start --dagster-home {target.parent / '.dagster_home'}")
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
        subject, _, session = held.registered.partition(" ")  # "sub-X ses-Y" of a registered session
        rows.append(
            {
                "scan_id": held.scan_id,
                "decision": f"held: {held.reason}",
                "subject": subject.removeprefix("sub-"),
                "session": session.removeprefix("ses-"),
                "reason": held.message,
            }
        )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in result.problems:
        print(f"problem ({problem.kind}): {problem.message}", file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print_rows(rows, args.format, ["scan_id", "decision", "subject", "session", "reason"])
    return EXIT_OK


def prepare(home: Path) -> None:
    """Create and migrate the instance's storage once, before any Dagster process opens it."""
    from neuroflow_dagster.control.storage import InstanceNotReady, prepare_instance

    try:
        prepare_instance(home)
    except InstanceNotReady as exc:
        raise ConfigError(str(exc)) from exc


def _home_option(value: str | None) -> Path:
    home = value or os.environ.get("DAGSTER_HOME")
    if not home:
        raise UsageError("no Dagster instance: pass --dagster-home or set DAGSTER_HOME")
    path = Path(home).resolve()
    if not (path / "dagster.yaml").is_file():
        raise UsageError(
            f"{path / 'dagster.yaml'} does not exist: copy the project's dagster.yaml there first "
            "(deploy/ has the production variants)"
        )
    return path


def cmd_instance_init(args: argparse.Namespace) -> int:
    home = _home_option(args.dagster_home)
    prepare(home)
    print(f"Dagster instance at {home}: storage created and migrated")
    return EXIT_OK


def _dagster_dev(host: str, port: int) -> list[str]:
    dagster = Path(sys.executable).with_name("dagster")
    return [str(dagster), "dev", "-m", "neuroflow_dagster.definitions", "-h", host, "-p", str(port)]


def cmd_start(args: argparse.Namespace) -> int:
    """`dagster dev` for this code location, after creating the instance's storage exactly once."""
    config = load_config(args.config)
    problems = check_paths(config)
    if problems:
        raise ConfigError(f"{config.source} cannot be used:\n  " + "\n  ".join(problems))
    home = _home_option(args.dagster_home)
    prepare(home)
    env = dict(os.environ, DAGSTER_HOME=str(home), NEUROFLOW_CONFIG=str(config.source))
    return subprocess.call(_dagster_dev(args.host, args.port), env=env, cwd=Path(str(config.source)).parent)


def cmd_demo(args: argparse.Namespace) -> int:
    from neuroflow_dagster.demo.workspace import build_demo_workspace

    directory = Path(args.dir).resolve()
    config_path = build_demo_workspace(directory, reset=args.reset)
    home = dagster_home(directory)
    prepare(home)
    env = dict(os.environ, DAGSTER_HOME=str(home), NEUROFLOW_CONFIG=str(config_path))
    print(f"demo workspace: {directory}")
    print(
        f"  DICOM in {directory / 'incoming'}; BIDS in {directory / 'bids'}; derivatives in {directory / 'derivatives'}"
    )
    print(f"  Dagster UI: http://{args.host}:{args.port}  (Ctrl-C stops it)")
    if args.no_ui:
        return EXIT_OK
    argv = _dagster_dev(args.host, args.port)
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

    p = sub.add_parser("instance", help="the Dagster instance (DAGSTER_HOME)")
    isub = p.add_subparsers(dest="instance_command", required=True, parser_class=Parser)
    i = isub.add_parser("init", help="create and migrate the instance's storage once (safe to repeat)")
    i.add_argument("--dagster-home", help="the instance folder holding dagster.yaml (default: $DAGSTER_HOME)")
    i.set_defaults(func=cmd_instance_init)

    p = sub.add_parser("start", help="create the instance's storage if needed, then start dagster dev")
    p.add_argument("--dagster-home", help="the instance folder holding dagster.yaml (default: $DAGSTER_HOME)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_start)

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
