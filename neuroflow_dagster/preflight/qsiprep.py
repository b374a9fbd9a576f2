"""QSIPrep's own input handling on a run's exact inputs, before the run is started or submitted.

The request is the run's own command line (the ToolSpec's argv): for a container runtime its
container paths are mapped back to the host folders they mount, for the stand-in (``builtin``) it is
the argv the real QSIPrep would get for the same run (``runtime: local``, same image tag, so the same
dialect). Only the output and work folders are replaced by a scratch folder of the preflight's own
(QSIPrep creates folders in both while it parses); the BIDS folder, the BIDS filter file, the
participant, the sessions and every flag are the run's. The venv follows the QSIPrep version the stage
runs (``tools.qsiprep.dialect``: 1.x -> 1.1.1, 26.x -> 26.1.1).

Verdicts (docs/tools.md, "The QSIPrep preflight"):

- ``ok``: QSIPrep parsed the command line, grouped the sessions and built its whole workflow;
- ``refused``: it raised or exited on these inputs; the message is QSIPrep's own, preceded by a plain
  explanation where its own is cryptic (a DWI without PhaseEncodingDirection);
- ``unavailable``: the preflight could not judge (no venv, a timeout, a download attempted offline);
  the run goes ahead as it would without a preflight. A missing venv is news only once (a marker in
  ``state_dir/preflight``), so the caller warns once, not on every run;
- ``off``: ``pipelines.qsiprep.preflight.enabled: false``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.preflight import venvs
from neuroflow_dagster.tools import qsiprep as qsiprep_tool
from neuroflow_dagster.tools.spec import ToolSpec

RUNNER = Path(__file__).with_name("qsiprep_runner.py")
# The locked versions that judge the two dialects of tools/qsiprep.py: 1.x and 26.0 take 1.1.1's flags
# (26.0.0's parser is 1.1.1's), 26.1 and later 26.1.1's.
OLD_DIALECT_VERSION = "1.1.1"
NEW_DIALECT_VERSION = "26.1.1"
PANDAS_STR_ACCESSOR = "Can only use .str accessor with string values"

Status = Literal["ok", "refused", "unavailable", "off"]


@dataclass(frozen=True)
class Verdict:
    """What the preflight found; ``as_dict`` is what metadata and the provenance file record."""

    status: Status
    message: str = ""  # the refusal (plain words + QSIPrep's own) or why it could not judge
    qsiprep_version: str | None = None
    seconds: float = 0.0
    argv: tuple[str, ...] = ()
    log_path: str | None = None
    tool_message: str | None = None  # QSIPrep's own words, unchanged
    details: dict[str, Any] = field(default_factory=dict)
    news: bool = False  # unavailable for a reason not reported before: the caller warns (once)

    @property
    def refused(self) -> bool:
        return self.status == "refused"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["argv"] = list(self.argv)
        out.pop("news")
        return out


def preflight_version(config: Any) -> str:
    """The locked QSIPrep version that judges this stage's runs (the dialect its image tag names)."""
    return NEW_DIALECT_VERSION if qsiprep_tool.dialect(config) >= qsiprep_tool.NEW_DIALECT else OLD_DIALECT_VERSION


def venvs_dir(config: Any) -> Path:
    """Where the preflight venvs live (``preflight.venvs_dir``, default ``work_dir/preflight/venvs``)."""
    configured = config.pipelines.qsiprep.preflight.venvs_dir
    return Path(configured) if configured is not None else Path(config.paths.work_dir) / "preflight" / "venvs"


def real_spec(
    config: Any,
    spec: ToolSpec,
    participant: str,
    sessions: Sequence[str],
    scratch: Path,
    anat_sessions: Sequence[str] = (),
) -> ToolSpec:
    """The spec of the real QSIPrep for this run: ``spec`` itself, or for the stand-in the spec the
    local runtime would run (same image tag, so the same dialect and flags)."""
    if not spec.stand_in:
        return spec
    local = config.model_copy(deep=True)
    local.pipelines.qsiprep.runtime = "local"
    return qsiprep_tool.build_spec(
        local, participant, list(sessions), output_dir=scratch / "out", anat_sessions=list(anat_sessions)
    )


def host_argv(spec: ToolSpec) -> list[str]:
    """argv with every container path (and path under one) replaced by the host folder it mounts."""
    mounts = sorted(spec.mounts, key=lambda m: len(m.container), reverse=True)
    argv = []
    for arg in spec.argv:
        for mount in mounts:
            if arg == mount.container or arg.startswith(mount.container.rstrip("/") + "/"):
                arg = str(mount.host) + arg[len(mount.container) :]
                break
        argv.append(arg)
    return argv


def preflight_argv(spec: ToolSpec, scratch: Path) -> list[str]:
    """The real run's host argv with its output and work folders moved into ``scratch``."""
    argv = host_argv(spec)
    host_out = str(spec.output_dir)
    if len(argv) < 3 or argv[2] != host_out:
        raise ValueError(f"not a QSIPrep command line (output folder {host_out} not third): {argv[:4]}")
    argv[2] = str(scratch / "out")
    if "-w" in argv[:-1]:
        argv[argv.index("-w") + 1] = str(scratch / "work")
    return argv


def run(
    config: Any,
    spec: ToolSpec,
    participant: str,
    sessions: Sequence[str],
    *,
    log_path: Path,
    anat_sessions: Sequence[str] = (),
    scratch_root: Path | None = None,
) -> Verdict:
    """Judge one QSIPrep run (``sessions`` with DWI, ``anat_sessions`` lending their anatomy, as given to
    ``build_spec``) before it starts; never raises for what the preflight itself lacks."""
    cfg = config.pipelines.qsiprep.preflight
    if not cfg.enabled:
        return Verdict("off")
    started = time.monotonic()
    try:
        version = preflight_version(config)
    except ValueError as exc:  # an image tag no locked QSIPrep speaks for (0.x): build_spec says so too
        return Verdict("unavailable", f"no QSIPrep preflight for this image: {exc}")
    root = venvs_dir(config)
    why = venvs.problem(root, version)
    if why is not None:
        return Verdict("unavailable", why, version, news=note_unavailable(config, version, why))
    clear_unavailable(config, version)
    scratch_root = Path(scratch_root or Path(config.paths.work_dir) / "preflight" / "runs")
    scratch_root.mkdir(parents=True, exist_ok=True)
    _remove_stale(scratch_root)
    scratch = Path(tempfile.mkdtemp(prefix=f"sub-{participant}_", dir=scratch_root))
    try:
        try:
            argv = preflight_argv(real_spec(config, spec, participant, sessions, scratch, anat_sessions), scratch)
        except ValueError as exc:  # a spec the real tool cannot be asked about: judge nothing, say why
            return Verdict("unavailable", f"cannot build the preflight's command line: {exc}", version)
        given = sorted({*sessions, *anat_sessions})
        result = _run_runner(
            venvs.venv_dir(root, version), argv, participant, given, scratch, Path(log_path), cfg.timeout_seconds
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return judge(result, version, argv, participant, Path(config.paths.bids_root), Path(log_path),
                 time.monotonic() - started)  # fmt: skip


def _remove_stale(scratch_root: Path, max_age_s: float = 86400) -> None:
    """Scratch folders a killed run worker left (each preflight deletes its own when it ends)."""
    now = time.time()
    for entry in scratch_root.iterdir():
        try:
            if now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _run_runner(
    venv: Path,
    argv: list[str],
    participant: str,
    sessions: Sequence[str],
    scratch: Path,
    log_path: Path,
    timeout_s: float,
) -> dict[str, Any]:
    """Run qsiprep_runner.py in the venv's interpreter (an argv list, never a shell); its output -> log."""
    request = scratch / "request.json"
    answer = scratch / "result.json"
    atomic_write_text(
        request,
        json.dumps({"argv": argv, "config_file": str(scratch / "config.toml"), "participant": participant,
                    "sessions": list(sessions)}),
    )  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # -I: the runner's own folder (which holds this module, named qsiprep.py) is not put on sys.path.
    command = [str(venvs.python_of(venv)), "-I", str(RUNNER), str(request), str(answer)]
    with log_path.open("w", encoding="utf-8") as log:
        log.write(f"# QSIPrep preflight: {' '.join(command)}\n# QSIPrep argv: {json.dumps(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=scratch,
                env=venvs.clean_environ(venvs.tool_env(venv)), start_new_session=True,
            )  # fmt: skip
        except OSError as exc:  # the venv's interpreter is gone or not executable
            return {"verdict": "unavailable", "message": f"cannot start {command[0]}: {exc}"}
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return {"verdict": "unavailable", "message": f"the preflight did not finish within {timeout_s:g} s"}
        except BaseException:  # the run was cancelled or its worker is stopping: nobody needs the verdict
            _kill_group(proc)
            raise
    if not answer.is_file():
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-10:])
        return {"verdict": "unavailable", "message": f"the preflight process ended (exit {code}) without a verdict: "
                f"{tail}"}  # fmt: skip
    return json.loads(answer.read_text(encoding="utf-8"))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def judge(
    result: dict[str, Any],
    version: str,
    argv: Sequence[str],
    participant: str,
    bids_root: Path,
    log_path: Path,
    seconds: float,
) -> Verdict:
    """The runner's answer as a Verdict: QSIPrep's own message, made plain where it is cryptic."""
    status = result.get("verdict", "unavailable")
    tool_message = result.get("message")
    details = {
        key: result[key]
        for key in ("phase", "timings", "processing_list", "nodes", "exit_code", "max_rss_mb", "cpu_s")
        if key in result
    }
    missing = sorted({cmd.split()[0] for _iface, cmd in result.get("missing_dependencies", [])})
    if missing:
        details["missing_binaries"] = missing  # recorded, not fatal: the real run has them in its image
    message = ""
    if status == "refused":
        plain = _plain_reason(result, bids_root)
        qsiprep = f"QSIPrep {result.get('qsiprep_version', version)}"
        message = f"{qsiprep} refuses sub-{participant}'s inputs (preflight of its own input handling): "
        message += f"{plain} {qsiprep}'s own error: {tool_message}" if plain else str(tool_message)
        if result.get("dwi_without_phase_encoding"):
            details["dwi_without_phase_encoding"] = result["dwi_without_phase_encoding"]
    elif status == "unavailable":
        message = f"the QSIPrep {version} preflight could not judge this run: {tool_message}"
    return Verdict(
        status=status if status in ("ok", "refused") else "unavailable",
        message=message,
        qsiprep_version=result.get("qsiprep_version", version),
        seconds=round(seconds, 2),
        argv=tuple(argv),
        log_path=str(log_path),
        tool_message=tool_message,
        details=details,
    )


def _plain_reason(result: dict[str, Any], bids_root: Path) -> str:
    """Plain words for QSIPrep's cryptic refusals ('' when its own message is plain enough)."""
    if PANDAS_STR_ACCESSOR not in str(result.get("message")):
        return ""
    files = result.get("dwi_without_phase_encoding") or []
    if not files:
        return (
            "a DWI of this run has metadata QSIPrep cannot group (a missing or non-text PhaseEncodingDirection "
            "is the usual cause)."
        )
    named = []
    for nifti in files:
        sidecar = Path(_strip_nii(nifti) + ".json")
        shown = _relative(sidecar, bids_root)
        named.append(shown if sidecar.is_file() else f"{shown} (no sidecar)")
    return (
        f"{', '.join(named)}: no PhaseEncodingDirection. QSIPrep groups DWI series by phase-encoding direction and "
        "cannot without it (dcm2niix writes it only when the scanner records the polarity; add it to the sidecar)."
    )


def _strip_nii(path: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- said once


def _markers(config: Any, version: str) -> list[Path]:
    return sorted((Path(config.paths.state) / "preflight").glob(f"qsiprep-{version}.*.unavailable"))


def note_unavailable(config: Any, version: str, reason: str) -> bool:
    """Record that the venv of ``version`` cannot be used; True only the first time for this reason.

    The marker ``state_dir/preflight/qsiprep-<version>.<sha>.unavailable`` is created exclusively, so
    one process wins even when several runs find the venv missing at once.
    """
    digest = hashlib.sha256(reason.encode()).hexdigest()[:12]
    marker = Path(config.paths.state) / "preflight" / f"qsiprep-{version}.{digest}.unavailable"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(reason)
    for old in _markers(config, version):
        if old != marker:
            old.unlink(missing_ok=True)
    return True


def clear_unavailable(config: Any, version: str) -> None:
    """The venv works (again): a later breakage is news again."""
    for marker in _markers(config, version):
        marker.unlink(missing_ok=True)


def unavailable_notes(config: Any) -> dict[str, str]:
    """The recorded reason per QSIPrep version whose venv could not be used (``neuroflow preflight status``)."""
    notes: dict[str, str] = {}
    for marker in sorted((Path(config.paths.state) / "preflight").glob("qsiprep-*.unavailable")):
        version = marker.name[len("qsiprep-") :].split(".unavailable")[0].rsplit(".", 1)[0]
        notes[version] = marker.read_text(encoding="utf-8")
    return notes
