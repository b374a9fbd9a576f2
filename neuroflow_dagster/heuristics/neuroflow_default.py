"""The shipped HeudiConv heuristic: DICOM series -> BIDS names for a brain-bank MRI session.

HeudiConv imports this file by path (``heudiconv -f .../neuroflow_default.py``),
also inside a container where neuroflow_dagster is not installed, so it must
stay self-contained: standard library only.

Why a heuristic of our own: HeudiConv's built-in ``convertall`` writes names
that are not BIDS, and the validator (and QSIPrep after it) rejects them.
Every output name here is a BIDS name with sessions
(``sub-<label>/ses-<label>/<datatype>/sub-<label>_ses-<label>_..``).

This is the FIRST cut, from what HeudiConv knows before conversion. A
``SeqInfo`` has no b-values and no phase-encoding polarity, and for classic
one-file-per-slice DICOM its ``dim4`` is 1 whatever the number of volumes, so
``custom_seqinfo`` (HeudiConv calls it for every series) reads the headers of a
diffusion-like series for its number of volumes and largest b-value (pydicom,
which HeudiConv itself depends on, imported there only): a b=0-only series goes
to ``fmap/`` as an ``epi`` field map, a single diffusion-weighted volume is
skipped, a full DWI named as a field map goes to ``dwi/``. What the converted
files contain decides the rest after dcm2niix has run
(``neuroflow_dagster.bids.curate``, docs/domain-rules.md#conversion): the same
routing by the ``.bval`` for vendors whose b-values are not read here, ``dir-``
from ``PhaseEncodingDirection``, IntendedFor and B0FieldIdentifier/B0FieldSource.
This heuristic therefore sets no ``POPULATE_INTENDED_FOR_OPTS``.

Series are classified by their SeriesDescription (ProtocolName when it is
empty: GE writes the exam's protocol there, the same for every series), as
lower-case tokens, and by ImageType; the first rule that matches wins:

=================================  ==========================================  ===================
skipped                            localizer/scout/survey/calibration/bias,    (not raw data we use)
                                   setter/navigator, reports, MOCO, derived
                                   maps (ADC/FA/TRACEW/ColFA, reformats),
                                   other DERIVED images (except an RMS
                                   combination), fMRI and its field maps
dwi ``_sbref``                     SBRef of a diffusion series                 dwi/ ``dir-XX``
dwi ``_dwi``                       ImageType DIFFUSION (b=0 only in its        dwi/ ``dir-XX``
                                   headers: fmap ``acq-dwi`` ``_epi``)
fmap ``_epi``                      spin-echo field map by name (SpinEcho,      fmap/ ``[acq-dwi_]dir-XX``
                                   DistortionMap, TOPUP, blip, revPE, ...)
fmap ``_phasediff``/``_magnitude`` gradient-echo field map by name (phase:     fmap/ ``[acq-dwi]``
                                   ImageType P; with AP/PA/.. in the name:
                                   an EPI field map, ``_epi``)
dwi ``_dwi``                       diffusion by name (dwi, dti, diff, dMRI,    dwi/ ``dir-XX``
                                   NODDI, DKI, DSI; a b0 EPI series)
anat ``_FLAIR``                    flair, dark-fluid (da-fl), T2 tirm (a T1    anat/
                                   FLAIR without t2 is a T1w)
anat ``_T2w``                      t2, t2w, sT2W (not T2*, SWI, PD)            anat/
anat ``_T1w``                      t1, t1w, sT1W, mprage, mpr, spgr, fspgr,    anat/
                                   bravo, tfl3d (not MP2RAGE)
=================================  ==========================================  ===================

``acq-dwi`` is written on a field map only when its name says it was acquired
for diffusion; curation decides by content and geometry which field map
serves which DWI. Then two cross-series rules: the per-echo series of a
multi-echo MPRAGE are skipped when its RMS combination is there (the RMS is
the T1w), and of Siemens copies of one acquisition that differ only in their
reconstruction flags (unfiltered ND vs prescan-normalized NORM, ND vs
distortion-corrected DIS2D/DIS3D) only the most corrected one is kept:
prescan normalization removes the receive-coil intensity bias that hampers
skull stripping and registration, and the vendor's gradient-nonlinearity
correction gives the truer geometry. Several remaining series with one name
get ``run-01``, ``run-02``, ... in acquisition order.

``decide(seqinfo)`` gives every series its decision with the reason; neuroflow
calls it again on HeudiConv's ``dicominfo`` table to record why each series
went where (the provenance of the session).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

# QSIPrep's default --b0-threshold: volumes at or below it are b=0 images (as in bids/curate.py).
B0_THRESHOLD = 100.0
# Entities in BIDS order (run is HeudiConv's {item}).
_ENTITY_ORDER = ("acq", "dir", "run")

_LOCALIZER = {
    "localizer", "localiser", "scout", "survey", "loc", "3plane", "aahead", "autoalign", "smartbrain",
    "refscan", "calibration", "cal", "bias", "phoenix", "phoenixzipreport", "report", "screensave",
}  # fmt: skip
_NAVIGATOR = {"setter", "nav", "navigator", "navigators", "moco", "mocoseries"}
_DERIVED_NAMES = {"adc", "eadc", "fa", "colfa", "tracew", "trace", "tensor", "exp", "md", "isotropic", "t1map", "t2map"}
_DERIVED_TYPES = {
    "ADC", "EADC", "FA", "COLFA", "TRACEW", "TRACE", "TENSOR", "EXP", "ISOTROPIC", "MPR", "REFORMATTED",
    "PROJECTION IMAGE", "MIP", "MOCO", "T1 MAP", "T2 MAP", "SUBTRACTION", "CSA REPORT", "CSAPARALLEL",
}  # fmt: skip
_COMBINED_TYPES = {"RMS", "MEAN"}
_FMRI = {"bold", "fmri", "rfmri", "tfmri", "rsfmri", "fcmri", "rest", "resting", "func", "task"}
_DIFFUSION_PREFIXES = ("dwi", "dti", "diff", "dmri", "hardi", "mddw", "noddi", "dki", "dsi")
_B0_WORD = re.compile(r"^b0(rev|ap|pa|lr|rl|si|is)?$")  # a b=0 EPI series: its content decides (dwi/ or fmap/)
_DIFFUSION_SUFFIXES = ("dwi", "dti")
_SE_FMAP = (
    "spinecho", "distortion", "topup", "sefmap", "fmapse", "seepi", "epise", "pepolar", "revpe", "reversepe",
    "reversephase", "blip", "b0rev", "revb0", "oppositepe",
)  # fmt: skip
_GRE_FMAP = ("fieldmap", "b0map", "grefield")
_GRE_FMAP_TOKENS = {"fmap", "fieldmap", "fieldmapping"}
_T2STAR = {"t2star", "swi", "swan", "qsm", "megre", "medic", "hemo", "susceptibility"}
_T2STAR_WITH_T2 = {"star", "gre", "fl2d", "fl3d", "medic", "hemo"}
_PD = {"pd", "pdw", "pdt2", "pdw2"}
_T2 = re.compile(r"^s?t2(w|tse|spc|space|cube|flair)?$")
_T1 = re.compile(r"^s?t1(w|tfe|ffe|mprage|mpr|se|spgr)?$")
_T1_WORDS = {"mprage", "mpr", "memprage", "spgr", "fspgr", "irfspgr", "bravo", "tfl3d", "tfe"}
_DIRECTIONS = {"ap", "pa", "lr", "rl", "si", "is"}
# Reconstruction flags that tell Siemens copies of one acquisition apart (see the module docstring).
_COPY_MARKERS = {"nd", "norm", "dis2d", "dis3d", "unfiltered", "filtered", "fil", "rms"}


class Decision(NamedTuple):
    """What the heuristic does with one series, and why (datatype None = skipped)."""

    series_id: str
    description: str
    datatype: str | None
    suffix: str | None
    entities: tuple[tuple[str, str], ...]
    reason: str

    @property
    def target(self) -> str | None:
        """``anat/T1w``, ``fmap/acq-dwi_dir-PA_epi``, ... (None when skipped)."""
        if self.datatype is None or self.suffix is None:
            return None
        names = [f"{k}-{v}" for k, v in self.entities]
        return f"{self.datatype}/" + "_".join([*names, self.suffix])


def create_key(
    template: str | None,
    outtype: tuple[str, ...] = ("nii.gz",),
    annotation_classes: None = None,
) -> tuple[str, tuple[str, ...], None]:
    """HeudiConv's key triple: output template, output types, annotations (unused)."""
    if not template:
        raise ValueError("Template must be a valid format string")
    return (template, outtype, annotation_classes)


def series_text(seq: Any) -> str:
    """The name a series is classified by: its description, else its protocol name."""
    description = (getattr(seq, "series_description", "") or "").strip()
    return description or (getattr(seq, "protocol_name", "") or "").strip()


def tokens(text: str) -> list[str]:
    """Lower-case alphanumeric words: 'ABCD_T1w_MPR_vNav' -> ['abcd', 't1w', 'mpr', 'vnav']."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _image_type(seq: Any) -> set[str]:
    value = getattr(seq, "image_type", None) or ()
    if isinstance(value, str):  # "('ORIGINAL', ...)" from a dicominfo table, or "ORIGINAL\\PRIMARY"
        value = re.findall(r"[A-Za-z0-9_ ]+", value.replace("\\", "','"))
    return {str(t).strip().upper() for t in value if str(t).strip()}


def phase_encoding_label(text: str) -> str | None:
    """'AP'/'PA'/'LR'/'RL'/'SI'/'IS' when the series name says so (dMRI_mb3_AP -> 'AP'); the last one wins."""
    found = [t for t in tokens(text) if t in _DIRECTIONS]
    return found[-1].upper() if found else None


def _is_diffusion_name(words: Sequence[str]) -> str | None:
    for word in words:
        if word.startswith(_DIFFUSION_PREFIXES) or word.endswith(_DIFFUSION_SUFFIXES) or _B0_WORD.match(word):
            return word
    return None


def _is_fmri_name(words: Sequence[str]) -> str | None:
    for word in words:
        if word in _FMRI or word.startswith(("fmri", "rfmri", "tfmri")):
            return word
    return None


def _contains(compact: str, parts: Iterable[str]) -> str | None:
    return next((p for p in parts if p in compact), None)


def _skip(seq: Any, reason: str) -> Decision:
    return Decision(str(getattr(seq, "series_id", "")), series_text(seq), None, None, (), reason)


def _named(seq: Any, datatype: str, suffix: str, entities: dict[str, str | None], reason: str) -> Decision:
    kept = tuple((k, v) for k in _ENTITY_ORDER for v in [entities.get(k)] if v)
    return Decision(str(getattr(seq, "series_id", "")), series_text(seq), datatype, suffix, kept, reason)


def classify(seq: Any) -> Decision:
    """The decision for one series on its own (``decide`` adds the rules across series).

    ``seq`` needs the SeqInfo fields series_description, protocol_name,
    image_type, is_derived and is_motion_corrected (series_id for the result);
    a plain object with these attributes works too (the unit tests use one).
    """
    text = series_text(seq)
    words = tokens(text)
    word_set = set(words)
    compact = "".join(words)
    image_type = _image_type(seq)
    if not text and not image_type:
        return _skip(seq, "no SeriesDescription, ProtocolName or ImageType")
    if hit := (word_set & _LOCALIZER) or _contains(compact, ("localizer", "localiser", "scout", "aahead")):
        return _skip(seq, f"localizer, calibration or report ({_first(hit)})")
    if "CSA REPORT" in image_type:
        return _skip(seq, "scanner report (ImageType CSA REPORT)")
    if hit := word_set & _NAVIGATOR:
        return _skip(seq, f"navigator, setter or motion-corrected series ({_first(hit)})")
    if getattr(seq, "is_motion_corrected", False) or "MOCO" in image_type:
        return _skip(seq, "motion-corrected copy (ImageType MOCO)")
    if hit := image_type & _DERIVED_TYPES:
        return _skip(seq, f"derived map or reformat (ImageType {_first(hit)})")
    if hit := word_set & _DERIVED_NAMES:
        return _skip(seq, f"derived map ({_first(hit)} in the name)")
    combined = bool(image_type & _COMBINED_TYPES) or "rms" in word_set
    derived = "DERIVED" in image_type or bool(getattr(seq, "is_derived", False))
    if derived and not combined:
        return _skip(seq, "derived image (ImageType DERIVED)")
    direction = phase_encoding_label(text)
    diffusion_type = "DIFFUSION" in image_type
    diffusion_word = _is_diffusion_name(words)
    fmri_word = _is_fmri_name(words) if not diffusion_word else None
    if "sbref" in word_set or "SBREF" in image_type:
        if diffusion_type or diffusion_word:
            return _named(seq, "dwi", "sbref", {"dir": direction}, "single-band reference of a diffusion series")
        return _skip(seq, "single-band reference of a non-diffusion series (fMRI is not converted)")
    if diffusion_type:
        return _diffusion(seq, direction, "diffusion series (ImageType DIFFUSION)")
    se_fmap = _contains(compact, _SE_FMAP)
    gre_fmap = (word_set & _GRE_FMAP_TOKENS) or _contains(compact, _GRE_FMAP)
    if (se_fmap or gre_fmap) and fmri_word:
        return _skip(seq, f"field map acquired for fMRI ({fmri_word} in the name): fMRI is not converted")
    purpose = {"acq": "dwi"} if diffusion_word else {}
    why = f" for diffusion ({diffusion_word} in the name)" if diffusion_word else ""
    if se_fmap:
        content = _content(seq)
        if content.get("max_b", -1) > B0_THRESHOLD and content.get("volumes", 0) > 1:
            return _diffusion(seq, direction, f"a full diffusion series named as a field map ({se_fmap})")
        return _named(seq, "fmap", "epi", {**purpose, "dir": direction}, f"spin-echo EPI field map ({se_fmap}){why}")
    if gre_fmap and direction and not image_type & {"P", "PHASE"}:
        # A gradient-echo field map has no phase-encoding direction in its name; one that does is EPI.
        return _named(seq, "fmap", "epi", {**purpose, "dir": direction}, f"EPI field map (field map, {direction}){why}")
    if gre_fmap:
        if image_type & {"P", "PHASE"}:
            return _named(seq, "fmap", "phasediff", purpose, f"gradient-echo field map, phase (ImageType P){why}")
        return _named(seq, "fmap", "magnitude", purpose, f"gradient-echo field map, magnitude{why}")
    if diffusion_word:
        return _diffusion(seq, direction, f"diffusion series ({diffusion_word} in the name)")
    if fmri_word:
        return _skip(seq, f"functional MRI ({fmri_word} in the name): not converted, the pipelines are diffusion only")
    return _classify_anatomy(seq, text, words, word_set, compact, image_type)


def _diffusion(seq: Any, direction: str | None, why: str) -> Decision:
    """A diffusion-like series: a DWI, unless its headers show b=0 only (a field map) or one weighted volume."""
    content = _content(seq)
    max_b, volumes = content.get("max_b", -1), content.get("volumes", 0)
    if 0 <= max_b <= B0_THRESHOLD:
        return _named(seq, "fmap", "epi", {"acq": "dwi", "dir": direction},
                      f"{why}, b=0 only in its headers ({volumes or '?'} volume(s)): a field map for diffusion")
    if max_b > B0_THRESHOLD and volumes == 1:
        return _skip(seq, f"{why}, but a single diffusion-weighted volume: not a DWI QSIPrep can use (3D)")
    return _named(seq, "dwi", "dwi", {"dir": direction}, why)


def _content(seq: Any) -> dict[str, Any]:
    """What custom_seqinfo read from the series' headers ({} when nothing: not diffusion-like, unknown vendor)."""
    custom = getattr(seq, "custom", None)
    try:
        return {str(k): v for k, v in custom} if custom else {}
    except (TypeError, ValueError):
        return {}


def custom_seqinfo(wrapper: Any, series_files: list[str]) -> tuple[tuple[str, Any], ...] | None:
    """HeudiConv hook, called per series: (("volumes", n), ("max_b", b)) of a diffusion-like series.

    Reads the headers only (no pixels) and only of series that look like diffusion or an EPI field map,
    and stops at the first diffusion-weighted file once a slice position repeats (volumes -1: several,
    not counted): a b=0-only series, the one whose routing depends on it, is always read whole.
    b-values: standard (0018,9087), Siemens (0019,100C), GE (0043,1039), Philips (2001,1003). Volumes:
    files / distinct slice positions (a mosaic file is a whole volume at one position). None when unknown
    (enhanced multi-frame, no b-value tag): curation decides from dcm2niix's .bval then.
    """
    ds = getattr(wrapper, "dcm_data", None)
    if ds is None:
        return None
    text = str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or "")
    words = tokens(text)
    image_type = {str(t).upper() for t in (ds.get("ImageType") or ())}
    if "DERIVED" in image_type or not (
        "DIFFUSION" in image_type or _is_diffusion_name(words) or _contains("".join(words), _SE_FMAP)
    ):
        return None
    try:
        import pydicom  # HeudiConv depends on it: present wherever this heuristic runs
    except ImportError:
        return None
    positions: set[tuple[float, ...]] = set()
    max_b: float | None = None
    several = False  # a slice position seen twice: more than one volume
    for path in series_files:
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_CONTENT_TAGS))
        except Exception:  # an unreadable file: HeudiConv reports it; nothing to learn here
            continue
        if int(head.get("NumberOfFrames", 1) or 1) > 1:
            return None  # enhanced multi-frame: b-values per frame, left to curation
        position = head.get("ImagePositionPatient")
        if position is not None:
            key = tuple(round(float(v), 2) for v in position)
            several = several or key in positions
            positions.add(key)
        b = _b_value(head)
        if b is not None:
            max_b = b if max_b is None else max(max_b, b)
        if several and max_b is not None and max_b > B0_THRESHOLD:
            return (("volumes", -1), ("max_b", max_b))  # a multi-volume DWI: no need to read on
    if max_b is None:
        return None  # no b-value this reader knows (or a spin-echo field map): left to curation
    # Mosaics (one volume per file) share one position; classic files have one position per slice.
    return (("volumes", len(series_files) // max(len(positions), 1)), ("max_b", max_b))


_CONTENT_TAGS = (0x00189087, 0x0019100C, 0x00431039, 0x20011003, 0x00200032, 0x00280008)


def _b_value(head: Any) -> float | None:
    for tag in (0x00189087, 0x0019100C, 0x00431039, 0x20011003):
        if tag not in head:
            continue
        value = head[tag].value
        if isinstance(value, bytes) and tag == 0x20011003 and len(value) == 4:
            value = struct.unpack("<f", value)[0]  # Philips: a binary float (implicit VR files)
        elif isinstance(value, bytes):
            value = value.decode("latin-1", "replace").strip("\x00 ").split("\\")[0]
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0] if len(value) else None
        try:
            b = float(value)
        except (TypeError, ValueError):
            continue
        return b % 1e9 if tag == 0x00431039 else b  # GE adds 1e9 to flag the b-value
    return None


def _classify_anatomy(
    seq: Any, text: str, words: list[str], word_set: set[str], compact: str, image_type: set[str]
) -> Decision:
    if ("P" in image_type and "M" not in image_type) or "PHASE" in image_type:
        return _skip(seq, "phase image of an anatomical series")
    if "MOSAIC" in image_type:
        return _skip(seq, "EPI mosaic (a navigator or fMRI-like series), not an anatomical image")
    if "mp2rage" in compact:
        return _skip(seq, "MP2RAGE image (INV1/INV2/UNI/T1 map): not a BIDS T1w")
    t1_word = next((w for w in words if _T1.match(w) or w in _T1_WORDS), None)
    if "flair" in compact or "darkfluid" in compact or "dafl" in compact or ("tirm" in word_set and _has_t2(words)):
        if t1_word and not _has_t2(words):  # GE's T1 FLAIR: an inversion-prepared T1-weighted image
            return _named(seq, "anat", "T1w", {}, f"T1-weighted FLAIR ({t1_word} in the name)")
        return _named(seq, "anat", "FLAIR", {}, "FLAIR (flair / dark-fluid in the name)")
    if "t2star" in compact or "t2*" in text.lower() or word_set & _T2STAR or (
        _has_t2(words) and word_set & _T2STAR_WITH_T2
    ):
        return _skip(seq, "T2*-weighted or susceptibility image: no suffix this bank uses")
    if word_set & _PD:
        return _skip(seq, "proton-density (or PD/T2 dual-echo) image: no suffix this bank uses")
    if _has_t2(words):
        return _named(seq, "anat", "T2w", {}, "T2-weighted (t2 in the name)")
    if t1_word:
        return _named(seq, "anat", "T1w", {}, f"T1-weighted ({t1_word} in the name)")
    return _skip(seq, "no rule names it")


def _has_t2(words: Sequence[str]) -> bool:
    return any(_T2.match(w) for w in words)


def _first(hit: Any) -> str:
    if isinstance(hit, (set, frozenset)):
        return sorted(hit)[0]
    return str(hit)


def _order_key(seq: Any) -> tuple[Any, ...]:
    return (str(getattr(seq, "time", None) or ""), _series_number(seq), str(getattr(seq, "series_id", "")))


def _series_number(seq: Any) -> int:
    match = re.match(r"(\d+)", str(getattr(seq, "series_id", "")))
    return int(match.group(1)) if match else 0


def _base(seq: Any) -> tuple[str, ...]:
    """The series name without reconstruction markers: what copies of one acquisition share."""
    return tuple(w for w in tokens(series_text(seq)) if w not in _COPY_MARKERS)


def _copy_rank(seq: Any) -> tuple[int, int]:
    """How corrected a reconstruction is: (vendor distortion correction 0-2, prescan normalized 0-1)."""
    image_type = _image_type(seq)
    distortion = 2 if "DIS3D" in image_type else 1 if "DIS2D" in image_type else 0
    return (distortion, 1 if "NORM" in image_type else 0)


def _dims(seq: Any) -> tuple[Any, ...]:
    def num(name: str) -> Any:
        value = getattr(seq, name, None)
        try:
            return round(float(value), 4)
        except (TypeError, ValueError):
            return value

    return tuple(num(n) for n in ("dim1", "dim2", "dim3", "TR", "TE"))


def decide(seqinfo: Iterable[Any]) -> list[Decision]:
    """Every series with its decision and reason, in acquisition order (see the module docstring)."""
    seqs = sorted(seqinfo, key=_order_key)
    decided = {id(s): classify(s) for s in seqs}
    _skip_echoes_of_rms(seqs, decided)
    _keep_best_copy(seqs, decided)
    return [decided[id(s)] for s in seqs]


def _skip_echoes_of_rms(seqs: list[Any], decided: dict[int, Decision]) -> None:
    """A multi-echo MPRAGE's per-echo series are not T1w runs of their own when its RMS combination is there."""
    for rms in seqs:
        d = decided[id(rms)]
        if d.datatype != "anat" or not ({"rms"} & set(tokens(series_text(rms))) or _image_type(rms) & {"RMS"}):
            continue
        for other in seqs:
            o = decided[id(other)]
            if other is rms or o.target != d.target or "rms" in tokens(series_text(other)):
                continue
            if _base(other) == _base(rms):
                why = f"per-echo images of a multi-echo series; its RMS combination {d.description!r} is the {d.suffix}"
                decided[id(other)] = _skip(other, why)


def _keep_best_copy(seqs: list[Any], decided: dict[int, Decision]) -> None:
    """Of Siemens copies of one acquisition (same name and geometry, other reconstruction flags) keep the most
    corrected; copies with the same flags are repeated acquisitions (runs)."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for seq in seqs:
        d = decided[id(seq)]
        if d.datatype is None:
            continue
        groups.setdefault((d.target, _base(seq), _dims(seq)), []).append(seq)
    for members in groups.values():
        ranks = {_copy_rank(s) for s in members}
        if len(ranks) < 2:
            continue
        best = max(ranks)
        kept = next(s for s in members if _copy_rank(s) == best)
        for seq in members:
            if _copy_rank(seq) != best:
                why = f"less corrected copy ({_flags(seq)}) of one acquisition: kept {kept.series_id} ({_flags(kept)})"
                decided[id(seq)] = _skip(seq, why)


def _flags(seq: Any) -> str:
    return "/".join(sorted(_image_type(seq) & {"ND", "NORM", "DIS2D", "DIS3D"})) or "-"


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


def infotodict(seqinfo: Iterable[Any]) -> dict[tuple[str, tuple[str, ...], None], list[Any]]:
    """HeudiConv entry point: {key: [series_id, ...]} for every series we name."""
    groups: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[str]] = {}
    for d in decide(seqinfo):  # acquisition order, so run numbers follow it
        if d.datatype is not None and d.suffix is not None:
            groups.setdefault((d.datatype, d.suffix, d.entities), []).append(d.series_id)
    info: dict[tuple[str, tuple[str, ...], None], list[Any]] = {}
    for (datatype, suffix, entities), members in groups.items():
        info[create_key(bids_template(datatype, suffix, dict(entities), with_run=len(members) > 1))] = members
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
