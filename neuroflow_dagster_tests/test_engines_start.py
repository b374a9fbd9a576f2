"""An engine the tests need that cannot start is an error with its log, never a skip.

The session fixtures (conftest: ``slurm``, ``slurm_no_accounting``, ``docker_engine``) use these
same context managers; here each is given a configuration its daemon refuses, and must raise
EngineStartError quoting the daemon's own complaint, and leave no daemon running.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from neuroflow_dagster_tests.engines.docker_engine import docker_engine
from neuroflow_dagster_tests.engines.slurm_cluster import EngineStartError, slurm_cluster


def _running(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_a_slurm_controller_that_cannot_start_fails_with_its_log() -> None:
    with pytest.raises(EngineStartError) as info, slurm_cluster(accounting=False,
                                                               extra_conf="SelectType=select/no-such-plugin\n"):
        pass
    text = str(info.value)
    assert "slurmctld exited" in text and "no-such-plugin" in text  # the controller's own words
    root = text.split("(/tmp/neuroflow-slurm-", 1)[1].split("/", 1)[0]
    assert not _running(f"neuroflow-slurm-{root}")  # munged and the rest were stopped


def test_a_docker_engine_that_cannot_start_fails_with_its_log() -> None:
    with pytest.raises(EngineStartError) as info, docker_engine(extra_args=("--storage-driver=no-such-driver",)):
        pass
    text = str(info.value)
    assert "dockerd exited" in text and "no-such-driver" in text
