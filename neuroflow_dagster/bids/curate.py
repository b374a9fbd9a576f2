"""Curation of a converted session: route each image by what it contains, then link field maps to DWIs.

Why after conversion: the heuristic sees HeudiConv's ``SeqInfo`` (names, ImageType, a ``dim4`` that
is 1 for classic one-file-per-slice DICOM) plus the b-values its ``custom_seqinfo`` can read from the
headers of the vendors it knows, and no phase-encoding polarity. dcm2niix's output has both
(``.bval``, ``PhaseEncodingDirection`` in the sidecar when the vendor records it), so the routing that
depends on them is decided here, on the staged session HeudiConv wrote, before the BIDS validator sees
it (for series the heuristic already routed right, it confirms). The rules (docs/domain-rules.md#conversion):

* A diffusion image with diffusion-weighted volumes (b > ``B0_THRESHOLD``, QSIPrep's own default) and
  more than one volume is a DWI, in ``dwi/``, whatever it was named (a full reverse-PE DWI named
  blip/revPE included). One with a single volume is left out: QSIPrep refuses it ("DWI file not 4D");
  so is one whose diffusion-weighted volumes have no gradient direction (trace images), and a
  multi-volume series with ImageType DIFFUSION but no b-values (dcm2niix could not read them).
* A b=0-only image in ``dwi/`` (any number of volumes; also one without b-values that is not a
  DIFFUSION series: a spin-echo b=0 named like a DWI) is a field map: ``fmap/..._acq-dwi_dir-XX_epi``,
  its bval/bvec removed.
* ``dir-`` of every DWI, SBRef and EPI field map comes from ``PhaseEncodingDirection`` and the image's
  orientation (``j-`` on an axial image whose j axis points anterior is A>>P: ``AP``); names that then
  collide get ``run-`` in acquisition order.
* A field map whose sidecar lacks what BIDS requires (the validator's rules: ``PhaseEncodingDirection``
  and ``TotalReadoutTime`` or ``EffectiveEchoSpacing`` for ``epi``; ``EchoTime1``/``EchoTime2`` for
  ``phasediff``; ``EchoTime`` for ``phase1``/``phase2``; ``Units`` for ``fieldmap``) is left out with a
  warning: dcm2niix cannot read the polarity of every vendor's data, and such a file fails the validator.
* A field map serves a DWI only when it was acquired for it: named for diffusion (``acq-dwi``, or a
  diffusion word in its SeriesDescription), or taken from the diffusion sequence itself, or, when its
  name says nothing, an EPI field map in the DWI's imaging volume (a GRE one with the DWI's
  ShimSetting). A field map named for fMRI never does, and none does when the scanner's shim changed
  in between (both sidecars carry ShimSetting and they differ), nor an EPI one that adds no reverse
  phase encoding along the DWI's axis. Each DWI takes one field map group: EPI before gradient echo,
  then the closest in time.
* A group that serves DWIs gets ``IntendedFor`` (paths relative to the subject folder, as QSIPrep 1.1.1
  reads them; it ignores ``bids::`` URIs and B0Field*) and ``B0FieldIdentifier`` (naming the session:
  unique per subject);
  each DWI it serves gets ``B0FieldSource``, and when the group's EPI images have a single polarity the
  DWIs join its ``B0FieldIdentifier`` too (QSIPrep 26 refuses a PEPOLAR field whose images share one
  phase encoding). Field maps that serve no DWI keep no DWI in their IntendedFor.
  Full DWIs in opposite directions with no field map get nothing: QSIPrep pairs them itself; nor does a
  session where a field map would serve only some DWIs while another has an opposite-PE DWI partner
  (QSIPrep 26 infers no pairs in a session where anything is linked).

Every decision is recorded with its reason (``CurationReport``): the materialization metadata and the
session's provenance file carry it. Plain Python (no Dagster import).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np

from neuroflow_dagster.bids.dataset import read_tsv, write_tsv
from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.heuristics.neuroflow_default import B0_THRESHOLD, tokens
from neuroflow_dagster.naming.bids import entities as name_prefix
from neuroflow_dagster.naming.bids import session_dir

# Part of the conversion's code version (tools/heudiconv.py): bump it when a rule here changes what a
# conversion writes, so Dagster marks converted sessions stale (and only then).
CURATION_VERSION = "1"
# What the BIDS validator requires of each field map suffix (any one key of each tuple).
REQUIRED_FMAP_METADATA: dict[str, tuple[tuple[str, ...], ...]] = {
    "epi": (("PhaseEncodingDirection",), ("TotalReadoutTime", "EffectiveEchoSpacing")),
    "phasediff": (("EchoTime1",), ("EchoTime2",)),
    "phase1": (("EchoTime",),),
    "phase2": (("EchoTime",),),
    "fieldmap": (("Units",),),
}
GRE_SUFFIXES = ("phasediff", "phase1", "phase2", "fieldmap", "magnitude", "magnitude1", "magnitude2")
ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part")
SIDECAR_EXTENSIONS = (".json", ".bval", ".bvec")
# RAS axis (0 x, 1 y, 2 z) and the sign of the direction the phase encoding travels -> BIDS dir- label.
DIRECTION_LABELS = {(0, 1): "LR", (0, -1): "RL", (1, 1): "PA", (1, -1): "AP", (2, 1): "IS", (2, -1): "SI"}
DIFFUSION_ACQ = ("dwi", "diff", "dti", "dmri")
OTHER_PURPOSE = ("func", "bold", "fmri", "rest", "task", "asl", "perf", "anat")


class CurationError(RuntimeError):
    """The staged session could not be curated (unreadable files): the conversion fails with this reason."""


@dataclass
class Image:
    """One converted image of the staged session and what its files say."""

    datatype: str
    entities: dict[str, str]  # without sub/ses, in file order
    suffix: str
    source: str  # path as HeudiConv wrote it, relative to the session folder
    sidecar: dict[str, Any]
    shape: tuple[int, ...]
    affine: np.ndarray
    bvals: list[float] | None
    acq_time: datetime | None
    bvecs: np.ndarray | None = None  # (3, volumes), FSL style
    from_diffusion: bool = False  # a b=0 image moved out of dwi/ (the diffusion sequence's own)
    target: str = ""  # final path relative to the session folder ("" = left out)
    notes: list[str] = field(default_factory=list)  # why its name changed

    @property
    def volumes(self) -> int:
        return self.shape[3] if len(self.shape) > 3 else 1

    @property
    def phase_encoding(self) -> str | None:
        value = self.sidecar.get("PhaseEncodingDirection")
        return value if isinstance(value, str) and re.fullmatch(r"[ijk]-?", value) else None

    @property
    def series(self) -> str:
        """'4 ep2d_diff_b0_PA': how decisions name the DICOM series an image came from."""
        number = self.sidecar.get("SeriesNumber", "?")
        return f"{number} {self.sidecar.get('SeriesDescription') or self.sidecar.get('ProtocolName') or '?'}"

    @property
    def is_dwi(self) -> bool:
        return self.datatype == "dwi" and self.suffix == "dwi"

    @property
    def diffusion_weighted(self) -> bool:
        return bool(self.bvals) and max(self.bvals or [0.0]) > B0_THRESHOLD


@dataclass(frozen=True)
class FileDecision:
    """What curation did with one converted image."""

    source: str
    target: str | None  # None = left out of the session
    series: str
    action: str  # kept | renamed | moved | left out
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.target, "from": self.source, "series": self.series, "action": self.action,
                "reason": self.reason}  # fmt: skip


@dataclass
class CurationReport:
    """Every decision of the conversion of one session, with its reason (provenance and metadata)."""

    files: list[FileDecision] = field(default_factory=list)
    field_maps: list[dict[str, Any]] = field(default_factory=list)  # one entry per field map group
    warnings: list[str] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)  # the heuristic's decision per DICOM series

    def as_dict(self) -> dict[str, Any]:
        return {
            "series": list(self.series),
            "files": [f.as_dict() for f in self.files],
            "field_maps": list(self.field_maps),
            "warnings": list(self.warnings),
        }

    def as_markdown(self) -> str:
        """A table for the Dagster UI: every DICOM series and converted file, where it went and why."""
        lines = ["| series | BIDS file | why |", "|---|---|---|"]
        for s in self.series:
            target = s.get("target") or "skipped"
            lines.append(f"| {_cell(s.get('series'))} | {_cell(target)} | {_cell(s.get('reason'))} |")
        for f in self.files:
            if f.action != "kept":
                lines.append(f"| {_cell(f.series)} | {_cell(f.target or 'left out')} | {f.action}: {_cell(f.reason)} |")
        for group in self.field_maps:
            used = ", ".join(group.get("serves") or []) or "no DWI"
            files = ", ".join(group["files"])
            lines.append(f"| field map {_cell(files)} | serves {_cell(used)} | {_cell(group['reason'])} |")
        return "\n".join(lines)


def _cell(value: object) -> str:
    return str(value if value is not None else "").replace("|", "/").replace("\n", " ")


# --------------------------------------------------------------------------- reading the staged session


_NAME = re.compile(r"^(?P<stem>[^/]+?)\.nii(\.gz)?$")


def parse_name(filename: str) -> tuple[dict[str, str], str]:
    """``sub-1_ses-2_acq-dwi_dir-PA_epi.nii.gz`` -> ({"acq": "dwi", "dir": "PA"}, "epi") (sub/ses dropped)."""
    match = _NAME.match(filename)
    stem = match.group("stem") if match else filename
    *parts, suffix = stem.split("_")
    found: dict[str, str] = {}
    for part in parts:
        key, _, value = part.partition("-")
        if key not in ("sub", "ses") and value:
            found[key] = value
    return found, suffix


def build_name(participant: str, session: str, datatype: str, entities: Mapping[str, str], suffix: str) -> str:
    """The BIDS path relative to the session folder, entities in BIDS order (unknown ones after them)."""
    known = [k for k in ENTITY_ORDER if k in entities]
    other = [k for k in entities if k not in ENTITY_ORDER]
    parts = [name_prefix(participant, session), *(f"{k}-{entities[k]}" for k in [*known, *other] if entities[k])]
    return f"{datatype}/{'_'.join([*parts, suffix])}.nii.gz"


def _stem(rel: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", rel)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CurationError(f"cannot read the sidecar {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _read_bvals(path: Path) -> list[float] | None:
    if not path.exists():
        return None
    try:
        return [float(v) for v in path.read_text(encoding="utf-8").split()]
    except (OSError, ValueError) as exc:
        raise CurationError(f"cannot read the b-values {path}: {exc}") from exc


def _read_bvecs(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [[float(v) for v in line.split()] for line in lines if line.strip()]
        return np.array(rows, dtype=float) if len(rows) == 3 and len({len(r) for r in rows}) == 1 else None
    except (OSError, ValueError) as exc:
        raise CurationError(f"cannot read the b-vectors {path}: {exc}") from exc


def _undirected(image: Image) -> int | None:
    """How many diffusion-weighted volumes have no gradient direction (trace/isotropic images), if known."""
    if image.bvals is None or image.bvecs is None or image.bvecs.shape[1] != len(image.bvals):
        return None
    weighted = np.asarray(image.bvals) > B0_THRESHOLD
    return int(np.sum(weighted & (np.linalg.norm(image.bvecs, axis=0) < 1e-6)))


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or value in ("", "n/a"):
        return None
    for fmt in ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.strptime(value, fmt)
        except ValueError:
            continue
    return None


def scans_table(folder: Path, participant: str, session: str) -> Path:
    return folder / f"{name_prefix(participant, session)}_scans.tsv"


def inventory(folder: Path, participant: str, session: str) -> list[Image]:
    """Every NIfTI image of the staged session folder, with its sidecar, header and b-values."""
    _, rows = read_tsv(scans_table(folder, participant, session))
    times = {r.get("filename", ""): _parse_time(r.get("acq_time")) for r in rows}
    images: list[Image] = []
    for path in sorted(folder.glob("*/*.nii*")):
        rel = str(path.relative_to(folder))
        entities, suffix = parse_name(path.name)
        try:
            header = nib.load(path)
            shape, affine = tuple(int(n) for n in header.shape), np.asarray(header.affine, dtype=float)
        except Exception as exc:  # nibabel raises several types for a damaged file
            raise CurationError(f"cannot read the NIfTI header of {path}: {exc}") from exc
        stem = folder / _stem(rel)
        images.append(
            Image(
                datatype=path.parent.name,
                entities=entities,
                suffix=suffix,
                source=rel,
                sidecar=_read_json(Path(f"{stem}.json")),
                shape=shape,
                affine=affine,
                bvals=_read_bvals(Path(f"{stem}.bval")),
                acq_time=times.get(rel),
                bvecs=_read_bvecs(Path(f"{stem}.bvec")),
                target=rel,
            )
        )
    return images


# --------------------------------------------------------------------------- the rules


def direction_label(phase_encoding: str | None, affine: np.ndarray) -> str | None:
    """BIDS ``dir-`` label from PhaseEncodingDirection (voxel axis and sign) and the image's orientation."""
    if not phase_encoding or not re.fullmatch(r"[ijk]-?", phase_encoding):
        return None
    axis = "ijk".index(phase_encoding[0])
    vector = affine[:3, axis] * (-1.0 if phase_encoding.endswith("-") else 1.0)
    world = int(np.argmax(np.abs(vector)))
    return DIRECTION_LABELS[(world, 1 if vector[world] > 0 else -1)]


def _pe_axis(image: Image) -> str | None:
    return image.phase_encoding[0] if image.phase_encoding else None


def missing_fmap_metadata(image: Image) -> list[str]:
    """The keys BIDS requires of this field map that its sidecar lacks (``A or B`` for alternatives)."""
    missing = []
    for keys in REQUIRED_FMAP_METADATA.get(image.suffix, ()):
        if not any(image.sidecar.get(k) not in (None, "") for k in keys):
            missing.append(" or ".join(keys))
    return missing


def _route_by_content(images: list[Image], decisions: dict[int, tuple[str, str]], warnings: list[str]) -> None:
    """dwi/ <-> fmap/ by b-values and volume count; 3D, trace-only or b-value-less DWIs are left out."""

    def leave_out(image: Image, why: str, detail: str) -> None:
        image.target = ""
        warnings.append(f"{image.source} (series {image.series}): {detail}: left out of the session")
        decisions[id(image)] = ("left out", why)

    for image in images:
        if image.is_dwi:
            weighted = sum(b > B0_THRESHOLD for b in image.bvals or [])
            undirected = _undirected(image)
            diffusion_type = "DIFFUSION" in (image.sidecar.get("ImageType") or ())
            if image.bvals is None and image.volumes > 1 and diffusion_type:
                leave_out(image, "no b-values", "a diffusion series without b-values (dcm2niix could not read them)")
            elif weighted and undirected == weighted:
                leave_out(image, "trace-weighted volumes without gradient directions",
                          "its diffusion-weighted volumes have no gradient direction (trace/isotropic images)")
            elif weighted and image.volumes == 1:
                leave_out(image, "one diffusion-weighted volume (3D)", "a single diffusion-weighted volume is not a "
                          "DWI series QSIPrep can use ('DWI file not 4D')")
            elif not weighted:
                image.datatype, image.suffix, image.from_diffusion = "fmap", "epi", True
                image.entities = {"acq": "dwi", **{k: v for k, v in image.entities.items() if k != "acq"}}
                b = f"b <= {B0_THRESHOLD:g}" if image.bvals else "no diffusion weighting"
                decisions[id(image)] = ("moved", f"b=0 only ({image.volumes} volume(s), {b}): a field map, not a DWI")
            elif undirected:
                warnings.append(f"{image.source} (series {image.series}): {undirected} diffusion-weighted volume(s) "
                                "without a gradient direction (trace images left in the series?)")
        elif image.datatype == "fmap" and image.suffix == "epi" and image.diffusion_weighted and image.volumes > 1:
            image.datatype, image.suffix = "dwi", "dwi"
            image.entities = {k: v for k, v in image.entities.items() if k != "acq"}
            decisions[id(image)] = ("moved", f"a full diffusion series ({image.volumes} volumes, b up to "
                                             f"{max(image.bvals or [0]):g}) named as a field map: a DWI")


def _check_fmaps(images: list[Image], decisions: dict[int, tuple[str, str]], warnings: list[str]) -> None:
    for image in images:
        if image.target and image.datatype == "fmap":
            missing = missing_fmap_metadata(image)
            if missing:
                image.target = ""
                why = f"its sidecar lacks {', '.join(missing)}, which BIDS requires of an {image.suffix} field map"
                warnings.append(f"{image.source} (series {image.series}): {why}: left out of the session "
                                "(dcm2niix could not read it from this vendor's headers)")
                decisions[id(image)] = ("left out", why)


def _name_images(images: list[Image], participant: str, session: str, warnings: list[str]) -> None:
    """dir- from the headers; run- for names that collide (acquisition order)."""
    for image in images:
        if not image.target:
            continue
        if image.datatype in ("dwi", "fmap") and image.suffix in ("dwi", "sbref", "epi"):
            label = direction_label(image.phase_encoding, image.affine)
            if label:
                if image.entities.get("dir") != label:
                    image.notes.append(f"dir-{label} from PhaseEncodingDirection {image.phase_encoding}")
                image.entities["dir"] = label
            elif image.is_dwi:
                warnings.append(
                    f"{image.source} (series {image.series}): no PhaseEncodingDirection in its sidecar (dcm2niix "
                    "could not read the polarity): QSIPrep cannot preprocess a DWI without it"
                )
    _disambiguate(images)
    clashes: dict[str, list[Image]] = {}
    for image in images:
        if image.target and image.datatype in ("dwi", "fmap") and image.suffix in ("dwi", "sbref", "epi"):
            base = {k: v for k, v in image.entities.items() if k != "run"}
            clashes.setdefault(build_name(participant, session, image.datatype, base, image.suffix), []).append(image)
    for members in clashes.values():
        members.sort(key=lambda i: (i.acq_time or datetime.max, i.source))
        for number, image in enumerate(members, start=1):
            base = {k: v for k, v in image.entities.items() if k != "run"}
            if len(members) > 1:
                base["run"] = f"{number:02d}"
            if base.get("run") != image.entities.get("run"):
                image.notes.append(f"run-{base['run']}: {len(members)} images of this name" if "run" in base
                                   else "one image of this name: no run-")
            image.entities = base
    for image in images:
        if image.target:
            image.target = build_name(participant, session, image.datatype, image.entities, image.suffix)


def _disambiguate(images: list[Image]) -> None:
    """BIDS inheritance: a sidecar applies to every file of its folder and suffix whose entities include its
    own, so ``fmap/sub-1_ses-1_dir-PA_epi.json`` would also describe ``..._acq-dwi_dir-PA_epi.nii.gz``
    (QSIPrep 26 refuses that: ambiguous-json-inheritance). When an image's entities are a strict subset of
    another's, its family (the images that differ only in dir- and run-: an AP/PA pair, a GRE set) gets an
    ``acq-`` label from its SeriesDescription."""
    live = [i for i in images if i.target]

    def family(image: Image) -> tuple[str, frozenset[tuple[str, str]]]:
        return image.datatype, frozenset((k, v) for k, v in image.entities.items() if k not in ("dir", "run"))

    ambiguous = {
        family(image)
        for image in live
        if "acq" not in image.entities
        and any(
            other is not image and other.datatype == image.datatype and other.suffix == image.suffix
            and set(image.entities.items()) < set(other.entities.items())
            for other in live
        )
    }
    for key in ambiguous:
        members = sorted((i for i in live if family(i) == key), key=lambda i: i.source)
        label = acquisition_label(members[0])
        for image in members:
            image.entities = {"acq": label, **image.entities}
            image.notes.append(f"acq-{label}: without it another image's sidecar would apply to it (BIDS inheritance)")


def acquisition_label(image: Image) -> str:
    """'SpinEchoFieldMap_AP' -> 'SpinEchoFieldMap': the series name, letters and digits, without direction words."""
    name = image.sidecar.get("SeriesDescription") or image.sidecar.get("ProtocolName") or ""
    words = re.findall(r"[A-Za-z0-9]+", str(name))
    label = "".join(w for w in words if w.lower() not in ("ap", "pa", "lr", "rl", "si", "is"))[:40]
    return label or "other"


# --------------------------------------------------------------------------- field maps -> DWIs


@dataclass
class FieldMapGroup:
    """Field map images estimated together: an EPI set (same entities but dir/run) or a GRE set."""

    kind: str  # "epi" | "gre"
    images: list[Image]

    @property
    def name(self) -> str:
        return ", ".join(Path(i.target).name for i in self.images)

    def purpose(self) -> tuple[bool | None, str]:
        """(True: acquired for diffusion / False: for something else / None: cannot tell by name), why."""
        if any(i.from_diffusion or "DIFFUSION" in (i.sidecar.get("ImageType") or ()) for i in self.images):
            return True, "b=0 images of the diffusion sequence itself"
        acq = " ".join(i.entities.get("acq", "") for i in self.images).lower()
        words = {w for i in self.images for w in tokens(str(i.sidecar.get("SeriesDescription", "")))}
        if any(a in acq for a in DIFFUSION_ACQ) or any(w.startswith(DIFFUSION_ACQ) for w in words):
            return True, "acquired for diffusion (its name says so)"
        if any(a in acq for a in OTHER_PURPOSE) or any(w.startswith(OTHER_PURPOSE) for w in words):
            return False, "acquired for another scan (its name says so)"
        return None, ""

    def epi_polarities(self, axis: str) -> set[str]:
        return {i.phase_encoding or "" for i in self.images if _pe_axis(i) == axis}


def _groups(images: list[Image]) -> list[FieldMapGroup]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], FieldMapGroup] = {}
    for image in images:
        if not image.target or image.datatype != "fmap":
            continue
        if image.suffix == "epi":
            key = ("epi", tuple(sorted((k, v) for k, v in image.entities.items() if k not in ("dir", "run"))))
        elif image.suffix in GRE_SUFFIXES:
            key = ("gre", tuple(sorted(image.entities.items())))
        else:
            continue
        found.setdefault(key, FieldMapGroup(key[0], [])).images.append(image)
    return list(found.values())


def _same_volume(a: Image, b: Image) -> bool:
    """Same imaging volume: matrix and voxel-to-world mapping (within a voxel)."""
    if a.shape[:3] != b.shape[:3]:
        return False
    voxel = float(np.min(np.linalg.norm(b.affine[:3, :3], axis=0)))
    return bool(np.allclose(a.affine[:3, :3], b.affine[:3, :3], atol=0.05 * voxel)
                and np.allclose(a.affine[:3, 3], b.affine[:3, 3], atol=voxel))


def _shims(image: Image) -> tuple[float, ...] | None:
    value = image.sidecar.get("ShimSetting")
    if isinstance(value, list) and value:
        try:
            return tuple(round(float(v), 3) for v in value)
        except (TypeError, ValueError):
            return None
    return None


def serves(group: FieldMapGroup, dwi: Image) -> tuple[bool, str]:
    """Whether this field map group may correct this DWI, and why (see the module docstring)."""
    purpose, why = group.purpose()
    if purpose is False:
        return False, why
    dwi_shim = _shims(dwi)
    if dwi_shim is not None:
        for image in group.images:
            shim = _shims(image)
            if shim is not None and shim != dwi_shim:
                return False, "shimmed differently from the DWI: it does not describe the field the DWI saw"
    if group.kind == "epi":
        axis = _pe_axis(dwi)
        if axis is None:
            return False, "the DWI has no PhaseEncodingDirection"
        polarities = group.epi_polarities(axis)
        if not polarities:
            return False, "phase encoding along another axis than the DWI's"
        if polarities == {dwi.phase_encoding}:
            return False, "same phase-encoding direction as the DWI: no reverse-PE information"
        if purpose is None:
            if not any(_same_volume(i, dwi) for i in group.images):
                return False, "its name says nothing and its imaging volume is another (acquired for another scan)"
            why = "in the DWI's imaging volume"
        return True, why
    if purpose is None:
        if dwi_shim is None or not any(_shims(i) == dwi_shim for i in group.images):
            return False, "its name says nothing and no ShimSetting shows it was acquired with the DWI's shim"
        why = "acquired with the DWI's shim settings"
    return True, why


def _reverse_partner(dwi: Image, dwis: Sequence[Image]) -> bool:
    """Whether another DWI of the session is phase-encoded along the same axis in the opposite direction."""
    axis = _pe_axis(dwi)
    return axis is not None and any(
        _pe_axis(o) == axis and o.phase_encoding != dwi.phase_encoding for o in dwis if o is not dwi
    )


def _other_targets(image: Image, final: set[str]) -> set[str]:
    """IntendedFor entries a site's heuristic wrote for images other than DWIs (e.g. fMRI) that still exist."""
    value = image.sidecar.get("IntendedFor")
    entries = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return {e for e in entries if isinstance(e, str) and e in final and "/dwi/" not in e}


def _distance(group: FieldMapGroup, dwi: Image) -> float:
    times = [i.acq_time for i in group.images if i.acq_time is not None]
    if dwi.acq_time is None or not times:
        return math.inf
    return min(abs((t - dwi.acq_time).total_seconds()) for t in times)


def _link(images: list[Image], session: str, report: CurationReport) -> dict[int, dict[str, Any]]:
    """The sidecar changes linking field maps and DWIs: {id(image): {key: value or None (= remove)}}."""
    dwis = sorted((i for i in images if i.target and i.is_dwi), key=lambda i: i.target)
    groups = _groups(images)
    changes: dict[int, dict[str, Any]] = {id(i): {} for i in images}
    assigned: dict[int, list[Image]] = {id(g): [] for g in groups}
    reasons: dict[int, list[str]] = {id(g): [] for g in groups}
    for dwi in dwis:
        candidates = []
        for group in groups:
            ok, why = serves(group, dwi)
            reasons[id(group)].append(f"{Path(dwi.target).name}: {why}")
            if ok:
                candidates.append((0 if group.kind == "epi" else 1, _distance(group, dwi), group.name, group))
        if candidates:
            assigned[id(min(candidates, key=lambda c: c[:3])[3])].append(dwi)
    linked = {id(d) for members in assigned.values() for d in members}
    if any(id(d) not in linked and _reverse_partner(d, dwis) for d in dwis):
        # A DWI no field map serves pairs with an opposite-PE DWI; a link on the others would stop QSIPrep 26
        # inferring that pair (it stops guessing in a curated session), so the DWIs pair among themselves.
        for group in groups:
            if assigned[id(group)]:
                reasons[id(group)].append("not linked: the session's DWIs pair by reverse phase encoding themselves")
            assigned[id(group)] = []
    final = {f"ses-{session}/{i.target}" for i in images if i.target}
    used = [g for g in groups if assigned[id(g)]]
    for number, group in enumerate(sorted(used, key=lambda g: g.name), start=1):
        identifier = f"ses{session}_dwifmap{number}"
        targets = assigned[id(group)]
        intended = [f"ses-{session}/{d.target}" for d in targets]
        for image in group.images:
            changes[id(image)].update({"IntendedFor": sorted({*intended, *_other_targets(image, final)}),
                                       "B0FieldIdentifier": identifier})
        single = group.kind == "epi" and len({i.phase_encoding for i in group.images}) == 1
        for dwi in targets:
            changes[id(dwi)]["B0FieldSource"] = identifier
            if single:
                changes[id(dwi)]["B0FieldIdentifier"] = identifier
        report.field_maps.append({
            "files": [i.target for i in group.images],
            "B0FieldIdentifier": identifier,
            "serves": [d.target for d in targets],
            "reason": "; ".join(sorted(set(reasons[id(group)]))),
        })  # fmt: skip
    for group in groups:
        if assigned[id(group)]:
            continue
        for image in group.images:
            changes[id(image)].update({"IntendedFor": sorted(_other_targets(image, final)) or None,
                                       "B0FieldIdentifier": None})
        reasons_text = "; ".join(sorted(set(reasons[id(group)]))) or "no DWI in the session"
        report.field_maps.append({"files": [i.target for i in group.images], "B0FieldIdentifier": None,
                                  "serves": [], "reason": reasons_text})  # fmt: skip
    for dwi in dwis:
        if "B0FieldSource" not in changes[id(dwi)]:
            changes[id(dwi)].update({"B0FieldSource": None, "B0FieldIdentifier": None})
    return changes


# --------------------------------------------------------------------------- applying it


def _move(folder: Path, image: Image, plan: list[tuple[Path, Path]]) -> None:
    old, new = folder / _stem(image.source), folder / _stem(image.target)
    for ext in (".nii.gz", ".nii", *SIDECAR_EXTENSIONS):
        if Path(f"{old}{ext}").exists():
            if ext in (".bval", ".bvec") and image.suffix != "dwi":
                continue  # removed below: b=0 field maps carry none
            plan.append((Path(f"{old}{ext}"), Path(f"{new}{ext}")))


def _remove_files(folder: Path, rel: str, extensions: Iterable[str]) -> None:
    for ext in extensions:
        Path(f"{folder / _stem(rel)}{ext}").unlink(missing_ok=True)


def _write_sidecar(path: Path, sidecar: dict[str, Any], change: Mapping[str, Any]) -> None:
    if not change:
        return
    data = dict(sidecar)
    for key, value in change.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    if data != sidecar:
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def curate_session(
    staging_dir: str | os.PathLike[str],
    participant: str,
    session: str,
    *,
    series: Sequence[Mapping[str, Any]] = (),
) -> CurationReport:
    """Apply the rules of the module docstring to the staged session ``staging_dir/sub-X/ses-Y`` in place.

    ``series``: the heuristic's decision per DICOM series (``series_decisions``), recorded in the report.
    Idempotent: a curated session is left as it is. Raises CurationError when a file cannot be read.
    """
    folder = session_dir(Path(staging_dir), participant, session)
    report = CurationReport(series=list(series))
    if not folder.is_dir():
        return report
    images = inventory(folder, participant, session)
    decisions: dict[int, tuple[str, str]] = {}
    original = {id(i): (i.datatype, i.suffix) for i in images}
    _route_by_content(images, decisions, report.warnings)
    _check_fmaps(images, decisions, report.warnings)
    _name_images(images, participant, session, report.warnings)
    changes = _link(images, session, report)
    for image in images:
        if image.target and original[id(image)][0] == "fmap" and image.datatype == "dwi":
            changes[id(image)].setdefault("IntendedFor", None)
    # Files: left-out images go, renamed ones move (through hidden temporary names: names may swap).
    plan: list[tuple[Path, Path]] = []
    for image in images:
        if not image.target:
            _remove_files(folder, image.source, (".nii.gz", ".nii", *SIDECAR_EXTENSIONS))
        elif image.target != image.source:
            _move(folder, image, plan)
        if image.target and image.suffix == "epi":
            _remove_files(folder, image.source, (".bval", ".bvec"))
    temporary = [(old, old.with_name(f".curate-{uuid.uuid4().hex[:8]}-{old.name}"), new) for old, new in plan]
    for old, tmp, _new in temporary:
        os.rename(old, tmp)
    for _old, tmp, new in temporary:
        new.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, new)
    for image in images:
        if image.target:
            _write_sidecar(folder / f"{_stem(image.target)}.json", image.sidecar, changes.get(id(image), {}))
    for sub in folder.iterdir():
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    _update_scans(folder, participant, session, images)
    for image in images:
        action, why = decisions.get(id(image), ("kept", ""))
        if action == "kept" and image.target != image.source:
            action, why = "renamed", "; ".join(image.notes)
        elif image.notes and image.target:
            why = "; ".join([why, *image.notes]) if why else "; ".join(image.notes)
        report.files.append(FileDecision(image.source, image.target or None, image.series, action, why))
    return report


def _update_scans(folder: Path, participant: str, session: str, images: list[Image]) -> None:
    table = scans_table(folder, participant, session)
    columns, rows = read_tsv(table)
    if not columns:
        return
    renamed = {i.source: i.target for i in images}
    kept = []
    for row in rows:
        name = row.get("filename", "")
        if name in renamed:
            if not renamed[name]:
                continue
            row = {**row, "filename": renamed[name]}
        kept.append(row)
    if kept != rows:
        write_tsv(table, columns, kept)


# --------------------------------------------------------------------------- why each series went where


def _typed(row: Mapping[str, str]) -> SimpleNamespace:
    """A dicominfo row back into SeqInfo-like values (HeudiConv writes them as text)."""
    values: dict[str, Any] = dict(row)
    for key in ("dim1", "dim2", "dim3", "dim4", "series_files", "total_files_till_now"):
        try:
            values[key] = int(values.get(key) or 0)
        except ValueError:
            values[key] = 0
    for key in ("TR", "TE"):
        try:
            values[key] = float(values.get(key) or 0)
        except ValueError:
            values[key] = 0.0
    for key in ("is_derived", "is_motion_corrected"):
        values[key] = str(values.get(key)).strip() == "True"
    try:
        values["image_type"] = tuple(ast.literal_eval(values.get("image_type") or "()"))
    except (ValueError, SyntaxError):
        values["image_type"] = tuple(str(values.get("image_type") or "").split("\\"))
    try:  # what the heuristic's custom_seqinfo returned, e.g. "(('volumes', 7), ('max_b', 1000.0))"
        values["custom"] = ast.literal_eval(values.get("custom") or "None")
    except (ValueError, SyntaxError):
        values["custom"] = None
    return SimpleNamespace(**values)


def series_decisions(staging_dir: str | os.PathLike[str], participant: str, session: str,
                     heuristic: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The heuristic's decision and reason for every DICOM series of the session, from the ``dicominfo``
    table HeudiConv left in the staging folder. A heuristic without ``decide`` (a site's own) is recorded
    by the names it gave (HeudiConv's ``.edit.txt``)."""
    info = Path(staging_dir) / ".heudiconv" / participant / f"ses-{session}" / "info"
    _, rows = read_tsv(info / f"dicominfo_ses-{session}.tsv")
    if not rows:
        return []
    module_name = f"_neuroflow_heuristic_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, heuristic)
    decide = None
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            decide = getattr(module, "decide", None)
        finally:
            sys.modules.pop(module_name, None)
    seqs = [_typed(r) for r in rows]
    if decide is None:
        named = _edit_names(info, session)
        return [{"series": s.series_id, "target": named.get(s.series_id), "reason": "site heuristic"} for s in seqs]
    return [{"series": d.series_id, "target": d.target, "reason": d.reason} for d in decide(seqs)]


def _edit_names(info: Path, session: str) -> dict[str, str]:
    edit = next(iter(sorted(info.glob(f"*ses-{session}.edit.txt"))), None)
    if edit is None:
        return {}
    try:
        mapping = ast.literal_eval(edit.read_text(encoding="utf-8"))
    except (OSError, ValueError, SyntaxError):
        return {}
    out: dict[str, str] = {}
    for key, members in mapping.items():
        template = key[0] if isinstance(key, tuple) else str(key)
        for member in members:
            item = member.get("item") if isinstance(member, dict) else member
            out[str(item)] = str(template).rsplit("/", 1)[-1]
    return out


def curate_conversion(
    staging_dir: str | os.PathLike[str], participant: str, session: str, heuristic: str | os.PathLike[str]
) -> CurationReport:
    """What the conversion runs on HeudiConv's output: ``curate_session`` with the heuristic's reason for
    every DICOM series. A site heuristic that cannot be loaded here (it imports what only its container
    has) still converts; its series are then recorded without reasons."""
    try:
        series = series_decisions(staging_dir, participant, session, heuristic)
    except Exception as exc:  # a site's heuristic module: anything it raises on import or in decide()
        series = [{"series": None, "target": None, "reason": f"heuristic not explained here: {exc}"}]
    return curate_session(staging_dir, participant, session, series=series)
