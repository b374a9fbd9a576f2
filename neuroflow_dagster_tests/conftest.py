"""Shared, generic fixtures: synthetic and real DICOM session folders, a minimal config, real engines."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from neuroflow_dagster.bids import curate
from neuroflow_dagster.bids.curate import CurationReport
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.demo import sources, synth
from neuroflow_dagster.tools import heudiconv
from neuroflow_dagster.tools.spec import ToolSpec
from neuroflow_dagster_tests.engines.docker_engine import DockerEngine
from neuroflow_dagster_tests.engines.docker_engine import docker_engine as start_docker_engine
from neuroflow_dagster_tests.engines.slurm_cluster import SlurmCluster, slurm_cluster


def pytest_configure(config: pytest.Config) -> None:
    """The suite behaves the same however it was started.

    A background job of a non-interactive shell (`make test &`, CI runners) starts with SIGINT ignored,
    and Dagster's interrupt handling then maps SIGTERM to the same ignored handler after every in-process
    run. Ignored dispositions are inherited by every process the tests start: spawn-pool workers that
    never die on `Pool.terminate()`, tools that ignore the runtime's SIGTERM. Restore the defaults first.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


PREFLIGHT_VENVS_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "qsiprep-preflight-venv.sh"
_preflight_build: subprocess.Popen[bytes] | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building QSIPrep's preflight venvs as soon as their tests are collected, in the background:
    the build (minutes, mostly disk) overlaps the tests that run before them; their fixture calls the
    same script, which waits for this build (a file lock) and then finds it done (its stamp)."""
    global _preflight_build
    needs = [i for i in session.items if "test_qsiprep_preflight.py" in i.nodeid and i.get_closest_marker("slow")]
    if not needs:  # the file's unit tests need no venv
        return
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "neuroflow-preflight-venvs.log"
    with log.open("wb") as out:
        _preflight_build = subprocess.Popen(
            ["bash", str(PREFLIGHT_VENVS_SCRIPT)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    """A build still running when the session ends (interrupted) is stopped; the next one starts over."""
    if _preflight_build is not None and _preflight_build.poll() is None:
        os.killpg(_preflight_build.pid, signal.SIGTERM)
        _preflight_build.wait(timeout=60)


@pytest.fixture
def synth_dwi_session(tmp_path: Path) -> synth.SynthSession:
    """A synthetic session folder (T1w + 12-direction DWI tensor phantom, seed 0) under tmp_path."""
    return synth.write_session(tmp_path / "dicom" / "20240115_1430", seed=0)


@pytest.fixture
def real_dicom_dir(tmp_path: Path) -> Path:
    """A copy of HeudiConv's real Siemens Prisma DWI (b0dwiForFmap) as a session folder."""
    folder = tmp_path / "dicom" / "20240220_1100"
    try:
        sources.copy_real_session(folder, "b0dwiForFmap")
    except sources.SourceNotAvailable as exc:  # pragma: no cover - heudiconv is a core dependency
        pytest.fail(f"real DICOM missing: {exc}")
    return folder


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., NeuroflowConfig]:
    """Factory: a valid NeuroflowConfig rooted in tmp_path; keyword sections override the defaults."""

    def build(**sections: Any) -> NeuroflowConfig:
        data: dict[str, Any] = {
            "paths": {
                "dicom_incoming": str(tmp_path / "dicom"),
                "bids_root": str(tmp_path / "bids"),
                "derivatives": str(tmp_path / "derivatives"),
                "work_dir": str(tmp_path / "work"),
                "log_dir": str(tmp_path / "logs"),
            }
        }
        data.update(sections)
        return NeuroflowConfig.model_validate(data)

    return build


def _run_spec_locally(spec: ToolSpec, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run a ToolSpec as the local runtime does (argv list, env overrides, cwd created); fail with its log."""
    if spec.workdir is not None:
        Path(spec.workdir).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        list(spec.argv),
        env={**os.environ, **spec.env},
        cwd=spec.workdir,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        pytest.fail(f"{spec.tool} exited {proc.returncode}: {spec.command_line()}\n{tail}")
    return proc


@pytest.fixture(scope="session")
def run_spec() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a ToolSpec locally (real tool, no Dagster): the boundary the local runtime uses."""
    return _run_spec_locally


def convert_locally(
    config: NeuroflowConfig, dicom: Path, staging: Path, participant: str, session: str
) -> tuple[ToolSpec, CurationReport]:
    """What the conversion asset does before validating, without Dagster: the real HeudiConv + dcm2niix run
    locally into ``staging``, then the curation of the staged session (bids/curate.py)."""
    spec = heudiconv.build_spec(config, dicom_dir=dicom, participant=participant, session=session, staging_dir=staging)
    _run_spec_locally(spec)
    heuristic = heudiconv.resolve_heuristic(config.pipelines.bids_conversion.heuristic)
    return spec, curate.curate_conversion(staging, participant, session, heuristic)


@pytest.fixture(scope="session")
def convert() -> Callable[..., tuple[ToolSpec, CurationReport]]:
    """``convert(config, dicom, staging, participant, session)``: real HeudiConv + dcm2niix, then curation."""
    return convert_locally


# --------------------------------------------------------------------------- real engines (started here)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """One real Slurm cluster with accounting (slurmdbd + MariaDB) for the session; raises if it cannot start."""
    with slurm_cluster(accounting=True) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_no_accounting() -> Iterator[SlurmCluster]:
    """A second real cluster WITHOUT accounting (sacct disabled), as on sites that run no slurmdbd."""
    with slurm_cluster(accounting=False) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """One real Docker engine (private dockerd) with the local busybox test image; raises if it cannot start."""
    with start_docker_engine() as engine:
        yield engine
