"""Who owns a piece of work that outlives a run worker: one small JSON record per (stage, partition).

A Slurm job keeps running when the Dagster run worker that submitted it dies (OOM, node reboot,
``kill -9``). Dagster's run retry then starts a NEW run for the same partition; without a record
that run would submit a second job, and two jobs would write the same output folder. So before
submitting, the runtime writes ``<state_dir>/jobs/<stage>/<partition>-<hash>.json`` (atomically:
readers see the old or the new record, never half of one), and a later run for the same
(stage, partition) reads it and re-attaches to the job instead.

The record says who owns the work: the run (and the root of its retry chain), the worker's host
and pid, the runtime, and the handle to the work itself - a Slurm job id, or for a local process
its pid. That is what a watchdog needs to stop the work of a worker that is gone, whatever the
runtime. Plain Python, no Dagster import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from neuroflow_dagster.fsutil import atomic_write_text

RECORD_VERSION = 1
# submitting: written just before sbatch (job_id unknown yet); submitted: job id known, someone is
# (or was) waiting on it; finished: a run collected the final state (``final``); nobody needs it.
STATUSES = ("submitting", "submitted", "finished")
_STAGE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _safe(partition: str) -> str:
    """A file name for any partition key (``|`` and ``,`` included) that cannot collide or escape."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", partition).strip("._")[:80] or "all"
    digest = hashlib.sha256(partition.encode("utf-8")).hexdigest()[:10]
    return f"{readable}-{digest}"


@dataclass
class JobRecord:
    stage: str
    partition: str
    runtime: str
    status: str
    # The work itself: a scheduler's job id, or the pid (process group) of a local process.
    job_id: str | None = None
    pid: int | None = None
    # Who owns it.
    owner_run_id: str | None = None
    owner_root_run_id: str | None = None
    owner_host: str = field(default_factory=lambda: socket.gethostname())
    owner_pid: int = field(default_factory=os.getpid)
    # What it is and where it writes.
    fingerprint: str = ""
    job_name: str = ""
    submitted: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    log_path: str = ""
    output_path: str = ""  # the job's own output file (stdout/stderr)
    result_path: str = ""
    # Where the tool writes its outputs (a run's staging folder): a run that adopts the job publishes
    # from here, not from its own fresh staging folder.
    output_dir: str = ""
    # Filled in when a run collects the final state (state, exit code, ...).
    final: dict[str, Any] | None = None
    collected_by: str | None = None
    version: int = RECORD_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class JobStore:
    """The records under ``<state_dir>/jobs``; one file per (stage, partition), replaced atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, partition: str) -> Path:
        if not _STAGE.match(stage):
            raise ValueError(f"stage name {stage!r}: lower-case letters, digits and _ only")
        return self.root / stage / f"{_safe(partition)}.json"

    def load(self, stage: str, partition: str) -> JobRecord | None:
        path = self.path(stage, partition)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise JobRecordError(
                f"job record {path} is unreadable ({exc}); inspect it, then delete it so the next run can submit"
            ) from exc
        if not isinstance(data, dict) or data.get("stage") != stage or data.get("partition") != partition:
            raise JobRecordError(
                f"job record {path} does not belong to {stage} / {partition!r}; "
                "inspect it, then delete it so the next run can submit"
            )
        return JobRecord.from_dict(data)

    def save(self, record: JobRecord) -> Path:
        record.updated = time.time()
        path = self.path(record.stage, record.partition)
        atomic_write_text(path, record.to_json())
        return path

    def all(self) -> list[JobRecord]:
        """Every record (for an operator's view or a watchdog); unreadable files are skipped."""
        records = []
        for path in sorted(self.root.glob("*/*.json")):
            try:
                records.append(JobRecord.from_dict(json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, TypeError):
                continue
        return records


class JobRecordError(Exception):
    """A job record that cannot be trusted; the message says which file and what to do."""
