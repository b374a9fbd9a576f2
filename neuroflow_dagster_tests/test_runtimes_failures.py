"""Failure classes (docs/domain-rules.md#failures): the classification table, retry delays, Dagster retries."""

from __future__ import annotations

import random
from pathlib import Path

import dagster as dg
import pytest

from neuroflow_dagster.config import RetryConfig
from neuroflow_dagster.defs.execution import tool_failure
from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY
from neuroflow_dagster.runtimes.base import RunRecord, ToolRunError
from neuroflow_dagster.runtimes.failures import (
    FailureClass,
    classify,
    is_retryable,
    retry_delay,
)

T, R, V, C, X = (FailureClass.TRANSIENT, FailureClass.RESOURCE, FailureClass.VALIDATION,
                 FailureClass.CONFIGURATION, FailureClass.TOOL)

CASES = [
    # transient
    ("requests.exceptions.ConnectionError: [Errno 111] Connection refused", 1, T),
    ("ConnectionResetError: [Errno 104] Connection reset by peer", 1, T),
    ("urlopen error timed out", 1, T),
    ("socket.timeout: The read operation timed out", 1, T),
    ("OSError: [Errno 101] Network is unreachable", 1, T),
    ("HTTP 503 Service Unavailable", 1, T),
    ("OSError: [Errno 24] Too many open files: '/work/x.nii.gz'", 1, T),
    ("Temporary failure in name resolution", 1, T),
    # resource
    ("OSError: [Errno 12] Cannot allocate memory", 1, R),
    ("OSError: [Errno 28] No space left on device: '/work/qsiprep_wf'", 1, R),
    ("RuntimeError: CUDA out of memory", 1, R),
    ("Traceback (most recent call last):\nMemoryError", 1, R),
    ("terminate called after throwing an instance of 'std::bad_alloc'", 134, R),
    ("", 137, R),
    ("Killed", -9, R),
    # validation
    ("validation error: sub-01/ses-01 has no dwi.bval", 2, V),
    ("bids-validator: Invalid BIDS dataset", 1, V),
    ("ERROR: missing required file sub-01_ses-01_dwi.bvec", 1, V),
    ("pydicom.errors.InvalidDicomError: File is missing DICOM File Meta Information header", 1, V),
    ("malformed DICOM in 20240115_1430/IM0001", 1, V),
    ("protocol mismatch: no T1w series", 1, V),
    # configuration
    ("configuration error: atlas_file is not set", 2, C),
    ("Config file not found: /etc/neuroflow/neuroflow.yaml", 1, C),
    ("invalid configuration in neuroflow.yaml", 1, C),
    ("ERROR: a valid license file is required for FreeSurfer to run", 1, C),
    ("FreeSurfer license file /opt/freesurfer/license.txt not found", 1, C),
    ("No such file or directory: '/opt/freesurfer/license.txt'", 1, C),
    ("docker: Error response from daemon: pull access denied for pennlinc/qsiprep", 125, C),
    ("Unable to find image 'pennlinc/qsiprep:9.9' locally: image not found", 125, C),
    ("qsiprep: error: unrecognized arguments: --bogus", 2, C),
    # unknown non-zero exit
    ("Segmentation fault (core dumped)", 139, X),
    ("", 1, X),
    ("nipype.pipeline.engine: Node dwi_denoise failed", 1, X),
]


@pytest.mark.parametrize(("text", "exit_code", "expected"), CASES)
def test_classification_table(text: str, exit_code: int, expected: FailureClass) -> None:
    assert classify(text, exit_code) is expected


def test_explicit_prefixes_and_deterministic_causes_win_over_retryable_words() -> None:
    # A harmless network retry inside the tool must not make a licence problem retryable.
    text = "WARNING: connection timed out, retrying\nERROR: FreeSurfer license file not found"
    assert classify(text, 1) is C
    assert classify("validation error: no b-values\nNo space left on device", 1) is V
    # Text evidence beats the bare exit code.
    assert classify("configuration error: bad atlas", 137) is C


def test_the_license_flag_in_an_echoed_command_line_is_not_a_licence_failure() -> None:
    echoed = "Running: qsiprep /data/bids /out participant --fs-license-file /opt/license.txt"
    assert classify(echoed + "\nSegmentation fault", 139) is X


def test_retryable_classes_are_transient_and_resource_only() -> None:
    assert {c for c in FailureClass if is_retryable(c)} == {T, R}
    assert is_retryable("transient") and not is_retryable("tool")


def test_retry_delay_follows_requirements_without_jitter() -> None:
    cfg = RetryConfig(jitter=0)
    assert [retry_delay(n, cfg) for n in (1, 2, 3, 4, 5, 6)] == [300, 600, 1200, 2400, 3600, 3600]


def test_retry_delay_jitter_stays_within_twenty_percent_and_varies() -> None:
    cfg = RetryConfig()
    rng = random.Random(7)
    delays = [retry_delay(2, cfg, rng) for _ in range(200)]
    assert all(480 <= d <= 720 for d in delays)
    assert max(delays) - min(delays) > 150  # really jittered, not a constant
    capped = [retry_delay(9, cfg, rng) for _ in range(200)]
    assert all(2880 <= d <= 4320 for d in capped)
    with pytest.raises(ValueError, match="start at 1"):
        retry_delay(0, cfg)


def _error(failure_class: str) -> ToolRunError:
    record = RunRecord(tool="qsiprep", runtime="local", command="qsiprep a b", output_dir="/out",
                       log_path="/logs/x.log", started=0.0, ended=1.0, exit_code=1, log_tail="boom")
    return ToolRunError("qsiprep failed", record, failure_class)


def test_tool_failure_retries_only_retryable_classes() -> None:
    cfg = RetryConfig(max_retries=3, delay_seconds=300, jitter=0)
    retry = tool_failure(_error("resource"), cfg, retry_number=1, stage="qsiprep")
    assert isinstance(retry, dg.RetryRequested)
    assert (retry.max_retries, retry.seconds_to_wait) == (3, 600)
    assert isinstance(retry.__cause__, dg.Failure)
    assert retry.__cause__.metadata[FAILURE_CLASS_KEY].value == "resource"
    final = tool_failure(_error("validation"), cfg, retry_number=0, stage="qsiprep")
    assert isinstance(final, dg.Failure) and final.allow_retries is False
    assert final.metadata["command"].value == "qsiprep a b"
    assert isinstance(tool_failure(_error("transient"), RetryConfig(max_retries=0), 0, "qsiprep"), dg.Failure)


@pytest.mark.parametrize(("failure_class", "attempts"), [("transient", 3), ("configuration", 1)])
def test_tool_failure_through_a_real_materialization(tmp_path: Path, failure_class: str,
                                                       attempts: int) -> None:
    """Real Dagster run: a retryable failure is attempted 1 + max_retries times, a configuration
    failure once - even though the asset also carries a RetryPolicy."""
    cfg = RetryConfig(max_retries=2, delay_seconds=0, jitter=0)
    seen: list[int] = []

    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=5, delay=0))
    def flaky(context) -> None:  # unannotated: a string annotation in a local def is unresolvable
        seen.append(context.retry_number)
        raise tool_failure(_error(failure_class), cfg, context.retry_number, "qsiprep")

    result = dg.materialize([flaky], raise_on_error=False)
    assert not result.success
    assert seen == list(range(attempts))
