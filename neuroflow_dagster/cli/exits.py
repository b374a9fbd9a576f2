"""Exit codes of `neuroflow`, stable for scripts, and the errors that map to them.

0 ok, 1 error, 2 configuration problem (errors.ConfigError), 5 bad arguments
(errors.UsageError and argparse's own errors). Every command returns its code;
``run`` turns the two operator errors into their codes and messages, and
``records_errors_exit_1`` does the same for what the Dagster records, the ScanID
registry or the webserver answer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from neuroflow_dagster.discovery.identity import RegistryError
from neuroflow_dagster.errors import ConfigError, UsageError

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_USAGE = 0, 1, 2, 5

Command = Callable[[argparse.Namespace], int]


def run(command: Command, args: argparse.Namespace) -> int:
    """Run one command; a ConfigError exits 2, a UsageError 5, Ctrl-C 1, each with its message."""
    try:
        return int(command(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_ERROR


def records_errors_exit_1(command: Command) -> Command:
    """For commands that read records or call the webserver: their failures exit 1 with the reason."""

    def guarded(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (RegistryError, RuntimeError, OSError) as exc:  # BackfillError is a RuntimeError
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR

    guarded.__name__ = command.__name__
    guarded.__doc__ = command.__doc__
    return guarded


class Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad arguments; 2 means "configuration" here, so bad arguments exit 5."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
