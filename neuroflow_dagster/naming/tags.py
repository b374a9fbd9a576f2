"""Run-tag and metadata keys: what the runs and materializations carry and the readers look for.

Ours (``neuroflow/...``) and the Dagster ones this project reads or sets
(``dagster/...``), spelled once so that the writer (sensors, stage jobs, the
execution wrapper, backfills) and the readers (alerts, status, failures) agree.
"""

from __future__ import annotations

# Run tags set by the project.
STAGE_TAG = "neuroflow/stage"  # its value is the stage name (stages.py), or DISCOVERY_TAG_VALUE
SCAN_ID_TAG = "neuroflow/scan_id"
DISCOVERY_TAG_VALUE = "discovery"  # the protocol-check runs the discovery sensor requests

# Metadata keys of materializations and failures.
STATUS_KEY = "neuroflow/status"
FAILURE_CLASS_KEY = "neuroflow/failure_class"
LOG_PATH_KEY = "log_path"
LOG_TAIL_KEY = "log_tail"
STATE_KEY = "neuroflow/state"  # an observation's cell state (neuroflow_dagster/states.py): held, blocked
CAUSE_KEY = "neuroflow/cause"  # its cause: qc, no_anat, ... or the stage that blocks it
# Values of STATUS_KEY.
STATUS_DONE = "done"
STATUS_NOT_APPLICABLE = "not_applicable"

# Dagster's own tags.
PARTITION_TAG = "dagster/partition"
MAX_RUNTIME_TAG = "dagster/max_runtime"
WILL_RETRY_TAG = "dagster/will_retry"
RETRY_NUMBER_TAG = "dagster/retry_number"


def partition_dimension_tag(dimension: str) -> str:
    """``dagster/partition/<dimension>``: Dagster tags a multi-partition run with each dimension's value."""
    return f"{PARTITION_TAG}/{dimension}"
