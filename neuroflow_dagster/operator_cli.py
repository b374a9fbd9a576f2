"""Operator subcommands that read Dagster's own records (status, failures, reprocess, ...)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:  # filled in by the operator-interface work
    return None
