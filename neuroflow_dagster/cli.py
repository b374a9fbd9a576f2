"""The `neuroflow` command: set-up, checks and operator actions around the Dagster deployment.

Exit codes are stable for scripts: 0 ok, 1 error, 2 configuration problem, 5 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from neuroflow_dagster.config import ConfigError, check_paths, load_config

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_USAGE = 0, 1, 2, 5


class UsageError(Exception):
    """Bad arguments: exit 5."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 by default; 2 means "config" here
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def template_text(stability_minutes: float = 180, interval_seconds: int = 60) -> str:
    text = resources.files("neuroflow_dagster").joinpath("templates/neuroflow.yaml").read_text(encoding="utf-8")
    return text.replace("__STABILITY__", f"{stability_minutes:g}").replace("__INTERVAL__", str(interval_seconds))


def init_workspace(
    directory: Path, *, stability_minutes: float = 180, interval_seconds: int = 60, force: bool = False
) -> Path:
    """Write DIR/neuroflow.yaml (commented starter config for the embedded default) and its folders."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "neuroflow.yaml"
    if target.exists() and not force:
        raise UsageError(f"{target} exists; use --force to overwrite")
    target.write_text(template_text(stability_minutes, interval_seconds), encoding="utf-8")
    for sub in ("incoming", "bids", "derivatives", "work", "logs", "state"):
        (directory / sub).mkdir(exist_ok=True)
    mapping = directory / "mapping.csv"
    if not mapping.exists():
        mapping.write_text("ScanID,SubjectCode\n", encoding="utf-8")
    return target


def dagster_home(directory: Path) -> Path:
    """A DAGSTER_HOME with the project's dagster.yaml (instance settings: limits, retries, monitoring)."""
    home = directory / ".dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_project_dagster_yaml(), home / "dagster.yaml")
    return home


def _project_dagster_yaml() -> Path:
    shipped = Path(str(resources.files("neuroflow_dagster").joinpath("templates/dagster.yaml")))
    top = Path(__file__).resolve().parent.parent / "dagster.yaml"
    return top if top.is_file() else shipped


def _print_rows(rows: list[dict[str, Any]], fmt: str, columns: list[str]) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=2, default=str))
        return
    if fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


# --------------------------------------------------------------------------- commands


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
    _print_rows(rows, args.format, ["scan_id", "decision", "subject", "session", "reason"])
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neuroflow", description=__doc__)
    parser.add_argument(
        "--config", help="neuroflow.yaml (default: $NEUROFLOW_CONFIG, ./, ~/.config/neuroflow/, /etc/neuroflow/)"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("init", help="write DIR/neuroflow.yaml, a commented starter config")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("config", help="configuration commands")
    csub = p.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    v = csub.add_parser("validate", help="load, validate and check the paths of the configuration")
    v.set_defaults(func=cmd_config_validate)

    p = sub.add_parser("scan", help="what discovery would register now, and why other folders are held")
    p.add_argument(
        "--dry-run",
        action="store_true",
        default=True,
        help="(always) nothing is written; the sensor does the real registration",
    )
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
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

    from neuroflow_dagster import operator_cli

    operator_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help exits 0; bad arguments exit 5 (see _Parser.error)
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
