"""One session's image QC verdict: each configured measure against its warn and fail thresholds.

Levels, worst last: ``passed`` < ``warn`` < ``failed``. A session fails when any measure
of any of its QC tables (QSIPrep writes one per DWI series it kept apart) is beyond a
``fail_*`` threshold; a failed session is not reconstructed or parcellated until an
operator approves it (approvals.py). Thresholds: the ``qc`` section of neuroflow.yaml
(docs/configuration.md#qc-the-image-qc-gate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from neuroflow_dagster.config import NeuroflowConfig, QcConfig, QcMetricConfig
from neuroflow_dagster.qc.approvals import Approval, approval_for
from neuroflow_dagster.tools import layout
from neuroflow_dagster.tools.qc_table import find_image_qc, read_image_qc

PASSED, WARN, FAILED, NOT_APPLICABLE = "passed", "warn", "failed", "not_applicable"
_RANK = {NOT_APPLICABLE: 0, PASSED: 1, WARN: 2, FAILED: 3}
_POLICY = {"pass": PASSED, "warn": WARN, "fail": FAILED}


def worst(levels: list[str] | tuple[str, ...]) -> str:
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

    def as_dict(self) -> dict[str, object]:
        return {"table": self.table, "metric": self.metric, "value": self.value, "level": self.level,
                "rule": self.rule, "reason": self.reason}


@dataclass(frozen=True)
class Verdict:
    """A session's QC: its level, every measure judged, the tables read and problems (no table...)."""

    level: str
    metrics: tuple[MetricResult, ...] = ()
    tables: tuple[Path, ...] = ()
    problems: tuple[str, ...] = ()
    figures: tuple[Path, ...] = field(default=())

    @property
    def blocking(self) -> bool:
        return self.level == FAILED

    def summary(self) -> str:
        """One line: what failed or warned, else what passed."""
        bad = [m.reason for m in self.metrics if m.level in (FAILED, WARN)] + list(self.problems)
        if self.level == NOT_APPLICABLE:
            return self.problems[0] if self.problems else "not applicable"
        if not bad:
            shown = ", ".join(f"{m.metric} {_fmt(m.value)}" for m in self.metrics) or "no measure configured"
            return f"QC passed: {shown}"
        return f"QC {self.level}: " + "; ".join(bad)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:g}" if float(value).is_integer() else f"{value:.3g}"


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


def judge_metric(table: str, metric: str, value: float | None, limits: QcMetricConfig, qc: QcConfig) -> MetricResult:
    """One value against its thresholds (a value equal to a threshold is within it)."""
    rule = rule_text(limits)
    if value is None:
        level = _POLICY[qc.missing_metric]
        return MetricResult(table, metric, None, level, rule, f"{metric} not measured in {table} (missing_metric: "
                            f"{qc.missing_metric})")
    for level, below, above in ((FAILED, limits.fail_below, limits.fail_above),
                                (WARN, limits.warn_below, limits.warn_above)):
        if below is not None and value < below:
            return MetricResult(table, metric, value, level, rule, f"{metric} {_fmt(value)} < {below:g}")
        if above is not None and value > above:
            return MetricResult(table, metric, value, level, rule, f"{metric} {_fmt(value)} > {above:g}")
    return MetricResult(table, metric, value, PASSED, rule, f"{metric} {_fmt(value)}")


def judge_tables(tables: list[Path], qc: QcConfig) -> Verdict:
    """The verdict of a session from its QC tables (already found)."""
    results: list[MetricResult] = []
    problems: list[str] = []
    levels: list[str] = []
    if not tables:
        level = _POLICY[qc.missing_table]
        why = f"no image QC table (*_desc-image_qc.tsv) (missing_table: {qc.missing_table})"
        return Verdict(level, problems=(why,))
    for path in tables:
        try:
            values = read_image_qc(path)
        except (OSError, ValueError) as exc:
            problems.append(f"cannot read {path.name}: {exc}")
            levels.append(FAILED)  # a damaged table judges nothing: it never lets a session through
            continue
        for metric, limits in qc.metrics.items():
            result = judge_metric(path.name, metric, values.get(metric), limits, qc)
            results.append(result)
            levels.append(result.level)
    return Verdict(worst(levels), tuple(results), tuple(tables), tuple(problems))


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


def preprocessed(qsiprep_root: Path, participant: str, session: str) -> bool:
    """QSIPrep wrote a preprocessed DWI for the session (else there is nothing to judge)."""
    dwi = layout.session_dir(qsiprep_root, participant, session) / "dwi"
    return any(dwi.glob("*desc-preproc_dwi.nii.gz"))


def session_verdict(config: NeuroflowConfig, participant: str, session: str) -> Verdict:
    """Find the session's QC tables under the QSIPrep derivatives and judge them."""
    root = layout.qsiprep_dir(config)
    figures = tuple(session_figures(root, participant, session))
    if not preprocessed(root, participant, session):
        return Verdict(NOT_APPLICABLE, problems=(f"no QSIPrep output for sub-{participant} ses-{session} "
                                                 "(no DWI, or left out of QSIPrep): nothing to judge",))
    verdict = judge_tables(find_image_qc(root, participant, session), config.qc)
    if not config.qc.enabled:
        verdict = Verdict(PASSED, verdict.metrics, verdict.tables, ("the QC gate is off (qc.enabled: false)",))
    return Verdict(verdict.level, verdict.metrics, verdict.tables, verdict.problems, figures)


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


def session_gate(config: NeuroflowConfig, scan_id: str, participant: str, session: str) -> GateState:
    """The session's verdict plus its standing approval (looked up by ScanID)."""
    return GateState(session_verdict(config, participant, session), approval_for(config, scan_id))
