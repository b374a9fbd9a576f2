"""`image_qc_session`: a session's image QC after QSIPrep, with the blocking `image_qc` check.

The asset reads the session's QC table(s) from the QSIPrep derivatives (qc/gate.py judges them
against the cohort of the session's acquisition group and the `qc` section of neuroflow.yaml, and
records the verdict; the same tables judged again keep it) and records every measure, its level and
the rule that gave it, the cohort plot of each measure with the session ringed (qc/report.py), the
figures QSIPrep drew for the session, and any operator approval. Its check
fails with ERROR severity when a measure is beyond a fail threshold and no approval stands:
the check is blocking, so in the run that also reconstructs and parcellates the session those
steps are skipped. Warnings and approved failures are WARN (not blocking), so the UI shows
them in yellow with the reason. docs/operations.md, "The QC gate".
"""


import base64
import html
from pathlib import Path

import dagster as dg

from neuroflow_dagster import stages
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.assets.common import refuse, session_context
from neuroflow_dagster.defs.execution import read_while_running, reading_outputs
from neuroflow_dagster.defs.partitions import session_partitions, subject_of_session
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.naming.tags import STATUS_DONE, STATUS_KEY, STATUS_NOT_APPLICABLE
from neuroflow_dagster.qc.gate import (
    FAILED,
    NOT_APPLICABLE,
    WARN,
    Evaluation,
    GateState,
    evaluate_session,
    session_gate,
)

QC_KEY = dg.AssetKey(stages.QC_ASSET)
QC_CHECK_KEY = dg.AssetCheckKey(QC_KEY, stages.QC_CHECK)
QC_STATE_KEY = "neuroflow/qc"  # passed | warn | failed | approved | not_applicable, on the check and the asset
FAILURE_CLASS = "qc"
INLINE_LIMIT = 600_000  # bytes: larger figures are linked, not embedded
_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".gif": "image/gif"}


def figures_markdown(figures: list[Path]) -> str:
    """The figures inline (data URIs: the UI cannot load local files), large ones as paths."""
    parts = []
    for path in figures:
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size <= INLINE_LIMIT and path.suffix.lower() in _MIME:
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(f"**{path.name}**\n\n![{path.name}](data:{_MIME[path.suffix.lower()]};base64,{data})")
        else:
            parts.append(f"**{path.name}** ({size / 1e6:.1f} MB): `{path}`")
    return "\n\n".join(parts)


def metrics_markdown(gate: GateState) -> str:
    rows = ["| table | measure | value | level | thresholds |", "|---|---|---|---|---|"]
    for m in gate.verdict.metrics:
        value = "n/a" if m.value is None else f"{m.value:g}"
        level = m.level.upper() if m.level == FAILED else m.level
        rows.append(f"| {html.escape(m.table)} | {m.metric} | {value} | {level} | {m.rule} |")
    return "\n".join(rows)


def check_metadata(gate: GateState) -> dict[str, dg.MetadataValue | str | float | int]:
    """Each measure (value and level), the thresholds, the state and the approval, for the check and asset."""
    meta: dict[str, dg.MetadataValue | str | float | int] = {QC_STATE_KEY: gate.state, "qc_summary": gate.describe()}
    many = len(gate.verdict.tables) > 1
    for m in gate.verdict.metrics:
        name = f"{m.table.split('_space-')[0]}:{m.metric}" if many else m.metric
        meta[name] = dg.MetadataValue.float(m.value) if m.value is not None else "n/a"
        meta[f"{name} level"] = m.level
        meta[f"{name} thresholds"] = m.rule
        meta[f"{name} rule"] = m.basis  # absolute / cohort / floor
        if m.score is not None:
            meta[f"{name} MADs from median"] = dg.MetadataValue.float(round(m.score, 2))
    if gate.verdict.notes:
        meta["qc_rule"] = "; ".join(gate.verdict.notes)
    if gate.verdict.metrics:
        meta["measures"] = dg.MetadataValue.md(metrics_markdown(gate))
    if gate.approval is not None:
        meta["approval"] = gate.approval.describe()
        meta["approved_by"] = gate.approval.by
        meta["approved_at"] = gate.approval.at
    for problem in gate.verdict.problems:
        meta.setdefault("problem", problem)
    return meta


def check_result(gate: GateState) -> dg.AssetCheckResult:
    """ERROR (blocks recon and parcellation in this run) only for an unapproved failure."""
    state = gate.state
    severity = dg.AssetCheckSeverity.ERROR if state == FAILED else dg.AssetCheckSeverity.WARN
    passed = state not in (FAILED, WARN, "approved")
    return dg.AssetCheckResult(
        check_name=stages.QC_CHECK, passed=passed, severity=severity, description=gate.describe()[:2000],
        metadata=check_metadata(gate),
    )


def cohort_markdown(cfg: NeuroflowConfig, scan_id: str, evaluation: Evaluation) -> str:
    """The cohort plot of each measure over the session's acquisition group(s), the session ringed, as an
    inline PNG (Dagster's markdown renderer allows `data:` image sources; a local path would not load)."""
    from neuroflow_dagster.qc.report import session_figure

    png, _ = session_figure(cfg, scan_id, evaluation.groups)
    data = base64.b64encode(png).decode()
    text = "; ".join(evaluation.gate.verdict.notes) or "every session a point; the ringed one is this session"
    return f"![cohort of {html.escape(scan_id)}](data:image/png;base64,{data})\n\n{text}"


def gate_or_refuse(config: NeuroflowConfig, scan_id: str, participant: str, session: str) -> GateState:
    """For the gated stages themselves: refuse (never retried) a session whose QC failed unapproved.

    The blocking check already skips them in the run that judged the session; this holds when
    they are launched alone (a UI materialization, `neuroflow reprocess --stage qsirecon`).
    """
    gate = session_gate(config, scan_id, participant, session)
    if gate.blocks:
        raise refuse(f"sub-{participant} ses-{session} failed image QC ({gate.describe()}); look at "
                     f"{stages.QC_ASSET} in the UI and `neuroflow qc approve {scan_id} --reason ...` to let it "
                     "through", FAILURE_CLASS)
    return gate


def build_image_qc_asset(config: NeuroflowConfig) -> dg.AssetsDefinition:
    qsiprep = stages.stage("qsiprep")
    reads = [qsiprep] if read_while_running(qsiprep) else []

    @dg.asset(
        name=stages.QC_ASSET,
        partitions_def=session_partitions,
        deps=[dg.AssetDep(qsiprep.asset, partition_mapping=subject_of_session)],
        check_specs=[
            dg.AssetCheckSpec(
                stages.QC_CHECK, asset=stages.QC_ASSET, blocking=True, partitions_def=session_partitions,
                description="QSIPrep's image QC measures against the cohort of the session's acquisition group "
                            "(the fixed qc thresholds for a small group; the fail thresholds are floors); a failure "
                            "holds reconstruction and parcellation of the session until `neuroflow qc approve`",
            )
        ],
        group_name="preprocessing",
        kinds={"python"},
        description="The session's image QC from QSIPrep's *_desc-image_qc.tsv judged against its cohort, with the "
                    "cohort plot and QSIPrep's figures; its blocking check gates reconstruction and parcellation "
                    "(docs/operations.md, 'The QC gate').",
    )
    def image_qc_session(context: dg.AssetExecutionContext, neuroflow: NeuroflowResource) -> dg.MaterializeResult:
        cfg = neuroflow.load()
        ses = session_context(cfg, context.partition_key)
        # It reads QSIPrep's output of the subject: not while a publish replaces it (docs/domain-rules.md#state).
        retry = cfg.stage(stages.QC_GATED_STAGES[0]).retry
        with reading_outputs(context, cfg, stages.QC_ASSET, reads, ses.participant, retry) as waited:
            evaluation = evaluate_session(cfg, ses.entry.scan_id, ses.participant, ses.session,
                                          by=f"{stages.QC_ASSET} run {context.run_id[:8]}")
            gate = evaluation.gate
            meta = dict(check_metadata(gate))
            figures = list(gate.verdict.figures)
            if figures:
                meta["figures"] = dg.MetadataValue.md(figures_markdown(figures))
                meta["figure_paths"] = dg.MetadataValue.json([str(p) for p in figures])
        meta.update(waited)
        meta[STATUS_KEY] = STATUS_NOT_APPLICABLE if gate.state == NOT_APPLICABLE else STATUS_DONE
        meta["scan_id"] = ses.entry.scan_id
        if evaluation.stored is not None:
            meta["verdict"] = evaluation.describe_origin()
            if evaluation.kept:
                context.log.info(f"QC verdict kept: {evaluation.describe_origin()}")
        if evaluation.today is not None:
            meta["under today's cohort"] = evaluation.today.summary()
        if gate.verdict.tables:
            meta["qc_table"] = dg.MetadataValue.path(str(gate.verdict.tables[0]))
        if gate.verdict.metrics:  # from the store alone: outside the read of QSIPrep's output
            try:
                meta["cohort"] = dg.MetadataValue.md(cohort_markdown(cfg, ses.entry.scan_id, evaluation))
            except Exception as exc:  # a picture never decides a verdict
                context.log.warning(f"cohort figure not drawn: {type(exc).__name__}: {exc}")
                meta["cohort"] = f"not drawn: {type(exc).__name__}: {exc}"
        if gate.state == FAILED:
            context.log.warning(f"image QC failed, reconstruction and parcellation held: {gate.describe()}")
        return dg.MaterializeResult(metadata=meta, check_results=[check_result(gate)])

    return image_qc_session
