"""The two errors an operator fixes, raised by any layer and turned into exit codes by the CLI.

Plain Python. ``ConfigError``: the configuration (neuroflow.yaml, the Dagster
instance folder) cannot be used; the message names the key or folder and the
file (exit 2). ``UsageError``: what was asked cannot name a stage, session,
subject or run (exit 5). The exit codes themselves live in cli/exits.py.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem an operator must fix; the message names key and file."""


class UsageError(ValueError):
    """A request that cannot name what it asks for (stage, session, run); the message says what is accepted."""
