"""The cohort rule of the image QC gate: a measure against the study's own sessions of its acquisition group.

Plain Python (standard library). The rule (docs/domain-rules.md#image-qc): a session's value is placed
among the values of every OTHER session of the same acquisition group (the DWI's BIDS sidecar keys
``qc.cohort.group_by``: by default the series description and the scanner model) by its distance from
their median in scaled MADs, ``(value - median) / spread`` with ``spread = max(1.4826 * MAD, min_spread)``
(1.4826 x the median absolute deviation is one standard deviation for normally distributed values,
and neither the median nor the MAD moves for a few outliers, unlike a mean and a standard deviation).

:class:`GroupValues` holds one measure's values of one group with each session's own values, so that
"the others" is exact for every session of the group at O(log n) each (a re-judgement of 20,000
sessions must not sort 20,000 lists).
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: A MAD times this is one standard deviation for normally distributed values.
MAD_TO_SIGMA = 1.4826
#: Sidecar keys that name the protocol (the group label calls them "protocol").
PROTOCOL_KEYS = ("SeriesDescription", "ProtocolName")
MODEL_KEY = "ManufacturersModelName"
_ENTITY = re.compile(r"_(acq|dir|run|rec|echo|part|chunk)-([A-Za-z0-9]+)")


def fmt(value: float | None) -> str:
    """Three significant digits, integers as integers (how QC values read in reasons)."""
    if value is None:
        return "n/a"
    return f"{value:g}" if float(value).is_integer() else f"{value:.3g}"


# --------------------------------------------------------------------------- acquisition groups


@dataclass(frozen=True)
class Group:
    """An acquisition group: the values of the ``group_by`` sidecar keys ("" when a key is missing)."""

    fields: tuple[tuple[str, str], ...]

    @property
    def key(self) -> str:
        """Stable identity of the group (what the store indexes)."""
        return json.dumps([list(f) for f in self.fields], separators=(",", ":"))

    @property
    def label(self) -> str:
        """How reasons and plots name it: ``protocol ep2d_diff_mddw_12dir on Prisma_fit``."""
        parts: list[str] = []
        protocol_named = False
        for key, value in self.fields:
            if key in PROTOCOL_KEYS and not protocol_named:
                parts.append(f"protocol {value or 'unknown'}")
                protocol_named = True
            elif key == MODEL_KEY:
                parts.append(f"on {value}" if value else "on an unknown scanner model")
            else:
                parts.append(f"{key} {value or 'unknown'}")
        return " ".join(parts)

    @classmethod
    def from_key(cls, key: str) -> Group:
        return cls(tuple((str(k), str(v)) for k, v in json.loads(key)))


def table_entities(name: str) -> dict[str, str]:
    """The BIDS entities of a QSIPrep output name that say which raw series it came from (acq, dir, run...)."""
    stem = name.split("_space-")[0].split("_desc-")[0]
    return dict(_ENTITY.findall(stem))


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).strip()


def acquisition_group(bids_root: Path, participant: str, session: str, qc_table: str,
                      keys: Sequence[str]) -> Group:
    """The group of one QC table, from the BIDS sidecars of the raw DWI series it was made from.

    Why the raw sidecars: they exist for every QSIPrep (the real one reads this BIDS dataset) and
    dcm2niix writes SeriesDescription, ProtocolName, ManufacturersModelName... into them from the
    DICOM headers. A table is matched to the raw ``*_dwi.json`` whose entities agree with the
    table's (an entity QSIPrep dropped when it merged series is a wildcard); when merged series
    differ, their values are joined with " + " (an AP+PA pair is its own group).
    """
    dwi = bids_root / f"sub-{participant}" / f"ses-{session}" / "dwi"
    want = table_entities(qc_table)
    found: dict[str, set[str]] = {k: set() for k in keys}
    try:
        sidecars = sorted(dwi.glob(f"sub-{participant}_ses-{session}_*dwi.json"))
    except OSError:
        sidecars = []
    for path in sidecars:
        if not path.name.endswith("_dwi.json"):
            continue
        have = table_entities(path.name)
        if any(have.get(k) != v for k, v in want.items()):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for key in keys:
            value = data.get(key)
            if value is not None and _text(value):
                found[key].add(_text(value))
    return Group(tuple((k, " + ".join(sorted(found[k]))) for k in keys))


# --------------------------------------------------------------------------- statistics


def median_sorted(values: Sequence[float]) -> float:
    n = len(values)
    mid = n // 2
    return float(values[mid]) if n % 2 else (values[mid - 1] + values[mid]) / 2.0


def median_without(values: Sequence[float], drop: Iterable[float]) -> float | None:
    """The median of sorted ``values`` with one occurrence of each of ``drop`` removed (O(k log n)).

    Every dropped value must be in ``values``. None when nothing is left.
    """
    gone: list[int] = []
    for value in sorted(drop):
        i = bisect.bisect_left(values, value)
        while i in gone:  # the same value dropped twice: the next occurrence
            i += 1
        if i >= len(values) or values[i] != value:
            raise ValueError(f"{value!r} is not among the values")
        gone.append(i)
    gone.sort()
    n = len(values) - len(gone)
    if n <= 0:
        return None

    def at(position: int) -> float:
        index = position
        for g in gone:
            if g <= index:
                index += 1
        return float(values[index])

    mid = n // 2
    return at(mid) if n % 2 else (at(mid - 1) + at(mid)) / 2.0


@dataclass(frozen=True)
class CohortStats:
    """Where the other sessions of a group stand on one measure."""

    label: str  # the group's label
    n: int  # values (one per series; usually one per session)
    sessions: int
    median: float
    spread: float  # max(1.4826 x MAD, min_spread); 0 when every value is the same and no min_spread
    mad: float  # the raw median absolute deviation

    def describe(self) -> str:
        """``214 sessions of protocol X on Y`` (``230 series of 214 sessions`` when some have several)."""
        what = f"{self.n} sessions" if self.n == self.sessions else f"{self.n} series of {self.sessions} sessions"
        return f"{what} of {self.label}" if self.label else what

    def score(self, value: float) -> float:
        """Signed distance from the median in spreads (scaled MADs)."""
        return (value - self.median) / self.spread


@dataclass
class GroupValues:
    """One measure's values in one acquisition group, each session's own kept apart."""

    label: str
    by_scan: dict[str, list[float]] = field(default_factory=dict)
    _sorted: list[float] | None = None
    _deviations: dict[float, list[float]] = field(default_factory=dict)

    def add(self, scan_id: str, value: float) -> None:
        self.by_scan.setdefault(scan_id, []).append(float(value))
        if self._sorted is not None:
            self._sorted = None
            self._deviations.clear()

    @property
    def values(self) -> list[float]:
        if self._sorted is None:
            self._sorted = sorted(v for vs in self.by_scan.values() for v in vs)
        return self._sorted

    def _sorted_deviations(self, median: float) -> list[float]:
        devs = self._deviations.get(median)
        if devs is None:
            if len(self._deviations) > 8:
                self._deviations.clear()
            devs = self._deviations[median] = sorted(abs(v - median) for v in self.values)
        return devs

    def stats(self, without: str | None = None, min_spread: float | None = None) -> CohortStats | None:
        """The group without the session ``without`` (the one being judged); None when no one is left."""
        own = self.by_scan.get(without, []) if without is not None else []
        median = median_without(self.values, own)
        if median is None:
            return None
        mad = median_without(self._sorted_deviations(median), [abs(v - median) for v in own])
        assert mad is not None
        sessions = len(self.by_scan) - (1 if own else 0)
        spread = max(MAD_TO_SIGMA * mad, min_spread or 0.0)
        return CohortStats(self.label, len(self.values) - len(own), sessions, median, spread, mad)


def badness(score: float, below: bool, above: bool) -> float:
    """How far into the bad side(s) a score is (negative or zero: on the good side)."""
    worst = -math.inf
    if below:
        worst = max(worst, -score)
    if above:
        worst = max(worst, score)
    return worst
