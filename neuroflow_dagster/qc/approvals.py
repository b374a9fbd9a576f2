"""Operator approvals of sessions that failed the image QC gate: who, when, why; append-only.

``state/qc_approvals.jsonl`` gets one JSON line per approval (and per revocation), never
rewritten, so the record survives restarts and shows every decision ever made. The latest
line of a ScanID decides. Keyed by ScanID (what a person looked at), with the labels it had.
"""

from __future__ import annotations

import getpass
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from neuroflow_dagster.config import NeuroflowConfig

FILE = "qc_approvals.jsonl"


@dataclass(frozen=True)
class Approval:
    scan_id: str
    participant: str
    session: str
    by: str
    at: str
    reason: str
    qc: str = ""  # the verdict the operator saw

    def describe(self) -> str:
        return f"approved by {self.by} at {self.at}: {self.reason}"


def path(config: NeuroflowConfig) -> Path:
    return config.paths.state / FILE


def _entries(config: NeuroflowConfig) -> list[dict[str, Any]]:
    try:
        text = path(config).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash approves nothing: the session stays blocked
        if isinstance(entry, dict) and entry.get("scan_id"):
            out.append(entry)
    return out


def load_approvals(config: NeuroflowConfig) -> dict[str, Approval]:
    """ScanID -> its standing approval (an approval not revoked since)."""
    current: dict[str, Approval] = {}
    for entry in _entries(config):
        scan_id = str(entry["scan_id"])
        if entry.get("action") == "revoke":
            current.pop(scan_id, None)
        elif entry.get("action") == "approve":
            current[scan_id] = Approval(scan_id, str(entry.get("participant", "")), str(entry.get("session", "")),
                                        str(entry.get("by", "")), str(entry.get("at", "")),
                                        str(entry.get("reason", "")), str(entry.get("qc", "")))
    return current


def approval_for(config: NeuroflowConfig, scan_id: str) -> Approval | None:
    return load_approvals(config).get(scan_id)


def history(config: NeuroflowConfig) -> list[dict[str, Any]]:
    """Every approval and revocation, oldest first."""
    return _entries(config)


def append_entry(config: NeuroflowConfig, entry: dict[str, Any], name: str = FILE) -> None:
    """One JSON line appended under a lock (the operator's QC decisions: approvals, re-judgements)."""
    file = config.paths.state / name
    file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(file) + ".lock"), file.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()


def approve(
    config: NeuroflowConfig, scan_id: str, participant: str, session: str, reason: str,
    by: str | None = None, qc: str = "",
) -> Approval:
    """Record that ``by`` (default: the logged-in user) lets the session through; a reason is required."""
    if not reason or not reason.strip():
        raise ValueError("an approval needs a reason (what was looked at and why the data are usable)")
    who = (by or "").strip() or getpass.getuser()
    entry = {"action": "approve", "scan_id": scan_id, "participant": participant, "session": session,
             "by": who, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reason": reason.strip(), "qc": qc}
    append_entry(config, entry)
    return Approval(scan_id, participant, session, who, entry["at"], entry["reason"], qc)


def revoke(config: NeuroflowConfig, scan_id: str, reason: str, by: str | None = None) -> bool:
    """Withdraw a standing approval (the gate holds the session again); False if there was none."""
    if not reason or not reason.strip():
        raise ValueError("revoking an approval needs a reason")
    standing = approval_for(config, scan_id)
    if standing is None:
        return False
    append_entry(config, {"action": "revoke", "scan_id": scan_id, "participant": standing.participant,
                     "session": standing.session, "by": (by or "").strip() or getpass.getuser(),
                     "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reason": reason.strip()})
    return True
