"""The last discovery tick's verdict on every folder, as a small JSON file the CLI reads.

Dagster records what was registered (partitions, events, checks); folders
that were *not* registered (unstable, unmapped, excluded, in conflict, unreadable)
have no partition to hang an event on, so the sensor writes them here and logs
them. The same file tells the stage assets which registered sessions are held
in conflict (``blocks``): they refuse those, as they refuse excluded ones, and it
feeds the alert sensor with the problems an operator must act on.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.discovery.engine import ALERT_REASONS, TickResult
from neuroflow_dagster.discovery.identity import Registry, RegistryEntry
from neuroflow_dagster.discovery.protocol import ProtocolResult, SeriesInfo, check_protocol
from neuroflow_dagster.discovery.scanner import read_headers, stat_walk
from neuroflow_dagster.fsutil import atomic_write_text


def report_path(config: NeuroflowConfig) -> Path:
    return config.paths.state / "discovery_status.json"


def write_status_report(config: NeuroflowConfig, result: TickResult) -> None:
    data = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mapping_source": result.mapping_source,
        "warnings": result.warnings,
        "held": [
            {
                "scan_id": h.scan_id,
                "path": h.path,
                "reason": h.reason,
                "message": h.message,
                "registered": h.registered,
                "blocks": h.blocks,
            }
            for h in result.held
        ],
        "problems": [{"kind": p.kind, "key": p.key, "message": p.message} for p in result.problems],
        "notes": result.notes,
        "stats": vars(result.stats),
    }
    atomic_write_text(report_path(config), json.dumps(data, indent=1, default=str))


def read_status_report(config: NeuroflowConfig) -> dict[str, Any]:
    try:
        data = json.loads(report_path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {"held": [], "warnings": [], "at": None}
    data.setdefault("problems", [])
    data.setdefault("notes", [])
    return data


def session_block(
    config: NeuroflowConfig,
    entry: RegistryEntry,
    registry: Registry | None = None,
    report: dict[str, Any] | None = None,
) -> str | None:
    """Why no stage may process this registered session now, or None.

    Two causes: its subject holds sessions of two SubjectCodes (a merge written before codes were
    checked), or the last discovery tick held its ScanID as ``remapped`` (the mapping now names
    another subject). Both are resolved by an operator (docs/operations.md, "What happens when").
    """
    registry = registry if registry is not None else Registry(config.paths.state)
    merged = registry.blocked_labels().get(entry.participant_id)
    if merged:
        return f"identity conflict: {merged}"
    report = report if report is not None else read_status_report(config)
    for item in report.get("held", []):
        if item.get("blocks") and item.get("scan_id") == entry.scan_id:
            return f"identity conflict: {item.get('message')}"
    return None


def subject_block(config: NeuroflowConfig, participant: str, registry: Registry | None = None) -> str | None:
    """Why the subject-level stage (one template from all sessions) must not run now, or None."""
    registry = registry if registry is not None else Registry(config.paths.state)
    report = read_status_report(config)
    for entry in registry.sessions_of(participant):
        reason = session_block(config, entry, registry, report)
        if reason:
            return f"sub-{participant} ses-{entry.session_id} is held: {reason}"
    return None


def alert_items(report: dict[str, Any]) -> dict[str, str]:
    """Problems an operator must act on, keyed so that each is alerted once while it lasts.

    The key changes when the text does (another code, another row), so a changed problem is alerted
    again; a problem that disappears and comes back later is alerted again too.
    """
    items: dict[str, str] = {}
    for held in report.get("held", []):
        if held.get("reason") in ALERT_REASONS:
            text = f"{held.get('reason')}: {held.get('scan_id')!r} ({held.get('path')}): {held.get('message')}"
            items[_key("held", held.get("reason"), held.get("scan_id"), held.get("message"))] = text
    for problem in report.get("problems", []):
        text = f"{problem.get('kind')} problem: {problem.get('message')}"
        items[_key("problem", problem.get("kind"), problem.get("key"), problem.get("message"))] = text
    return items


def _key(*parts: Any) -> str:
    return hashlib.blake2b("\0".join(str(p) for p in parts).encode("utf-8", "replace"), digest_size=10).hexdigest()


def series_markdown(rows: list[list[Any]]) -> str:
    """The series table as markdown (description, UID, files, number, image type)."""
    lines = ["| # | SeriesDescription | files | ImageType | SeriesInstanceUID |", "|---|---|---|---|---|"]
    for desc, uid, n_files, number, image_type in rows:
        cells = [str(number if number is not None else ""), str(desc), str(n_files), str(image_type), str(uid)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def recheck_protocol(config: NeuroflowConfig, dicom_path: str | Path) -> ProtocolResult:
    """Re-read a registered session's headers now and validate them (the check run by hand)."""
    root = Path(dicom_path)
    walk = stat_walk(root)
    summary = read_headers(walk.candidates, root=root)
    series: list[SeriesInfo] = summary.series
    return check_protocol(series, config.protocol, summary.n_dicom, summary.n_unreadable, summary.unreadable_examples)
