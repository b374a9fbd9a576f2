"""Protocol rules (docs/domain-rules.md#protocol): which series a session must contain before it is worth converting.

Works on the series table the scanner built from DICOM headers, so a check costs no I/O and can be
re-run whenever the folder changes. Patterns are case-insensitive and anchored at the start
(``re.match``), exactly as the predecessor's, so existing site configs keep their meaning.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from neuroflow_dagster.config import ProtocolConfig, ScanRule


@dataclass(frozen=True)
class SeriesInfo:
    """One series (files sharing a SeriesInstanceUID) as read from headers."""

    uid: str
    description: str = "Unknown"
    n_files: int = 0
    series_number: int | None = None
    image_type: str = ""
    modality: str = ""

    def as_row(self) -> list[object]:
        """Row for the ``dicom_session`` series table: [description, uid, n_files, number, image_type]."""
        return [self.description, self.uid, self.n_files, self.series_number, self.image_type]


@dataclass(frozen=True)
class RuleMatch:
    """How one rule fared: the series it matched and whether one of them had an acceptable file count."""

    name: str
    required: bool
    pattern: str
    min_files: int
    max_files: int | None
    matched_series: list[str] = field(default_factory=list)
    matched_files: list[int] = field(default_factory=list)
    satisfied: bool = False
    detail: str = ""


@dataclass(frozen=True)
class ProtocolResult:
    valid: bool
    message: str
    n_dicom: int
    matches: list[RuleMatch] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        return [m.name for m in self.matches if m.required and not m.satisfied]


def _expected(rule: ScanRule) -> str:
    if rule.max_files is None:
        return f">= {rule.min_files}"
    return f"{rule.min_files}-{rule.max_files}"


def match_rule(rule: ScanRule, series: Sequence[SeriesInfo], required: bool) -> RuleMatch:
    """A rule is satisfied by any one matching series whose file count is within [min_files, max_files]."""
    pattern = re.compile(rule.series_description_pattern, re.IGNORECASE)
    hits = [s for s in series if pattern.match(s.description or "")]
    ok = [s for s in hits if s.n_files >= rule.min_files and (rule.max_files is None or s.n_files <= rule.max_files)]
    if ok:
        detail = f"{rule.name}: {ok[0].description!r} with {ok[0].n_files} files"
    elif hits:
        counts = ", ".join(f"{s.description!r} has {s.n_files}" for s in hits)
        detail = f"{rule.name}: wrong number of files ({counts}; expected {_expected(rule)})"
    else:
        detail = f"{rule.name}: no series matches {rule.series_description_pattern!r}"
    return RuleMatch(
        name=rule.name,
        required=required,
        pattern=rule.series_description_pattern,
        min_files=rule.min_files,
        max_files=rule.max_files,
        matched_series=[s.description for s in hits],
        matched_files=[s.n_files for s in hits],
        satisfied=bool(ok),
        detail=detail,
    )


def unreadable_note(n_unreadable: int, examples: Sequence[str] = ()) -> str:
    """``; 12 files are not readable DICOM (e.g. corrupt_0000.dcm: not DICOM (no DICM preamble))``, or ""."""
    if not n_unreadable:
        return ""
    what = "file is" if n_unreadable == 1 else "files are"
    return f"; {n_unreadable} {what} not readable DICOM" + (f" (e.g. {examples[0]})" if examples else "")


def check_protocol(
    series: Sequence[SeriesInfo],
    protocol: ProtocolConfig,
    n_dicom: int | None = None,
    n_unreadable: int = 0,
    unreadable_examples: Sequence[str] = (),
) -> ProtocolResult:
    """Validate one session's series table.

    - Required rules configured: valid iff every one is satisfied, else "Missing required scans: A, B".
    - None configured: valid iff the session has >= ``bids_conversion_min_files`` DICOM files, else
      "Session has N DICOM files (minimum: M)". A session with zero DICOM files is never valid.
    - Valid: "Session valid: N scan types found", N = rules satisfied (required + optional), or the
      number of series when no rules are configured at all.
    A failure also says how many files of the folder are not readable DICOM, and why for one of them
    ("...; 12 files are not readable DICOM (e.g. ...)"): a folder of 12 corrupt files is not an empty one.
    """
    total = sum(s.n_files for s in series) if n_dicom is None else n_dicom
    matches = [match_rule(r, series, True) for r in protocol.required_scans]
    matches += [match_rule(r, series, False) for r in protocol.optional_scans]
    minimum = protocol.bids_conversion_min_files
    note = unreadable_note(n_unreadable, unreadable_examples)
    if protocol.required_scans:
        missing = [m.name for m in matches if m.required and not m.satisfied]
        if missing:
            return ProtocolResult(False, f"Missing required scans: {', '.join(missing)}{note}", total, matches)
    elif total < minimum or total == 0:
        return ProtocolResult(False, f"Session has {total} DICOM files (minimum: {minimum}){note}", total, matches)
    n_types = sum(m.satisfied for m in matches) if matches else len(series)
    return ProtocolResult(True, f"Session valid: {n_types} scan types found", total, matches)
