"""Set-up commands: `neuroflow init`, `config validate`, `scan`, `instance init`, `start`, `demo` and
`preflight install|status`."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from neuroflow_dagster.cli.exits import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, Parser
from neuroflow_dagster.cli.output import add_format_option, print_rows
from neuroflow_dagster.config import check_paths, load_config
from neuroflow_dagster.errors import ConfigError, UsageError
from neuroflow_dagster.scaffold import dagster_home, init_workspace


def cmd_init(args: argparse.Namespace) -> int:
    target = init_workspace(Path(args.dir), force=args.force)
    print(f"wrote {target}")
    print("next: put ScanID,SubjectCode rows in mapping.csv, then")
    print(f"  neuroflow --config {target} start --dagster-home {target.parent / '.dagster_home'}")
    return EXIT_OK


def cmd_config_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    problems = check_paths(config)
    if problems:
        print(f"{config.source}: not usable:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{config.source}: ok")
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    from neuroflow_dagster.discovery import engine
    from neuroflow_dagster.discovery.exclusions import load_exclusions

    config = load_config(args.config)
    result = engine.dry_run_discovery(config, excluded=set(load_exclusions(config)))
    rows: list[dict[str, Any]] = []
    for reg in result.registrations:
        rows.append(
            {
                "scan_id": reg.scan_id,
                "decision": "register",
                "subject": reg.participant_label,
                "session": reg.session_label,
                "reason": reg.protocol.message,
            }
        )
    for held in result.held:
        subject, _, session = held.registered.partition(" ")  # "sub-X ses-Y" of a registered session
        rows.append(
            {
                "scan_id": held.scan_id,
                "decision": f"held: {held.reason}",
                "subject": subject.removeprefix("sub-"),
                "session": session.removeprefix("ses-"),
                "reason": held.message,
            }
        )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in result.problems:
        print(f"problem ({problem.kind}): {problem.message}", file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print_rows(rows, args.format, ["scan_id", "decision", "subject", "session", "reason"])
    return EXIT_OK


def prepare(home: Path) -> None:
    """Create and migrate the instance's storage once, before any Dagster process opens it."""
    from neuroflow_dagster.control.storage import InstanceNotReady, prepare_instance

    try:
        prepare_instance(home)
    except InstanceNotReady as exc:
        raise ConfigError(str(exc)) from exc


def _home_option(value: str | None) -> Path:
    home = value or os.environ.get("DAGSTER_HOME")
    if not home:
        raise UsageError("no Dagster instance: pass --dagster-home or set DAGSTER_HOME")
    path = Path(home).resolve()
    if not (path / "dagster.yaml").is_file():
        raise UsageError(
            f"{path / 'dagster.yaml'} does not exist: copy the project's dagster.yaml there first "
            "(deploy/ has the production variants)"
        )
    return path


def cmd_instance_init(args: argparse.Namespace) -> int:
    home = _home_option(args.dagster_home)
    prepare(home)
    print(f"Dagster instance at {home}: storage created and migrated")
    return EXIT_OK


def _dagster_dev(host: str, port: int) -> list[str]:
    dagster = Path(sys.executable).with_name("dagster")
    return [str(dagster), "dev", "-m", "neuroflow_dagster.definitions", "-h", host, "-p", str(port)]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SHUTDOWN_GRACE_S = 60.0  # dagster dev stops its webserver, daemon and code server within this
SWEEP_GRACE_S = 10.0  # then whatever is left in its process group gets SIGTERM, and SIGKILL after this
PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """In the dagster dev child before exec: default signal dispositions (a background job of a
    non-interactive shell starts with SIGINT ignored, and `dagster dev` maps SIGTERM to SIGINT's
    handler, so both would be ignored) and, on Linux, SIGTERM when this process dies (even by SIGKILL)."""
    from neuroflow_dagster.runtimes.guard import reset_signal_dispositions

    reset_signal_dispositions()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl: the handlers below still stop it
            pass


def run_dagster_dev(argv: list[str], env: dict[str, str], cwd: Path) -> int:
    """Run `dagster dev` and stop its whole process tree on SIGINT, SIGTERM or SIGHUP, however this
    process was started (docs/operations.md, "...Dagster was started from a background shell").

    The child leads its own process group, so this process is the one entry point for signals: it
    sends SIGTERM to `dagster dev` (its orderly shutdown, as Ctrl-C), waits up to SHUTDOWN_GRACE_S, then
    stops what is left of the group (SIGTERM, SIGKILL after SWEEP_GRACE_S): no orphan keeps the port.
    """
    from neuroflow_dagster.runtimes.process import kill_group

    proc = subprocess.Popen(argv, env=env, cwd=cwd, start_new_session=True, preexec_fn=_child_setup)
    stopping: list[tuple[int, float]] = []

    def forward(signum: int, _frame: object) -> None:
        if not stopping:
            stopping.append((signum, time.monotonic()))
            print(f"neuroflow: {signal.Signals(signum).name} received, stopping dagster dev", flush=True)
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        code: int | None = None
        while code is None:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() - stopping[0][1] > SHUTDOWN_GRACE_S:
                    break
    finally:
        kill_group(proc, SWEEP_GRACE_S)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:  # stopped as asked: clean when dagster dev shut down by itself within the grace period
        return 0 if proc.returncode is not None and time.monotonic() - stopping[0][1] <= SHUTDOWN_GRACE_S else 1
    return proc.returncode if proc.returncode is not None else 1


def cmd_start(args: argparse.Namespace) -> int:
    """`dagster dev` for this code location, after creating the instance's storage exactly once."""
    config = load_config(args.config)
    problems = check_paths(config)
    if problems:
        raise ConfigError(f"{config.source} cannot be used:\n  " + "\n  ".join(problems))
    home = _home_option(args.dagster_home)
    prepare(home)
    env = dict(os.environ, DAGSTER_HOME=str(home), NEUROFLOW_CONFIG=str(config.source))
    return run_dagster_dev(_dagster_dev(args.host, args.port), env, Path(str(config.source)).parent)


def cmd_demo(args: argparse.Namespace) -> int:
    from neuroflow_dagster.demo.workspace import build_demo_workspace

    directory = Path(args.dir).resolve()
    config_path = build_demo_workspace(directory, reset=args.reset)
    home = dagster_home(directory)
    prepare(home)
    env = dict(os.environ, DAGSTER_HOME=str(home), NEUROFLOW_CONFIG=str(config_path))
    print(f"demo workspace: {directory}")
    print(
        f"  DICOM in {directory / 'incoming'}; BIDS in {directory / 'bids'}; derivatives in {directory / 'derivatives'}"
    )
    print(f"  Dagster UI: http://{args.host}:{args.port}  (Ctrl-C stops it)")
    if args.no_ui:
        return EXIT_OK
    argv = _dagster_dev(args.host, args.port)
    if args.late_session_after is not None:
        from neuroflow_dagster.demo.workspace import schedule_late_session

        schedule_late_session(directory, args.late_session_after)
    return run_dagster_dev(argv, env, directory)


def cmd_preflight_install(args: argparse.Namespace) -> int:
    """Build the pinned venv(s) QSIPrep's preflight runs in (idempotent: a built venv returns at once)."""
    from neuroflow_dagster.preflight import qsiprep as preflight
    from neuroflow_dagster.preflight import venvs

    config = load_config(args.config)
    versions = list(venvs.VERSIONS) if args.all else [preflight.preflight_version(config)]
    root = preflight.venvs_dir(config)
    try:
        for version in versions:
            print(venvs.build(root, version, config.pipelines.qsiprep.preflight.python,
                              log=lambda m: print(m, file=sys.stderr)))  # fmt: skip
            preflight.clear_unavailable(config, version)
    except venvs.VenvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_preflight_status(args: argparse.Namespace) -> int:
    """Per locked QSIPrep version: is its venv ready, does the stage use it, what runs were told."""
    from neuroflow_dagster.preflight import qsiprep as preflight
    from neuroflow_dagster.preflight import venvs

    config = load_config(args.config)
    cfg = config.pipelines.qsiprep.preflight
    used = preflight.preflight_version(config)
    root = preflight.venvs_dir(config)
    notes = preflight.unavailable_notes(config)
    rows = []
    for version in venvs.VERSIONS:
        problem = venvs.problem(root, version)
        rows.append(
            {
                "qsiprep": version,
                "used": "yes" if version == used and cfg.enabled else "no",
                "venv": str(venvs.venv_dir(root, version)),
                "state": "ready" if problem is None else "missing",
                "note": problem or notes.get(version, ""),
            }
        )
    print_rows(rows, args.format, ["qsiprep", "used", "state", "venv", "note"])
    if not cfg.enabled:
        print("the preflight is off (pipelines.qsiprep.preflight.enabled: false)", file=sys.stderr)
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write DIR/neuroflow.yaml, a commented starter config")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("config", help="configuration commands")
    csub = p.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    v = csub.add_parser("validate", help="load, validate and check the paths of the configuration")
    v.set_defaults(func=cmd_config_validate)

    p = sub.add_parser("scan", help="what discovery would register now, and why other folders are held")
    p.add_argument(
        "--dry-run",
        action="store_true",
        default=True,
        help="(always) nothing is written; the sensor does the real registration",
    )
    add_format_option(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("instance", help="the Dagster instance (DAGSTER_HOME)")
    isub = p.add_subparsers(dest="instance_command", required=True, parser_class=Parser)
    i = isub.add_parser("init", help="create and migrate the instance's storage once (safe to repeat)")
    i.add_argument("--dagster-home", help="the instance folder holding dagster.yaml (default: $DAGSTER_HOME)")
    i.set_defaults(func=cmd_instance_init)

    p = sub.add_parser("start", help="create the instance's storage if needed, then start dagster dev")
    p.add_argument("--dagster-home", help="the instance folder holding dagster.yaml (default: $DAGSTER_HOME)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("demo", help="build a demo workspace with real and synthetic DICOM and start dagster dev")
    p.add_argument("--dir", default="demo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--reset", action="store_true", help="start from an empty workspace")
    p.add_argument("--no-ui", action="store_true", help="only build the workspace")
    p.add_argument(
        "--late-session-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="drop a late third session of the first subject after SECONDS",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("preflight", help="the pinned venvs in which QSIPrep's own input handling checks each run")
    psub = p.add_subparsers(dest="preflight_command", required=True, parser_class=Parser)
    i = psub.add_parser("install", help="build the venv of the QSIPrep version the stage runs (~1.5 GB, minutes)")
    i.add_argument("--all", action="store_true", help="every locked QSIPrep version, not only the one in use")
    i.set_defaults(func=cmd_preflight_install)
    i = psub.add_parser("status", help="which preflight venvs are ready and which the stage uses")
    add_format_option(i)
    i.set_defaults(func=cmd_preflight_status)
