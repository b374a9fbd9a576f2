"""One session's image QC verdict: each configured measure against the cohort of its acquisition group,
or against its fixed thresholds.

Levels, worst last: ``passed`` < ``warn`` < ``failed``. A session fails when any measure of any
of its QC tables (QSIPrep writes one per DWI series it kept apart) is beyond a ``fail_*`` threshold
(a floor: it always applies) or, under the cohort rule, more than ``qc.cohort.fail_mads`` scaled MADs
on the bad side of the median of the other sessions of its acquisition group (cohort.py); a group
with fewer than ``qc.cohort.min_sessions`` such sessions, or ``qc.mode: absolute``, uses the fixed
``warn_*``/``fail_*`` thresholds and the verdict says so. A failed session is not reconstructed or
parcellated until an operator approves it (approvals.py). Rules: docs/domain-rules.md#image-qc;
settings: docs/configuration.md#qc-the-image-qc-gate.

A verdict is made once per QC table content and settings and recorded (store.py): judging the same
tables again keeps it, whatever the cohort has become since; `neuroflow qc rejudge` lists, and on an
operator's word records, the sessions whose standing today's cohort would change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroflow_dagster.config import NeuroflowConfig, QcConfig, QcMetricConfig
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.qc.approvals import Approval, approval_for
from neuroflow_dagster.qc.cohort import CohortStats, Group, acquisition_group, badness, fmt
from neuroflow_dagster.qc.store import JUDGE, SeriesMeasures, Store, StoredVerdict
from neuroflow_dagster.tools import layout
from neuroflow_dagster.tools.qc_table import find_image_qc, read_image_qc

PASSED, WARN, FAILED, NOT_APPLICABLE = "passed", "warn", "failed", "not_applicable"
ABSOLUTE, COHORT, FLOOR = "absolute", "cohort", "floor"  # which rule gave a measure its level
_RANK = {NOT_APPLICABLE: 0, PASSED: 1, WARN: 2, FAILED: 3}
_POLICY = {"pass": PASSED, "warn": WARN, "fail": FAILED}
GATE_OFF = "the QC gate is off (qc.enabled: false)"

#: (QC table name, measure) -> (the group's label, the other sessions' statistics or None when there are none)
CohortLookup = Callable[[str, str], "tuple[str, CohortStats | None]"]


def worst(levels: Sequence[str]) -> str:
    return max(levels, key=_RANK.__getitem__, default=PASSED)


@dataclass(frozen=True)
class MetricResult:
    """One measure of one QC table: its value, its level and the rule that gave it."""

    table: str  # the QC table's file name
    metric: str
    value: float | None
    level: str
    rule: str  # "fail < 0.5, warn < 0.8"
    reason: str  # "raw_masked_neighbor_corr 0.17 < 0.5"
    basis: str = ABSOLUTE  # absolute thresholds, the cohort rule, or a floor under the cohort rule
    score: float | None = None  # signed distance from the cohort's median, in scaled MADs
    cohort: str = ""  # "214 sessions of protocol X on Y"
    median: float | None = None
    spread: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "metric": self.metric, "value": self.value, "level": self.level,
                "rule": self.rule, "reason": self.reason, "basis": self.basis, "score": self.score,
                "cohort": self.cohort, "median": self.median, "spread": self.spread}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricResult:
        return cls(**{k: data.get(k) for k in ("table", "metric", "value", "level", "rule", "reason")},
                   basis=data.get("basis") or ABSOLUTE, score=data.get("score"), cohort=data.get("cohort") or "",
                   median=data.get("median"), spread=data.get("spread"))


@dataclass(frozen=True)
class Verdict:
    """A session's QC: its level, every measure judged, the tables read and problems (no table...)."""

    level: str
    metrics: tuple[MetricResult, ...] = ()
    tables: tuple[Path, ...] = ()
    problems: tuple[str, ...] = ()
    figures: tuple[Path, ...] = field(default=())
    notes: tuple[str, ...] = ()  # which rule applied where it is not the cohort's ("absolute thresholds: ...")
    problem_level: str = PASSED  # the worst level the problems gave

    @property
    def blocking(self) -> bool:
        return self.level == FAILED

    def summary(self) -> str:
        """One line: what failed or warned, else what passed; then the rule's notes."""
        bad = [m.reason for m in self.metrics if m.level in (FAILED, WARN)] + list(self.problems)
        if self.level == NOT_APPLICABLE:
            return self.problems[0] if self.problems else "not applicable"
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        if not bad:
            shown = ", ".join(f"{m.metric} {fmt(m.value)}" for m in self.metrics) or "no measure configured"
            return f"QC passed: {shown}{notes}"
        return f"QC {self.level}: " + "; ".join(bad) + notes

    def to_record(self) -> dict[str, Any]:
        """What the store keeps of a verdict (figures are looked up again when shown)."""
        return {"level": self.level, "metrics": [m.as_dict() for m in self.metrics],
                "tables": [str(t) for t in self.tables], "problems": list(self.problems), "notes": list(self.notes),
                "problem_level": self.problem_level}

    @classmethod
    def from_record(cls, record: dict[str, Any], figures: Sequence[Path] = ()) -> Verdict:
        metrics = tuple(MetricResult.from_dict(m) for m in record.get("metrics", []))
        return cls(str(record.get("level", FAILED)), metrics, tuple(Path(t) for t in record.get("tables", [])),
                   tuple(record.get("problems", [])), tuple(figures), tuple(record.get("notes", [])),
                   str(record.get("problem_level", PASSED)))


def rule_text(limits: QcMetricConfig) -> str:
    parts = []
    if limits.fail_below is not None:
        parts.append(f"fail < {limits.fail_below:g}")
    if limits.fail_above is not None:
        parts.append(f"fail > {limits.fail_above:g}")
    if limits.warn_below is not None:
        parts.append(f"warn < {limits.warn_below:g}")
    if limits.warn_above is not None:
        parts.append(f"warn > {limits.warn_above:g}")
    return ", ".join(parts)


def bad_sides(limits: QcMetricConfig) -> tuple[bool, bool]:
    """The bad side(s) of a measure: the side(s) its thresholds guard."""
    below = limits.fail_below is not None or limits.warn_below is not None
    above = limits.fail_above is not None or limits.warn_above is not None
    return below, above


def _beyond(metric: str, value: float, below: float | None, above: float | None) -> str | None:
    if below is not None and value < below:
        return f"{metric} {fmt(value)} < {below:g}"
    if above is not None and value > above:
        return f"{metric} {fmt(value)} > {above:g}"
    return None


def cohort_rule_text(limits: QcMetricConfig, qc: QcConfig, stats: CohortStats) -> str:
    below, above = bad_sides(limits)
    side = "below or above" if below and above else "below" if below else "above"
    floors = [p for p in rule_text(limits).split(", ") if p.startswith("fail")]
    parts = [f"floor {p}" for p in floors]
    if qc.cohort.fail_mads is not None:
        parts.append(f"fail > {qc.cohort.fail_mads:g} MADs {side}")
    parts.append(f"warn > {qc.cohort.warn_mads:g} MADs {side} the median {fmt(stats.median)} (MAD x 1.4826 = "
                 f"{fmt(stats.spread)}) of {stats.describe()}")
    return ", ".join(parts)


def judge_metric(table: str, metric: str, value: float | None, limits: QcMetricConfig, qc: QcConfig,
                 cohort: CohortStats | None = None) -> MetricResult:
    """One value against its cohort (when given) and floors, else its fixed thresholds.

    A value equal to a threshold is within it.
    """
    if value is None:
        level = _POLICY[qc.missing_metric]
        return MetricResult(table, metric, None, level, rule_text(limits), f"{metric} not measured in {table} "
                            f"(missing_metric: {qc.missing_metric})")
    if cohort is None:
        rule = rule_text(limits)
        for level, below, above in ((FAILED, limits.fail_below, limits.fail_above),
                                    (WARN, limits.warn_below, limits.warn_above)):
            beyond = _beyond(metric, value, below, above)
            if beyond:
                return MetricResult(table, metric, value, level, rule, beyond)
        return MetricResult(table, metric, value, PASSED, rule, f"{metric} {fmt(value)}")
    rule = cohort_rule_text(limits, qc, cohort)
    score = cohort.score(value)
    bad = badness(score, *bad_sides(limits))
    where = (f"{abs(score):.1f} MADs {'below' if score < 0 else 'above'} the median {fmt(cohort.median)} of "
             f"{cohort.describe()}")
    extra = {"score": score, "cohort": cohort.describe(), "median": cohort.median, "spread": cohort.spread}
    floor = _beyond(metric, value, limits.fail_below, limits.fail_above)
    if floor:
        return MetricResult(table, metric, value, FAILED, rule, f"{floor} (floor; {where})", FLOOR, **extra)
    if qc.cohort.fail_mads is not None and bad > qc.cohort.fail_mads:
        return MetricResult(table, metric, value, FAILED, rule, f"{metric} {fmt(value)} is {where}", COHORT, **extra)
    if bad > qc.cohort.warn_mads:
        return MetricResult(table, metric, value, WARN, rule, f"{metric} {fmt(value)} is {where}", COHORT, **extra)
    return MetricResult(table, metric, value, PASSED, rule, f"{metric} {fmt(value)} ({where})", COHORT, **extra)


def _cohort_for(metric: str, label: str, stats: CohortStats | None,
                qc: QcConfig) -> tuple[CohortStats | None, str | None]:
    """The statistics when the cohort rule judges this measure, else None and the note that says why not."""
    if qc.mode != "cohort":
        return None, None
    least = qc.cohort.min_sessions
    if stats is None or stats.n < least:
        n = stats.sessions if stats is not None else 0
        group = f" of {label}" if label else ""
        return None, (f"absolute thresholds: {n} other session{'' if n == 1 else 's'}{group}, fewer than "
                      f"qc.cohort.min_sessions ({least})")
    if stats.spread <= 0:
        return None, (f"absolute thresholds for {metric}: the {stats.describe()} all measure {fmt(stats.median)} "
                      f"(no spread; qc.metrics.{metric}.min_spread sets one)")
    return stats, None


def no_table_verdict(qc: QcConfig) -> Verdict:
    level = _POLICY[qc.missing_table]
    why = f"no image QC table (*_desc-image_qc.tsv) (missing_table: {qc.missing_table})"
    return Verdict(level, problems=(why,), problem_level=level)


def judge_values(values: Sequence[tuple[str, dict[str, float | None]]], qc: QcConfig,
                 cohort: CohortLookup | None = None, problems: Sequence[str] = (),
                 problem_level: str = PASSED) -> Verdict:
    """The verdict from each readable table's values (name, {measure: value}) and the tables' problems."""
    results: list[MetricResult] = []
    notes: list[str] = []
    for table, measured in values:
        for metric, limits in qc.metrics.items():
            stats = None
            if cohort is not None and qc.mode == "cohort" and measured.get(metric) is not None:
                label, raw = cohort(table, metric)
                stats, note = _cohort_for(metric, label, raw, qc)
                if note and note not in notes:
                    notes.append(note)
            results.append(judge_metric(table, metric, measured.get(metric), limits, qc, stats))
    level = worst([*(m.level for m in results), problem_level])
    if not qc.enabled:
        level, notes = PASSED, [GATE_OFF]
    return Verdict(level, tuple(results), (), tuple(problems), (), tuple(notes), problem_level)


def read_tables(tables: Sequence[Path]) -> tuple[list[tuple[str, dict[str, float | None]]], list[str]]:
    """Each table's values, and a problem per table that cannot be read (it judges nothing, so it fails)."""
    values: list[tuple[str, dict[str, float | None]]] = []
    problems: list[str] = []
    for path in tables:
        try:
            values.append((path.name, read_image_qc(path)))
        except (OSError, ValueError) as exc:
            problems.append(f"cannot read {path.name}: {exc}")
    return values, problems


def judge_tables(tables: list[Path], qc: QcConfig, cohort: CohortLookup | None = None) -> Verdict:
    """The verdict of a session from its QC tables (already found)."""
    if not tables:
        verdict = no_table_verdict(qc)
        return verdict if qc.enabled else Verdict(PASSED, problems=verdict.problems, notes=(GATE_OFF,),
                                                  problem_level=verdict.problem_level)
    values, problems = read_tables(tables)
    verdict = judge_values(values, qc, cohort, problems, FAILED if problems else PASSED)
    return Verdict(verdict.level, verdict.metrics, tuple(tables), verdict.problems, (), verdict.notes,
                   verdict.problem_level)


def session_figures(qsiprep_root: Path, participant: str, session: str) -> list[Path]:
    """QSIPrep's figures of one session: ``sub-X/figures/sub-X_ses-Y_*`` (svg, png, gif), newest layout first."""
    folders = [qsiprep_root / f"sub-{participant}" / "figures",
               qsiprep_root / f"sub-{participant}" / f"ses-{session}" / "figures"]
    prefix = f"sub-{participant}_ses-{session}_"
    found: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir()
                            if p.name.startswith(prefix) and p.suffix.lower() in (".svg", ".png", ".gif"))
    return found


def session_reports(qsiprep_root: Path, participant: str, session: str) -> list[Path]:
    """QSIPrep's HTML report(s) of the session: ``sub-X.html`` (per subject), ``sub-X_ses-Y.html`` where written."""
    names = (f"sub-{participant}.html", f"sub-{participant}_ses-{session}.html")
    return [qsiprep_root / n for n in names if (qsiprep_root / n).is_file()]


def preprocessed(qsiprep_root: Path, participant: str, session: str) -> bool:
    """QSIPrep wrote a preprocessed DWI for the session (else there is nothing to judge)."""
    dwi = layout.session_dir(qsiprep_root, participant, session) / "dwi"
    return any(dwi.glob("*desc-preproc_dwi.nii.gz"))


# --------------------------------------------------------------------------- a session, judged or kept


def settings_signature(qc: QcConfig) -> str:
    """The QC settings a verdict was made under (a change of them is a new judgement)."""
    return hashlib.sha256(qc.model_dump_json().encode()).hexdigest()[:16]


def tables_signature(tables: Sequence[Path]) -> str:
    """The QC tables' names and contents (the same values judged again keep their verdict)."""
    digest = hashlib.sha256()
    for path in tables:
        digest.update(path.name.encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            digest.update(f"unreadable: {exc}".encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Judgement:
    """A fresh judgement of a session and what it measured (for the store)."""

    verdict: Verdict
    series: tuple[SeriesMeasures, ...]
    tables_sig: str


def store_of(config: NeuroflowConfig) -> Store:
    return Store(config.paths.state)


def cohort_lookup(store: Store, scan_id: str, groups: dict[str, Group], qc: QcConfig,
                  skip: Collection[str] = ()) -> CohortLookup:
    """The other sessions of each table's group (without ``skip``: excluded sessions), read from the store
    once per (group, measure)."""
    cache: dict[tuple[str, str], Any] = {}

    def lookup(table: str, metric: str) -> tuple[str, CohortStats | None]:
        group = groups[table]
        key = (group.key, metric)
        if key not in cache:
            cache[key] = store.group_values(group, metric, skip)
        min_spread = qc.metrics[metric].min_spread
        return group.label, cache[key].stats(without=scan_id, min_spread=min_spread)

    return lookup


def judge_session(config: NeuroflowConfig, store: Store, scan_id: str, participant: str, session: str) -> Judgement:
    """Judge the session's QC tables now, against the cohort in the store (nothing is recorded)."""
    root = layout.qsiprep_dir(config)
    figures = tuple(session_figures(root, participant, session))
    if not preprocessed(root, participant, session):
        why = (f"no QSIPrep output for sub-{participant} ses-{session} (no DWI, or left out of QSIPrep): "
               "nothing to judge")
        return Judgement(Verdict(NOT_APPLICABLE, problems=(why,), figures=figures), (), "")
    tables = find_image_qc(root, participant, session)
    qc = config.qc
    if not tables:
        verdict = judge_tables([], qc)
        return Judgement(Verdict(verdict.level, problems=verdict.problems, figures=figures, notes=verdict.notes,
                                 problem_level=verdict.problem_level), (), tables_signature([]))
    series, problems = measure_tables(config, participant, session, tables)
    groups = {s.qc_table: s.group for s in series}
    lookup = cohort_lookup(store, scan_id, groups, qc, load_exclusions(config))
    values = [(s.qc_table, s.values) for s in series]
    verdict = judge_values(values, qc, lookup, problems, FAILED if problems else PASSED)
    return Judgement(Verdict(verdict.level, verdict.metrics, tuple(tables), verdict.problems, figures, verdict.notes,
                             verdict.problem_level), series, tables_signature(tables))


def measure_tables(config: NeuroflowConfig, participant: str, session: str,
                   tables: Sequence[Path]) -> tuple[tuple[SeriesMeasures, ...], list[str]]:
    """Each readable QC table's values and acquisition group; a problem per unreadable table."""
    values, problems = read_tables(tables)
    keys = config.qc.cohort.group_by
    series = tuple(SeriesMeasures(name, acquisition_group(config.paths.bids_root, participant, session, name, keys),
                                  measured) for name, measured in values)
    return series, problems


def seed_cohort(config: NeuroflowConfig, sessions: Sequence[tuple[str, str, str]]) -> tuple[int, int]:
    """Put the measures of sessions the store does not know yet into the cohort, without a verdict
    (sessions judged before the store existed keep the verdict Dagster recorded). ``sessions``:
    (ScanID, participant, session). Returns (sessions added, sessions without QC tables)."""
    store = store_of(config)
    known = set(store.series()) | set(store.standings())
    root = layout.qsiprep_dir(config)
    added = empty = 0
    for scan_id, participant, session in sessions:
        if scan_id in known:
            continue
        tables = find_image_qc(root, participant, session) if preprocessed(root, participant, session) else []
        series, _ = measure_tables(config, participant, session, tables)
        if not series:
            empty += 1
            continue
        store.save_measures(scan_id, participant, session, series)
        added += 1
    return added, empty


def session_verdict(config: NeuroflowConfig, participant: str, session: str, scan_id: str = "") -> Verdict:
    """Judge the session now (the cohort from the store, without the session itself); records nothing."""
    return judge_session(config, store_of(config), scan_id, participant, session).verdict
@dataclass(frozen=True)
class GateState:
    """What the gate decides for a session: its QC verdict and any standing approval."""

    verdict: Verdict
    approval: Approval | None

    @property
    def state(self) -> str:
        """passed / warn / failed / approved / not_applicable."""
        if self.verdict.level == FAILED and self.approval is not None:
            return "approved"
        return self.verdict.level

    @property
    def blocks(self) -> bool:
        return self.state == FAILED

    def describe(self) -> str:
        text = self.verdict.summary()
        if self.state == "approved":
            assert self.approval is not None
            text += f"; {self.approval.describe()}"
        return text


def _kept(standing: StoredVerdict | None, judgement: Judgement, qc: QcConfig) -> bool:
    """The standing verdict still holds: made on these very tables, under these settings."""
    return (standing is not None and standing.tables_sig == judgement.tables_sig
            and standing.settings_sig == settings_signature(qc))


def standing_verdict(config: NeuroflowConfig, scan_id: str, participant: str,
                     session: str) -> tuple[Verdict, StoredVerdict | None, Judgement]:
    """The verdict in force: the recorded one if made on the current tables and settings, else judged now."""
    store = store_of(config)
    judgement = judge_session(config, store, scan_id, participant, session)
    if judgement.verdict.level == NOT_APPLICABLE:
        return judgement.verdict, None, judgement
    standing = store.standing(scan_id) if scan_id else None
    if _kept(standing, judgement, config.qc):
        assert standing is not None
        return Verdict.from_record(standing.record, judgement.verdict.figures), standing, judgement
    return judgement.verdict, None, judgement


@dataclass(frozen=True)
class Evaluation:
    """What the QC asset decided: the gate state, the verdict record in force, and how it came about."""

    gate: GateState
    stored: StoredVerdict | None  # None: nothing to judge (not applicable)
    kept: bool  # the standing verdict was kept (same tables, same settings): the cohort may have moved since
    today: Verdict | None  # a kept verdict judged again under today's cohort, when that gives another level
    groups: tuple[Group, ...] = ()  # the acquisition groups of the session's QC tables

    def describe_origin(self) -> str:
        if self.stored is None:
            return ""
        if not self.kept:
            return f"judged {self.stored.at}"
        how = "re-judged by " + self.stored.by if self.stored.action != JUDGE else "judged"
        text = f"{how} {self.stored.at}; kept (the same QC tables and settings)"
        if self.today is not None:
            text += (f"; under today's cohort it would be {self.today.level}: `neuroflow qc rejudge --dry-run` lists "
                     "such sessions")
        return text


def evaluate_session(config: NeuroflowConfig, scan_id: str, participant: str, session: str,
                     by: str = "") -> Evaluation:
    """The QC asset's evaluation: keep the standing verdict of unchanged tables, else judge and record.

    Never silent: a kept verdict whose level today's cohort would change says so (``today``); only
    an operator's `neuroflow qc rejudge` records a new verdict for the same tables.
    """
    store = store_of(config)
    verdict, standing, judgement = standing_verdict(config, scan_id, participant, session)
    approval = approval_for(config, scan_id)
    if verdict.level == NOT_APPLICABLE:
        return Evaluation(GateState(verdict, approval), None, False, None)
    groups = tuple(dict.fromkeys(s.group for s in judgement.series))
    if standing is not None:
        today = judgement.verdict if judgement.verdict.level != verdict.level else None
        return Evaluation(GateState(verdict, approval), standing, True, today, groups)
    stored = store.save_judgement(participant, session, judgement.series, StoredVerdict(
        scan_id, participant, session, verdict.level, verdict.summary(), judgement.tables_sig,
        settings_signature(config.qc), by=by, record=verdict.to_record()))
    return Evaluation(GateState(verdict, approval), stored, False, None, groups)


def session_gate(config: NeuroflowConfig, scan_id: str, participant: str, session: str) -> GateState:
    """The session's verdict in force (recorded, or judged now when its tables changed) and its approval."""
    verdict, _, _ = standing_verdict(config, scan_id, participant, session)
    return GateState(verdict, approval_for(config, scan_id))
