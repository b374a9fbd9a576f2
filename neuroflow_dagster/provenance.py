"""Provenance beside the data: how every published file was made, in a JSON file next to it.

Someone holding only the BIDS folder or the derivatives folder - no Dagster,
no logs - must be able to tell exactly how each file was made. So every
successful stage run writes one document into its staged outputs before
they are published (so it is published atomically with them, and a failed
run leaves none):

- the tool: name, image and digest or the stand-in's packages and versions,
  runtime, the exact command;
- the configuration: the stage's settings and its code_version (the hash
  Dagster compares to mark outputs stale);
- the inputs: for BIDS the DICOM series (SeriesInstanceUID, description,
  number of files, read from the headers; DICOM is never written) and a
  digest of the file list; for later stages the sha256 of every input file
  the tool reads (streamed, 1 MiB at a time) and the upstream
  materializations (asset, partition, Dagster run id);
- the run: Dagster run id, job, attempt, host, user, start, end, exit code;
- the outputs: every file the run published, with size and sha256.

Document layout and file names: docs/provenance.md. This module hashes,
reads headers and writes; the Dagster layer (defs/execution.py) passes what
only Dagster knows (run id, upstream runs, code version). Plain Python.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from neuroflow_dagster.discovery.scanner import read_headers, stat_walk
from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.tools.spec import ToolSpec

FORMAT = "neuroflow-provenance/1"
CHUNK = 1 << 20
# What the embedded stand-ins are made of: their versions are the "tool version" of a builtin run.
STAND_IN_PACKAGES = ("neuroflow-dagster", "dipy", "nibabel", "numpy", "scipy", "parcellate")


@dataclass(frozen=True)
class InputTree:
    """Files a tool reads, under one root (paths in the document are relative to it)."""

    label: str  # e.g. "bids_root", "derivatives/qsiprep"
    root: Path
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Plan:
    """What a stage asset knows about its run's provenance before the tool starts.

    ``document``: where the file goes, relative to the run's output folder (its staging folder);
    ``outputs_under``: the folders (relative to it) whose files the run publishes ('' = all of it).
    """

    participant: str
    sessions: tuple[str, ...]
    document: str
    inputs: tuple[InputTree, ...] = ()
    dicom_dir: Path | None = None
    outputs_under: tuple[str, ...] = ("",)
    tool_versions: Mapping[str, Any] = field(default_factory=dict)
    tool_extra: Mapping[str, Any] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    """sha256 of a file read in 1 MiB chunks: memory stays flat whatever the file's size."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the given distributions (absent ones left out)."""
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def tree_files(root: Path, patterns: Sequence[str], *, skip: Sequence[str] = ()) -> list[Path]:
    """Regular files under ``root``: each pattern ('' = all of root) is a glob relative to ``root``
    naming files or folders (taken whole). Hidden entries are left out; sorted, no duplicates.

    ``skip``: paths relative to ``root`` to leave out (the provenance document itself).
    """
    root = Path(root)
    skipped = {Path(s) for s in skip}
    found: set[Path] = set()
    for pattern in patterns:
        for match in [root] if not pattern else sorted(root.glob(pattern)):
            for path in [match] if match.is_file() else match.rglob("*"):
                rel = path.relative_to(root)
                if any(part.startswith(".") for part in rel.parts) or rel in skipped:
                    continue
                if path.is_file():
                    found.add(path)
    return sorted(found)


def input_tree(label: str, root: Path, patterns: Sequence[str]) -> InputTree:
    """The files a tool reads under ``root`` (see tree_files), as the Plan takes them."""
    return InputTree(label, Path(root), tuple(tree_files(root, patterns)))


def describe_files(root: Path, files: Iterable[Path]) -> tuple[list[dict[str, Any]], int]:
    """[{path (relative to root), bytes, sha256}] and the number of bytes hashed."""
    rows: list[dict[str, Any]] = []
    total = 0
    for path in files:
        size = path.stat().st_size
        rows.append({"path": str(Path(path).relative_to(root)), "bytes": size, "sha256": sha256_file(path)})
        total += size
    return rows, total


def dicom_inputs(dicom_dir: Path) -> dict[str, Any]:
    """The DICOM series of a session folder from their headers (pixel data is not read, nothing written).

    ``files_digest`` is a sha256 over the sorted (relative path, size) list: it changes when a file
    is added, removed or resized, without reading every file.
    """
    folder = Path(dicom_dir)
    walk = stat_walk(folder)
    headers = read_headers(walk.candidates, folder)
    listing = hashlib.sha256()
    for path in walk.candidates:
        listing.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\n".encode())
    return {
        "path": str(folder),
        "n_files": walk.n_files,
        "n_dicom": headers.n_dicom,
        "n_unreadable": headers.n_unreadable,
        "files_digest": listing.hexdigest(),
        "acquisition": headers.acquisition,
        "series": [
            {
                "SeriesInstanceUID": s.uid,
                "SeriesNumber": s.series_number,
                "SeriesDescription": s.description,
                "ImageType": s.image_type,
                "Modality": s.modality,
                "n_files": s.n_files,
            }
            for s in headers.series
        ],
    }


@dataclass
class Inputs:
    """What the tool was given, identified before it started."""

    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dicom: dict[str, Any] | None = None
    bytes_hashed: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"files": self.files}
        if self.dicom is not None:
            out["dicom"] = self.dicom
        return out


def collect_inputs(plan: Plan) -> Inputs:
    """Hash the input files and read the DICOM headers: call BEFORE the tool runs (what it was given)."""
    started = time.monotonic()
    inputs = Inputs()
    for tree in plan.inputs:
        rows, n_bytes = describe_files(tree.root, tree.files)
        inputs.files.setdefault(tree.label, []).extend(rows)
        inputs.bytes_hashed += n_bytes
    if plan.dicom_dir is not None:
        inputs.dicom = dicom_inputs(plan.dicom_dir)
    inputs.seconds = round(time.monotonic() - started, 3)
    return inputs


def build_document(
    plan: Plan,
    *,
    stage: str,
    asset: str,
    partition: str,
    code_version: str | None,
    settings: Mapping[str, Any],
    spec: ToolSpec,
    record: Mapping[str, Any],
    run: Mapping[str, Any],
    upstream: Sequence[Mapping[str, Any]],
    inputs: Inputs,
    outputs: Sequence[Mapping[str, Any]],
    outputs_seconds: float,
    outputs_bytes: int,
) -> dict[str, Any]:
    """The provenance document (docs/provenance.md); ``record`` is the tool run's RunRecord.as_dict()."""
    tool: dict[str, Any] = {
        "name": spec.tool,
        "stand_in": spec.stand_in,
        "runtime": record.get("runtime"),
        "image": record.get("image") or spec.image,
        "image_digest": record.get("image_digest"),
        "versions": dict(plan.tool_versions),
        **dict(plan.tool_extra),
    }
    return {
        "format": FORMAT,
        "generated_by": {
            "name": "neuroflow-dagster",
            "version": package_versions(["neuroflow-dagster"]).get("neuroflow-dagster", "unknown"),
        },
        "stage": stage,
        "asset": asset,
        "partition": partition,
        "subject": plan.participant,
        "sessions": list(plan.sessions),
        "tool": tool,
        "command": {
            "argv": list(spec.argv),
            "line": record.get("command"),
            "output_dir": str(spec.output_dir),
            "published_to": str(spec.publish_to) if spec.publish_to is not None else None,
        },
        "code_version": code_version,
        "settings": dict(settings),
        "inputs": inputs.as_dict(),
        "upstream": [dict(u) for u in upstream],
        "run": {
            **dict(run),
            "host": socket.gethostname(),
            "user": _user(),
            "started": iso(record.get("started")),
            "finished": iso(record.get("ended")),
            "duration_s": record.get("duration_s"),
            "exit_code": record.get("exit_code"),
            "log_path": record.get("log_path"),
        },
        "outputs": list(outputs),
        "cost": {
            "inputs_hashed_bytes": inputs.bytes_hashed,
            "inputs_seconds": inputs.seconds,
            "outputs_hashed_bytes": outputs_bytes,
            "outputs_seconds": outputs_seconds,
        },
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (containers)
        return "unknown"


def describe_outputs(output_dir: Path, plan: Plan) -> tuple[list[dict[str, Any]], int, float]:
    """The files the run publishes (everything under ``outputs_under`` but the document), hashed."""
    started = time.monotonic()
    files = tree_files(output_dir, plan.outputs_under, skip=[plan.document])
    rows, n_bytes = describe_files(output_dir, files)
    return rows, n_bytes, round(time.monotonic() - started, 3)


def write_document(output_dir: Path, plan: Plan, document: Mapping[str, Any]) -> Path:
    """Write the document at ``output_dir/plan.document`` (atomically: temp file + rename)."""
    path = Path(output_dir) / plan.document
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_document(path: Path) -> dict[str, Any]:
    """A provenance file, checked to be one (its ``format``)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("neuroflow-provenance/"):
        raise ValueError(f"{path} is not a neuroflow provenance file")
    return data


def verify_outputs(path: Path) -> list[str]:
    """Re-hash the files a provenance document lists (relative to its tree); returns the mismatches.

    The tree is found from the document's own place: ``sub-X[/ses-Y]/<name>`` under it.
    """
    document = read_document(path)
    subject = next(p for p in Path(path).parents if p.name.startswith("sub-"))
    root = subject.parent
    problems: list[str] = []
    for row in document.get("outputs", []):
        target = root / row["path"]
        if not target.is_file():
            problems.append(f"{row['path']}: missing")
        elif sha256_file(target) != row["sha256"]:
            problems.append(f"{row['path']}: sha256 differs")
    return problems
