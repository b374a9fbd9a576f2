"""QSIPrep as a ToolSpec: one subject, all of the given sessions in one run.

QSIPrep builds one anatomical template from every session it is given, so it
runs per subject and over an explicit session list: the list fixes which data
went into the template, even if another session is converted while it runs.
The sessions are passed twice, on purpose: as the session option (which
QSIPrep uses to form its processing group) and in a BIDS filter file (which
restricts the files it collects, and records the choice next to the run).

The command line depends on QSIPrep's version, read from the image tag
(``pennlinc/qsiprep:1.1.1``; for runtime ``local`` the tag names the
installed version). QSIPrep 26.1.0 renamed ``--session-id`` to
``--session-label`` and ``--hmc-model`` to ``--hmc-method`` and dropped
``--fs-license-file``; 26.0.0 still speaks 1.x's dialect. Every dialect is
tested against the real parsers of 1.1.1, 26.0.0 and 26.1.1
(neuroflow_dagster_tests/test_tool_specs_parsers.py).

With ``--subject-anatomical-reference sessionwise`` QSIPrep makes one
processing group per session and collects each group's files with that
session only - unless a ``session`` in the filter file overrides it (in
``collect_data`` the filter's entities are applied after the session
option, 1.1.1 to 26.1.1), which would pour every session's files into every
group. So sessionwise runs get no ``session`` key in the filter file.

``build_spec`` writes the BIDS filter file and creates the run's work and
output folders (a container runtime would otherwise create missing bind
sources as root).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neuroflow_dagster.config import OUTPUT_RESOLUTION_AUTO, QSIPREP_NEW_DIALECT
from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.naming.bids import session_path
from neuroflow_dagster.tools import layout
from neuroflow_dagster.tools.layout import C_OUT, PathMap, SpecError, stand_in_command
from neuroflow_dagster.tools.spec import ToolSpec

TOOL = "qsiprep"
STAND_IN = "neuroflow_dagster.tools.builtin.preproc"
# The data types QSIPrep collects (qsiprep/utils/bids.py collect_data, 1.1.1 and 26.1.1 alike).
FILTER_QUERIES = ("dwi", "t1w", "t2w", "fmap", "roi")
# QSIPrep from this version on speaks the new dialect (26.0.0 still takes --session-id, --hmc-model and
# --fs-license-file: its parser is 1.1.1's; 26.1.0's is the first with the new names).
NEW_DIALECT = QSIPREP_NEW_DIALECT

C_BIDS = "/data/bids"
C_FILTER = "/neuroflow/bids_filter.json"


def dialect(config: Any) -> tuple[int, int]:
    """``(1, 0)`` for QSIPrep 1.x and 26.0 (the old flag names), ``NEW_DIALECT`` for 26.1 and later.

    An image reference without a readable version (a bare digest, ``latest``)
    is taken as the 1.x dialect of the default image.
    """
    version = layout.image_version(config.pipelines.qsiprep.image)
    if version is None:
        return (1, 0)
    if version[0] < 1:
        raise SpecError(
            f"pipelines.qsiprep.image {config.pipelines.qsiprep.image!r}: QSIPrep {version[0]}.x is "
            "not supported (1.x or 26.x and later)"
        )
    return NEW_DIALECT if config.pipelines.qsiprep.new_dialect else (1, 0)


def native_resolution(bids_root: Path, participant: str, sessions: Sequence[str]) -> float:
    """``output_resolution: auto``: the finest voxel edge (mm) of the DWI images going into the run.

    The rule of QSIPrep's own ``VoxelSizeChooser`` (qsiprep/interfaces/anatomical.py, default
    anisotropic strategy ``min``) over every ``dwi/*_dwi.nii[.gz]`` of the given sessions, so no
    session is resampled coarser than it was acquired; rounded to 0.01 mm (header zooms are float32).
    QSIPrep's docs: "You can specify the resolution of the original data or choose to upsample".
    """
    import nibabel as nib  # only here: the code location imports this module, nibabel is slow to import

    edges: list[float] = []
    problems: list[str] = []
    for session in sessions:
        folder = layout.session_dir(Path(bids_root), participant, session) / "dwi"
        for path in sorted(folder.glob("*_dwi.nii*")):
            try:
                zooms = nib.load(path).header.get_zooms()[:3]
            except Exception as exc:  # nibabel raises several types for foreign or truncated files
                problems.append(f"{path.name}: {type(exc).__name__}: {exc}")
                continue
            edges += [float(z) for z in zooms if float(z) > 0]
    if not edges:
        why = "; ".join(problems) or "no dwi/*_dwi.nii[.gz] in them"
        raise SpecError(
            f"pipelines.qsiprep.output_resolution: auto, but no DWI voxel size could be read from "
            f"sub-{participant} ses-{', ses-'.join(sessions)} ({why}); set a number of mm"
        )
    return round(min(edges), 2)


def output_resolution(config: Any, participant: str, sessions: Sequence[str]) -> float:
    """The ``--output-resolution`` of a run: the configured number, or the data's own (``auto``)."""
    value = config.pipelines.qsiprep.output_resolution
    if value == OUTPUT_RESOLUTION_AUTO:
        return native_resolution(Path(config.paths.bids_root), participant, sessions)
    return float(value)


def bids_filter_content(
    sessions: Sequence[str] | None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The filter file: the operator's ``bids_filters`` plus ``session: [...]`` for every data type
    (``sessions`` None: no session key, for sessionwise runs; see the module docstring).

    A ``session`` key in the operator's filters is refused: which sessions go
    in is decided per run, and a fixed one would silently contradict it.
    """
    content: dict[str, Any] = {}
    for query, filters in (extra or {}).items():
        if not isinstance(filters, Mapping):
            raise SpecError(f"pipelines.qsiprep.bids_filters.{query}: must be a mapping of BIDS entities")
        if "session" in filters:
            raise SpecError(
                f"pipelines.qsiprep.bids_filters.{query}.session: sessions are chosen per run; remove this key"
            )
        content[query] = dict(filters)
    if sessions is not None:
        for query in FILTER_QUERIES:
            content.setdefault(query, {})["session"] = list(sessions)
    return content


def write_bids_filter(path: Path, sessions: Sequence[str] | None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the filter file atomically; an unchanged file is left alone (same bytes, same mtime)."""
    path = Path(path)
    text = json.dumps(bids_filter_content(sessions, extra), indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    atomic_write_text(path, text)
    return path


def bids_filter_path(config: Any, participant: str) -> Path:
    """Beside the run's work folder, not inside it: QSIPrep may clear its own work folder."""
    return Path(config.paths.work_dir) / TOOL / f"{layout.entities(participant)}_bids_filter.json"


def golden_outputs(participant: str, sessions: Sequence[str], *, sessionwise: bool = False) -> tuple[str, ...]:
    """Files every successful run leaves for the sessions it preprocessed (QSIPrep 1.1.1's own golden
    lists, e.g. forrest_gump_outputs.txt). Sessionwise runs write a report per session, not ``sub-X.html``
    (qsiprep/reports/core.py), which no golden list pins down: the DWI outputs are required."""
    sub = layout.entities(participant)
    outputs = ["dataset_description.json"] + ([] if sessionwise else [f"{sub}.html"])
    for session in sessions:
        stem = f"{session_path(participant, session)}/dwi/{layout.entities(participant, session)}_*space-ACPC_"
        outputs += [
            f"{stem}desc-preproc_dwi.nii.gz",
            f"{stem}desc-preproc_dwi.bval",
            f"{stem}desc-preproc_dwi.bvec",
            f"{stem}desc-brain_mask.nii.gz",
        ]
    return tuple(outputs)


def _sessions(sessions: Sequence[str]) -> list[str]:
    if isinstance(sessions, str) or not sessions:
        raise SpecError(f"QSIPrep needs a non-empty list of session labels, got {sessions!r}")
    labels = [layout.validate_label(s, "session") for s in sessions]
    if len(set(labels)) != len(labels):
        raise SpecError(f"session labels repeat: {labels}")
    return sorted(labels)


def build_spec(
    config: Any,
    participant: str,
    sessions: Sequence[str],
    *,
    output_dir: Path | None = None,
    anat_sessions: Sequence[str] = (),
) -> ToolSpec:
    """The QSIPrep run for ``participant`` over ``sessions`` (those with DWI), per the stage's runtime.

    ``anat_sessions``: sessions without DWI whose anatomical images go into the subject's anatomical
    reference (eligibility.plan_qsiprep); they are given to QSIPrep with the others and produce no
    DWI outputs. ``output_dir``: the run's staging folder (tools/publish.py); the outputs are then
    published into ``derivatives/qsiprep`` after success, the subject's folder replaced as a whole.
    """
    cfg = config.pipelines.qsiprep
    layout.validate_label(participant)
    sessions = _sessions(sessions)
    given = _sessions([*sessions, *anat_sessions])
    bids = Path(config.paths.bids_root)
    final = layout.qsiprep_dir(config)
    out = Path(output_dir) if output_dir is not None else final
    work = layout.work_dir(config, TOOL, participant)
    layout.check_not_inside(out, bids, "QSIPrep's output folder")
    layout.check_not_inside(work, bids, "QSIPrep's work folder")
    outputs = golden_outputs(participant, sessions, sessionwise=cfg.sessionwise)
    common = {
        "output_dir": out,
        "scratch_dir": work,
        "outputs": outputs,
        "nprocs": cfg.nprocs,
        "mem_mb": cfg.mem_mb,
        **layout.publish_plan(out, final, [f"sub-{participant}"]),
    }

    if cfg.tool_runtime == "builtin":
        argv, pm = stand_in_command(STAND_IN, ("--bids-dir", bids), out, participant, given, work)
        argv += [
            "--nprocs", str(cfg.nprocs),
            "--anat-modality", cfg.anat_modality,
            "--subject-anatomical-reference", cfg.subject_anatomical_reference,
        ]  # fmt: skip
        layout.prepare_dirs(work, out)
        return ToolSpec(
            tool=TOOL, argv=tuple(argv), image=None, mounts=tuple(pm.mounts), workdir=work, stand_in=True, **common
        )

    containerized = cfg.containerized
    if containerized and not cfg.image:
        raise SpecError(f"pipelines.qsiprep.image: required when runtime is {cfg.tool_runtime}")
    new_dialect = dialect(config) >= NEW_DIALECT
    if not new_dialect and containerized and cfg.fs_license is None:
        raise SpecError(
            f"pipelines.qsiprep.fs_license: required when runtime is {cfg.tool_runtime} (QSIPrep before 26.1)"
        )

    resolution = output_resolution(config, participant, sessions)
    filter_sessions = None if cfg.sessionwise else given
    filter_file = write_bids_filter(bids_filter_path(config, participant), filter_sessions, cfg.bids_filters)
    pm = PathMap(containerized=containerized)
    argv = [
        TOOL,
        pm(bids, C_BIDS),
        pm(out, C_OUT, read_only=False),
        "participant",
        "--participant-label", participant,
        "--session-label" if new_dialect else "--session-id", *given,
        "--bids-filter-file", pm(filter_file, C_FILTER),
        "--output-resolution", f"{resolution:g}",
        "--anatomical-template", cfg.anatomical_template[0],
        "--anat-modality", cfg.anat_modality,
        "--subject-anatomical-reference", cfg.subject_anatomical_reference,
    ]  # fmt: skip
    if cfg.skip_bids_validation:
        argv.append("--skip-bids-validation")
    if cfg.denoise_method:
        argv += ["--denoise-method", cfg.denoise_method]
    if cfg.unringing_method:
        argv += ["--unringing-method", cfg.unringing_method]
    if cfg.hmc_model:
        argv += ["--hmc-method" if new_dialect else "--hmc-model", cfg.hmc_model]
    argv += ["--nprocs", str(cfg.nprocs)]
    if cfg.omp_nthreads:
        argv += ["--omp-nthreads", str(cfg.omp_nthreads)]
    argv += ["--mem-mb", str(cfg.mem_mb)]
    # QSIPrep 26.1 and later no longer take a FreeSurfer licence.
    tail = {"fs_license": not new_dialect, "templateflow_home": config.paths.templateflow_home}
    return layout.nipreps_container_spec(TOOL, argv, cfg, pm, work, out, **tail, **common)


def reads(
    config: Any, participant: str, sessions: Sequence[str], anat_sessions: Sequence[str] = ()
) -> list[tuple[str, Path, list[str]]]:
    """What a run over ``sessions`` (and ``anat_sessions``) reads, as (label, root, globs relative to
    root): those sessions' BIDS folders (not the subject's other sessions), the dataset description
    and the BIDS filter file."""
    given = _sessions([*sessions, *anat_sessions])
    bids = Path(config.paths.bids_root)
    reads = [("bids_root", bids, ["dataset_description.json", *(session_path(participant, s) for s in given)])]
    if config.pipelines.qsiprep.tool_runtime != "builtin":
        filter_file = bids_filter_path(config, participant)
        reads.append(("bids_filter", filter_file.parent, [filter_file.name]))
    return reads


def code_version(config: Any) -> str:
    """Changes when anything that changes QSIPrep's OUTPUT changes (not threads, memory, runtime limits)."""
    cfg = config.pipelines.qsiprep
    fields = {
        "output_resolution": cfg.output_resolution,
        "anatomical_template": list(cfg.anatomical_template),
        "anat_modality": cfg.anat_modality,
        "subject_anatomical_reference": cfg.subject_anatomical_reference,
        "denoise_method": cfg.denoise_method,
        "unringing_method": cfg.unringing_method,
        "hmc_model": cfg.hmc_model,
        "bids_filters": cfg.bids_filters,
        "extra_args": list(cfg.extra_args),
    }
    return layout.version_hash(TOOL, layout.tool_identity(cfg, STAND_IN), fields)
