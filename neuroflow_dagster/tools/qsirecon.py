"""QSIRecon as a ToolSpec: one session, from its subject's QSIPrep output.

QSIRecon has a session filter (``--session-id``, in 1.1.1 and 26.x alike),
so no BIDS filter file is needed. Its output root is
``derivatives/qsirecon-<workflow_name>``; inside it QSIRecon itself writes
the atlases in subject space at ``sub-X/ses-Y/dwi/*_seg-<Atlas>_dseg.nii.gz``,
their tables at ``atlases/atlas-<Atlas>/atlas-<Atlas>_dseg.tsv`` and the
model maps under ``derivatives/qsirecon-<SUFFIX>/sub-X/ses-Y/dwi/`` (SUFFIX
comes from the recon spec, e.g. ``DKI`` for ``dipy_dki``) - the layout of
QSIRecon 1.1.1's golden lists (qsirecon/tests/data/*_outputs.txt), and the
one QSIParc reads.

QSIRecon is not on PyPI (container only), so unlike QSIPrep and QSIParc its
parser is not exercised by the test suite; see docs/tools.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroflow_dagster.naming.bids import session_path
from neuroflow_dagster.tools import layout
from neuroflow_dagster.tools.layout import C_OUT, PathMap, SpecError, stand_in_command
from neuroflow_dagster.tools.spec import ToolSpec

TOOL = "qsirecon"
STAND_IN = "neuroflow_dagster.tools.builtin.recon"

C_QSIPREP = "/data/qsiprep"
C_SPEC = "/neuroflow/recon_spec"

SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def recon_spec_file(value: str) -> Path | None:
    """The recon spec as a file, or None when it names one of QSIRecon's built-in specs (``dipy_dki``)."""
    if "/" in value or value.endswith(SPEC_SUFFIXES):
        return Path(value).expanduser()
    return None


def golden_outputs(participant: str, session: str, atlases: list[str], *, stand_in: bool = False) -> tuple[str, ...]:
    """Files a successful run leaves for this session (relative to the QSIRecon output root).

    The stand-in writes the same layout but draws its own atlas (any name),
    so its atlas patterns are ``seg-*`` rather than the configured atlases.
    """
    ents = layout.entities(participant, session)
    dwi = f"{session_path(participant, session)}/dwi/{ents}_*space-ACPC_"
    outputs = [f"derivatives/qsirecon-*/{dwi}model-*_param-*_dwimap.nii.gz"]
    for atlas in ["*"] if stand_in else atlases:
        outputs += [f"{dwi}seg-{atlas}_dseg.nii.gz", f"atlases/atlas-{atlas}/atlas-{atlas}_dseg.tsv"]
    return tuple(outputs)


def build_spec(config: Any, participant: str, session: str, *, output_dir: Path | None = None) -> ToolSpec:
    """The QSIRecon run for one session, per the stage's runtime.

    ``output_dir``: the run's staging folder; after success every ``sub-X/ses-Y`` it wrote (QSIRecon
    nests them under ``derivatives/qsirecon-*/`` too) replaces the published one as a whole.
    """
    cfg = config.pipelines.qsirecon
    layout.validate_label(participant)
    layout.validate_label(session, "session")
    for atlas in cfg.atlases:
        if not layout.is_label(atlas):
            raise SpecError(f"pipelines.qsirecon.atlases: {atlas!r} is not an atlas name (letters and digits)")
    source = layout.qsiprep_dir(config)
    final = layout.qsirecon_dir(config)
    out = Path(output_dir) if output_dir is not None else final
    work = layout.work_dir(config, TOOL, participant, session)
    unit = f"sub-{participant}/ses-{session}"
    common = {
        "output_dir": out,
        "scratch_dir": work,
        "nprocs": cfg.nprocs,
        "mem_mb": cfg.mem_mb,
        **layout.publish_plan(out, final, [unit, f"**/{unit}"]),
    }

    if cfg.tool_runtime == "builtin":
        argv, pm = stand_in_command(STAND_IN, ("--qsiprep-dir", source), out, participant, [session], work)
        if cfg.atlas_file is not None:
            argv += ["--atlas-file", pm(Path(cfg.atlas_file), "")]
            if cfg.atlas_labels is not None:
                argv += ["--atlas-labels", pm(Path(cfg.atlas_labels), "")]
        elif cfg.atlas_labels is not None:
            raise SpecError("pipelines.qsirecon.atlas_labels is set without atlas_file")
        layout.prepare_dirs(work, out)
        return ToolSpec(
            tool=TOOL,
            argv=tuple(argv),
            image=None,
            mounts=tuple(pm.mounts),
            workdir=work,
            outputs=golden_outputs(participant, session, cfg.atlases, stand_in=True),
            stand_in=True,
            **common,
        )

    containerized = cfg.containerized
    if containerized and not cfg.image:
        raise SpecError(f"pipelines.qsirecon.image: required when runtime is {cfg.tool_runtime}")
    if containerized and cfg.fs_license is None:
        raise SpecError(f"pipelines.qsirecon.fs_license: required when runtime is {cfg.tool_runtime}")
    pm = PathMap(containerized=containerized)
    source_arg, out_arg = pm(source, C_QSIPREP), pm(out, C_OUT, read_only=False)
    spec_file = recon_spec_file(cfg.recon_spec)
    if spec_file is not None:
        if not spec_file.is_file():
            raise SpecError(f"pipelines.qsirecon.recon_spec: {spec_file} does not exist")
        recon_spec = pm(spec_file, C_SPEC + spec_file.suffix)
    else:
        recon_spec = cfg.recon_spec
    argv = [
        TOOL,
        source_arg,
        out_arg,
        "participant",
        "--participant-label", participant,
        "--session-id", session,
        "--input-type", "qsiprep",
        "--recon-spec", recon_spec,
    ]  # fmt: skip
    if cfg.atlases:
        argv += ["--atlases", *cfg.atlases]
    argv += ["--nprocs", str(cfg.nprocs), "--mem-mb", str(cfg.mem_mb)]
    outputs = golden_outputs(participant, session, cfg.atlases)
    return layout.nipreps_container_spec(
        TOOL, argv, cfg, pm, work, out, outputs=outputs, templateflow_home=config.paths.templateflow_home, **common
    )


def reads(config: Any, participant: str, session: str) -> list[tuple[str, Path, list[str]]]:
    """What a run for one session reads, as (label, root, globs relative to root): the subject's QSIPrep
    anatomy, this session's QSIPrep folder, QSIPrep's provenance and dataset description; the recon spec
    and (stand-in) atlas files when they are files."""
    cfg = config.pipelines.qsirecon
    sub = layout.entities(participant)
    reads = [
        (
            "derivatives/qsiprep",
            layout.qsiprep_dir(config),
            [
                "dataset_description.json",
                f"{sub}/anat",
                session_path(participant, session),
                f"{sub}/{sub}_*provenance.json",
            ],
        )
    ]
    spec_file = recon_spec_file(cfg.recon_spec)
    files = [spec_file] if spec_file is not None else []
    if cfg.tool_runtime == "builtin":
        files += [Path(f) for f in (cfg.atlas_file, cfg.atlas_labels) if f is not None]
    reads += [(f"config:{path.name}", path.parent, [path.name]) for path in files]
    return reads


def code_version(config: Any) -> str:
    """Changes with the recon spec (name, or file content), atlases, workflow name, stand-in atlas, extra args."""
    cfg = config.pipelines.qsirecon
    spec_file = recon_spec_file(cfg.recon_spec)
    fields = {
        "recon_spec": cfg.recon_spec,
        "recon_spec_sha256": layout.file_digest(spec_file) if spec_file is not None else None,
        "workflow_name": cfg.workflow_name,
        "atlases": list(cfg.atlases),
        "extra_args": list(cfg.extra_args),
    }
    if cfg.tool_runtime == "builtin":
        fields["atlas_file"] = layout.file_digest(cfg.atlas_file)
        fields["atlas_labels"] = layout.file_digest(cfg.atlas_labels)
    return layout.version_hash(TOOL, layout.tool_identity(cfg, STAND_IN), fields)
