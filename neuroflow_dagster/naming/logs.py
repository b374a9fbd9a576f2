"""Where a tool run's log file goes: ``log_dir/<stage>/<partition>_<time>_<run8>.log``.

Written by the execution wrapper (one file per tool run) and found again by
``neuroflow logs``; both spell the name here.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_partition(partition: str) -> str:
    """The partition key made path-safe (``01|0075`` -> ``01_0075``); no partition -> ``all``."""
    return _UNSAFE.sub("_", partition) or "all"


def stage_log_dir(log_dir: Path, stage: str) -> Path:
    return Path(log_dir) / stage


def run_log_path(log_dir: Path, stage: str, partition: str, run_id: str) -> Path:
    """A new log file for one run of ``stage`` on ``partition`` (time-stamped, run id prefix)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return stage_log_dir(log_dir, stage) / f"{safe_partition(partition)}_{stamp}_{run_id[:8]}.log"


def partition_log_glob(partition: str) -> str:
    """The pattern matching every run log of ``partition`` inside its stage's folder."""
    return f"{safe_partition(partition)}_*.log"
