"""Where the diffusion stages read and write, and the small rules every tool spec shares.

One place decides the derivative folders (``derivatives/qsiprep``,
``derivatives/qsirecon-<workflow_name>``, ``derivatives/qsiparc``), the
per-run work folders and how a host path becomes the path a container sees.
The BIDS spelling itself is naming/bids.py; labels are checked here before
they reach any path or argv: a label such as ``../x`` or ``01 02`` must never
become a folder name or two arguments.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from neuroflow_dagster.config import image_version
from neuroflow_dagster.naming import bids
from neuroflow_dagster.naming.bids import is_label
from neuroflow_dagster.tools.spec import Mount, ToolSpec

# Where a containerized tool sees its output, work folder and FreeSurfer licence (fixed paths, so argv
# does not depend on where the operator keeps data); every tool module uses these.
C_OUT = "/out"
C_WORK = "/work"
C_LICENSE = "/opt/freesurfer/license.txt"
C_TEMPLATEFLOW = "/templateflow"
# Switch off nipype's and the BIDS apps' start-up network pings: workers on a clinical network have no internet.
NO_PING_ENV = {"NIPYPE_NO_ET": "1", "NO_ET": "1"}


class SpecError(ValueError):
    """A tool run that cannot be described from this configuration (the message names the key or label)."""


def validate_label(label: str, kind: str = "participant") -> str:
    """Return ``label`` if it is a BIDS label (letters and digits only), else raise SpecError.

    Prefixed labels (``sub-0075``) are refused rather than stripped: the
    partition keys are bare labels, and guessing would hide a caller's bug.
    """
    if not is_label(label):
        prefix = bids.SUBJECT_PREFIX if kind == "participant" else bids.SESSION_PREFIX
        hint = f" (give it without the '{prefix}' prefix)" if str(label).startswith(prefix) else ""
        raise SpecError(f"{kind} label {label!r} is not a BIDS label: letters and digits only{hint}")
    return label


def entities(participant: str, session: str | None = None) -> str:
    """The file-name prefix ``sub-X_ses-Y`` (or ``sub-X``), labels checked."""
    return bids.entities(validate_label(participant), None if session is None else validate_label(session, "session"))


def session_dir(root: Path, participant: str, session: str) -> Path:
    """``root/sub-X/ses-Y`` with the labels checked: the same shape in BIDS, QSIPrep, QSIRecon and QSIParc trees."""
    return bids.session_dir(root, validate_label(participant), validate_label(session, "session"))


def qsiprep_dir(config: Any) -> Path:
    return Path(config.paths.derivatives) / "qsiprep"


def qsirecon_dir(config: Any) -> Path:
    """QSIRecon's output root; QSIRecon itself nests ``derivatives/qsirecon-<SUFFIX>/`` inside it."""
    name = config.pipelines.qsirecon.workflow_name
    if not is_label(name):
        raise SpecError(f"pipelines.qsirecon.workflow_name {name!r}: letters and digits only")
    return Path(config.paths.derivatives) / f"qsirecon-{name}"


def qsiparc_dir(config: Any) -> Path:
    return Path(config.paths.derivatives) / "qsiparc"


def qsirecon_map_dirs(root: Path, participant: str, session: str) -> list[Path]:
    """The session's ``dwi`` folders holding QSIRecon's model maps.

    Real QSIRecon writes maps under ``ROOT/derivatives/qsirecon-<SUFFIX>/sub-X/ses-Y/dwi``
    (one SUFFIX per reconstruction node, e.g. ``DKI``), while atlases in
    subject space sit at ``ROOT/sub-X/ses-Y/dwi``. QSIParc looks in exactly
    those places, so a caller checking "is there a reconstruction" must too.
    """
    rel = session_dir(Path(""), participant, session) / "dwi"
    return sorted(p for p in (Path(root) / "derivatives").glob(f"qsirecon-*/{rel}") if p.is_dir())


def qsirecon_maps(root: Path, participant: str, session: str) -> list[Path]:
    """The session's ``*_dwimap.nii.gz`` model maps: "is there a reconstruction to parcellate?"."""
    return sorted(p for d in qsirecon_map_dirs(root, participant, session) for p in d.glob("*_dwimap.nii.gz"))


def publish_plan(output_dir: Path, final: Path, units: list[str]) -> dict[str, Any]:
    """ToolSpec fields for a run writing into ``output_dir``: publish into ``final`` if that is elsewhere."""
    if Path(output_dir) == Path(final):
        return {}
    return {"publish_to": Path(final), "publish_units": tuple(units)}


def work_dir(config: Any, stage: str, participant: str, session: str | None = None) -> Path:
    """A run's own scratch folder (``work_dir/<stage>/sub-X[_ses-Y]``): concurrent runs never share one."""
    return Path(config.paths.work_dir) / stage / entities(participant, session)


def package_version() -> str:
    """neuroflow-dagster's own version: the stand-ins' code is versioned with it."""
    try:
        return metadata.version("neuroflow-dagster")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def file_digest(path: Path | None) -> str | None:
    """sha256 of a small input file (recon spec, atlas) so that editing it changes the code version."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        return f"missing:{path}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def version_hash(stage: str, tool: str, fields: dict[str, Any]) -> str:
    """``<tool version>-<10 hex>``: stable for equal inputs, different whenever an output-changing field is."""
    payload = json.dumps({"stage": stage, "tool": tool, "fields": fields}, sort_keys=True, default=str)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    return f"{_short_tool(tool)}-{digest}"


def _short_tool(tool: str) -> str:
    if tool.startswith("builtin"):
        return "builtin"
    version = image_version(tool)
    return ".".join(map(str, version)) if version else "unversioned"


def tool_identity(stage_config: Any, stand_in_module: str) -> str:
    """What produced the outputs: the image (its tag is the version) or the stand-in and its package version."""
    if stage_config.tool_runtime == "builtin":
        return f"builtin:{stand_in_module}:{package_version()}"
    return stage_config.image or f"{stage_config.tool_runtime}:unversioned"


def stand_in_command(
    module: str,
    source: tuple[str, Path],
    out: Path,
    participant: str,
    sessions: Sequence[str],
    work: Path | None = None,
) -> tuple[list[str], PathMap]:
    """An embedded stand-in's command and its host-path map: ``python -m <module> <--X-dir> SOURCE
    --output-dir OUT --participant-label P --session-label S... [--work-dir WORK]`` (the options every
    stand-in takes, in that order; the caller appends the tool's own)."""
    pm = PathMap(containerized=False)
    flag, folder = source
    argv = [
        sys.executable, "-m", module,
        flag, pm(folder, ""),
        "--output-dir", pm(out, "", read_only=False),
        "--participant-label", participant,
        "--session-label", *sessions,
    ]  # fmt: skip
    if work is not None:
        argv += ["--work-dir", pm(work, "", read_only=False)]
    return argv, pm


@dataclass
class PathMap:
    """Turns host paths into the paths the tool sees, collecting the mounts on the way.

    Containers (docker, apptainer) see fixed paths (``/data/bids``, ``/out``,
    ``/work`` ...), so argv does not depend on where the operator keeps data;
    local and builtin runs see host paths and the mounts are identity entries
    kept for the record.
    """

    containerized: bool
    mounts: list[Mount] = field(default_factory=list)

    def __call__(self, host: Path, container: str, *, read_only: bool = True) -> str:
        host = Path(host)
        seen = host.as_posix() if not self.containerized else container
        if not any(m.host == host and m.container == seen for m in self.mounts):
            self.mounts.append(Mount(host=host, container=seen, read_only=read_only))
        return seen


def check_not_inside(inner: Path, outer: Path, what: str) -> None:
    """BIDS apps refuse a work or output folder inside their input dataset; fail before the run does."""
    inner_r, outer_r = Path(inner).resolve(), Path(outer).resolve()
    if inner_r == outer_r or outer_r in inner_r.parents:
        raise SpecError(f"{what} {inner} must not be inside the input folder {outer}")


def prepare_dirs(work: Path, out: Path) -> None:
    """The run's work and output folders exist before the tool (or its container) starts."""
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def nipreps_container_spec(
    tool: str,
    argv: list[str],
    cfg: Any,
    pm: PathMap,
    work: Path,
    out: Path,
    *,
    fs_license: bool = True,
    templateflow_home: Path | None = None,
    **fields: Any,
) -> ToolSpec:
    """The tail every NiPreps container command shares (QSIPrep, QSIRecon): the work folder (``-w``),
    the FreeSurfer licence when configured and ``fs_license`` says the tool takes it, ``--notrack``
    (no crash reports leave a clinical site), the operator's extra arguments; then the spec.

    ``templateflow_home`` (``paths.templateflow_home``): bound read-only and named by
    ``TEMPLATEFLOW_HOME``, so both tools read the site's templates instead of downloading them (QSIPrep's
    docs, "Running QSIPrep with Apptainer on Non-Internet Nodes"); the env reaches docker, apptainer
    (``--env``) and a Slurm job's environment alike."""
    container_work = pm(work, C_WORK, read_only=False)
    argv = [*argv, "-w", container_work]
    if fs_license and cfg.fs_license is not None:
        argv += ["--fs-license-file", pm(Path(cfg.fs_license), C_LICENSE)]
    argv.append("--notrack")
    argv += list(cfg.extra_args)
    env = dict(NO_PING_ENV)
    if templateflow_home is not None:
        env["TEMPLATEFLOW_HOME"] = pm(Path(templateflow_home), C_TEMPLATEFLOW)
    prepare_dirs(work, out)
    return ToolSpec(
        tool=tool,
        argv=tuple(argv),
        image=cfg.image,
        mounts=tuple(pm.mounts),
        env=env,
        workdir=Path(container_work),
        **fields,
    )
