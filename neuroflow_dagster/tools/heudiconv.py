"""HeudiConv + dcm2niix: one DICOM session folder -> one staged BIDS session.

The run always writes into a FRESH staging directory (under paths.work_dir)
that is a small BIDS dataset of its own; bids.validator checks it and
bids.dataset publishes only its ``sub-X/ses-Y`` folder. Two HeudiConv traps
are handled by that design rather than by flags:

* the hidden ``.heudiconv/`` cache keeps an old heuristic's decisions
  (``--overwrite`` does not clear it): a fresh staging dir never has one, and
  since only ``sub-X/ses-Y`` is published, it never reaches bids_root. It
  stays in the staging dir as provenance (``.heudiconv/<sub>/ses-<ses>/info``:
  the heuristic used, dicominfo.tsv, filegroup.json) until work_dir is cleaned;
* HeudiConv's top-level files (README with TODOs, participants.tsv with
  age/sex/group) stay in staging too; bids.dataset owns bids_root's.

Flags beyond the classic command line, and why:

* ``-g all``: one session folder is one session even when it holds several
  StudyInstanceUIDs (a study re-registered at the console); with the default
  ``-g studyUID`` HeudiConv 1.5.1 aborts with "Existing study session ...".
* ``--minmeta``: sidecars exactly as dcm2niix writes them, without the
  dcmstack dump (large, non-BIDS keys, and slower).

No Dagster import: plain Python, used by the Dagster asset and by tests.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from neuroflow_dagster.config import ConfigError, NeuroflowConfig
from neuroflow_dagster.naming.bids import entities, session_path
from neuroflow_dagster.tools.layout import C_OUT, validate_label
from neuroflow_dagster.tools.spec import Mount, ToolSpec

TOOL = "heudiconv"
CONTAINER_DICOM = "/dicom"
CONTAINER_HEURISTIC = "/heuristic.py"
SHIPPED_HEURISTICS = Path(__file__).resolve().parent.parent / "heuristics"


def shipped_heuristics() -> dict[str, Path]:
    """Heuristics shipped inside the package, by name (file stem)."""
    return {p.stem: p for p in sorted(SHIPPED_HEURISTICS.glob("*.py")) if not p.name.startswith("_")}


def resolve_heuristic(value: str) -> Path:
    """``pipelines.bids_conversion.heuristic``: a path to a .py file, or a shipped heuristic's name."""
    if value.endswith(".py") or os.sep in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"pipelines.bids_conversion.heuristic: {path} does not exist")
        return path.resolve()
    shipped = shipped_heuristics()
    if value not in shipped:
        raise ConfigError(
            f"pipelines.bids_conversion.heuristic: {value!r} is neither a .py file nor a shipped "
            f"heuristic (shipped: {', '.join(shipped) or 'none'})"
        )
    return shipped[value]


def golden_outputs(participant: str, session: str) -> tuple[str, ...]:
    """Patterns that must each match after a good conversion (relative to the staging dir)."""
    base = session_path(participant, session)
    return (
        "dataset_description.json",
        f"{base}/*/*.nii.gz",
        f"{base}/*/*.json",
        f"{base}/{entities(participant, session)}_scans.tsv",
    )


def tool_env() -> dict[str, str]:
    """Environment overrides for a local run: the venv's bin first on PATH (dcm2niix is a pip
    wheel there, next to heudiconv) and NO_ET=1 (no etelemetry update check: no network)."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    parts = [venv_bin, *[p for p in path.split(os.pathsep) if p and p != venv_bin]]
    return {"PATH": os.pathsep.join(parts), "NO_ET": "1"}


def build_spec(
    config: NeuroflowConfig,
    *,
    dicom_dir: str | os.PathLike[str],
    participant: str,
    session: str,
    staging_dir: str | os.PathLike[str],
) -> ToolSpec:
    """The HeudiConv run that converts ``dicom_dir`` into ``staging_dir`` (must be new or empty).

    argv: ``heudiconv --files DICOM -s SUB -ss SES -f HEURISTIC -c dcm2niix -b
    [--overwrite] -o STAGING -g all --minmeta``, with container paths
    (/dicom read-only, /out, /heuristic.py read-only) when the stage runs in
    docker/apptainer, host paths otherwise. Labels are without ``sub-``/``ses-``.
    """
    cfg = config.pipelines.bids_conversion
    validate_label(participant)
    validate_label(session, "session")
    dicom = Path(dicom_dir).resolve()
    staging = Path(staging_dir).resolve()
    if not dicom.is_dir():
        raise FileNotFoundError(f"DICOM folder {dicom} does not exist or is not a folder")
    if staging.exists() and any(staging.iterdir()):
        raise FileExistsError(
            f"staging dir {staging} is not empty: HeudiConv must convert into a fresh dir "
            "(its .heudiconv cache would replay an old heuristic's decisions)"
        )
    heuristic = resolve_heuristic(cfg.heuristic)
    containerized = cfg.containerized
    if containerized:
        mounts = (
            Mount(dicom, CONTAINER_DICOM, read_only=True),
            Mount(staging, C_OUT, read_only=False),
            Mount(heuristic, CONTAINER_HEURISTIC, read_only=True),
        )
        dicom_arg, out_arg, heuristic_arg = CONTAINER_DICOM, C_OUT, CONTAINER_HEURISTIC
        env = {"NO_ET": "1"}
    else:
        mounts = (
            Mount(dicom, str(dicom), read_only=True),
            Mount(staging, str(staging), read_only=False),
            Mount(heuristic, str(heuristic), read_only=True),
        )
        dicom_arg, out_arg, heuristic_arg = str(dicom), str(staging), str(heuristic)
        env = tool_env()
    argv = [
        "heudiconv",
        "--files", dicom_arg,
        "-s", participant,
        "-ss", session,
        "-f", heuristic_arg,
        "-c", cfg.converter,
        "-b",
    ]  # fmt: skip
    if cfg.overwrite:
        argv.append("--overwrite")
    argv += ["-o", out_arg, "-g", "all", "--minmeta"]
    return ToolSpec(
        tool=TOOL,
        argv=tuple(argv),
        output_dir=staging,
        image=cfg.image if containerized else None,
        mounts=mounts,
        env=env,
        workdir=staging if not containerized else None,
        outputs=golden_outputs(participant, session),
    )


def code_version(config: NeuroflowConfig, *, curation: str = "") -> str:
    """Changes whenever a re-conversion could give different files: heuristic content, tool
    versions (local) or image (containers), converter flags, and ``curation``, the version of the
    rules applied after the tool (``bids.curate.CURATION_VERSION``). Cheap: no subprocess (read at load)."""
    cfg = config.pipelines.bids_conversion
    digest = hashlib.sha256()
    try:
        digest.update(resolve_heuristic(cfg.heuristic).read_bytes())
    except (ConfigError, OSError):
        digest.update(f"missing heuristic {cfg.heuristic}".encode())
    if cfg.containerized:
        tools = f"image={cfg.image}"
    else:
        tools = ";".join(f"{name}={_package_version(name)}" for name in ("heudiconv", "dcm2niix"))
    digest.update(f"{tools};converter={cfg.converter};-g all;--minmeta;curation={curation}".encode())
    return digest.hexdigest()[:16]


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _version_of(argv: list[str], env: dict[str, str]) -> str | None:
    exe = shutil.which(argv[0], path=env.get("PATH"))
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout + proc.stderr).strip()
    match = re.search(r"v?(\d+\.\d+\.\d+\w*)", text)
    return match.group(1) if match else (text.splitlines()[-1] if text else None)


def tool_versions() -> dict[str, str | None]:
    """Versions of the local tools ({"heudiconv": "1.5.1", "dcm2niix": "1.0.20260724"}); None if absent."""
    env = tool_env()
    try:
        heudiconv = metadata.version("heudiconv")
    except metadata.PackageNotFoundError:
        heudiconv = _version_of(["heudiconv", "--version"], env)
    return {"heudiconv": heudiconv, "dcm2niix": _version_of(["dcm2niix", "-v"], env)}
