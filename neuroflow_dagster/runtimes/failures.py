"""Failure classes: which tool failures are worth retrying, and how long to wait.

docs/domain-rules.md#failures: transient and resource failures are retried
(300 s x 2^(attempt-1) capped at 3600 s, +-20 % jitter); validation and
configuration failures are not, because running the same input with the same
settings again gives the same error and only delays the operator's fix.
"tool" is an unknown non-zero exit: not retried either, since nothing says
that a second attempt would behave differently.

The classification reads the error text (our message plus the last lines of
the tool's log). Explicit markers win over guesses: the stand-ins print
``validation error:`` / ``configuration error:`` themselves. Plain Python;
defs/execution.py turns a classified failure into Dagster's retry or failure.
"""

from __future__ import annotations

import random
import re
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from neuroflow_dagster.config import RetryConfig


class FailureClass(str, Enum):
    TRANSIENT = "transient"
    RESOURCE = "resource"
    VALIDATION = "validation"
    CONFIGURATION = "configuration"
    TOOL = "tool"

    def __str__(self) -> str:
        return self.value


RETRYABLE = frozenset({FailureClass.TRANSIENT, FailureClass.RESOURCE})

# Order matters: explicit prefixes, then the deterministic (non-retryable) classes, then the
# retryable ones. A log that says both "connection timed out" (a harmless retry inside the tool)
# and "FreeSurfer license not found" failed because of the licence.
_PATTERNS: tuple[tuple[FailureClass, re.Pattern[str]], ...] = (
    (FailureClass.CONFIGURATION, re.compile(r"^\s*configuration error:", re.I | re.M)),
    (FailureClass.VALIDATION, re.compile(r"^\s*validation error:", re.I | re.M)),
    (
        FailureClass.CONFIGURATION,
        re.compile(
            r"config(uration)?( file)? (was )?not found|invalid configuration|"
            r"free\s*surfer licen[cs]e|licen[cs]e file (is )?(required|not found|missing)|"
            r"license\.txt[^\n]{0,80}(not found|missing|does not exist|no such file)|"
            r"(no such file|not found|missing)[^\n]{0,80}license\.txt|"
            r"image not found|no such image|pull access denied|manifest unknown|"
            r"repository does not exist|executable not found|unknown flag|unrecognized arguments",
            re.I,
        ),
    ),
    (
        FailureClass.VALIDATION,
        re.compile(
            r"invalid bids|not a valid bids|bids validation (failed|error)|"
            r"missing required (file|scan)|required file .{0,80}(missing|not found)|"
            r"malformed dicom|invalid dicom|invaliddicomerror|protocol mismatch|missing required scans|"
            # QSIPrep's own input refusals (qsiprep/workflows/base.py, qsiprep/utils/bids.py; 1.1.1 to
            # 26.1.1): the same input fails the same way again, as the stand-in's refusals say.
            r"no (t1w|t2w|dwi) images found for participant|dwi file not 4d",
            re.I,
        ),
    ),
    (
        FailureClass.RESOURCE,
        re.compile(
            r"cannot allocate memory|no space left on device|out of memory|\bmemoryerror\b|"
            r"\boom[- ]?kill|disk quota exceeded|std::bad_alloc",
            re.I,
        ),
    ),
    (
        FailureClass.TRANSIENT,
        re.compile(
            r"connection (refused|reset|aborted)|timed? ?out\b|timeout|network (is )?unreachable|"
            r"service unavailable|temporar(il)?y unavailable|too many open files|"
            r"temporary failure in name resolution|broken pipe|resource temporarily unavailable",
            re.I,
        ),
    ),
)

# 137 = 128 + SIGKILL (what Docker and shells report), -9 = Popen's "killed by signal 9":
# without other evidence, a SIGKILL on a long neuroimaging job is the kernel's OOM killer.
_OOM_EXIT_CODES = frozenset({137, -9})


def classify(text: str, exit_code: int | None) -> FailureClass:
    """Failure class of a failed run from its error text (message + log tail) and exit code."""
    for failure_class, pattern in _PATTERNS:
        if pattern.search(text or ""):
            return failure_class
    if exit_code in _OOM_EXIT_CODES:
        return FailureClass.RESOURCE
    return FailureClass.TOOL


def is_retryable(failure_class: FailureClass | str) -> bool:
    return FailureClass(failure_class) in RETRYABLE


def retry_delay(attempt: int, retry_config: RetryConfig, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): delay x 2^(n-1), capped, +-jitter.

    The cap applies before the jitter so that a fleet of failed runs hitting the cap does not
    retry in the same second (that is what the jitter is for).
    """
    if attempt < 1:
        raise ValueError(f"retry attempt numbers start at 1, got {attempt}")
    base = min(retry_config.delay_seconds * 2 ** (attempt - 1), retry_config.max_delay_seconds)
    rng = rng or random.Random()
    factor = 1.0 + rng.uniform(-retry_config.jitter, retry_config.jitter)
    return max(0.0, base * factor)
