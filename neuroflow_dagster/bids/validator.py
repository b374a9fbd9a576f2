"""The real BIDS validator (bids-validator-deno) on a staged session, as a structured report.

Why the real one: QSIPrep validates its input with the same validator and
refuses invalid datasets hours into a run; checking each session right after
conversion turns that into an immediate, specific failure.

The console script ``bids-validator-deno`` (pip package of the same name,
next to this interpreter in the venv) runs the bundled validator with the
schema bundled in the package: without ``--schema`` it makes no network
request, and ``DENO_NO_UPDATE_CHECK=1`` stops Deno's own update check.
Command: ``bids-validator-deno --format json --outfile REPORT.json DATASET``.
It exits 0 (no errors) or 16 (errors found) with a JSON report; anything else
(not installed, crash, timeout, unreadable JSON) raises ValidatorError: a
validator that did not run is never a pass.

Plain Python (no Dagster import).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from neuroflow_dagster.naming.bids import BIDS_VERSION, session_dir, session_path

EXECUTABLE = "bids-validator-deno"
EXIT_OK = 0
EXIT_ISSUES = 16  # measured with 3.0.2: the report lists at least one error
MAX_EXAMPLES = 5
SESSION_EMPTY = "NEUROFLOW_SESSION_EMPTY"


class ValidatorError(RuntimeError):
    """The validator itself could not run or produced no usable report (not a verdict on the data)."""


@dataclass(frozen=True)
class Issue:
    """One issue code (with its sub-code, e.g. a missing sidecar key), aggregated over files."""

    code: str
    severity: str
    message: str
    count: int
    files: tuple[str, ...] = ()  # up to MAX_EXAMPLES example locations
    sub_code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "sub_code": self.sub_code,
            "severity": self.severity,
            "message": self.message,
            "count": self.count,
            "files": list(self.files),
        }


@dataclass(frozen=True)
class ValidationReport:
    passed: bool
    errors: list[Issue]
    warnings: list[Issue]
    validator_version: str
    command: list[str]
    duration_s: float
    dataset: Path
    exit_code: int
    summary_counts: dict[str, Any] = field(default_factory=dict)  # the validator's own "summary"

    @property
    def error_codes(self) -> list[str]:
        return sorted({i.code for i in self.errors})

    def summary(self) -> str:
        """One line for logs, check descriptions and failure messages."""
        head = "BIDS valid" if self.passed else "BIDS INVALID"
        text = f"{head}: {len(self.errors)} error code(s), {len(self.warnings)} warning code(s)"
        if self.errors:
            parts = [f"{i.code} ({i.count}x, e.g. {i.files[0] if i.files else '-'})" for i in self.errors[:5]]
            text += ": " + "; ".join(parts)
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "errors": [i.as_dict() for i in self.errors],
            "warnings": [i.as_dict() for i in self.warnings],
            "validator_version": self.validator_version,
            "command": list(self.command),
            "duration_s": self.duration_s,
            "dataset": str(self.dataset),
            "exit_code": self.exit_code,
        }

    def as_metadata(self) -> dict[str, Any]:
        """Flat, JSON-able values (Dagster turns dicts into JSON metadata)."""
        return {
            "validator_version": self.validator_version,
            "validator_command": " ".join(self.command),
            "validator_duration_s": self.duration_s,
            "error_codes": ", ".join(self.error_codes) or "none",
            "n_errors": sum(i.count for i in self.errors),
            "n_warnings": sum(i.count for i in self.warnings),
            "issues": {
                "errors": [i.as_dict() for i in self.errors],
                "warnings": [{"code": i.code, "sub_code": i.sub_code, "count": i.count} for i in self.warnings],
            },
        }


def find_executable() -> str:
    """The console script next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(EXECUTABLE)
    if found is None:
        raise ValidatorError(
            f"{EXECUTABLE} not found next to {sys.executable} nor on PATH (pip install bids-validator-deno)"
        )
    return found


def validator_version() -> str:
    try:
        return metadata.version("bids-validator-deno")
    except metadata.PackageNotFoundError:
        return "unknown"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DENO_NO_UPDATE_CHECK": "1", "NO_COLOR": "1", "DENO_NO_PROMPT": "1"})
    return env


def parse_issues(report: dict[str, Any]) -> tuple[list[Issue], list[Issue]]:
    """Group the validator's issues by (code, subCode): errors and warnings, most frequent first."""
    raw = report.get("issues")
    if isinstance(raw, dict):
        items = raw.get("issues", [])
        messages = raw.get("codeMessages", {}) or {}
    elif isinstance(raw, list):  # tolerate a flat list
        items, messages = raw, {}
    else:
        raise ValidatorError("validator report has no 'issues'")
    groups: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}
    for item in items:
        code = str(item.get("code", "UNKNOWN"))
        severity = str(item.get("severity", "error")).lower()
        groups.setdefault((code, item.get("subCode"), severity), []).append(item)
    errors: list[Issue] = []
    warnings: list[Issue] = []
    for (code, sub_code, severity), members in groups.items():
        files: list[str] = []
        for m in members:
            for loc in [m.get("location"), *(m.get("affects") or [])]:
                if loc and loc not in files:
                    files.append(str(loc))
        message = str(messages.get(code) or members[0].get("issueMessage") or code).strip()
        issue = Issue(code, severity, message, len(members), tuple(files[:MAX_EXAMPLES]), sub_code)
        (errors if severity == "error" else warnings).append(issue)
    errors.sort(key=lambda i: (-i.count, i.code))
    warnings.sort(key=lambda i: (-i.count, i.code))
    return errors, warnings


def validate_dataset(
    dataset: str | os.PathLike[str],
    *,
    timeout_s: float = 600.0,
    extra_args: Sequence[str] = (),
) -> ValidationReport:
    """Run the validator on a BIDS dataset folder and parse its JSON report."""
    root = Path(dataset).resolve()
    if not root.is_dir():
        raise ValidatorError(f"cannot validate {root}: not a folder")
    exe = find_executable()
    with tempfile.TemporaryDirectory(prefix="bids-validator-") as tmp:
        out = Path(tmp) / "report.json"
        command = [exe, "--format", "json", "--outfile", str(out), *extra_args, str(root)]
        started = time.monotonic()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=_env(), check=False)
        except subprocess.TimeoutExpired as exc:
            raise ValidatorError(f"{EXECUTABLE} on {root} did not finish within {timeout_s:.0f} s") from exc
        except OSError as exc:
            raise ValidatorError(f"{EXECUTABLE} could not be started: {exc}") from exc
        duration = round(time.monotonic() - started, 3)
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        if proc.returncode not in (EXIT_OK, EXIT_ISSUES):
            raise ValidatorError(f"{EXECUTABLE} crashed on {root} (exit code {proc.returncode}): {tail}")
        try:
            report = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValidatorError(
                f"{EXECUTABLE} on {root} wrote no readable JSON report (exit code {proc.returncode}): {tail}"
            ) from exc
    errors, warnings = parse_issues(report)
    if proc.returncode == EXIT_ISSUES and not errors:
        raise ValidatorError(f"{EXECUTABLE} exited {proc.returncode} on {root} but reported no error: {tail}")
    return ValidationReport(
        passed=not errors,
        errors=errors,
        warnings=warnings,
        validator_version=validator_version(),
        command=command,
        duration_s=duration,
        dataset=root,
        exit_code=proc.returncode,
        summary_counts=dict(report.get("summary") or {}),
    )


def validate_session(
    staging_dir: str | os.PathLike[str],
    participant: str,
    session: str,
    **kwargs: Any,
) -> ValidationReport:
    """Validate the staged dataset HeudiConv wrote (it holds exactly this one session).

    HeudiConv writes dataset_description.json and the other top-level files,
    so the staged dir is a dataset on its own; if they are missing (e.g.
    ``-b notop``) a minimal dataset_description.json is added. A session
    folder without any NIfTI fails with the code NEUROFLOW_SESSION_EMPTY even
    though the validator alone would accept an empty dataset.
    """
    root = Path(staging_dir)
    description = root / "dataset_description.json"
    if root.is_dir() and not description.exists():
        description.write_text(
            json.dumps({"Name": "neuroflow staged session", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw"}) + "\n",
            encoding="utf-8",
        )
    report = validate_dataset(root, **kwargs)
    folder = session_dir(root, participant, session)
    if not any(folder.glob("*/*.nii*")):
        empty = Issue(
            SESSION_EMPTY,
            "error",
            f"the staged session {folder} has no NIfTI file: nothing was converted",
            1,
            ("/" + session_path(participant, session),),
        )
        report = ValidationReport(
            passed=False,
            errors=[empty, *report.errors],
            warnings=report.warnings,
            validator_version=report.validator_version,
            command=report.command,
            duration_s=report.duration_s,
            dataset=report.dataset,
            exit_code=report.exit_code,
            summary_counts=report.summary_counts,
        )
    return report
