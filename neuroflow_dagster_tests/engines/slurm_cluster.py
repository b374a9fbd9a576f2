"""A real one-node Slurm cluster for the tests (Debian's slurm-wlm + munge, optionally slurmdbd + MariaDB).

Everything lives in one temporary folder: slurm.conf (clients find it through ``SLURM_CONF``),
a private munge key and socket (``AuthInfo=socket=``), state, spool and logs; the daemons listen
on free ports. Nothing goes to /etc or /run, so the host's own services (if any) are untouched
and two test sessions do not collide. One node, 2 CPUs, ``DefMemPerCPU`` set so that jobs run
side by side (without it each job takes the whole node), ``OverMemoryKill`` so that a job over
its ``--mem`` is killed, ``MinJobAge=300`` as on a real site.

With ``accounting=True`` a MariaDB server and slurmdbd are started too, so ``sacct`` works;
without it ``sacct`` answers "accounting storage is disabled", as on sites that run no slurmdbd.

The daemons run as root (the tests run as root in CI; munged runs as the ``munge`` user).
Start-up failures raise ``EngineStartError`` with the log tails. Run as a script to keep a
cluster up for a manual demo: ``python -m neuroflow_dagster_tests.engines.slurm_cluster``.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sacct", "scontrol", "scancel")
ACCOUNTING_BINARIES = ("slurmdbd", "mariadbd", "mariadb-install-db", "mariadb")
PARTITION = "debug"
CPUS = 2
MEM_PER_CPU_MB = 1000
REAL_MEMORY_MB = 20000


class EngineStartError(RuntimeError):
    """An engine the tests need did not start; the message carries its log tail."""


def missing_binaries(accounting: bool) -> list[str]:
    names = BINARIES + (ACCOUNTING_BINARIES if accounting else ())
    return [name for name in names if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _which(name: str) -> str:
    found = shutil.which(name) or (str(Path("/usr/sbin", name)) if Path("/usr/sbin", name).exists() else None)
    if found is None:
        raise EngineStartError(f"{name} not found: install Debian's slurm-wlm, munge (and slurmdbd, "
                               "mariadb-server for accounting); scripts/system-deps.sh does")
    return found


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@dataclass
class SlurmCluster:
    root: Path
    node: str
    accounting: bool
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def jobcomp(self) -> Path:
        return self.root / "log" / "jobcomp.txt"

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, the runtime) needs in its environment."""
        return {"SLURM_CONF": str(self.conf)}

    def client(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, **self.env})
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex_join(argv)} exited {proc.returncode}: {proc.stdout}{proc.stderr}\n"
                               f"{self.logs()}")
        return proc

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadb"):
            for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.stdout"):
                if path.exists() and path.stat().st_size:
                    parts.append(f"--- {path.name} ({path}) ---\n{_tail(path, 2000)}")
        return "\n".join(parts)

    def jobs_in_queue(self) -> list[str]:
        out = self.client("squeue", "-h", "-o", "%i %T").stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def alive(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self.procs.items()}


def shlex_join(argv: tuple[str, ...] | list[str]) -> str:
    import shlex

    return shlex.join(list(argv))


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _slurm_conf(cluster: SlurmCluster, ports: dict[str, int], munge_socket: Path, extra: str = "") -> str:
    root = cluster.root
    lines = {
        "ClusterName": "neuroflowtest",
        "SlurmctldHost": f"{cluster.node}(127.0.0.1)",
        "SlurmctldPort": ports["ctld"],
        "SlurmdPort": ports["slurmd"],
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={munge_socket}",
        "StateSaveLocation": root / "state",
        "SlurmdSpoolDir": root / "spool",
        "SlurmctldPidFile": root / "run" / "slurmctld.pid",
        "SlurmdPidFile": root / "run" / "slurmd.pid",
        "SlurmctldLogFile": root / "log" / "slurmctld.log",
        "SlurmdLogFile": root / "log" / "slurmd.log",
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
        "MpiDefault": "none",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core_Memory",
        "DefMemPerCPU": MEM_PER_CPU_MB,
        "SchedulerType": "sched/backfill",
        "SchedulerParameters": "sched_interval=2",
        "ReturnToService": 2,
        "JobCompType": "jobcomp/filetxt",
        "JobCompLoc": cluster.jobcomp,
        "JobAcctGatherType": "jobacct_gather/linux",
        "JobAcctGatherFrequency": "task=1",
        "JobAcctGatherParams": "OverMemoryKill",
        "MinJobAge": 300,
        "KillWait": 5,
        "InactiveLimit": 0,
        "MailProg": "/bin/true",
    }
    if cluster.accounting:
        lines["AccountingStorageType"] = "accounting_storage/slurmdbd"
        lines["AccountingStorageHost"] = "127.0.0.1"
        lines["AccountingStoragePort"] = ports["dbd"]
        # For slurmdbd with munge this names the munge socket (AuthInfo does not reach that connection).
        lines["AccountingStoragePass"] = munge_socket
    else:
        lines["AccountingStorageType"] = "accounting_storage/none"
    text = "".join(f"{key}={value}\n" for key, value in lines.items())
    text += (f"NodeName={cluster.node} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={REAL_MEMORY_MB} State=UNKNOWN\n"
             f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")
    return text + extra


def _wait(check, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [name for name, proc in cluster.procs.items() if proc.poll() is not None]
        if dead:
            raise EngineStartError(f"{', '.join(dead)} exited while waiting for {what}\n{cluster.logs()}")
        if check():
            return
        time.sleep(0.2)
    raise EngineStartError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")


def _spawn(cluster: SlurmCluster, name: str, argv: list[str], *, user: str | None = None) -> None:
    log = open(cluster.root / "log" / f"{name}.stdout", "ab")  # the daemon's own; closed below
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    cluster.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, **cluster.env}, start_new_session=True)
    log.close()


def _start_munge(cluster: SlurmCluster) -> Path:
    folder = cluster.root / "munge"  # the socket's folder must be searchable by all (munged checks)
    folder.mkdir()
    folder.chmod(0o755)
    (folder / "private").mkdir(mode=0o700)
    key = folder / "private" / "munge.key"
    key.write_bytes(secrets.token_bytes(128))
    key.chmod(0o400)
    munge = pwd.getpwnam("munge")
    for path in (folder, folder / "private", key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    log = cluster.root / "log" / "munged.log"
    log.touch()
    os.chown(log, munge.pw_uid, munge.pw_gid)
    sock = folder / "munge.socket"
    seed = folder / "private" / "munged.seed"
    _spawn(cluster, "munged", [_which("munged"), "-F", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={folder / 'munged.pid'}", f"--seed-file={seed}",
                               f"--log-file={log}", "--num-threads=4"], user="munge")
    _wait(sock.exists, 20, "munged's socket", cluster)
    return sock


def _start_mariadb(cluster: SlurmCluster, port: int) -> tuple[str, str]:
    """A private MariaDB server (TCP 127.0.0.1:port) with a ``slurm`` user; returns (user, password)."""
    data = cluster.root / "mysql"
    sock = cluster.root / "run" / "mysql.sock"
    log = cluster.root / "log" / "mariadb.log"
    init = subprocess.run([_which("mariadb-install-db"), "--no-defaults", "--user=root", f"--datadir={data}",
                           "--auth-root-authentication-method=socket", "--skip-test-db"],
                          capture_output=True, text=True, timeout=180, check=False)
    if init.returncode != 0:
        raise EngineStartError(f"mariadb-install-db failed ({init.returncode}):\n{init.stdout[-2000:]}"
                               f"{init.stderr[-2000:]}")
    _spawn(cluster, "mariadb", [_which("mariadbd"), "--no-defaults", "--user=root", f"--datadir={data}",
                                f"--socket={sock}", f"--port={port}", "--bind-address=127.0.0.1",
                                f"--log-error={log}", f"--pid-file={cluster.root / 'run' / 'mysql.pid'}",
                                "--skip-name-resolve", "--innodb-buffer-pool-size=32M",
                                "--innodb-log-file-size=16M", "--innodb-flush-log-at-trx-commit=0",
                                "--performance-schema=OFF"])
    _wait(sock.exists, 60, "MariaDB's socket", cluster)
    password = secrets.token_hex(12)
    sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';"
           f"CREATE USER 'slurm'@'localhost' IDENTIFIED BY '{password}';"
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';")
    deadline = time.monotonic() + 60
    while True:
        proc = subprocess.run([_which("mariadb"), "--no-defaults", f"--socket={sock}", "-u", "root", "-e", sql],
                              capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode == 0:
            return "slurm", password
        if time.monotonic() > deadline:
            raise EngineStartError(f"could not create the slurm database user: {proc.stderr}\n{cluster.logs()}")
        time.sleep(0.5)


def _add_accounting_entities(cluster: SlurmCluster) -> None:
    """The cluster in slurmdbd (slurmctld registers it itself) and root's association."""
    deadline = time.monotonic() + 60
    while True:
        out = cluster.client("sacctmgr", "-n", "-P", "list", "cluster", "format=Cluster", check=False)
        if "neuroflowtest" in out.stdout:
            break
        if time.monotonic() > deadline:
            raise EngineStartError(f"slurmctld did not register with slurmdbd: {out.stdout}{out.stderr}\n"
                                   f"{cluster.logs()}")
        time.sleep(0.3)


def _node_idle(cluster: SlurmCluster) -> bool:
    out = cluster.client("sinfo", "-h", "-N", "-o", "%T", check=False)
    return out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated")


@contextmanager
def slurm_cluster(*, accounting: bool = True, root: Path | None = None, extra_conf: str = "") -> Iterator[SlurmCluster]:
    """Start munged, (MariaDB + slurmdbd,) slurmctld and slurmd; yield; stop them and remove the folder.

    ``extra_conf`` is appended to slurm.conf (lines ``Key=value``).
    """
    if os.geteuid() != 0:
        raise EngineStartError("the test Slurm cluster runs its daemons as root (SlurmUser=root); run as root")
    own_root = root is None
    # Not under pytest's tmp_path: munged runs as the `munge` user and needs to reach its folder.
    root = Path(tempfile.mkdtemp(prefix="neuroflow-slurm-")) if root is None else root
    root.chmod(0o755)
    for sub in ("etc", "state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cluster = SlurmCluster(root=root, node=socket.gethostname().split(".")[0], accounting=accounting)
    try:
        ctld_port, slurmd_port, dbd_port, db_port = _free_ports(4)
        munge_socket = _start_munge(cluster)
        ports = {"ctld": ctld_port, "slurmd": slurmd_port, "dbd": dbd_port}
        _write(cluster.conf, _slurm_conf(cluster, ports, munge_socket, extra_conf))
        if accounting:
            db_user, db_password = _start_mariadb(cluster, db_port)
            _write(cluster.conf.parent / "slurmdbd.conf", "".join(f"{k}={v}\n" for k, v in {
                "AuthType": "auth/munge",
                "AuthInfo": f"socket={munge_socket}",
                "DbdHost": "localhost",
                "DbdAddr": "127.0.0.1",
                "DbdPort": dbd_port,
                "SlurmUser": "root",
                "StorageType": "accounting_storage/mysql",
                "StorageHost": "127.0.0.1",
                "StoragePort": db_port,
                "StorageUser": db_user,
                "StoragePass": db_password,
                "StorageLoc": "slurm_acct_db",
                "LogFile": root / "log" / "slurmdbd.log",
                "PidFile": root / "run" / "slurmdbd.pid",
            }.items()), mode=0o600)
            _spawn(cluster, "slurmdbd", [_which("slurmdbd"), "-D"])
            _wait(lambda: _port_open(dbd_port), 60, "slurmdbd's port", cluster)
        _spawn(cluster, "slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(cluster.conf)])
        _wait(lambda: _port_open(ctld_port), 60, "slurmctld's port", cluster)
        if accounting:
            _add_accounting_entities(cluster)
        _spawn(cluster, "slurmd", [_which("slurmd"), "-D", "-f", str(cluster.conf), "-N", cluster.node])
        _wait(lambda: _node_idle(cluster), 60, "the node to be idle", cluster)
        yield cluster
    finally:
        _stop(cluster)
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(cluster: SlurmCluster) -> None:
    """Cancel what is left, then stop the daemons in reverse order (SIGTERM, SIGKILL after 10 s)."""
    if cluster.procs.get("slurmctld") is not None and cluster.procs["slurmctld"].poll() is None:
        try:
            cluster.client("scancel", "--full", "-u", "root", timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
    for name in ("slurmd", "slurmctld", "slurmdbd", "mariadb", "munged"):
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Jobs' processes (slurmstepd) are not children of slurmd's group: kill whatever still runs from here.
    _kill_strays(cluster.root)


def _kill_strays(root: Path) -> None:
    """SIGKILL job processes of this cluster that outlived slurmd (slurmstepd and what it started)."""
    marker = f"SLURM_CONF={root / 'etc' / 'slurm.conf'}".encode()
    own = {os.getpid(), os.getppid()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        in_job = marker in environ and any(v.startswith(b"SLURM_JOB_ID=") for v in environ)
        if in_job or (b"slurmstepd" in cmdline and str(root).encode() in b"".join(environ)):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description="Keep a one-node test Slurm cluster up until Ctrl-C.")
    parser.add_argument("--no-accounting", action="store_true", help="no slurmdbd/MariaDB (sacct disabled)")
    args = parser.parse_args()

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)  # a background job ignores SIGINT: stop cleanly on SIGTERM too
    with slurm_cluster(accounting=not args.no_accounting) as cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
