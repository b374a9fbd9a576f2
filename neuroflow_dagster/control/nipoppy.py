"""`neuroflow status --format nipoppy`: the site's state as Nipoppy's own status tables.

Nipoppy (https://nipoppy.readthedocs.io) tracks a dataset in two tab-separated
files, and its tools (``nipoppy status``) and the Neurobagel digest read them:

- ``curation_status.tsv``: one row per participant x session, DICOM -> BIDS
  (``in_pre_reorg`` raw files there, ``in_post_reorg`` organised and ready
  for conversion, ``in_bids`` converted);
- ``processing_status.tsv``: one row per participant x session x pipeline
  (name, version, step) with SUCCESS / FAIL / INCOMPLETE / UNAVAILABLE.

Column names, id formats and allowed values are those of nipoppy 0.4.8
(``nipoppy.tabular.curation_status``, ``nipoppy.tabular.processing_status``,
``nipoppy.tabular.manifest``); ``manifest.tsv`` is written too because
``nipoppy status`` starts from it. How neuroflow's states map onto Nipoppy's,
and why: docs/operations.md ("Nipoppy's status files"). The test reads the
files with nipoppy's own classes, in their own venv (scripts/nipoppy-venv.sh).

Input: the report ``control.status.collect_status`` returns, plus what the
latest materialization of each processing partition records about the tool
that made it (``recorded_tools``), so outputs made by a stand-in are never
filed under a real QSIPrep version after the configuration changed.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from neuroflow_dagster import stages
from neuroflow_dagster.bids.dataset import present_suffixes
from neuroflow_dagster.config import NeuroflowConfig, StageConfig
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.naming.bids import ses, session_dir, sub
from neuroflow_dagster.naming.partitions import session_key
from neuroflow_dagster.runtimes import STAND_IN_IMAGE
from neuroflow_dagster.stages import SOURCE, Stage
from neuroflow_dagster.tools.layout import image_version, package_version

NIPOPPY_VERSION = "0.4.8"  # the release whose table definitions these files follow
CURATION_FILE = "curation_status.tsv"
PROCESSING_FILE = "processing_status.tsv"
MANIFEST_FILE = "manifest.tsv"

SUCCESS, FAIL, INCOMPLETE, UNAVAILABLE = "SUCCESS", "FAIL", "INCOMPLETE", "UNAVAILABLE"
DEFAULT_STEP = "default"  # Nipoppy's name for a pipeline's only step

# nipoppy.tabular: ManifestModel, CurationStatusModel (a manifest plus four columns), ProcessingStatusModel.
MANIFEST_COLUMNS = ["participant_id", "visit_id", "session_id", "datatype"]
CURATION_COLUMNS = [*MANIFEST_COLUMNS, "participant_dicom_dir", "in_pre_reorg", "in_post_reorg", "in_bids"]
PROCESSING_COLUMNS = [
    "participant_id",
    "bids_participant_id",
    "session_id",
    "bids_session_id",
    "pipeline_name",
    "pipeline_version",
    "pipeline_step",
    "status",
]

# A state of the state model (neuroflow_dagster/states.py) -> Nipoppy's status, before the rules of
# `processing_status` (a session a subject-level run did not take; a stage that lacks its data; a run
# held only by the disk guard). docs/operations.md ("Nipoppy's status files") documents the table.
STATUS_OF_STATE = {
    "done": SUCCESS,
    "failed": FAIL,
    "running": INCOMPLETE,
    "queued": INCOMPLETE,
    "waiting": INCOMPLETE,  # its turn has not come, or its outputs predate a newer upstream: a run is due
    "held": UNAVAILABLE,  # cannot run until an operator acts (QC, no anatomical image, excluded, identity)
    "blocked": UNAVAILABLE,  # cannot run until the named upstream stage is fixed
    "not_applicable": UNAVAILABLE,
}
NOT_RUN = "waiting"
HOLD_DISK = "disk_guard"  # held only until the disk has space again: it runs by itself, so INCOMPLETE


@dataclass(frozen=True)
class Recorded:
    """What a partition's latest materialization says about the run that made it (None: not recorded)."""

    version: str | None = None
    step: str | None = None
    sessions: tuple[str, ...] | None = None  # a subject-level run: the sessions it took


# --------------------------------------------------------------------------- versions and steps


def _image_label(image: str) -> str:
    """The version an image reference pins: its tag (``pennlinc/qsiprep:1.1.1`` -> ``1.1.1``), the version
    in a ``.sif`` file name, else ``sha256-<12 hex>`` of a digest-only reference, else the name."""
    ref, _, digest = image.partition("@")
    name = ref.rstrip("/").rsplit("/", 1)[-1]
    if ":" in name:
        return name.rsplit(":", 1)[1]
    if name.endswith(".sif"):
        found = image_version(name)
        return ".".join(map(str, found)) if found else name[: -len(".sif")]
    if digest:
        algo, _, hexdigest = digest.partition(":")
        return f"{algo}-{hexdigest[:12]}"
    return name or "unknown"


def _installed_version(tool: str) -> str:
    try:
        return metadata.version(tool)
    except metadata.PackageNotFoundError:
        return "unknown"


def standin_version(version: str | None) -> str:
    """A stand-in is never filed under the real tool's version: ``standin-<neuroflow version>``."""
    return f"standin-{version}" if version else "standin"


def configured_version(stage: Stage, cfg: StageConfig) -> str:
    """The version the stage runs now: the image tag, ``standin-<neuroflow version>`` for the built-in
    stand-in, the installed package's version for a local tool."""
    runtime = cfg.tool_runtime
    if runtime == "builtin":
        return standin_version(package_version())
    if runtime == "local":
        return _installed_version(stage.name)
    return _image_label(cfg.image) if cfg.image else "unknown"


def recorded_version(meta: Mapping[str, Any]) -> str | None:
    """The version a materialization records (defs/execution.py ``record_metadata``), None if it has none."""
    if meta.get("stand_in") is True or meta.get("image") == STAND_IN_IMAGE:
        return standin_version(meta.get("stand_in_version"))
    image = meta.get("image")
    if not image or image == "local":
        return None  # a local tool's version is not in the record; the installed one stands for it
    return _image_label(str(image))


def _step_name(value: str) -> str:
    """A recon spec given as a file is named by its stem."""
    return Path(value).stem if "/" in value or value.endswith((".json", ".yaml", ".yml")) else value


def configured_step(cfg: StageConfig) -> str:
    """QSIRecon's step is the recon spec recorded for the session (chosen by its shell scheme, so unknown before
    it ran: ``default`` then, as for every other stage); a stage config with one ``recon_spec`` names it."""
    spec = getattr(cfg, "recon_spec", None)
    return _step_name(str(spec)) if spec else DEFAULT_STEP


def recorded_from_metadata(meta: Mapping[str, Any]) -> Recorded:
    """The Recorded of one materialization's metadata (plain values)."""
    sessions = meta.get("sessions")
    spec = meta.get("recon_spec")
    return Recorded(
        version=recorded_version(meta),
        step=_step_name(str(spec)) if spec else None,
        sessions=tuple(s.strip() for s in str(sessions).split(",") if s.strip()) if sessions is not None else None,
    )


def recorded_tools(instance: Any, names: Iterable[str] | None = None) -> dict[str, dict[str, Recorded]]:
    """stage -> partition -> Recorded, from the latest materialization of every processing partition.

    One bulk read per asset (control/records.py); the status report itself does not keep metadata.
    """
    from neuroflow_dagster.control import records

    out: dict[str, dict[str, Recorded]] = {}
    for stage in processing_stages(names):
        mats = records.latest_materializations(instance, stage.asset, with_metadata=True)
        out[stage.name] = {p: recorded_from_metadata(m.metadata) for p, m in mats.items()}
    return out


# --------------------------------------------------------------------------- which stage is which


def processing_stages(names: Iterable[str] | None = None) -> list[Stage]:
    """Every other stage is a Nipoppy processing pipeline, named after the stage (qsiprep, qsirecon, ...)."""
    wanted = set(names) if names is not None else None
    return [s for s in stages.stages() if SOURCE not in s.upstream and (wanted is None or s.name in wanted)]


# --------------------------------------------------------------------------- the session on disk


@dataclass(frozen=True)
class OnDisk:
    """What Nipoppy's own tracker would look at: the raw folder and the BIDS session folder."""

    dicom_dir: str  # relative to paths.dicom_incoming when inside it
    in_pre_reorg: bool
    in_bids: bool
    datatypes: tuple[str, ...]
    suffixes: frozenset[str]


def _non_empty_dir(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            return next(it, None) is not None
    except OSError:
        return False


def on_disk(config: NeuroflowConfig, row: Mapping[str, Any], dicom_path: str) -> OnDisk:
    incoming = Path(config.paths.dicom_incoming)
    folder = Path(dicom_path) if dicom_path else incoming / str(row["scan_id"])
    try:
        shown = str(folder.relative_to(incoming))
    except ValueError:
        shown = str(folder)
    bids_dir = session_dir(Path(config.paths.bids_root), row["subject"], row["session"])
    in_bids = _non_empty_dir(bids_dir)
    datatypes: tuple[str, ...] = ()
    if in_bids:
        datatypes = tuple(sorted(p.name for p in bids_dir.iterdir() if p.is_dir() and not p.name.startswith(".")))
    return OnDisk(
        dicom_dir=shown,
        in_pre_reorg=_non_empty_dir(folder),
        in_bids=in_bids,
        datatypes=datatypes,
        suffixes=frozenset(present_suffixes(bids_dir)) if in_bids else frozenset(),
    )


# --------------------------------------------------------------------------- the tables


def _sessions(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Active sessions only: a retired binding (re-keyed) is not a session of its participant any more."""
    return [r for r in report["sessions"] if not str(r.get("mapping", "")).startswith("retired")]


def manifest_row(row: Mapping[str, Any], disk: OnDisk) -> dict[str, Any]:
    """neuroflow has no visits apart from imaging sessions: visit_id is the session label."""
    return {
        "participant_id": row["subject"],
        "visit_id": row["session"],
        "session_id": row["session"],
        "datatype": repr(list(disk.datatypes)) if disk.datatypes else "",
    }


def curation_row(row: Mapping[str, Any], disk: OnDisk) -> dict[str, Any]:
    """in_pre_reorg: the DICOM folder is there (not empty); in_post_reorg: it is also registered under its
    labels and passed the protocol check (ready for conversion); in_bids: ``bids_root/sub-X/ses-Y`` holds
    files - Nipoppy's own checks, on neuroflow's folders."""
    return {
        **manifest_row(row, disk),
        "participant_dicom_dir": disk.dicom_dir,
        "in_pre_reorg": disk.in_pre_reorg,
        "in_post_reorg": disk.in_pre_reorg and row.get("protocol") == "passed",
        "in_bids": disk.in_bids,
    }


def processing_status(stage: Stage, row: Mapping[str, Any], recorded: Recorded | None, missing_data: bool) -> str:
    """One session's Nipoppy status for one processing stage, from its cell in the state model.

    ``missing_data``: the session is converted but lacks the BIDS suffixes the stage requires (no DWI):
    a stage that has not run for it then is UNAVAILABLE (it will record "not applicable" when it runs).
    """
    state = str(row.get(stage.name, ""))
    cause = str(row.get("why", {}).get(stage.name, {}).get("cause", ""))
    if state == "done" or (state == "waiting" and cause == "stale"):
        took = recorded.sessions if recorded is not None else None
        if stage.per_subject and took is not None and row["session"] not in took:
            state = NOT_RUN  # the subject's run left this session out
    if state not in STATUS_OF_STATE:
        raise ValueError(
            f"{stage.name} state {state!r} of sub-{row['subject']} ses-{row['session']} has no Nipoppy status "
            f"(known: {', '.join(STATUS_OF_STATE)})"
        )
    if state == NOT_RUN and missing_data:
        return UNAVAILABLE
    if state == "held" and cause == HOLD_DISK:
        return INCOMPLETE
    return STATUS_OF_STATE[state]


def build_tables(
    report: Mapping[str, Any],
    config: NeuroflowConfig,
    recorded: Mapping[str, Mapping[str, Recorded]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """{"manifest": rows, "curation": rows, "processing": rows} for the report's active sessions."""
    recorded = recorded or {}
    paths = {e.scan_id: e.dicom_path for e in Registry(config.paths.state).all()}
    processing = processing_stages()
    out: dict[str, list[dict[str, Any]]] = {"manifest": [], "curation": [], "processing": []}
    for row in _sessions(report):
        participant, session = row["subject"], row["session"]
        disk = on_disk(config, row, paths.get(row["scan_id"], ""))
        out["manifest"].append(manifest_row(row, disk))
        out["curation"].append(curation_row(row, disk))
        for stage in processing:
            if stage.name not in row:
                continue
            cfg = config.stage(stage.config_section)
            key = participant if stage.per_subject else session_key(participant, session)
            rec = recorded.get(stage.name, {}).get(key)
            required = set(cfg.requires_bids_suffixes)
            missing_data = disk.in_bids and bool(required - disk.suffixes)
            status = processing_status(stage, row, rec, missing_data)
            out["processing"].append(
                {
                    "participant_id": participant,
                    "bids_participant_id": sub(participant),
                    "session_id": session,
                    "bids_session_id": ses(session),
                    "pipeline_name": stage.name,
                    "pipeline_version": (rec.version if rec and rec.version else configured_version(stage, cfg)),
                    "pipeline_step": (rec.step if rec and rec.step else configured_step(cfg)),
                    "status": status,
                }
            )
    return out


def _tsv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, delimiter="\t", lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_tables(tables: Mapping[str, list[dict[str, Any]]], out_dir: Path) -> dict[str, Path]:
    """The three files in ``out_dir`` (created if needed), each replaced atomically."""
    out_dir = Path(out_dir)
    files = {
        "curation": (out_dir / CURATION_FILE, CURATION_COLUMNS),
        "processing": (out_dir / PROCESSING_FILE, PROCESSING_COLUMNS),
        "manifest": (out_dir / MANIFEST_FILE, MANIFEST_COLUMNS),
    }
    for name, (path, columns) in files.items():
        atomic_write_text(path, _tsv(tables[name], columns))
    return {name: path for name, (path, _) in files.items()}


def summary(tables: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Counts in Nipoppy's terms: per pipeline (name, version, step) and status; curation checkpoints."""
    per_pipeline: dict[str, Counter[str]] = {}
    for r in tables["processing"]:
        name = f"{r['pipeline_name']} {r['pipeline_version']} {r['pipeline_step']}"
        per_pipeline.setdefault(name, Counter())[r["status"]] += 1
    curation = tables["curation"]
    return {
        "sessions": len(curation),
        "curation": {c: sum(1 for r in curation if r[c]) for c in ("in_pre_reorg", "in_post_reorg", "in_bids")},
        "processing": {name: dict(counts) for name, counts in per_pipeline.items()},
    }


__all__ = [
    "CURATION_COLUMNS",
    "NIPOPPY_VERSION",
    "PROCESSING_COLUMNS",
    "STATUS_OF_STATE",
    "Recorded",
    "build_tables",
    "recorded_tools",
    "summary",
    "write_tables",
]
