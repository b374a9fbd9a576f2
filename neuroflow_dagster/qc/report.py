"""The cohort as pictures: one plot per measure (every session a point, per acquisition group) and the
QC report page ``neuroflow qc report --output DIR`` writes (``DIR/index.html`` + one PNG per measure).

Held, approved and warned sessions are marked and named on the plots, and listed with their reasons and
links to QSIPrep's report and figures of the session; the sessions whose standing today's cohort would
change (rejudge.py) have a section of their own. The QC asset attaches the same plots, restricted to the
session's groups with the session ringed (defs/assets/image_qc.py).

Everything comes from the store (store.py): no QC table is read, so the page costs one pass over the
store at any archive size (benchmarks/qc_cohort.py). matplotlib's object API with the Agg canvas (no
pyplot global state: safe in run workers without a display).
"""

from __future__ import annotations

import html
import io
import os
import textwrap
import time
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from neuroflow_dagster.config import NeuroflowConfig, QcConfig, QcMetricConfig
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.qc.approvals import load_approvals
from neuroflow_dagster.qc.cohort import MAD_TO_SIGMA, CohortStats, Group, GroupValues, fmt
from neuroflow_dagster.qc.gate import (
    FAILED,
    WARN,
    MetricResult,
    bad_sides,
    rule_text,
    session_figures,
    session_reports,
    store_of,
)
from neuroflow_dagster.qc.rejudge import Change, plan
from neuroflow_dagster.qc.store import SeriesRow, Store
from neuroflow_dagster.tools import layout

HELD, APPROVED, WARNED, PASSED, UNJUDGED = "held", "approved", "warned", "passed", "not judged"
#: How each state is drawn: (marker, colour, size, z-order); the order is the legend's.
STYLE = {
    PASSED: ("o", "#7f7f7f", 10, 2),
    UNJUDGED: ("o", "#c7c7c7", 10, 1),
    WARNED: ("^", "#ff7f0e", 36, 3),
    APPROVED: ("s", "#1f77b4", 40, 4),
    HELD: ("X", "#d62728", 64, 5),
}
NAMED = (HELD, APPROVED, WARNED)  # states whose sessions are named on the plots (most urgent first)
MAX_NAMES = 25  # names per plot; the rest are in the report's table
ASSET_POINTS = 2000  # passed sessions drawn per group on the QC asset's plot (the report draws all)


def session_state(level: str | None, approved: bool) -> str:
    if level == FAILED:
        return APPROVED if approved else HELD
    if level == WARN:
        return WARNED
    return PASSED if level is not None else UNJUDGED


def session_name(participant: str, session: str) -> str:
    return f"sub-{participant} ses-{session}"


@dataclass(frozen=True)
class Point:
    scan_id: str
    name: str  # sub-X ses-Y
    value: float
    state: str


@dataclass
class Row:
    """One acquisition group on one measure's plot."""

    group: Group
    stats: CohortStats | None  # the whole group (the plot's reference; a session is judged without itself)
    points: list[Point] = field(default_factory=list)
    cohort_rule: bool = False  # the group is large enough (and spread) for the cohort rule


@dataclass
class Cohort:
    """What the plots show: per measure, its groups' points and statistics."""

    qc: QcConfig
    states: dict[str, str]
    rows: dict[str, list[Row]]
    names: dict[str, str]  # ScanID -> sub-X ses-Y


def _states(store: Store, config: NeuroflowConfig) -> dict[str, str]:
    approved = load_approvals(config)
    return {scan_id: session_state(level, scan_id in approved) for scan_id, level in store.levels().items()}


def load_cohort(config: NeuroflowConfig, only_groups: Collection[Group] | None = None) -> Cohort:
    """The cohort from the store (excluded sessions left out), all groups or ``only_groups``."""
    qc = config.qc
    store = store_of(config)
    excluded = load_exclusions(config)
    names = {scan_id: session_name(*labels) for scan_id, labels in store.labels().items()}
    states = {scan_id: state for scan_id, state in _states(store, config).items() if scan_id not in excluded}
    metrics = list(qc.metrics)
    if only_groups is None:
        values = store.all_group_values(metrics, skip=excluded)
    else:
        values = {(g.key, m): store.group_values(g, m, excluded) for g in only_groups for m in metrics}
    rows: dict[str, list[Row]] = {m: [] for m in metrics}
    for (key, metric), group_values in sorted(values.items(), key=lambda kv: kv[0]):
        if not group_values.by_scan:
            continue
        rows[metric].append(_row(Group.from_key(key), group_values, qc, qc.metrics[metric], states, names))
    return Cohort(qc, states, rows, names)


def _row(group: Group, values: GroupValues, qc: QcConfig, limits: QcMetricConfig, states: dict[str, str],
         names: dict[str, str]) -> Row:
    stats = values.stats(min_spread=limits.min_spread)
    # as a session of the group is judged: against the others, so the group needs min_sessions + 1
    applies = (qc.mode == "cohort" and stats is not None and stats.sessions > qc.cohort.min_sessions
               and stats.spread > 0)
    points = [Point(scan_id, names.get(scan_id, scan_id), v, states.get(scan_id, UNJUDGED))
              for scan_id, vs in values.by_scan.items() for v in vs]
    return Row(group, stats, points, applies)


# --------------------------------------------------------------------------- plots


def _jitter(scan_id: str, n: int) -> float:
    """A stable vertical offset per point (the same picture every time)."""
    return ((zlib.crc32(f"{scan_id}#{n}".encode()) % 1000) / 1000.0 - 0.5) * 0.6


def _cohort_lines(row: Row, limits: QcMetricConfig, qc: QcConfig) -> list[tuple[float, str]]:
    """The row's cohort thresholds (value, colour) on its bad side(s)."""
    if not row.cohort_rule or row.stats is None:
        return []
    below, above = bad_sides(limits)
    lines = []
    for mads, colour in ((qc.cohort.warn_mads, STYLE[WARNED][1]), (qc.cohort.fail_mads, STYLE[HELD][1])):
        if mads is None:
            continue
        if below:
            lines.append((row.stats.median - mads * row.stats.spread, colour))
        if above:
            lines.append((row.stats.median + mads * row.stats.spread, colour))
    return lines


def _drawn(points: list[Point], most: int | None, highlight: str | None) -> list[Point]:
    """At most ``most`` passed points (a stable sample: the same sessions every time); every flagged one
    and the highlighted one."""
    passed = [p for p in points if p.state in (PASSED, UNJUDGED)]
    if most is None or len(passed) <= most:
        return points
    keep = {p.scan_id for p in sorted(passed, key=lambda p: zlib.crc32(p.scan_id.encode()))[:most]}
    keep.add(highlight or "")
    return [p for p in points if p.state not in (PASSED, UNJUDGED) or p.scan_id in keep]


def draw_metric(ax: Any, metric: str, rows: Sequence[Row], limits: QcMetricConfig, qc: QcConfig,
                highlight: str | None = None, max_names: int = MAX_NAMES, max_points: int | None = None) -> list[str]:
    """One measure on ``ax``: a strip of points per group with its median and cohort thresholds, the
    absolute thresholds across; returns the session names written on the plot. ``max_points``: draw at
    most that many passed sessions per group (the statistics are always the whole group's)."""
    rows = [Row(r.group, r.stats, _drawn(r.points, max_points, highlight), r.cohort_rule) for r in rows]
    xs = [p.value for row in rows for p in row.points]
    for row in rows:
        xs += [x for x, _ in _cohort_lines(row, limits, qc)]
    absolute_warn = not rows or any(not row.cohort_rule for row in rows)  # else the cohort replaces them
    if absolute_warn:  # the fixed thresholds judged some group: they belong on the plot
        xs += [v for v in (limits.fail_below, limits.fail_above, limits.warn_below, limits.warn_above) if v is not None]
    lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    pad = (hi - lo) * 0.06 or abs(hi) * 0.05 or 0.5
    lo, hi = lo - pad, hi + pad
    off_plot: list[str] = []
    for value, colour, style, what in (
        (limits.fail_below, STYLE[HELD][1], "-", "fail <"), (limits.fail_above, STYLE[HELD][1], "-", "fail >"),
        (limits.warn_below, STYLE[WARNED][1], ":", "warn <"), (limits.warn_above, STYLE[WARNED][1], ":", "warn >"),
    ):
        if value is None or (what.startswith("warn") and not absolute_warn):
            continue
        if lo <= value <= hi:
            ax.axvline(value, color=colour, linestyle=style, linewidth=1, zorder=0)
        else:
            off_plot.append(f"{what} {value:g}")
    named: list[tuple[int, float, str, float, float]] = []  # (urgency, distance, name, x, y)
    for i, row in enumerate(rows):
        for state in STYLE:
            pts = [(p, i + _jitter(p.scan_id, k)) for k, p in enumerate(row.points) if p.state == state]
            if pts:
                marker, colour, size, z = STYLE[state]
                ax.scatter(np.fromiter((p.value for p, _ in pts), float, len(pts)),
                           np.fromiter((y for _, y in pts), float, len(pts)), marker=marker, c=colour, s=size,
                           zorder=z, linewidths=0.5, alpha=0.6 if state in (PASSED, UNJUDGED) else 0.95)
        if row.stats is not None:
            ax.plot([row.stats.median] * 2, [i - 0.42, i + 0.42], color="black", linewidth=1.5, zorder=6)
        for x, colour in _cohort_lines(row, limits, qc):
            ax.plot([x, x], [i - 0.42, i + 0.42], color=colour, linestyle="--", linewidth=1.2, zorder=6)
        for k, p in enumerate(row.points):
            y = i + _jitter(p.scan_id, k)
            if p.scan_id == highlight:
                ax.scatter([p.value], [y], marker="o", s=260, facecolors="none", edgecolors="black", linewidths=1.8,
                           zorder=7)
                named.append((-1, 0.0, p.name, p.value, y))
            elif p.state in NAMED:
                distance = abs(p.value - row.stats.median) if row.stats is not None else 0.0
                named.append((NAMED.index(p.state), -distance, p.name, p.value, y))
    written = []
    for _, _, name, x, y in sorted(named)[:max_names]:
        ax.annotate(name, (x, y), xytext=(5, 5), textcoords="offset points", fontsize=7, zorder=8)
        written.append(name)
    ax.set_xlim(lo, hi)
    ax.set_ylim(-0.6, max(len(rows), 1) - 0.4)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([
        textwrap.fill(row.group.label or "all sessions", 32) + "\n"
        + (f"n={row.stats.sessions}" if row.stats else "n=0")
        + (f", {len(row.points)} drawn" if row.stats and len(row.points) < row.stats.n else "")
        + ("" if row.cohort_rule else (" (absolute)" if qc.mode == "cohort" else ""))
        for row in rows
    ], fontsize=8)
    title = metric
    if off_plot:
        title += f"   (off the plot: {', '.join(off_plot)})"
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)
    more = len(named) - len(written)
    if more > 0:
        ax.text(1.0, -0.12, f"{more} more flagged session(s): see the table", transform=ax.transAxes,
                ha="right", va="top", fontsize=7)
    return written


def _legend(fig: Any, qc: QcConfig, highlight: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=STYLE[s][0], color=STYLE[s][1], linestyle="none", label=s)
               for s in (PASSED, WARNED, HELD, APPROVED)]
    handles.append(Line2D([], [], color="black", label="median"))
    if qc.mode == "cohort":
        handles.append(Line2D([], [], color=STYLE[WARNED][1], linestyle="--",
                              label=f"cohort warn ({qc.cohort.warn_mads:g} MADs)"))
        if qc.cohort.fail_mads is not None:
            handles.append(Line2D([], [], color=STYLE[HELD][1], linestyle="--",
                                  label=f"cohort fail ({qc.cohort.fail_mads:g} MADs)"))
    handles.append(Line2D([], [], color=STYLE[HELD][1], label="absolute fail (floor)"))
    handles.append(Line2D([], [], color=STYLE[WARNED][1], linestyle=":", label="absolute warn"))
    if highlight:
        handles.append(Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor="black",
                              linestyle="none", markersize=11, label="this session"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)


def figure_png(cohort: Cohort, metrics: Sequence[str], highlight: str | None = None, width: float = 10.0,
               max_points: int | None = None) -> tuple[bytes, list[str]]:
    """One PNG with a panel per measure (rows: the groups); returns it and the names written on it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heights = [0.9 + 0.75 * max(len(cohort.rows.get(m, [])), 1) for m in metrics]
    fig = Figure(figsize=(width, sum(heights) + 0.9), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    names: list[str] = []
    for ax, metric in zip(axes, metrics, strict=True):
        names += draw_metric(ax, metric, cohort.rows.get(metric, []), cohort.qc.metrics[metric], cohort.qc, highlight,
                             max_points=max_points)
    _legend(fig, cohort.qc, highlight is not None)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue(), names


def session_figure(config: NeuroflowConfig, scan_id: str, groups: Collection[Group]) -> tuple[bytes, list[str]]:
    """The QC asset's figure: each measure's plot over the session's own groups, the session ringed; at most
    ``ASSET_POINTS`` passed sessions per group drawn (a QC run must not cost more as the archive grows)."""
    cohort = load_cohort(config, only_groups=list(groups))
    return figure_png(cohort, list(config.qc.metrics), highlight=scan_id, width=9.0, max_points=ASSET_POINTS)


# --------------------------------------------------------------------------- the report page


def _link(target: Path, out_dir: Path, text: str) -> str:
    """A link that works from the report's folder (relative), with the absolute path as its tooltip."""
    rel = os.path.relpath(target, out_dir)
    return f'<a href="{html.escape(quote(rel))}" title="{html.escape(str(target))}">{html.escape(text)}</a>'


def _outlier_rows(config: NeuroflowConfig, store: Store, cohort: Cohort, out_dir: Path,
                  series: dict[str, list[SeriesRow]]) -> list[str]:
    """A table row per flagged measure of every held, approved or warned session, with QSIPrep's report."""
    flagged = store.standings(records=True, levels=(FAILED, WARN))
    approvals = load_approvals(config)
    excluded = load_exclusions(config)
    root = layout.qsiprep_dir(config)
    order = {HELD: 0, APPROVED: 1, WARNED: 2}
    out = []
    for scan_id, verdict in sorted(flagged.items(), key=lambda kv: (order.get(cohort.states.get(kv[0], ""), 3),
                                                                   kv[1].participant, kv[1].session)):
        if scan_id in excluded:
            continue
        state = cohort.states.get(scan_id, session_state(verdict.level, scan_id in approvals))
        name = session_name(verdict.participant, verdict.session)
        links = [_link(p, out_dir, p.name) for p in session_reports(root, verdict.participant, verdict.session)]
        links += [_link(p, out_dir, p.name.split(f"ses-{verdict.session}_", 1)[-1])
                  for p in session_figures(root, verdict.participant, verdict.session)]
        groups = {row.qc_table: row.group.label for row in series.get(scan_id, [])}
        metrics = [MetricResult.from_dict(m) for m in verdict.record.get("metrics", [])]
        bad = [m for m in metrics if m.level in (FAILED, WARN)]
        problems = [str(p) for p in verdict.record.get("problems", [])]
        lines = [(m.table, m.metric, fmt(m.value), m.reason) for m in bad] + [("", "", "", p) for p in problems]
        if not lines:
            lines = [("", "", "", verdict.summary)]
        approval = approvals.get(scan_id)
        note = f"<br><small>{html.escape(approval.describe())}</small>" if state == APPROVED and approval else ""
        note += "".join(f"<br><small>{html.escape(n)}</small>" for n in verdict.record.get("notes", []))
        for k, (table, metric, value, reason) in enumerate(lines):
            first = k == 0
            out.append(
                "<tr class='{cls}'>".format(cls=state.replace(" ", "-"))
                + (f"<td>{html.escape(name)}<br><small>ScanID {html.escape(scan_id)}</small></td>"
                   f"<td>{html.escape(state)}{note}<br><small>judged {html.escape(verdict.at)}</small></td>"
                   if first else "<td></td><td></td>")
                + f"<td>{html.escape(groups.get(table, ''))}</td><td>{html.escape(metric)}</td>"
                + f"<td>{html.escape(value)}</td><td>{html.escape(reason)}</td>"
                + (f"<td>{' '.join(links) or '-'}</td>" if first else "<td></td>")
                + "</tr>"
            )
    return out


def _change_rows(changes: list[Change]) -> list[str]:
    out = []
    for c in changes:
        s = c.standing
        approved = f" (approved: {html.escape(c.approval.describe())})" if c.approval else ""
        out.append(f"<tr><td>{html.escape(session_name(s.participant, s.session))}<br><small>ScanID "
                   f"{html.escape(s.scan_id)}</small></td><td>{html.escape(s.level)}{approved}<br><small>"
                   f"{html.escape(s.summary)}</small></td><td>{html.escape(c.today.level)}<br><small>"
                   f"{html.escape(c.today.summary())}</small></td></tr>")
    return out


def _group_table(metric: str, rows: list[Row], qc: QcConfig) -> str:
    lines = ["<table class='groups'><tr><th>acquisition group</th><th>sessions</th><th>median</th>"
             f"<th>MAD x {MAD_TO_SIGMA}</th><th>rule</th></tr>"]
    for row in rows:
        stats = row.stats
        if row.cohort_rule:
            rule = "cohort"
        elif qc.mode != "cohort":
            rule = "absolute (qc.mode)"
        else:
            rule = f"absolute (a session has fewer than {qc.cohort.min_sessions} others, or no spread)"
        lines.append(f"<tr><td>{html.escape(row.group.label or 'all sessions')}</td>"
                     f"<td>{stats.sessions if stats else 0}</td><td>{fmt(stats.median) if stats else '-'}</td>"
                     f"<td>{fmt(stats.spread) if stats else '-'}</td><td>{html.escape(rule)}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


_CSS = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.5em; vertical-align: top; text-align: left; }
tr.held td:first-child { border-left: 4px solid #d62728; }
tr.approved td:first-child { border-left: 4px solid #1f77b4; }
tr.warned td:first-child { border-left: 4px solid #ff7f0e; }
img { max-width: 100%; border: 1px solid #eee; }
small { color: #555; }
"""


@dataclass(frozen=True)
class ReportResult:
    index: Path
    images: list[Path]
    held: list[str]  # names of the held sessions
    named: list[str]  # names written on the plots
    changes: int


def write_report(config: NeuroflowConfig, out_dir: Path) -> ReportResult:
    """Write ``out_dir/index.html`` and one PNG per measure; links to QSIPrep's outputs are relative."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    qc = config.qc
    store = store_of(config)
    cohort = load_cohort(config)
    series = store.series()
    images: list[Path] = []
    named: list[str] = []
    sections = []
    for metric in qc.metrics:
        png, names = figure_png(cohort, [metric])
        image = out_dir / f"{metric}.png"
        image.write_bytes(png)
        images.append(image)
        named += names
        sections.append(f"<h3>{html.escape(metric)}</h3>\n<p><small>absolute thresholds: "
                        f"{html.escape(rule_text(qc.metrics[metric]))}</small></p>\n"
                        f"<img src='{quote(image.name)}' alt='{html.escape(metric)} per acquisition group'>\n"
                        + _group_table(metric, cohort.rows.get(metric, []), qc))
    counts = {state: sum(1 for s in cohort.states.values() if s == state) for state in (HELD, APPROVED, WARNED, PASSED)}
    held = sorted(cohort.names.get(s, s) + f" (ScanID {s})" for s, state in cohort.states.items() if state == HELD)
    changes = plan(config)
    outliers = _outlier_rows(config, store, cohort, out_dir, series)
    if qc.mode == "cohort":
        rule = (f"cohort rule: each measure against the other sessions of its acquisition group "
                f"({', '.join(qc.cohort.group_by) or 'one group'}), warn beyond {qc.cohort.warn_mads:g} and "
                + (f"fail beyond {qc.cohort.fail_mads:g}" if qc.cohort.fail_mads is not None else "never fail on")
                + f" scaled MADs from their median once a group has {qc.cohort.min_sessions} sessions; "
                "below that the absolute thresholds; the absolute fail thresholds always apply")
    else:
        rule = "absolute thresholds only (qc.mode: absolute)"
    body = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>neuroflow image QC report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Image QC report</h1>",
        f"<p><small>written by <code>neuroflow qc report</code> at {html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}"
        f" from {html.escape(str(store.path))}; configuration {html.escape(str(config.source or '-'))}</small></p>",
        f"<p>{html.escape(rule)} (docs/domain-rules.md, \"Image QC\").</p>",
        f"<p>{len(cohort.states)} session(s) judged: <b>{counts[HELD]} held</b>, {counts[APPROVED]} approved, "
        f"{counts[WARNED]} warned, {counts[PASSED]} passed.</p>",
        "<h2>Held by image QC</h2>",
        ("<ul>" + "".join(f"<li>{html.escape(h)}</li>" for h in held) + "</ul>"
         "<p><small><code>neuroflow qc approve SESSION --reason ...</code> lets one through.</small></p>")
        if held else "<p>none</p>",
        "<h2>The cohort, per measure</h2>", *sections,
        "<h2>Outliers</h2>",
        "<table><tr><th>session</th><th>state</th><th>acquisition group</th><th>measure</th><th>value</th>"
        "<th>why</th><th>QSIPrep</th></tr>", *outliers, "</table>" if outliers else "</table><p>none</p>",
        "<h2>Standing under today's cohort</h2>",
        ("<p>These sessions were judged when the cohort was different; today's cohort would change their level. "
         "Nothing changes until an operator runs <code>neuroflow qc rejudge --reason ...</code>.</p>"
         "<table><tr><th>session</th><th>recorded verdict</th><th>under today's cohort</th></tr>"
         + "".join(_change_rows(changes)) + "</table>")
        if changes else "<p>Every recorded verdict stands under today's cohort.</p>",
        "</body></html>",
    ]
    index = out_dir / "index.html"
    atomic_write_text(index, "\n".join(body) + "\n")
    index.chmod(0o644)  # a page to share, like the plots beside it
    return ReportResult(index, images, held, named, len(changes))
