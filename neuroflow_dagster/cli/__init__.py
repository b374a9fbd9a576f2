"""The `neuroflow` command (console script `neuroflow = neuroflow_dagster.cli:main`).

app.py builds the parser and runs a command; setup_commands.py holds init,
config validate, scan and demo; operator_commands.py the commands that read
Dagster's records or launch backfills; exits.py the exit codes and the errors
that map to them; output.py the table/CSV/JSON printer they share.
"""

from neuroflow_dagster.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
