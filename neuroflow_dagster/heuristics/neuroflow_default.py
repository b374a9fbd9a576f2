"""The shipped HeudiConv heuristic: DICOM series -> BIDS names for a brain-bank MRI session.

HeudiConv imports this file by path (``heudiconv -f .../neuroflow_default.py``),
also inside a container where neuroflow_dagster is not installed, so it must
stay self-contained: standard library only.

Why a heuristic of our own: HeudiConv's built-in ``convertall`` writes names
that are not BIDS, and the validator (and QSIPrep after it) rejects them.
Here every output name is a BIDS name, with sessions
(``sub-<label>/ses-<label>/<datatype>/sub-<label>_ses-<label>_..``) via
HeudiConv's ``{bids_subject_session_dir}`` / ``{bids_subject_session_prefix}``
fields, exactly as its ``bids_with_ses`` example does.

Classification (first rule that matches wins), on SeriesDescription /
ProtocolName (case-insensitive) and ImageType:

=========================  ===============================================  =============================
skipped                    localizer/scout/survey/calibration, derived      (not raw data)
                           images (ImageType DERIVED, ADC/FA/TRACEW/...),
                           motion-corrected (MOCO) series, phase-only
                           copies of anatomy
dwi ``_sbref``             SBRef in description or ImageType, diffusion      dwi/
fmap ``_epi``              named as reverse-PE / TOPUP / spin-echo field    fmap/ ``acq-dwi_dir-XX``
                           map, or a short (<= 6 volumes) diffusion series
                           named b0 (e.g. ``dMRI_b0_PA``)
dwi ``_dwi``               ImageType DIFFUSION or dwi/dti/diffusion/dMRI    dwi/ (``dir-XX`` when named)
fmap ``_phasediff``        gre field map with ImageType P                   fmap/ ``acq-dwi``
fmap ``_magnitude{1,2}``   gre field map otherwise (two echoes -> 1, 2)     fmap/ ``acq-dwi``
anat ``_FLAIR``            'flair'                                           anat/
anat ``_T2w``              token T2/T2w (not T2*, not FLAIR)                 anat/
anat ``_T1w``              'mprage', 'mp-rage', 'spgr', 'bravo', token T1    anat/
=========================  ===============================================  =============================

Several series with the same name get ``run-01``, ``run-02``, ... (in
acquisition order); a single one gets no run entity. Field maps carry
``acq-dwi`` because this bank's pipelines are diffusion only; that label is
also what HeudiConv's ``ModalityAcquisitionLabel`` matching needs to write
``IntendedFor`` into the field map sidecars (see POPULATE_INTENDED_FOR_OPTS).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

# HeudiConv reads this to fill IntendedFor of every field map with the
# dwi/ files of the same session (matching fmap acq-dwi <-> dwi/ datatype).
POPULATE_INTENDED_FOR_OPTS = {
    "matching_parameters": ["ModalityAcquisitionLabel"],
    "criterion": "Closest",
}

_SKIP_DESC = re.compile(
    r"local|scout|survey|calibration|aahead|_mpr_|\bmpr\b|screen.?save|phoenix|report|"
    r"(^|[^a-z0-9])loc([^a-z0-9]|$)|"
    r"(^|[^a-z0-9])(adc|fa|trace|tracew|colfa|tensor|exp|md)([^a-z0-9]|$)",
    re.IGNORECASE,
)
_DERIVED_IMAGE_TYPES = {"DERIVED", "ADC", "FA", "TRACEW", "TRACE", "COLFA", "TENSOR", "EXP", "MOCO"}
_SBREF = re.compile(r"sbref", re.IGNORECASE)
_DWI_DESC = re.compile(r"dwi|dti|diff|dmri|hardi|(^|[^a-z0-9])ep2d_d", re.IGNORECASE)
_SE_FMAP_DESC = re.compile(
    r"topup|rev(erse)?.?pe|blip|pepolar|se.?fmap|sefmap|spin.?echo.?field|fmap.?se|se.?epi",
    re.IGNORECASE,
)
_B0_TOKEN = re.compile(r"(^|[^a-z0-9])b0(.?only)?([^a-z0-9]|$)", re.IGNORECASE)
# A diffusion series named "b0" is a field map only if it is short; "DTI_b0_1000_30dir" is not.
_MAX_B0_FMAP_VOLUMES = 6
_GRE_FMAP_DESC = re.compile(r"field.?map|fmap|b0.?map|gre_field", re.IGNORECASE)
_FLAIR = re.compile(r"flair", re.IGNORECASE)
_T2 = re.compile(r"(^|[^a-z0-9])t2w?(?![a-z0-9*])(?!.?star)|t2.?space|t2.?tse", re.IGNORECASE)
_T2STAR = re.compile(r"t2\*|t2.?star|swi|t2.?fl2d|(^|[^a-z0-9])gre([^a-z0-9]|$)", re.IGNORECASE)
_T1 = re.compile(
    r"mp.?rage|spgr|bravo|tfl3d|(^|[^a-z0-9])t1w?(?![a-z0-9])|t1.?(mprage|tfe|space|se)",
    re.IGNORECASE,
)
_DIR = re.compile(r"(?:^|[^a-z0-9])(ap|pa|lr|rl|si|is)(?:[^a-z0-9]|$)", re.IGNORECASE)


def create_key(
    template: str | None,
    outtype: tuple[str, ...] = ("nii.gz",),
    annotation_classes: None = None,
) -> tuple[str, tuple[str, ...], None]:
    """HeudiConv's key triple: output template, output types, annotations (unused)."""
    if not template:
        raise ValueError("Template must be a valid format string")
    return (template, outtype, annotation_classes)


def _text(seq: Any) -> str:
    """Description and protocol together: some scanners fill only one of them."""
    parts = [getattr(seq, "series_description", "") or "", getattr(seq, "protocol_name", "") or ""]
    return " ".join(p for p in parts if p)


def _image_type(seq: Any) -> set[str]:
    return {str(t).upper() for t in (getattr(seq, "image_type", None) or ())}


def phase_encoding_label(text: str) -> str | None:
    """'AP'/'PA'/'LR'/'RL'/'SI'/'IS' when the series name says so (dMRI_mb3_AP -> 'AP')."""
    found = _DIR.findall(text.replace("-", "_"))
    return found[-1].upper() if found else None


def classify(seq: Any) -> tuple[str, str, dict[str, str]] | None:
    """Return (datatype, suffix, entities) for one HeudiConv SeqInfo, or None to skip it.

    ``seq`` needs the SeqInfo fields series_description, protocol_name,
    image_type, is_derived and is_motion_corrected; a plain object with these
    attributes works too (the unit tests use one).
    """
    text = _text(seq)
    image_type = _image_type(seq)
    if not text and not image_type:
        return None
    if getattr(seq, "is_derived", False) or getattr(seq, "is_motion_corrected", False):
        return None
    if image_type & _DERIVED_IMAGE_TYPES or _SKIP_DESC.search(text):
        return None
    direction = phase_encoding_label(text)
    is_diffusion = "DIFFUSION" in image_type or bool(_DWI_DESC.search(text))
    if _SBREF.search(text) or "SBREF" in image_type:
        if is_diffusion:
            return ("dwi", "sbref", {"dir": direction} if direction else {})
        return None  # SBRefs of fMRI runs: no func/ naming in this heuristic
    volumes = getattr(seq, "dim4", None)
    short = isinstance(volumes, int) and 0 < volumes <= _MAX_B0_FMAP_VOLUMES
    if _SE_FMAP_DESC.search(text) or (is_diffusion and short and _B0_TOKEN.search(text)):
        return ("fmap", "epi", {"acq": "dwi", "dir": direction or "unknown"})
    if is_diffusion:
        return ("dwi", "dwi", {"dir": direction} if direction else {})
    if _GRE_FMAP_DESC.search(text):
        if "P" in image_type or "PHASE" in image_type:
            return ("fmap", "phasediff", {"acq": "dwi"})
        return ("fmap", "magnitude", {"acq": "dwi"})
    if "P" in image_type and "M" not in image_type:
        return None  # phase images of anatomy (e.g. SWI phase): not a BIDS anat suffix we name
    if _FLAIR.search(text):
        return ("anat", "FLAIR", {})
    if _T2STAR.search(text):
        return None
    if _T2.search(text):
        return ("anat", "T2w", {})
    if _T1.search(text):
        return ("anat", "T1w", {})
    return None


_ENTITY_ORDER = ("acq", "dir", "run")


def bids_template(datatype: str, suffix: str, entities: dict[str, str], with_run: bool) -> str:
    """HeudiConv output template with entities in BIDS order; run is HeudiConv's {item}."""
    parts = ["{bids_subject_session_prefix}"]
    values = dict(entities)
    if with_run:
        values["run"] = "{item:02d}"
    for name in _ENTITY_ORDER:
        if values.get(name):
            parts.append(f"{name}-{values[name]}")
    parts.append(suffix)
    return "{bids_subject_session_dir}/" + datatype + "/" + "_".join(parts)


def _order_key(seq: Any) -> tuple[Any, ...]:
    return (getattr(seq, "time", None) or "", getattr(seq, "series_id", ""))


def infotodict(seqinfo: Iterable[Any]) -> dict[tuple[str, tuple[str, ...], None], list[Any]]:
    """HeudiConv entry point: {key: [series_id, ...]} for every series we name."""
    groups: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[Any]] = {}
    for seq in seqinfo:
        found = classify(seq)
        if found is None:
            continue
        datatype, suffix, entities = found
        groups.setdefault((datatype, suffix, tuple(sorted(entities.items()))), []).append(seq)
    info: dict[tuple[str, tuple[str, ...], None], list[Any]] = {}
    for (datatype, suffix, entities), members in groups.items():
        key = create_key(bids_template(datatype, suffix, dict(entities), with_run=len(members) > 1))
        info[key] = [s.series_id for s in sorted(members, key=_order_key)]
    return info


def names_for(seqinfo: Sequence[Any], subject: str, session: str) -> dict[str, str]:
    """series_id -> BIDS path prefix this heuristic gives it (for tests and dry runs, no HeudiConv)."""
    out: dict[str, str] = {}
    for (template, _types, _ann), series in infotodict(seqinfo).items():
        for index, series_id in enumerate(series, start=1):
            out[series_id] = template.format(
                bids_subject_session_prefix=f"sub-{subject}_ses-{session}",
                bids_subject_session_dir=f"sub-{subject}/ses-{session}",
                item=index,
            )
    return out
