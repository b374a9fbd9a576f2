"""The suite and the tools pass however the suite was started, including as a background job.

`make test &` from a non-interactive shell starts pytest with SIGINT ignored; Dagster then maps SIGTERM
to the same ignored handler after an in-process run. The meta-test below runs the tests that depend on
signals in a pytest started exactly that way (`trap '' INT TERM`) and requires them to pass.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parent.parent
SIGNAL_TESTS = [
    "neuroflow_dagster_tests/test_suite_signals.py::test_an_in_process_run_leaves_sigterm_usable",
    "neuroflow_dagster_tests/test_discovery_identity.py::test_concurrent_processes_never_share_an_ordinal",
    "neuroflow_dagster_tests/test_runtimes_local.py::test_keyboard_interrupt_in_the_parent_terminates_the_child_tree",
    "neuroflow_dagster_tests/test_runtimes_guard.py::test_signals_ignored_by_the_worker_are_reset_for_the_tool",
]


def test_an_in_process_run_leaves_sigterm_usable() -> None:
    """After an in-process Dagster run, SIGTERM is not ignored (Dagster copies SIGINT's handler onto it)."""

    @dg.asset
    def trivial() -> int:
        return 1

    assert dg.materialize([trivial]).success
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN


@pytest.mark.slow
def test_signal_dependent_tests_pass_when_the_suite_runs_as_a_background_job() -> None:
    inner = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "120", *SIGNAL_TESTS]
    proc = subprocess.run(["bash", "-c", "trap '' INT TERM; exec \"$@\"", "bash", *inner], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"{len(SIGNAL_TESTS)} passed" in proc.stdout
