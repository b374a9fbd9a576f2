"""The BIDS validator's verdict per converted session, kept so that QSIPrep leaves invalid sessions out.

The conversion asset validates the staged session (validator.py) and records
the verdict here; the QSIPrep eligibility rule (eligibility.py) reads it. One
small JSON file per session under ``paths.state/validation``, written
atomically. A session without a verdict counts as not passed.
"""

from __future__ import annotations

import json
from pathlib import Path

from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.naming.bids import entities


def verdict_path(state_dir: Path, participant: str, session: str) -> Path:
    return Path(state_dir) / "validation" / f"{entities(participant, session)}.json"


def save_verdict(state_dir: Path, participant: str, session: str, passed: bool, summary: str) -> None:
    atomic_write_text(verdict_path(state_dir, participant, session), json.dumps({"passed": passed, "summary": summary}))


def verdict_passed(state_dir: Path, participant: str, session: str) -> bool:
    try:
        return bool(json.loads(verdict_path(state_dir, participant, session).read_text())["passed"])
    except (OSError, ValueError, KeyError):
        return False
