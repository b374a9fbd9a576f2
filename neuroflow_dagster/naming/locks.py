"""Where the cross-process locks live: ``state_dir/locks/...``, spelled once for every holder.

- ``locks/<stage>/<partition>.lock``: one piece of work (stage x partition); the tool's processes hold
  it for their lifetime (runtimes/guard.py), so two processes of the same work never run at once, and
  nothing deletes that work's folders while it is held (retention.py).
- ``locks/readers/<stage>/sub-<label>.lock``: a subject's published output of a subject-level stage
  (QSIPrep's ``sub-X``); the runs that read it hold it shared, its publish exclusively (rwlock.py).
"""

from __future__ import annotations

from pathlib import Path

from neuroflow_dagster.naming.bids import is_label, sub
from neuroflow_dagster.naming.logs import safe_partition


def work_lock(state_dir: Path, stage: str, partition: str) -> Path:
    return Path(state_dir) / "locks" / stage / f"{safe_partition(partition)}.lock"


def readers_lock(state_dir: Path, stage: str, participant: str) -> Path:
    if not is_label(participant):
        raise ValueError(f"participant label {participant!r} is not a BIDS label (letters and digits only)")
    return Path(state_dir) / "locks" / "readers" / stage / f"{sub(participant)}.lock"
