"""Run a ToolSpec as one Slurm job: sbatch, follow it, take the final state from accounting.

The run worker (on a login/submit node, with Slurm's client commands and ``SLURM_CONF``)
submits with ``sbatch`` - options from ``pipelines.<stage>.slurm`` - a fixed batch script that
starts ``slurm_job.py`` with a JSON file holding the argv (no shell ever parses folder names).
Inside the job the tool runs as it would locally, or with ``apptainer exec`` and the same binds
as the apptainer runtime. While the job runs, the worker polls ``squeue`` and copies new lines
of the job's output file (``--output``, next to the per-run log) into the run's log.

Final state, in order of trust: ``sacct`` (accounting; retried briefly, since the controller
reports to slurmdbd asynchronously), else ``scontrol show job`` (until MinJobAge purges it), else
the jobcomp text file, else the wrapper's result file. Success needs positive evidence - state
COMPLETED with exit 0 - so a job whose end nobody recorded is a failure, never a success.

Failure classes: TIMEOUT, OUT_OF_MEMORY, an over-memory kill and DEADLINE are ``resource``;
NODE_FAIL, BOOT_FAIL, PREEMPTED and an unknown end are ``transient``; a non-zero exit is read
like any tool failure (failures.classify). A job cancelled outside neuroflow is not retried.

Re-attach: before submitting, a record (runtimes/jobs.py) is written under
``<state_dir>/jobs/<stage>/``; a later run for the same (stage, partition) - Dagster's run retry
after the worker died - finds the job still queued or running and waits on it instead of
submitting a second one. Cancelling the Dagster run cancels the job (``scancel``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroflow_dagster.config import StageConfig
from neuroflow_dagster.fsutil import atomic_write_text
from neuroflow_dagster.runtimes.apptainer import apptainer_exec_argv, apptainer_image_problem
from neuroflow_dagster.runtimes.base import DEFAULT_KILL_GRACE_S, RunRecord, RunRequest, Runtime, ToolRunError
from neuroflow_dagster.runtimes.container import mount_problem, resolve_image
from neuroflow_dagster.runtimes.failures import FailureClass, classify
from neuroflow_dagster.runtimes.jobs import JobRecord, JobStore
from neuroflow_dagster.runtimes.local import STAND_IN_IMAGE
from neuroflow_dagster.runtimes.process import (
    LogSink,
    exit_failure,
    fail,
    mark_cancelled,
    new_record,
    soft_timeout_note,
    succeed,
)
from neuroflow_dagster.tools.spec import ToolSpec

WRAPPER = Path(__file__).with_name("slurm_job.py")
BATCH_SCRIPT = '#!/bin/sh\n# neuroflow-dagster: runs the job wrapper given as arguments\nexec "$@"\n'
ACTIVE = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)
RESOURCE_STATES = {"TIMEOUT": "time limit", "OUT_OF_MEMORY": "memory limit", "DEADLINE": "deadline"}
TRANSIENT_STATES = {"NODE_FAIL": "node failure", "BOOT_FAIL": "node boot failure", "PREEMPTED": "preemption"}
# Evidence in the job's output that Slurm killed it for memory (OverMemoryKill, cgroup OOM).
_MEMORY_KILL = re.compile(r"exceeded (job )?memory limit|oom[-_ ]kill event|oom-kill", re.I)
_SBATCH_CONFIG = re.compile(
    r"invalid (account|partition|qos)|account/partition|requested node configuration is not available|"
    r"requested time limit is invalid|unrecognized option|invalid option|unknown option|"
    r"invalid generic resource|memory specification can not be satisfied|invalid (job|feature)|"
    r"unable to open file|no partition specified|invalid user",
    re.I,
)
_SBATCH_LIMIT = re.compile(
    r"submit ?limit|MaxSubmit|job violates accounting/qos policy|"
    r"slurm temporarily unable|unable to contact slurm controller|"
    r"socket timed out|connection refused|transient",
    re.I,
)
SACCT_RETRY_S = 20.0
LOCK_WAIT_S = 120.0


class SlurmCommandError(Exception):
    """A Slurm client command failed (controller unreachable, bad option ...)."""


# --------------------------------------------------------------------------- the Slurm CLI


@dataclass
class JobState:
    """What Slurm says about a job. ``exit_code`` is the shell convention (128+signal if killed)."""

    state: str
    source: str
    exit_code: int | None = None
    raw_exit: str | None = None
    node: str | None = None
    elapsed_s: float | None = None
    max_rss_kb: int | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def parse_exit(raw: str | None) -> int | None:
    """Slurm's ``code:signal`` -> the shell's convention (code, or 128+signal)."""
    if not raw or ":" not in raw:
        return None
    code, _, sig = raw.partition(":")
    try:
        code_i, sig_i = int(code), int(sig)
    except ValueError:
        return None
    return 128 + sig_i if sig_i else code_i


def parse_size_kb(text: str | None) -> int | None:
    """sacct sizes (``122360K``, ``1.5G``, ``0``) in KiB."""
    if not text:
        return None
    match = re.fullmatch(r"([0-9.]+)([KMGTP]?)", text.strip())
    if not match:
        return None
    factor = {"": 1 / 1024, "K": 1, "M": 1024, "G": 1024**2, "T": 1024**3, "P": 1024**4}[match.group(2)]
    return int(float(match.group(1)) * factor)


def parse_duration_s(text: str | None) -> float | None:
    """``[D-]HH:MM:SS`` or ``MM:SS`` (scontrol RunTime, sacct Elapsed) in seconds."""
    if not text or text in ("INVALID", "UNLIMITED"):
        return None
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
    parts = [float(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    hours, minutes, seconds = parts[-3:]
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


def parse_key_values(text: str) -> dict[str, str]:
    """``scontrol show job -o`` / jobcomp lines: ``Key=value`` pairs separated by spaces."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][A-Za-z/:]*)=(\S*)", text))


class SlurmCLI:
    """The Slurm client commands, always as argv lists, with the worker's environment."""

    def __init__(self, env: dict[str, str] | None = None, timeout_s: float = 60) -> None:
        self.env = {**os.environ, **(env or {})}
        self.timeout_s = timeout_s
        self._accounting: bool | None = None

    @property
    def accounting_disabled(self) -> bool:
        """sacct said the cluster keeps no accounting (known after the first ``accounting()`` call)."""
        return self._accounting is False

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                env=self.env,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError as exc:
            raise SlurmCommandError(
                f"executable not found: {argv[0]} (Slurm's client commands must be on PATH of the run worker)"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise SlurmCommandError(
                f"{argv[0]} did not answer within {self.timeout_s:.0f} s (controller overloaded or unreachable)"
            ) from exc
        if check and proc.returncode != 0:
            raise SlurmCommandError(
                f"{shlex.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[:1000]}"
            )
        return proc

    def submit(self, argv: list[str]) -> str:
        out = self.run(*argv).stdout.strip()
        job_id = out.split(";", 1)[0].strip()
        if not re.fullmatch(r"\d+(_\d+)?", job_id):
            raise SlurmCommandError(f"sbatch printed {out!r}, not a job id")
        return job_id

    def queue_state(self, job_id: str) -> JobState | None:
        """The job as squeue sees it; None when the controller no longer knows it."""
        proc = self.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%N|%r|%M", check=False)
        if proc.returncode != 0:
            if "invalid job id" in (proc.stderr + proc.stdout).lower():
                return None
            raise SlurmCommandError(f"squeue -j {job_id} exited {proc.returncode}: {proc.stderr.strip()[:500]}")
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        if not lines:
            return None
        state, node, reason, elapsed = [*lines[0].split("|"), "", "", ""][:4]
        return JobState(
            state=state.strip(),
            source="squeue",
            node=node or None,
            reason=reason or None,
            elapsed_s=parse_duration_s(elapsed),
        )

    def find_by_name(self, name: str) -> str | None:
        """The newest active job of ours named ``name`` (a submit interrupted before its id was saved)."""
        proc = self.run("squeue", "-h", "--me", "-n", name, "-o", "%i|%T", check=False)
        ids = [line.split("|")[0] for line in proc.stdout.splitlines() if line.strip()]
        return ids[-1] if proc.returncode == 0 and ids else None

    def accounting(self, job_id: str) -> JobState | None:
        """sacct's view of the job (and the peak RSS over its steps); None if accounting has no record."""
        if self._accounting is False:
            return None
        proc = self.run(
            "sacct",
            "-n",
            "-P",
            "-j",
            job_id,
            "-o",
            "JobIDRaw,State,ExitCode,NodeList,ElapsedRaw,MaxRSS,Reason",
            check=False,
        )
        text = (proc.stderr + proc.stdout).lower()
        if proc.returncode != 0 or "accounting storage is disabled" in text or "not running a supported" in text:
            if "disabled" in text or "not running a supported" in text or "slurmdbd" in text:
                self._accounting = False
            return None
        self._accounting = True
        job: JobState | None = None
        rss: list[int] = []
        for line in proc.stdout.splitlines():
            cols = line.split("|")
            if len(cols) < 7:
                continue
            raw_id, state, exit_raw, node, elapsed, max_rss, reason = cols[:7]
            size = parse_size_kb(max_rss)
            if size is not None:
                rss.append(size)
            if raw_id == job_id:
                job = JobState(
                    state=state.split()[0] if state else "UNKNOWN",
                    source="sacct",
                    exit_code=parse_exit(exit_raw),
                    raw_exit=exit_raw,
                    node=node or None,
                    elapsed_s=float(elapsed) if elapsed.isdigit() else None,
                    reason=reason or None,
                )
                if state.startswith("CANCELLED by"):
                    job.extra["cancelled_by_uid"] = state.split()[-1]
        if job is not None and rss:
            job.max_rss_kb = max(rss)
        return job

    def controller(self, job_id: str) -> JobState | None:
        """``scontrol show job``: works without accounting until MinJobAge purges the job."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        values = parse_key_values(proc.stdout)
        if "JobState" not in values:
            return None
        return JobState(
            state=values["JobState"],
            source="scontrol",
            exit_code=parse_exit(values.get("ExitCode")),
            raw_exit=values.get("ExitCode"),
            node=values.get("NodeList") or None,
            elapsed_s=parse_duration_s(values.get("RunTime")),
            reason=values.get("Reason"),
        )

    def jobcomp(self, job_id: str) -> JobState | None:
        """The jobcomp/filetxt file (if the cluster writes one and it is readable here)."""
        proc = self.run("scontrol", "show", "config", check=False)
        conf = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$", proc.stdout, re.M)) if proc.returncode == 0 else {}
        if conf.get("JobCompType") != "jobcomp/filetxt" or not conf.get("JobCompLoc"):
            return None
        try:
            lines = Path(conf["JobCompLoc"]).read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            if line.startswith(f"JobId={job_id} "):
                values = parse_key_values(line)
                return JobState(
                    state=values.get("JobState", "UNKNOWN"),
                    source="jobcomp",
                    exit_code=parse_exit(values.get("ExitCode")),
                    raw_exit=values.get("ExitCode"),
                    node=values.get("NodeList") or None,
                )
        return None

    def cancel(self, job_id: str) -> None:
        self.run("scancel", job_id, check=False)


# --------------------------------------------------------------------------- argv building


def _time_limit(stage: StageConfig, timeout_s: float | None) -> int:
    cfg = stage.slurm
    if cfg.time_limit_minutes:
        return int(cfg.time_limit_minutes)
    if timeout_s:
        return max(1, math.ceil(timeout_s / 60))
    return max(1, math.ceil(float(stage.timeout_minutes)))


def job_name(stage_name: str, partition: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", partition).strip("_")[:60] or "all"
    return f"nf-{stage_name}-{safe}"


# A job's memory beyond the tool's own budget (docs/runtimes.md, "slurm"): QSIPrep's and QSIRecon's
# --mem-mb is what nipype's scheduler plans with, not a cap (a node's real peak, Python and the
# container runtime come on top), while Slurm kills the job at --mem.
MEM_MARGIN_FRACTION = 0.25
MEM_MARGIN_MIN_MB = 1024


def job_resources(stage: StageConfig, nprocs: int | None, mem_mb: int | None) -> tuple[int | None, int | None]:
    """``(--cpus-per-task, --mem in MB)`` of a job; None leaves it to the cluster's default.

    Explicit keys win (``slurm.cpus``/``slurm.mem_mb``, then the stage's ``cpus``/``memory_mb``); else
    the tool's own ``nprocs``/``mem_mb`` as its spec carries them (one source of truth): CPUs exactly
    (nipype never runs more than --nprocs threads of work at once), memory plus
    ``max(MEM_MARGIN_MIN_MB, MEM_MARGIN_FRACTION x mem_mb)``.
    """
    cfg = stage.slurm
    cpus = cfg.cpus or stage.cpus or nprocs
    mem = cfg.mem_mb or stage.memory_mb
    if not mem and mem_mb:
        mem = mem_mb + max(MEM_MARGIN_MIN_MB, math.ceil(MEM_MARGIN_FRACTION * mem_mb))
    return (math.ceil(cpus) if cpus else None), (int(mem) if mem else None)


def sbatch_argv(
    stage: StageConfig,
    *,
    name: str,
    output: Path,
    workdir: Path,
    script: Path,
    timeout_s: float | None,
    job_args: list[str],
    nprocs: int | None = None,
    mem_mb: int | None = None,
) -> list[str]:
    """The sbatch command: resources from the stage (job_resources, with the tool's ``nprocs`` and
    ``mem_mb``), then the operator's extra options, then the script."""
    cfg = stage.slurm
    argv = [
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        f"--output={output}",
        "--open-mode=append",
        f"--chdir={workdir}",
        "--no-requeue",
        f"--time={_time_limit(stage, timeout_s)}",
    ]
    cpus, mem = job_resources(stage, nprocs, mem_mb)
    if mem:
        argv.append(f"--mem={mem}M")
    if cpus:
        argv.append(f"--cpus-per-task={cpus}")
    for key in ("partition", "account", "qos"):
        value = getattr(cfg, key)
        if value:
            argv.append(f"--{key}={value}")
    argv += list(cfg.extra_args)
    argv += [str(script), *job_args]
    return argv


def inner_argv(spec: ToolSpec, stage: StageConfig, inside: str) -> tuple[list[str], dict[str, str], str | None]:
    """(argv, env, cwd) the wrapper runs in the job: the tool itself, or apptainer exec around it."""
    if inside != "apptainer":
        return list(spec.argv), dict(spec.env), str(spec.workdir) if spec.workdir is not None else None
    extra: list[str] = []
    for bind in stage.slurm.binds:
        extra += ["--bind", bind]
    argv = apptainer_exec_argv(spec, stage, stage.slurm.apptainer, image=resolve_image(spec, stage), extra_args=extra)
    return argv, {}, None


def fingerprint(
    argv: list[str], env: dict[str, str], cwd: str | None, sbatch_options: list[str], output_dir: str | None = None
) -> str:
    """Same tool command and the same job request: the job a restarted run may adopt.

    ``sbatch_options`` are the options before the script; the per-run file paths are left out, and
    so is ``output_dir`` (each attempt writes into a staging folder of its own: a run that adopts an
    earlier job takes that job's folder instead, see SlurmRuntime).
    """
    stable = [a for a in sbatch_options if not a.startswith(("--output=", "--chdir="))]
    blob = json.dumps({"argv": argv, "env": env, "cwd": cwd, "sbatch": stable}, sort_keys=True)
    if output_dir:
        blob = blob.replace(json.dumps(output_dir)[1:-1], "<output_dir>")
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def poll_interval(poll_s: float, watched_s: float) -> float:
    """Every second at first, growing to ``poll_s`` after ``10 x poll_s``: a short job is seen to end
    within a second or two, a 24 h job costs the controller one squeue per ``poll_s``."""
    return max(min(poll_s, 1.0), min(poll_s, watched_s / 10))


# --------------------------------------------------------------------------- output tail


class OutputTail:
    """Reads whole new lines of the job's output file (it may not exist yet while the job is pending)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._partial = b""

    def read(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read(4 << 20)
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        return [line.decode("utf-8", errors="replace").rstrip("\r") for line in lines]

    def flush(self) -> list[str]:
        rest = self.read()
        if self._partial:
            rest.append(self._partial.decode("utf-8", errors="replace"))
            self._partial = b""
        return rest


# --------------------------------------------------------------------------- the runtime


class SlurmRuntime(Runtime):
    """One Slurm job per tool run; see the module docstring."""

    name = "slurm"
    stage: StageConfig

    def __init__(
        self,
        stage: StageConfig,
        *,
        kill_grace_s: float = DEFAULT_KILL_GRACE_S,
        stage_name: str = "tool",
        partition: str = "all",
        run_id: str | None = None,
        root_run_id: str | None = None,
        jobs: JobStore | None = None,
        cli: SlurmCLI | None = None,
        poll_s: float | None = None,
        cancel_wait_s: float = 60.0,
    ) -> None:
        super().__init__(stage, kill_grace_s=kill_grace_s)
        self.stage_name = stage_name
        self.partition = partition
        self.run_id = run_id
        self.root_run_id = root_run_id or run_id
        self.jobs = jobs
        self.cli = cli or SlurmCLI()
        self.poll_s = float(poll_s if poll_s is not None else stage.slurm.poll_seconds)
        self.cancel_wait_s = cancel_wait_s

    # -- public -----------------------------------------------------------------------------------

    def execute(self, spec: ToolSpec, request: RunRequest) -> RunRecord:
        """The limits in ``request`` are resolved from the stage (Runtime.run): ``timeout_s`` becomes
        ``--time`` unless ``slurm.time_limit_minutes`` is set; the soft timeout counts from RUNNING."""
        log_path = request.log_path
        timeout_s, soft_timeout_s = request.timeout_s, request.soft_timeout_s
        inside = self.stage.tool_runtime
        argv, env, cwd = inner_argv(spec, self.stage, inside)
        image: str | None = None
        if inside == "builtin":
            image = STAND_IN_IMAGE
        elif inside == "apptainer":
            image = spec.image or self.stage.image
        record = new_record(spec, runtime=self.name, command=argv, log_path=log_path, image=image)
        record.extra["slurm_inside"] = inside
        sink = LogSink(log_path, request.log)
        sink.note(f"tool {spec.tool} on runtime slurm (inside the job: {inside})")
        self._check(spec, inside, argv, record, sink)

        stem = log_path.name[: -len(log_path.suffix)] if log_path.suffix else log_path.name
        files = {k: log_path.with_name(f"{stem}.{k}") for k in ("slurm.out", "job.json", "result.json", "sbatch.sh")}
        name = job_name(self.stage_name, self.partition)
        job_args = [sys.executable, "-I", str(WRAPPER), str(files["job.json"])]
        sbatch = sbatch_argv(
            self.stage,
            name=name,
            output=files["slurm.out"],
            workdir=log_path.parent,
            script=files["sbatch.sh"],
            timeout_s=timeout_s,
            job_args=job_args,
            nprocs=spec.nprocs,
            mem_mb=spec.mem_mb,
        )
        print_ = fingerprint(
            argv, env, cwd, sbatch[: sbatch.index(str(files["sbatch.sh"]))], output_dir=str(spec.output_dir)
        )
        record.extra["slurm_sbatch"] = shlex.join(sbatch)

        pending: dict[str, JobRecord] = {}
        job: JobRecord | None = None
        try:
            # Look and submit under the work's lock: two runs of the same work at once end up
            # waiting on one job, never submitting two.
            with self._exclusive(spec, record, sink):
                try:
                    job = self._existing_job(print_, record, sink)
                except SlurmCommandError as exc:
                    raise fail(
                        record,
                        sink,
                        f"{spec.tool}: cannot ask slurm about the earlier job: {exc}",
                        FailureClass.TRANSIENT,
                    ) from exc
                if job is None:
                    job = self._submit(spec, argv, env, cwd, sbatch, files, name, print_, record, sink, pending)
            queue = self._wait(job, record, sink, soft_timeout_s)
        except ToolRunError:
            raise
        except BaseException as exc:  # the run was terminated (or a bug): the job must not outlive it
            self._cancel(job or pending.get("job"), record, sink, exc)
            raise
        return self._finish(job, queue, record, sink)

    @contextmanager
    def _exclusive(self, spec: ToolSpec, record: RunRecord, sink: LogSink) -> Iterator[None]:
        """The work's lock (``spec.lock``, the one local tools hold for their lifetime), held while
        looking for an earlier job and submitting. Afterwards the job record, not a lock, says who owns
        the work: a file lock would die with the run worker, the job does not."""
        if spec.lock is None:
            yield
            return
        path = Path(spec.lock)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip() or "unknown"
                        raise fail(
                            record,
                            sink,
                            f"{spec.tool}: another process of this work still holds "
                            f"{path} after {LOCK_WAIT_S:g} s: {holder}",
                            FailureClass.TRANSIENT,
                        ) from None
                    time.sleep(0.5)
            os.ftruncate(fd, 0)
            info = {
                "owner": spec.lock_owner or self.run_id,
                "tool": spec.tool,
                "runtime": self.name,
                "pid": os.getpid(),
            }
            os.pwrite(fd, (json.dumps(info, sort_keys=True) + "\n").encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock

    # -- steps --------------------------------------------------------------------------------------

    def _check(self, spec: ToolSpec, inside: str, argv: list[str], record: RunRecord, sink: LogSink) -> None:
        problem = None
        if not argv:
            problem = "empty command"
        elif shutil.which("sbatch", path=self.cli.env.get("PATH")) is None:
            problem = "executable not found: sbatch (Slurm's client commands must be on PATH of the run worker)"
        elif inside == "builtin" and not spec.stand_in:
            problem = (
                "runtime slurm with slurm.inside builtin got a spec for the real tool (stand_in=False); "
                "set pipelines.<stage>.slurm.inside to local or apptainer"
            )
        elif inside == "apptainer":
            problem = apptainer_image_problem(resolve_image(spec, self.stage))
            problem = problem or next((p for p in map(mount_problem, spec.mounts) if p), None)
        if problem is not None:
            raise fail(record, sink, f"{spec.tool}: {problem}", FailureClass.CONFIGURATION)

    def _existing_job(self, print_: str, record: RunRecord, sink: LogSink) -> JobRecord | None:
        """A job of an earlier run for this (stage, partition) that this run should wait on instead."""
        if self.jobs is None:
            return None
        try:
            old = self.jobs.load(self.stage_name, self.partition)
        except Exception as exc:  # JobRecordError: never guess, tell the operator
            raise fail(record, sink, str(exc), FailureClass.CONFIGURATION) from exc
        if old is None or old.status == "finished":
            return None
        if old.job_id is None:  # the earlier worker died between writing the record and sbatch's answer
            old.job_id = self._safe_call(lambda: self.cli.find_by_name(old.job_name), sink)
            if old.job_id is None:
                return None
        state = self._safe_call(lambda: self.cli.queue_state(old.job_id), sink)
        who = f"run {old.owner_run_id} on {old.owner_host}"
        if state is not None and state.active:
            if old.fingerprint == print_:
                sink.note(
                    f"re-attaching to slurm job {old.job_id} ({state.state}), submitted by {who} "
                    f"at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(old.submitted))}"
                )
                record.extra["slurm_reattached"] = True
                self._own(old, record)
                return old
            sink.note(
                f"slurm job {old.job_id} of {who} is {state.state} with a different command or request: "
                "cancelling it before submitting (two jobs must not write the same outputs)"
            )
            self.cli.cancel(old.job_id)
            self._wait_gone(old.job_id, sink)
            self._collected(old, {"state": "CANCELLED", "reason": "superseded"})
            return None
        # Finished while no run was watching: adopt its result only within the same retry chain
        # (the same intended work); a later, independent run recomputes.
        if (
            old.fingerprint == print_
            and old.owner_root_run_id
            and old.owner_root_run_id == self.root_run_id
            and old.owner_run_id != self.run_id
        ):
            sink.note(f"slurm job {old.job_id} of {who} ended while no run was watching it: using its result")
            record.extra["slurm_reattached"] = True
            self._own(old, record)
            return old
        return None

    def _own(self, job: JobRecord, record: RunRecord) -> None:
        """This run takes over an earlier run's job: its outputs are where that job writes them."""
        if job.output_dir and job.output_dir != record.output_dir:
            record.extra["slurm_adopted_output_dir"] = job.output_dir
            record.output_dir = job.output_dir
        job.owner_run_id = self.run_id
        job.owner_root_run_id = self.root_run_id
        job.owner_host = os.uname().nodename
        job.owner_pid = os.getpid()
        if self.jobs is not None:
            self.jobs.save(job)

    def _submit(
        self,
        spec: ToolSpec,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        sbatch: list[str],
        files: dict[str, Path],
        name: str,
        print_: str,
        record: RunRecord,
        sink: LogSink,
        pending: dict[str, JobRecord],
    ) -> JobRecord:
        atomic_write_text(
            files["job.json"],
            json.dumps(
                {"tool": spec.tool, "argv": argv, "env": env, "cwd": cwd, "result": str(files["result.json"])}, indent=1
            ),
        )
        atomic_write_text(files["sbatch.sh"], BATCH_SCRIPT)
        files["result.json"].unlink(missing_ok=True)
        job = JobRecord(
            stage=self.stage_name,
            partition=self.partition,
            runtime=self.name,
            status="submitting",
            owner_run_id=self.run_id,
            owner_root_run_id=self.root_run_id,
            fingerprint=print_,
            job_name=name,
            log_path=str(record.log_path),
            output_path=str(files["slurm.out"]),
            result_path=str(files["result.json"]),
            output_dir=str(spec.output_dir),
        )
        if self.jobs is not None:
            self.jobs.save(job)
        pending["job"] = job  # an interrupt during sbatch still finds the job (by name) to cancel
        sink.note(f"submitting: {shlex.join(sbatch)}")
        sink.note(f"in the job: {record.command}")
        try:
            job.job_id = self.cli.submit(sbatch)
        except SlurmCommandError as exc:
            text = str(exc)
            if _SBATCH_LIMIT.search(text):
                failure_class = FailureClass.TRANSIENT
            elif _SBATCH_CONFIG.search(text):
                failure_class = FailureClass.CONFIGURATION
            else:
                guessed = classify(text, None)
                failure_class = (
                    FailureClass.TRANSIENT if guessed == FailureClass.TRANSIENT else FailureClass.CONFIGURATION
                )
            if self.jobs is not None:
                self._collected(job, {"state": "NOT_SUBMITTED", "error": text})
            raise fail(record, sink, f"{spec.tool}: sbatch refused the job: {text}", failure_class) from exc
        job.status = "submitted"
        job.submitted = time.time()
        if self.jobs is not None:
            self.jobs.save(job)
        sink.note(f"submitted slurm job {job.job_id} ({name})")
        return job

    def _safe_call(self, call: Any, sink: LogSink) -> Any:
        try:
            return call()
        except SlurmCommandError as exc:
            sink.note(f"slurm query failed ({exc}); trying again")
            time.sleep(min(self.poll_s, 5))
            return call()

    def _wait(self, job: JobRecord, record: RunRecord, sink: LogSink, soft_timeout_s: float | None) -> JobState:
        """Forward output and poll until the job has left the active states; returns the last queue state."""
        assert job.job_id is not None
        record.extra["slurm_job_id"] = job.job_id
        tail = OutputTail(Path(job.output_path))
        running_since: float | None = None
        last_state = ""
        warned = False
        failures = 0
        watching_since = time.monotonic()
        while True:
            for line in tail.read():
                sink.line(line)
            try:
                state = self.cli.queue_state(job.job_id)
                failures = 0
            except SlurmCommandError as exc:
                failures += 1
                if failures in (1, 10) or failures % 60 == 0:
                    sink.note(f"cannot ask slurm about job {job.job_id} ({exc}); still waiting")
                time.sleep(self.poll_s)
                continue
            if state is None or not state.active:
                for line in tail.flush():
                    sink.line(line)
                return state or JobState(state="UNKNOWN", source="squeue")
            if state.state != last_state:
                where = f" on {state.node}" if state.node and state.state != "PENDING" else ""
                why = f" ({state.reason})" if state.reason and state.reason != "None" else ""
                sink.note(f"slurm job {job.job_id}: {state.state}{where}{why}")
                last_state = state.state
                if state.node and state.state == "RUNNING":
                    record.extra["slurm_node"] = state.node
            if state.state == "RUNNING" and running_since is None:
                running_since = time.monotonic() - (state.elapsed_s or 0.0)
            if (
                soft_timeout_s is not None
                and not warned
                and running_since is not None
                and time.monotonic() - running_since >= soft_timeout_s
            ):
                warned = True
                sink.note(soft_timeout_note(time.monotonic() - running_since, soft_timeout_s, None))
            time.sleep(poll_interval(self.poll_s, time.monotonic() - watching_since))

    def final_state(self, job: JobRecord, sink: LogSink | None = None) -> JobState:
        """Accounting first (retried while slurmdbd catches up), then controller, jobcomp, result file."""
        assert job.job_id is not None
        deadline = time.monotonic() + SACCT_RETRY_S
        while True:
            state = self.cli.accounting(job.job_id)
            if state is not None and not state.active:
                break
            if self.cli.accounting_disabled or time.monotonic() > deadline:
                state = None
                break
            time.sleep(1.0)
        if state is None:
            if sink is not None and self.cli.accounting_disabled:
                sink.note(
                    "slurm accounting is not available (sacct disabled): reading the controller, "
                    "jobcomp and the job's result file instead"
                )
            for source in (self.cli.controller, self.cli.jobcomp):
                state = source(job.job_id)
                if state is not None and not state.active:
                    break
                state = None
        result = _read_result(Path(job.result_path)) if job.result_path else None
        if state is None:
            if result is not None:
                completed = result.get("exit_code") == 0
                state = JobState(
                    state="COMPLETED" if completed else "FAILED",
                    source="job result file",
                    exit_code=result.get("exit_code"),
                    node=result.get("node"),
                )
            else:
                state = JobState(state="UNKNOWN", source="none")
        if result is not None:
            state.extra["result"] = result
            if state.max_rss_kb is None and result.get("max_rss_kb") is not None:
                state.max_rss_kb = int(result["max_rss_kb"])
            if state.node is None:
                state.node = result.get("node")
            # Two witnesses that disagree: the failure wins (a success needs positive evidence).
            if state.state == "COMPLETED" and result.get("exit_code") not in (0, None):
                state.state, state.exit_code = "FAILED", result["exit_code"]
        return state

    def _finish(self, job: JobRecord, queue: JobState, record: RunRecord, sink: LogSink) -> RunRecord:
        for attempt in range(3):
            try:
                final = self.final_state(job, sink)
                break
            except SlurmCommandError as exc:
                if attempt == 2:
                    raise fail(
                        record,
                        sink,
                        f"{record.tool}: slurm job {job.job_id} ended, but its final state could not be read: {exc}",
                        FailureClass.TRANSIENT,
                    ) from exc
                sink.note(f"reading the final state of slurm job {job.job_id} failed ({exc}); trying again")
                time.sleep(min(self.poll_s * 3, 30))
        if final.node is None:
            final.node = queue.node
        self._record_final(record, final)
        self._collected(job, {"state": final.state, "exit_code": final.exit_code, "source": final.source})
        summary = (
            f"slurm job {job.job_id} ended {final.state} (exit {final.raw_exit or final.exit_code}, "
            f"from {final.source})"
        )
        sink.note(summary)
        tool_text = sink.tool_text()
        if final.state == "COMPLETED" and final.exit_code == 0:
            return succeed(record, sink, 0)
        if final.state in RESOURCE_STATES or (final.state == "FAILED" and _MEMORY_KILL.search(tool_text)):
            what = RESOURCE_STATES.get(final.state, "memory limit")
            if what == "time limit":
                record.extra["timed_out"] = True
                record.extra["timeout_s"] = _time_limit(self.stage, None) * 60
            if what == "memory limit":
                record.extra["oom_killed"] = True
            message = (
                f"{record.tool}: slurm job {job.job_id} exceeded its {what} ({final.state}) (log: {record.log_path})"
            )
            raise fail(record, sink, message, FailureClass.RESOURCE, exit_code=final.exit_code)
        if final.state in TRANSIENT_STATES:
            message = (
                f"{record.tool}: slurm job {job.job_id} ended by {TRANSIENT_STATES[final.state]} "
                f"({final.state}) (log: {record.log_path})"
            )
            raise fail(record, sink, message, FailureClass.TRANSIENT, exit_code=final.exit_code)
        if final.state == "CANCELLED":
            by = final.extra.get("cancelled_by_uid")
            message = (
                f"{record.tool}: slurm job {job.job_id} was cancelled outside neuroflow"
                + (f" (by uid {by})" if by else "")
                + f"; not retried (log: {record.log_path})"
            )
            raise fail(record, sink, message, FailureClass.TOOL, exit_code=final.exit_code)
        if final.state == "UNKNOWN":
            message = (
                f"{record.tool}: the end of slurm job {job.job_id} was not recorded anywhere (no accounting, "
                f"the controller forgot it, no result file): treated as failed (log: {record.log_path})"
            )
            raise fail(record, sink, message, FailureClass.TRANSIENT)
        if final.exit_code in (None, 0):
            message = f"{record.tool}: slurm job {job.job_id} ended {final.state} (log: {record.log_path})"
            raise fail(record, sink, message, FailureClass.TRANSIENT, exit_code=final.exit_code)
        raise exit_failure(record, sink, final.exit_code)

    def _record_final(self, record: RunRecord, final: JobState) -> None:
        record.extra.update(
            {
                "slurm_state": final.state,
                "slurm_state_source": final.source,
                "slurm_exit_code": final.raw_exit or (str(final.exit_code) if final.exit_code is not None else None),
            }
        )
        if final.node:
            record.extra["slurm_node"] = final.node
        if final.elapsed_s is not None:
            record.extra["slurm_elapsed_s"] = final.elapsed_s
        if final.max_rss_kb is not None:
            record.extra["slurm_max_rss_mb"] = round(final.max_rss_kb / 1024, 1)
        record.extra = {k: v for k, v in record.extra.items() if v is not None}

    def _collected(self, job: JobRecord, final: dict[str, Any]) -> None:
        job.status = "finished"
        job.final = final
        job.collected_by = self.run_id
        if self.jobs is not None:
            self.jobs.save(job)

    def _wait_gone(self, job_id: str, sink: LogSink) -> JobState | None:
        deadline = time.monotonic() + self.cancel_wait_s
        state: JobState | None = None
        while time.monotonic() < deadline:
            try:
                state = self.cli.queue_state(job_id)
            except SlurmCommandError:
                state = None
            if state is None or not state.active:
                return state
            time.sleep(min(self.poll_s, 1.0))
        sink.note(f"slurm job {job_id} still {state.state if state else '?'} {self.cancel_wait_s:.0f} s after scancel")
        return state

    def _cancel(self, job: JobRecord | None, record: RunRecord, sink: LogSink, exc: BaseException) -> None:
        """Interrupted (the Dagster run was terminated) or a bug: the job must not outlive the run."""
        try:
            if job is not None and job.job_id is None and job.job_name:
                job.job_id = self.cli.find_by_name(job.job_name)  # sbatch answered after all?
            if job is not None and job.job_id is not None:
                sink.note(f"interrupted by {type(exc).__name__}: cancelling slurm job {job.job_id}")
                self.cli.cancel(job.job_id)
                state = self._wait_gone(job.job_id, sink)
                self._collected(job, {"state": state.state if state else "CANCELLED", "reason": "run cancelled"})
                record.extra["slurm_job_id"] = job.job_id
            elif job is not None:
                self._collected(job, {"state": "NOT_SUBMITTED", "reason": "run cancelled"})
        finally:
            sink.note(mark_cancelled(record, exc))
            record.log_tail = sink.tail
            sink.close()


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
