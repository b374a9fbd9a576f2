"""The `neuroflow` command: set-up, checks and operator actions around the Dagster deployment.

Exit codes are stable for scripts: 0 ok, 1 error, 2 configuration problem, 5 bad arguments.
"""

from __future__ import annotations

import argparse

from neuroflow_dagster.cli import operator_commands, qc_commands, setup_commands
from neuroflow_dagster.cli.exits import Parser, run


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="neuroflow", description=__doc__)
    parser.add_argument(
        "--config", help="neuroflow.yaml (default: $NEUROFLOW_CONFIG, ./, ~/.config/neuroflow/, /etc/neuroflow/)"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    setup_commands.add_commands(sub)
    operator_commands.add_commands(sub)
    qc_commands.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help exits 0; bad arguments exit 5 (see exits.Parser)
        return int(exc.code or 0)
    return run(args.func, args)
