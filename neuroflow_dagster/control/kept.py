"""What failed runs left on disk, as `neuroflow status` shows it (one line, like the disk guard's).

Read from ``state_dir/retention.json``, which the disk_guard sensor rewrites on each tick after pruning
(retention.py): listing and measuring the folders here would cost `status` seconds on a large archive.
"""

from __future__ import annotations

import time
from typing import Any

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.diskspace import gb
from neuroflow_dagster.retention import read_report

STALE_TICKS = 10  # a report older than this many guard intervals says the sensor may not be running


def _policy(config: NeuroflowConfig) -> str:
    keep = config.disk.keep_failed_runs
    parts = []
    if keep.count is not None:
        parts.append(f"the newest {keep.count} per stage and partition")
    if keep.days is not None:
        parts.append(f"for {keep.days:g} days")
    return ("kept " + " ".join(parts) if parts else "kept without limit") + " (disk.keep_failed_runs)"


def kept_folders_view(config: NeuroflowConfig, now: float | None = None) -> dict[str, Any]:
    """{"count", "bytes", "unmeasured", "oldest", "checked", "pruned_total", "message"} for status."""
    now = time.time() if now is None else now
    report = read_report(config)
    policy = _policy(config)
    if not report:
        return {"count": None, "bytes": None, "unmeasured": 0, "oldest": None, "checked": None,
                "pruned_total": None,
                "message": f"failed-run folders: not looked at yet (the disk_guard sensor does, each tick; {policy})"}
    kept = report.get("kept", [])
    sizes = [r["bytes"] for r in kept if isinstance(r.get("bytes"), int)]
    unmeasured = len(kept) - len(sizes)
    oldest = min(kept, key=lambda r: r.get("created", now), default=None)
    if not kept:
        text = "failed-run folders kept: none"
    else:
        size = gb(sum(sizes)) + (f" + {unmeasured} not measured yet" if unmeasured else "")
        assert oldest is not None
        age = (now - float(oldest.get("created", now))) / 86400
        when = time.strftime("%Y-%m-%d", time.localtime(float(oldest.get("created", now))))
        text = f"failed-run folders kept: {len(kept)} ({size}), oldest {when} ({age:.1f} days): {oldest.get('path')}"
    checked = float(report.get("checked", 0))
    text += f"; {policy}"
    if now - checked > STALE_TICKS * config.disk.interval_seconds:
        text += f"; last looked {(now - checked) / 60:.0f} min ago (is the disk_guard sensor running?)"
    return {
        "count": len(kept),
        "bytes": sum(sizes),
        "unmeasured": unmeasured,
        "oldest": oldest,
        "checked": checked,
        "pruned_total": report.get("pruned_total"),
        "message": text,
    }
