"""QSIRecon as a ToolSpec: one session, from its subject's QSIPrep output, with the spec for its shell scheme.

Before a run is built, ``plan_session`` reads the session's preprocessed gradient tables, counts their
shells (tools/shells.py) and picks ``pipelines.qsirecon.recon_specs.<scheme>``; no spec for the scheme
means the session is not reconstructed (not applicable, with the reason). ``refusals`` then checks the
chosen spec's model fits against every series with dipy, as QSIRecon's nodes would build them, so
data QSIRecon would fail on hours into a run is refused in seconds with dipy's own message.

QSIRecon has a session filter (``--session-id``, in 1.1.1 and 26.x alike), so no BIDS filter file is
needed. Its output root is ``derivatives/qsirecon-<workflow_name>``; inside it QSIRecon itself writes
the atlases in subject space at ``sub-X/ses-Y/dwi/*_seg-<Atlas>_dseg.nii.gz``, their tables at
``atlases/atlas-<Atlas>/atlas-<Atlas>_dseg.tsv`` and the model maps under
``derivatives/qsirecon-<SUFFIX>/sub-X/ses-Y/dwi/`` (SUFFIX comes from the recon spec, e.g. ``DKI`` for
``dipy_dki``) - the layout of QSIRecon 1.1.1's golden lists (qsirecon/tests/data/*_outputs.txt), and
the one QSIParc reads. ``--report-output-level session`` puts each session's report inside its own
folder (the default, ``root``, has every session's run rewrite ``sub-X.html``).

QSIRecon is not on PyPI (container only), so unlike QSIPrep and QSIParc its parser is not exercised
by the test suite; see docs/tools.md.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neuroflow_dagster.naming import qsirecon as names
from neuroflow_dagster.naming.bids import session_path
from neuroflow_dagster.tools import layout, shells
from neuroflow_dagster.tools.layout import C_OUT, PathMap, SpecError, stand_in_command
from neuroflow_dagster.tools.spec import ToolSpec

TOOL = "qsirecon"
STAND_IN = "neuroflow_dagster.tools.builtin.recon"

C_QSIPREP = "/data/qsiprep"
C_SPEC = "/neuroflow/recon_spec"
C_DATASETS = "/data/atlases"
REPORT_OUTPUT_LEVEL = "session"


def recon_spec_file(value: str) -> Path | None:
    """The recon spec as a file, or None when it names one of QSIRecon's built-in specs (``dipy_dki``)."""
    return Path(value).expanduser() if names.is_spec_file(value) else None


@dataclass(frozen=True)
class ReconPlan:
    """What a session's reconstruction will be: its series and their shells, its scheme, the chosen spec."""

    participant: str
    session: str
    series: tuple[shells.Series, ...]
    scheme: str
    spec: str | None

    @property
    def where(self) -> str:
        return f"sub-{self.participant} ses-{self.session}"

    def describe(self) -> str:
        """``b=0 x2, b=1000 x30: single-shell`` per series (named when there are several)."""
        if len(self.series) == 1:
            return self.series[0].shells.describe()
        return "; ".join(f"{s.dwi_name}: {s.shells.describe()}" for s in self.series)

    @property
    def reason(self) -> str:
        """Why the session is not reconstructed (only meaningful when ``spec`` is None)."""
        return (f"{self.where} is {names.SCHEME_TEXT[self.scheme]} ({self.describe()}) and "
                f"pipelines.qsirecon.recon_specs.{self.scheme} is not set: no reconstruction for that scheme")


def plan_session(config: Any, participant: str, session: str) -> ReconPlan:
    """Read the session's preprocessed gradient tables and choose its spec. Raises shells.GradientError
    for a table that cannot be read and SpecError when QSIPrep left no preprocessed series."""
    dwi = layout.session_dir(layout.qsiprep_dir(config), participant, session) / "dwi"
    series = tuple(shells.session_series(dwi))
    if not series:
        raise SpecError(f"no QSIPrep output for sub-{participant} ses-{session} ({dwi}/{shells.PREPROC_BVAL})")
    scheme = shells.session_scheme(series)
    return ReconPlan(participant, session, series, scheme, config.pipelines.qsirecon.recon_specs.for_scheme(scheme))


def spec_models(value: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The fits of a recon spec that can be checked against a gradient table: from naming/qsirecon.py for a
    built-in spec (its own parameters are the defaults), from the nodes of a spec file otherwise."""
    builtin = names.BUILTIN_SPECS.get(value)
    if builtin is not None:
        return [(m, {}) for m in builtin.models]
    path = recon_spec_file(value)
    if path is None or not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read the recon spec {path}: {exc}") from exc
    models: list[tuple[str, Mapping[str, Any]]] = []
    for node in (spec or {}).get("nodes", []) if isinstance(spec, dict) else []:
        if not isinstance(node, dict):
            continue
        action, software, params = node.get("action"), node.get("software"), node.get("parameters") or {}
        if action == "DKI_reconstruction":
            models.append((names.DKI, params))
        elif action == "MAPMRI_reconstruction":
            models.append((names.MAPMRI, params))
        elif (software, action) == ("DSI Studio", "export") or (software == "TORTOISE" and "estimate_tensor" in params):
            models.append((names.TENSOR, params))
    return models


def stale_workflow_sessions(root: Path, participant: str, session: str, published: Collection[str]) -> list[Path]:
    """The session's folders under ``derivatives/qsirecon-*`` that the run just published (``published``: units
    relative to ``root``) did not replace: what an earlier spec of the session wrote before its scheme's spec
    changed. QSIParc parcellates every workflow it finds, so they go once the new reconstruction is in place."""
    rel = session_path(participant, session)
    done = {Path(u) for u in published}
    found = sorted(d for d in (Path(root) / "derivatives").glob(f"qsirecon-*/{rel}") if d.is_dir())
    return [d for d in found if d.relative_to(root) not in done]


def refusals(plan: ReconPlan) -> list[str]:
    """What the chosen spec's fits refuse of the session's series (empty: QSIRecon may run)."""
    if plan.spec is None:
        return []
    return shells.model_refusals(plan.spec, spec_models(plan.spec), plan.series, plan.where)


def golden_outputs(
    participant: str, session: str, atlases: list[str], spec: str, *, stand_in: bool = False
) -> tuple[str, ...]:
    """Files a successful run leaves for this session (relative to the QSIRecon output root).

    A spec that writes scalar maps must leave at least one ``*_dwimap.nii.gz``; others (bundles, a
    reoriented series, a spec file) at least one file in the session's folder of some workflow. The
    stand-in draws its own atlas (any name), so its atlas patterns are ``seg-*``.
    """
    ents = layout.entities(participant, session)
    ses = session_path(participant, session)
    dwi = f"{ses}/dwi/{ents}_*space-ACPC_"
    builtin = names.BUILTIN_SPECS.get(spec)
    if stand_in or (builtin is not None and builtin.scalar_maps):
        outputs = [f"derivatives/qsirecon-*/{dwi}model-*_param-*_dwimap.nii.gz"]
    else:
        outputs = [f"derivatives/qsirecon-*/{ses}/**/{ents}_*"]
    for atlas in ["*"] if stand_in else atlases:
        outputs += [f"{dwi}seg-{atlas}_dseg.nii.gz", f"atlases/atlas-{atlas}/atlas-{atlas}_dseg.tsv"]
    return tuple(outputs)


def build_spec(
    config: Any, participant: str, session: str, *, output_dir: Path | None = None, plan: ReconPlan | None = None
) -> ToolSpec:
    """The QSIRecon run for one session, per the stage's runtime, with the spec ``plan`` chose (planned
    here from QSIPrep's output when not given).

    ``output_dir``: the run's staging folder; after success every ``sub-X/ses-Y`` it wrote (QSIRecon
    nests them under ``derivatives/qsirecon-*/`` too) replaces the published one as a whole.
    """
    cfg = config.pipelines.qsirecon
    layout.validate_label(participant)
    layout.validate_label(session, "session")
    for atlas in cfg.atlases:
        if not layout.is_label(atlas):
            raise SpecError(f"pipelines.qsirecon.atlases: {atlas!r} is not an atlas name (letters and digits)")
    if plan is None:
        plan = plan_session(config, participant, session)
    if plan.spec is None:
        raise SpecError(plan.reason)
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
        argv += ["--recon-spec", plan.spec]
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
            outputs=golden_outputs(participant, session, cfg.atlases, plan.spec, stand_in=True),
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
    spec_file = recon_spec_file(plan.spec)
    if spec_file is not None:
        scheme_key = f"pipelines.qsirecon.recon_specs.{plan.scheme}"
        if not spec_file.is_file():
            raise SpecError(f"{scheme_key}: {spec_file} does not exist")
        recon_spec = pm(spec_file, C_SPEC + spec_file.suffix)
    else:
        recon_spec = plan.spec
    argv = [
        TOOL,
        source_arg,
        out_arg,
        "participant",
        "--participant-label", participant,
        "--session-id", session,
        "--input-type", "qsiprep",
        "--recon-spec", recon_spec,
        "--report-output-level", REPORT_OUTPUT_LEVEL,
    ]  # fmt: skip
    if cfg.datasets:
        argv += ["--datasets", *(f"{n}={pm(Path(p), f'{C_DATASETS}/{n}')}" for n, p in cfg.datasets.items())]
    if cfg.atlases:
        argv += ["--atlases", *cfg.atlases]
    argv += ["--nprocs", str(cfg.nprocs), "--mem-mb", str(cfg.mem_mb)]
    outputs = golden_outputs(participant, session, cfg.atlases, plan.spec)
    return layout.nipreps_container_spec(
        TOOL, argv, cfg, pm, work, out, outputs=outputs, templateflow_home=config.paths.templateflow_home, **common
    )


def dataset_atlas_files(cfg: Any) -> list[tuple[str, Path, list[str]]]:
    """(dataset name, its folder, the files of the requested atlases in it): what a run reads from the site's
    atlas datasets (hashed for provenance and the code version)."""
    found = []
    for name, path in cfg.datasets.items():
        root = Path(path)
        files = sorted(
            str(p.relative_to(root)) for a in cfg.atlases for p in root.rglob(f"atlas-{a}_*") if p.is_file()
        )
        if files:
            found.append((name, root, files))
    return found


def reads(
    config: Any, participant: str, session: str, *, plan: ReconPlan | None = None
) -> list[tuple[str, Path, list[str]]]:
    """What a run for one session reads, as (label, root, globs relative to root): the subject's QSIPrep
    anatomy, this session's QSIPrep folder, QSIPrep's provenance and dataset description; the chosen
    recon spec when it is a file, the requested atlases of the site's datasets, the stand-in's atlas files."""
    cfg = config.pipelines.qsirecon
    sub = layout.entities(participant)
    found = [
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
    spec = plan.spec if plan is not None else None
    spec_file = recon_spec_file(spec) if spec else None
    files = [spec_file] if spec_file is not None else []
    if cfg.tool_runtime == "builtin":
        files += [Path(f) for f in (cfg.atlas_file, cfg.atlas_labels) if f is not None]
    else:
        found += [(f"datasets:{name}", root, rel) for name, root, rel in dataset_atlas_files(cfg)]
    found += [(f"config:{path.name}", path.parent, [path.name]) for path in files]
    return found


def code_version(config: Any) -> str:
    """Changes with the spec of each scheme (name, or file content), the atlases and the site's atlas files,
    the workflow name, the report level, the stand-in's atlas, extra args."""
    cfg = config.pipelines.qsirecon
    specs = cfg.recon_specs.named()
    fields = {
        "recon_specs": specs,
        "recon_spec_sha256": {
            s: layout.file_digest(f) for s, v in specs.items() if (f := recon_spec_file(v)) is not None
        },
        "workflow_name": cfg.workflow_name,
        "atlases": list(cfg.atlases),
        "datasets": {
            name: {rel: layout.file_digest(root / rel) for rel in rel_files}
            for name, root, rel_files in dataset_atlas_files(cfg)
        },
        "report_output_level": REPORT_OUTPUT_LEVEL,
        "extra_args": list(cfg.extra_args),
    }
    if cfg.tool_runtime == "builtin":
        fields["atlas_file"] = layout.file_digest(cfg.atlas_file)
        fields["atlas_labels"] = layout.file_digest(cfg.atlas_labels)
    return layout.version_hash(TOOL, layout.tool_identity(cfg, STAND_IN), fields)
