"""The disk guard as `neuroflow status` shows it: free space now, and whether new runs are held.

"Held" is read from the instance (the stage pools at limit 0, set by the `disk_guard` and
discovery sensors), the space is measured now, so the line says both what the guard did and why.
"""

from __future__ import annotations

from typing import Any

from neuroflow_dagster import stages
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.diskspace import held_pools, measure


def disk_guard_view(source: Any, config: NeuroflowConfig) -> dict[str, Any]:
    """{"holding", "message", "low", "folders": [...], "errors", "held_pools"} for status (JSON and table).

    `source`: the instance's tables (control/dagster_db.Db, the CLI) or a DagsterInstance."""
    from neuroflow_dagster.control.dagster_db import Db

    pools = sorted({s.pool for s in stages.stages()})
    held = source.held_pools(pools) if isinstance(source, Db) else held_pools(source.event_log_storage, pools)
    view = measure(config).as_dict(holding=bool(held))
    view["held_pools"] = held
    return view
