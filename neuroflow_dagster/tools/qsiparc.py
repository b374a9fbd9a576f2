"""QSIParc as a ToolSpec: per-region tables for one session from its QSIRecon output.

The real CLI (qsiparc 0.1.2, ``qsiparc run``) reads the QSIRecon output root
and parcellates every atlas QSIRecon wrote for the session, writing
``sub-X/ses-Y/dwi/atlas-<A>/sub-X_ses-Y_atlas-<A>_..._diffmap.tsv``. It has
no mask option: ``mask`` is a setting of the builtin stand-in only, and the
stand-in has no ``--force`` / ``--n-procs``. The generated arguments are
checked against the real click parser in the test suite.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

from neuroflow_dagster.naming.bids import session_path
from neuroflow_dagster.tools import layout
from neuroflow_dagster.tools.layout import C_OUT, PathMap, SpecError, stand_in_command
from neuroflow_dagster.tools.spec import ToolSpec

TOOL = "qsiparc"
STAND_IN = "neuroflow_dagster.tools.builtin.parcellate"

C_QSIRECON = "/data/qsirecon"


def golden_outputs(participant: str, session: str) -> tuple[str, ...]:
    ents = layout.entities(participant, session)
    return (f"{session_path(participant, session)}/dwi/atlas-*/{ents}_atlas-*_diffmap.tsv",)


def build_spec(config: Any, participant: str, session: str, *, output_dir: Path | None = None) -> ToolSpec:
    """The QSIParc run for one session, per the stage's runtime (``output_dir``: the run's staging folder)."""
    cfg = config.pipelines.qsiparc
    layout.validate_label(participant)
    layout.validate_label(session, "session")
    source = layout.qsirecon_dir(config)
    final = layout.qsiparc_dir(config)
    out = Path(output_dir) if output_dir is not None else final
    common = {
        "output_dir": out,
        "outputs": golden_outputs(participant, session),
        "nprocs": cfg.n_jobs,
        **layout.publish_plan(out, final, [f"sub-{participant}/ses-{session}"]),
    }

    if cfg.tool_runtime == "builtin":
        argv, pm = stand_in_command(STAND_IN, ("--qsirecon-dir", source), out, participant, [session])
        argv += ["--mask", cfg.mask]
        out.mkdir(parents=True, exist_ok=True)
        return ToolSpec(tool=TOOL, argv=tuple(argv), image=None, mounts=tuple(pm.mounts), stand_in=True, **common)

    containerized = cfg.containerized
    if containerized and not cfg.image:
        raise SpecError(f"pipelines.qsiparc.image: required when runtime is {cfg.tool_runtime} (no default image)")
    pm = PathMap(containerized=containerized)
    argv = [
        TOOL, "run",
        pm(source, C_QSIRECON),
        pm(out, C_OUT, read_only=False),
        "--participant-label", participant,
        "--session-label", session,
        "--n-procs", str(cfg.n_jobs),
    ]  # fmt: skip
    if cfg.stat_tier:
        argv += ["--stat-tier", cfg.stat_tier]
    if cfg.force:
        argv.append("--force")
    argv += list(cfg.extra_args)
    out.mkdir(parents=True, exist_ok=True)
    return ToolSpec(tool=TOOL, argv=tuple(argv), image=cfg.image, mounts=tuple(pm.mounts), **common)


def reads(config: Any, participant: str, session: str) -> list[tuple[str, Path, list[str]]]:
    """What a run for one session reads, as (label, root, globs relative to root): the session's QSIRecon
    folders (atlases in subject space, the model maps of every workflow) and the atlas tables."""
    ses = session_path(participant, session)
    return [("derivatives/qsirecon", layout.qsirecon_dir(config), [ses, f"derivatives/qsirecon-*/{ses}", "atlases"])]


def _identity(cfg: Any) -> str:
    """Local runs without an image are versioned by the qsiparc installed beside neuroflow, if any."""
    if cfg.tool_runtime == "local" and not cfg.image:
        try:
            return f"qsiparc=={metadata.version('qsiparc')}"
        except metadata.PackageNotFoundError:
            return "local:unversioned"
    return layout.tool_identity(cfg, STAND_IN)


def code_version(config: Any) -> str:
    """Changes with what changes the tables (mask, statistics tier, extra args), not with force or n_jobs."""
    cfg = config.pipelines.qsiparc
    fields = {"mask": cfg.mask, "stat_tier": cfg.stat_tier, "extra_args": list(cfg.extra_args)}
    return layout.version_hash(TOOL, _identity(cfg), fields)
