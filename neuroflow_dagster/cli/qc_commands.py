"""`neuroflow qc approve | revoke | list | rejudge | report`: the operator's side of the image QC gate (qc/).

A session whose image QC failed is not reconstructed or parcellated. `approve` records who let it
through, when and why (append-only, state/qc_approvals.jsonl) and relaunches the session's QC,
reconstruction and parcellation as one backfill through the webserver, as `neuroflow reprocess`
does. `list` shows every session's recorded verdict (a session never judged is judged now).
`rejudge` lists the sessions whose standing today's cohort would change and, with a reason, records
the new verdicts and relaunches them; `report` writes the cohort's plots and outliers as a page.
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from neuroflow_dagster import stages
from neuroflow_dagster.cli.exits import EXIT_OK, records_errors_exit_1
from neuroflow_dagster.cli.output import add_format_option, print_json, print_rows
from neuroflow_dagster.config import NeuroflowConfig, load_config
from neuroflow_dagster.errors import UsageError
from neuroflow_dagster.naming.partitions import session_key

LIST_COLUMNS = ["subject", "session", "scan_id", "qc", "detail", "approved_by", "approved_at", "reason", "judged"]
REJUDGE_COLUMNS = ["subject", "session", "scan_id", "recorded", "today", "approved_by", "detail"]


def _config(args: argparse.Namespace) -> NeuroflowConfig:
    return load_config(getattr(args, "config", None))


def relaunch_assets() -> list[str]:
    """What an approval re-runs for the session: the QC asset, then the stages it gates."""
    return [stages.QC_ASSET, *(stages.stage(name).asset for name in stages.QC_GATED_STAGES)]


def cmd_qc_approve(args: argparse.Namespace) -> int:
    """Let a session that failed image QC through: record who/when/why, relaunch its QC, recon, parcellation."""
    from neuroflow_dagster.control.targets import resolve_session
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.qc import approvals
    from neuroflow_dagster.qc.gate import FAILED, session_gate

    config = _config(args)
    if not (args.reason or "").strip():
        raise UsageError("--reason must say what was looked at and why the session may go on")
    entry = resolve_session(Registry(config.paths.state), args.session)
    what = f"sub-{entry.participant_id} ses-{entry.session_id} (ScanID {entry.scan_id!r})"
    gate = session_gate(config, entry.scan_id, entry.participant_id, entry.session_id)
    if gate.state == "approved":
        print(f"{what} is already approved: {gate.approval.describe() if gate.approval else ''}")
    elif gate.state != FAILED:
        raise UsageError(f"{what} did not fail image QC ({gate.state}: {gate.describe()}); nothing to approve")
    else:
        approval = approvals.approve(config, entry.scan_id, entry.participant_id, entry.session_id, args.reason,
                                     by=args.by, qc=gate.describe())
        print(f"{what}: {gate.describe()}")
        print(f"{approval.describe()}")
        print(f"recorded in {approvals.path(config)}")
    key = session_key(entry.participant_id, entry.session_id)
    result: dict[str, Any] = {"scan_id": entry.scan_id, "partition": key, "assets": relaunch_assets()}
    if args.no_launch:
        print(f"not relaunched (--no-launch): neuroflow qc approve {entry.scan_id} ... again, or backfill "
              f"{', '.join(result['assets'])} for {key} in the UI")
        return EXIT_OK
    title = f"neuroflow qc approve {key} by {args.by or getpass.getuser()}"
    print(relaunch(args.url, result["assets"], [key], title, "The approval is recorded; relaunch with `neuroflow qc "
                   f"approve {entry.scan_id} --reason ...` once the webserver is up")
          + " (watch it under Overview > Backfills)")
    return EXIT_OK


def relaunch(url: str | None, assets: list[str], keys: list[str], title: str, recorded: str) -> str:
    """One backfill through the webserver, as the UI launches it (tag of the recon lane, where QC runs);
    when it cannot be reached, the error says what is already recorded."""
    from neuroflow_dagster.control.backfill import BackfillError, graphql_url, launch_backfill

    try:
        launched = launch_backfill(url, assets, keys, stages.QC_GATED_STAGES[0], title)
    except BackfillError as exc:
        raise BackfillError(f"{exc}. {recorded}") from exc
    return (f"relaunched {', '.join(assets)} for {', '.join(keys)}: backfill {launched['backfill_id']} via "
            f"{graphql_url(url)}")


def cmd_qc_revoke(args: argparse.Namespace) -> int:
    """Withdraw an approval: the gate holds the session again at its next QC run (outputs are kept)."""
    from neuroflow_dagster.control.targets import resolve_session
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.qc import approvals

    config = _config(args)
    if not (args.reason or "").strip():
        raise UsageError("--reason must say why the approval is withdrawn")
    entry = resolve_session(Registry(config.paths.state), args.session)
    if approvals.revoke(config, entry.scan_id, args.reason, by=args.by):
        print(f"approval of ScanID {entry.scan_id!r} withdrawn; recorded in {approvals.path(config)}")
    else:
        print(f"ScanID {entry.scan_id!r} has no standing approval; nothing to do")
    return EXIT_OK


def qc_rows(config: NeuroflowConfig, everything: bool = False) -> list[dict[str, Any]]:
    """Every registered session's gate state (failed and approved ones unless ``everything``): its recorded
    verdict (one read of the store), or for a session never judged, judged now from its QC tables."""
    from neuroflow_dagster.discovery.exclusions import load_exclusions
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.qc.approvals import load_approvals
    from neuroflow_dagster.qc.gate import FAILED, GateState, Verdict, session_gate, store_of

    excluded = load_exclusions(config)
    standings = store_of(config).standings(records=True)
    approved = load_approvals(config)
    rows = []
    for entry in Registry(config.paths.state).all():
        if entry.status or entry.scan_id in excluded:
            continue
        standing = standings.get(entry.scan_id)
        if standing is not None:
            gate = GateState(Verdict.from_record(standing.record), approved.get(entry.scan_id))
            judged = standing.at + (f" (re-judged by {standing.by})" if standing.action == "rejudge" else "")
        else:
            gate = session_gate(config, entry.scan_id, entry.participant_id, entry.session_id)
            judged = "now (not judged by the QC asset yet)" if gate.state != "not_applicable" else ""
        if not everything and gate.state not in (FAILED, "approved"):
            continue
        approval = gate.approval if gate.state == "approved" else None
        rows.append({
            "subject": entry.participant_id, "session": entry.session_id, "scan_id": entry.scan_id,
            "partition": session_key(entry.participant_id, entry.session_id),
            "qc": "FAILED" if gate.state == FAILED else gate.state, "detail": gate.verdict.summary(),
            "approved_by": approval.by if approval else "", "approved_at": approval.at if approval else "",
            "reason": approval.reason if approval else "", "judged": judged,
            "metrics": [m.as_dict() for m in gate.verdict.metrics],
        })
    return rows


def cmd_qc_list(args: argparse.Namespace) -> int:
    """Sessions that fail image QC and sessions let through by an approval (--all: every session)."""
    config = _config(args)
    rows = qc_rows(config, everything=args.all)
    if args.format == "json":
        print_json(rows)
        return EXIT_OK
    print_rows(rows, args.format, LIST_COLUMNS, max_width=None if args.format == "csv" else 90)
    if args.format == "table":
        failed = sum(1 for r in rows if r["qc"] == "FAILED")
        approved = sum(1 for r in rows if r["qc"] == "approved")
        print(f"\n{failed} session(s) held by image QC, {approved} approved"
              + ("; `neuroflow qc approve SESSION --reason ...` lets one through" if failed else ""))
    return EXIT_OK


def cmd_qc_rejudge(args: argparse.Namespace) -> int:
    """Sessions whose recorded verdict today's cohort would change; with --reason, record and relaunch them."""
    from neuroflow_dagster.control.targets import resolve_session
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.qc import rejudge
    from neuroflow_dagster.qc.gate import store_of

    config = _config(args)
    reason = (args.reason or "").strip()
    if not args.dry_run and not reason:
        raise UsageError("--reason must say why today's cohort should decide (or --dry-run to only list)")
    only = None
    if args.sessions:
        registry = Registry(config.paths.state)
        only = {resolve_session(registry, s).scan_id for s in args.sessions}
    changes = rejudge.plan(config, only)
    apply = bool(changes) and not args.dry_run
    rows = [{
        "subject": c.standing.participant, "session": c.standing.session, "scan_id": c.standing.scan_id,
        "partition": session_key(c.standing.participant, c.standing.session),
        "recorded": c.standing.level, "recorded_at": c.standing.at, "today": c.today.level,
        "approved_by": c.approval.by if c.approval else "", "detail": c.detail(), "today_qc": c.today.summary(),
        "recorded_detail": c.standing.summary, "applied": apply,
    } for c in changes]
    if args.format == "json":
        print_json(rows)
    else:
        print_rows(rows, args.format, REJUDGE_COLUMNS, max_width=None if args.format == "csv" else 90)
    released = [session_key(c.standing.participant, c.standing.session) for c in changes if c.released]
    others = [session_key(c.standing.participant, c.standing.session) for c in changes if not c.released]
    if args.format == "table":
        print(f"\n{len(changes)} session(s) whose standing today's cohort would change: {len(released)} released, "
              f"{sum(1 for c in changes if c.held)} newly held, "
              f"{len(changes) - len(released) - sum(1 for c in changes if c.held)} other")
    if not apply:
        if changes and args.format == "table":
            print("nothing recorded (--dry-run); `neuroflow qc rejudge --reason ...` records these verdicts")
        return EXIT_OK
    recorded = rejudge.apply(config, changes, reason, by=args.by)
    print(f"recorded {len(recorded)} re-judgement(s) in {store_of(config).path} and "
          f"{config.paths.state / rejudge.AUDIT}")
    batches = [(relaunch_assets(), released), ([stages.QC_ASSET], others)]
    if args.no_launch:
        print("not relaunched (--no-launch): backfill " + "; ".join(
            f"{', '.join(assets)} for {', '.join(keys)}" for assets, keys in batches if keys) + " in the UI")
        return EXIT_OK
    who = args.by or getpass.getuser()
    for assets, keys in batches:
        if keys:
            print(relaunch(args.url, assets, keys, f"neuroflow qc rejudge by {who}", "The re-judgements are "
                           f"recorded; backfill {', '.join(assets)} for {', '.join(keys)} once the webserver is up"))
    return EXIT_OK


def cmd_qc_seed(args: argparse.Namespace) -> int:
    """Add the measures of sessions judged before the QC store existed to the cohort (verdicts unchanged)."""
    from neuroflow_dagster.discovery.exclusions import load_exclusions
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.qc.gate import seed_cohort, store_of

    config = _config(args)
    excluded = load_exclusions(config)
    sessions = [(e.scan_id, e.participant_id, e.session_id) for e in Registry(config.paths.state).all()
                if not e.status and e.scan_id not in excluded]
    added, empty = seed_cohort(config, sessions)
    print(f"{added} session(s) added to the cohort in {store_of(config).path} ({empty} without a QC table, "
          f"{len(sessions) - added - empty} already there); their verdicts stay as judged")
    return EXIT_OK


def cmd_qc_report(args: argparse.Namespace) -> int:
    """Write the QC report page: the cohort per measure as plots, held/approved/warned sessions named."""
    from pathlib import Path

    from neuroflow_dagster.qc.report import write_report

    config = _config(args)
    result = write_report(config, Path(args.output))
    print(f"wrote {result.index} with {len(result.images)} plot(s); held by image QC: "
          f"{', '.join(result.held) or 'none'}")
    if result.changes:
        print(f"{result.changes} session(s) would change standing under today's cohort: "
              "`neuroflow qc rejudge --dry-run`")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    qc = sub.add_parser("qc", help="the image QC gate: approve a session that failed, list failed/approved ones, "
                                   "re-judge under today's cohort, the QC report")
    qc_sub = qc.add_subparsers(dest="qc_command", required=True, parser_class=type(qc))

    p = qc_sub.add_parser("approve", help="let a session that failed image QC through (reason required)")
    p.add_argument("session", metavar="SESSION", help="a ScanID, sub-X/ses-Y, X/Y or the partition key Y|X")
    p.add_argument("--reason", required=True, help="what was looked at and why the data are usable")
    p.add_argument("--by", default=None, help="who approves (default: the logged-in user)")
    p.add_argument("--no-launch", action="store_true", help="record the approval only; relaunch nothing")
    p.add_argument("--url", default=None, help="the webserver (default http://127.0.0.1:3000/graphql)")
    p.set_defaults(func=records_errors_exit_1(cmd_qc_approve))

    p = qc_sub.add_parser("revoke", help="withdraw an approval (reason required)")
    p.add_argument("session", metavar="SESSION")
    p.add_argument("--reason", required=True)
    p.add_argument("--by", default=None)
    p.set_defaults(func=records_errors_exit_1(cmd_qc_revoke))

    p = qc_sub.add_parser("rejudge", help="sessions whose recorded QC verdict today's cohort would change; "
                                         "--reason records the new verdicts and relaunches them")
    p.add_argument("sessions", metavar="SESSION", nargs="*", help="only these sessions (default: every judged one)")
    p.add_argument("--dry-run", action="store_true", help="list only; record and relaunch nothing")
    p.add_argument("--reason", default=None, help="why today's cohort should decide (required unless --dry-run)")
    p.add_argument("--by", default=None, help="who re-judges (default: the logged-in user)")
    p.add_argument("--no-launch", action="store_true", help="record the verdicts only; relaunch nothing")
    p.add_argument("--url", default=None, help="the webserver (default http://127.0.0.1:3000/graphql)")
    add_format_option(p)
    p.set_defaults(func=records_errors_exit_1(cmd_qc_rejudge))

    p = qc_sub.add_parser("report", help="write DIR/index.html: the cohort per measure as plots, held, approved "
                                        "and warned sessions named, outliers with links to QSIPrep's report")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="the folder to write (created)")
    p.set_defaults(func=records_errors_exit_1(cmd_qc_report))

    p = qc_sub.add_parser("seed", help="add the QC measures of sessions judged before the QC store existed to "
                                      "the cohort (reads their QC tables once; verdicts unchanged)")
    p.set_defaults(func=records_errors_exit_1(cmd_qc_seed))

    p = qc_sub.add_parser("list", help="sessions held by image QC and approved ones (their recorded verdicts)")
    p.add_argument("--all", action="store_true", help="every registered session, whatever its QC")
    add_format_option(p)
    p.set_defaults(func=records_errors_exit_1(cmd_qc_list))
