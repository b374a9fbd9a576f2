"""Runs inside a Slurm job: the tool's argv, then a result file with its exit code and peak memory.

Started by the batch script as ``python -I slurm_job.py JOB.json`` (standard library only, so it
starts in milliseconds and needs nothing but the worker's Python on the node). JOB.json holds
``argv`` (a list: no shell ever sees it), ``env`` (added to the job's environment), ``cwd``
(created if missing, as the local runtime does) and ``result`` (where to write the outcome).

Why a wrapper and not ``sbatch --wrap``: the tool's exit code and peak RSS are written to a file
next to the log. When the cluster runs no accounting (``sacct`` disabled) and the controller has
already forgotten the job, that file is still there; and a job that was killed (time limit,
memory, cancel) never writes it, so a missing file can never pass for success.

Signals: Slurm sends SIGTERM (then SIGKILL) to every process of the job on a time limit or
scancel; the wrapper forwards SIGTERM/SIGINT to the tool too, waits for it, and ends the way the
tool ended (same exit code, or the same signal), so Slurm's ExitCode is the tool's.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time


def _write_result(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def main(job_file: str) -> int:
    with open(job_file, encoding="utf-8") as handle:
        job = json.load(handle)
    argv = list(job["argv"])
    env = dict(os.environ)
    env.update(job.get("env") or {})
    cwd = job.get("cwd")
    node = socket.gethostname()
    job_id = os.environ.get("SLURM_JOB_ID", "?")
    print(f"[neuroflow] slurm job {job_id} on {node}: running {' '.join(argv)}", flush=True)
    if cwd:
        os.makedirs(cwd, exist_ok=True)
    started = time.time()
    try:
        proc = subprocess.Popen(argv, env=env, cwd=cwd or None, stdin=subprocess.DEVNULL)
    except OSError as exc:
        print(f"[neuroflow] cannot start {argv[0]}: {exc}", flush=True)
        print(f"executable not found or not executable: {argv[0]} ({exc.strerror})", file=sys.stderr, flush=True)
        _write_result(
            job["result"],
            {
                "exit_code": 127,
                "signal": None,
                "node": node,
                "job_id": job_id,
                "started": started,
                "ended": time.time(),
                "max_rss_kb": None,
                "error": str(exc),
            },
        )
        return 127

    def forward(signum: int, _frame: object) -> None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    rc = proc.wait()
    ended = time.time()
    max_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    result = {
        "exit_code": rc if rc >= 0 else 128 - rc,
        "signal": -rc if rc < 0 else None,
        "node": node,
        "job_id": job_id,
        "started": started,
        "ended": ended,
        "max_rss_kb": max_rss_kb,
    }
    _write_result(job["result"], result)
    print(
        f"[neuroflow] tool exited with {rc if rc >= 0 else f'signal {-rc}'} after {ended - started:.1f} s "
        f"(peak RSS {max_rss_kb / 1024:.0f} MB)",
        flush=True,
    )
    if rc < 0:  # end the way the tool ended, so Slurm records the signal
        signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
        time.sleep(5)
        return 128 - rc
    return rc


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: slurm_job.py JOB.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
