"""The last discovery tick's verdict on every folder, as a small JSON file the CLI reads.

Dagster records what was registered (partitions, events, checks); folders
that were *not* registered (unstable, unmapped, excluded) have no partition
to hang an event on, so the sensor writes them here and logs them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.discovery.engine import TickResult
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
        "held": [{"scan_id": h.scan_id, "path": h.path, "reason": h.reason, "message": h.message} for h in result.held],
        "stats": vars(result.stats),
    }
    atomic_write_text(report_path(config), json.dumps(data, indent=1, default=str))


def read_status_report(config: NeuroflowConfig) -> dict[str, Any]:
    try:
        return json.loads(report_path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"held": [], "warnings": [], "at": None}


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
    return check_protocol(series, config.protocol, n_dicom=summary.n_dicom)
