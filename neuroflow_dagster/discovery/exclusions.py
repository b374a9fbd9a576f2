"""Sessions an operator excluded by hand, with the reason and an append-only audit trail.

Kept as plain files in `paths.state` (next to the ScanID registry) so the
sensor, the assets and the CLI read the same list without a second database.
An excluded ScanID is never registered; an excluded session that was already
registered is refused by every stage with the reason.
"""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.fsutil import atomic_write_text


def _paths(config: NeuroflowConfig) -> tuple[Path, Path, Path]:
    state = config.paths.state
    return state / "exclusions.json", state / "exclusions_audit.jsonl", state / "exclusions.lock"


def load_exclusions(config: NeuroflowConfig) -> dict[str, dict[str, Any]]:
    """scan_id -> {"reason", "at", "by"}."""
    path, _, _ = _paths(config)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot read the exclusion list {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _write(config: NeuroflowConfig, data: dict[str, Any], action: str, scan_id: str, reason: str) -> None:
    path, audit, _ = _paths(config)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))
    entry = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "by": getpass.getuser(),
        "action": action,
        "scan_id": scan_id,
        "reason": reason,
    }
    with audit.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def exclude(config: NeuroflowConfig, scan_id: str, reason: str) -> None:
    if not reason.strip():
        raise ValueError("an exclusion needs a reason")
    _, _, lock = _paths(config)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        data = load_exclusions(config)
        data[scan_id] = {
            "reason": reason.strip(),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "by": getpass.getuser(),
        }
        _write(config, data, "exclude", scan_id, reason.strip())


def include(config: NeuroflowConfig, scan_id: str) -> bool:
    """Lift an exclusion; returns False if the ScanID was not excluded."""
    _, _, lock = _paths(config)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        data = load_exclusions(config)
        if scan_id not in data:
            return False
        del data[scan_id]
        _write(config, data, "include", scan_id, "")
        return True


def audit_trail(config: NeuroflowConfig) -> list[dict[str, Any]]:
    _, audit, _ = _paths(config)
    if not audit.exists():
        return []
    return [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines() if line.strip()]
