"""QSIPrep's own input handling on one run's inputs, executed INSIDE the preflight venv.

    <venv>/bin/python qsiprep_runner.py REQUEST.json RESULT.json

Standard library and QSIPrep only (this file is run by path with the tools venv's interpreter and
never imports neuroflow). It does what ``qsiprep`` itself does before it starts any node
(``qsiprep.cli.run.main``): ``parse_args`` (the parser, the BIDS layout, the participant and
session grouping), ``config.to_filename`` and ``build_workflow`` (data collection, the checks on the
files, the whole nipype graph), in this process instead of QSIPrep's child process. The heavy
binaries (ANTs, FSL, MRtrix, ...) are not installed: ``check_deps`` is wrapped so that what is
missing is recorded, not fatal. Whatever QSIPrep raises or refuses is the verdict ``refused`` with
QSIPrep's own message; the caller (neuroflow_dagster/preflight/qsiprep.py) decides what it means
for the run. The request and the result are JSON files, so the tool's own output (its log, on
stdout/stderr) never mixes with the answer.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import time
import traceback

# The pandas error QSIPrep 1.1.1 and 26.x raise deep in their DWI grouping when a DWI's metadata lacks
# PhaseEncodingDirection (a .str accessor on a column of None); the caller says it plainly.
PANDAS_STR_ACCESSOR = "Can only use .str accessor with string values"
# Exceptions that say the preflight's environment failed (a download attempted offline), not that
# QSIPrep refused the data: the verdict is then "unavailable", never a refusal of a good run.
ENVIRONMENT_ERRORS = ("URLError", "ConnectionError", "RequestException", "Timeout", "TimeoutError", "SSLError")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _dwi_without_phase_encoding(config, participant: str, sessions: list[str]) -> list[str]:
    """DWI files of the run whose metadata (BIDS inheritance included) has no PhaseEncodingDirection."""
    layout = getattr(config.execution, "layout", None)
    if layout is None:
        return []
    query = {"subject": participant, "suffix": "dwi", "extension": [".nii", ".nii.gz"], "return_type": "filename"}
    if sessions:
        query["session"] = sessions
    missing = []
    for path in sorted(layout.get(**query)):
        if not layout.get_metadata(path).get("PhaseEncodingDirection"):
            missing.append(path)
    return missing


def run(request: dict) -> dict:
    argv = list(request["argv"])
    result: dict = {"verdict": "ok", "phase": "import", "timings": {}, "missing_dependencies": []}
    started = time.monotonic()
    try:
        import qsiprep
        from qsiprep import config
        from qsiprep.cli import workflow as qsiprep_workflow
        from qsiprep.cli.parser import parse_args
        from qsiprep.utils import misc
    except Exception as exc:  # a venv that cannot import QSIPrep cannot judge anything
        return {**result, "verdict": "unavailable", "message": f"cannot import QSIPrep: {exc!r}",
                "traceback": _tail(traceback.format_exc())}  # fmt: skip
    result["qsiprep_version"] = qsiprep.__version__
    result["timings"]["import"] = round(time.monotonic() - started, 3)

    real_check_deps = misc.check_deps
    missing: list[list[str]] = []

    def check_deps_recorded(workflow):
        # QSIPrep refuses to start when a binary is missing; here they all are, by design.
        missing.extend([list(item) for item in real_check_deps(workflow)])
        return []

    misc.check_deps = check_deps_recorded
    retval: dict = {}
    stderr = io.StringIO()
    phase = "parse"
    try:
        t0 = time.monotonic()
        with contextlib.redirect_stderr(_Tee(stderr, sys.stderr)):
            parse_args(argv[1:])
        result["timings"]["parse"] = round(time.monotonic() - t0, 3)
        result["processing_list"] = [[p, list(s)] for p, s in config.execution.processing_list]
        phase = "build"
        t0 = time.monotonic()
        config.to_filename(request["config_file"])
        qsiprep_workflow.build_workflow(request["config_file"], retval)
        result["timings"]["build"] = round(time.monotonic() - t0, 3)
        if retval.get("return_code") not in (0, None) or retval.get("workflow") is None:
            result.update(verdict="refused", message=f"QSIPrep's workflow build returned {retval.get('return_code')}")
        else:
            result["nodes"] = len(retval["workflow"]._get_all_nodes())
    except SystemExit as exc:  # the parser's own refusal: "qsiprep: error: ..." on stderr, exit 2
        lines = [line for line in stderr.getvalue().strip().splitlines() if line.strip()]
        errors = [line for line in lines if ": error: " in line]
        message = (errors or lines or [f"QSIPrep exited {exc.code}"])[-1]
        result.update(verdict="refused", message=message, exit_code=exc.code)
    except Exception as exc:  # whatever QSIPrep raises on these inputs is its verdict
        names = {cls.__name__ for cls in type(exc).__mro__}
        verdict = "unavailable" if names & set(ENVIRONMENT_ERRORS) else "refused"
        result.update(verdict=verdict, message=f"{type(exc).__name__}: {exc}", traceback=_tail(traceback.format_exc()))
        if PANDAS_STR_ACCESSOR in str(exc):
            with contextlib.suppress(Exception):
                result["dwi_without_phase_encoding"] = _dwi_without_phase_encoding(
                    config, request.get("participant", ""), list(request.get("sessions") or [])
                )
    finally:
        misc.check_deps = real_check_deps
    result["phase"] = phase
    result["missing_dependencies"] = missing
    result["timings"]["total"] = round(time.monotonic() - started, 3)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["max_rss_mb"] = round(usage.ru_maxrss / 1024)  # Linux: KiB
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)  # the cost without the machine's load
    return result


class _Tee(io.TextIOBase):
    """stderr kept for the verdict and still written to the log."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _exit_with_parent(poll_s: float = 2.0) -> None:
    """The run worker that asked is gone (killed, its run cancelled): nobody will read the verdict."""
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(args: list[str]) -> int:
    request_file, result_file = args
    _exit_with_parent()
    with open(request_file, encoding="utf-8") as handle:
        request = json.load(handle)
    result = run(request)
    with open(result_file + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(result, handle, default=str)
    import os

    os.replace(result_file + ".tmp", result_file)
    sys.stdout.flush()
    sys.stderr.flush()
    # QSIPrep's config and nipype leave exit handlers and threads behind; the answer is written.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
