"""A real Docker engine for the tests (Debian's docker.io: dockerd 20.10), and a local test image.

dockerd runs with its own data root, exec root (its managed containerd lives there too), pid
file and unix socket in a temporary folder, without a bridge or iptables rules (the tools need no
network, and the host's docker0 is left alone), so it never touches a Docker the host may run.
Clients reach it through ``DOCKER_HOST=unix://<root>/docker.sock`` (docker-py's ``from_env``,
which dagster-docker's Pipes client calls, reads it).

No registry is reachable from the test machines, so the test image is built locally: a root file
system with Debian's static busybox (sh, sleep, id, ...), imported with ``docker import``. Tests
that need Python in the container bind-mount the host's interpreter (see ``python_mounts``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from neuroflow_dagster_tests.engines.slurm_cluster import EngineStartError

IMAGE = "neuroflow/busybox-test:1.0"
BUSYBOX_APPLETS = ("sh", "echo", "cat", "sleep", "id", "ls", "true", "false", "touch", "stat", "env", "head",
                   "tail", "kill", "mkdir", "rm", "pwd", "grep", "dd")
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"


@dataclass
class DockerEngine:
    root: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log(self) -> Path:
        return self.root / "dockerd.log"

    def client(self):  # -> docker.DockerClient
        import docker

        return docker.DockerClient(base_url=self.host, timeout=120)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no dockerd log)"


def _busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(candidate).is_file():
            return Path(candidate)
    raise EngineStartError("busybox not found: install Debian's busybox-static (scripts/system-deps.sh does)")


def build_rootfs_tar(dest: Path) -> Path:
    """A minimal root file system: static busybox + applet links, /tmp, /etc/passwd, mount points."""
    busybox = _busybox()
    tar_path = dest / "rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        for folder in ("bin", "etc", "usr", "lib", "lib64", "root", "proc", "sys", "dev"):
            add_dir(folder)
        add_dir("tmp", 0o1777)
        tar.add(busybox, arcname="bin/busybox")
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(link)
        data = PASSWD.encode()
        info = tarfile.TarInfo("etc/passwd")
        info.size, info.mode = len(data), 0o644
        import io

        tar.addfile(info, io.BytesIO(data))
    return tar_path


def python_mounts() -> list[str]:
    """Read-only binds that make the host's Python (and this project's venv) usable in the container.

    Identity paths, so ``sys.executable`` and the editable install resolve as on the host.
    """
    paths = {"/usr", "/lib", "/lib64", sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[2])}
    real = Path(sys.executable).resolve().parent.parent
    paths.add(str(real))
    binds = []
    for path in sorted(paths):
        if Path(path).exists():
            binds.append(f"{path}:{path}:ro")
    # A bind under another bind must come after it; sorted() keeps parents first.
    return binds


def _docker_cli() -> str:
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise EngineStartError("the docker client is not installed (Debian's docker.io provides /usr/bin/docker)")


@contextmanager
def docker_engine(extra_args: tuple[str, ...] = ()) -> Iterator[DockerEngine]:
    """Start a private dockerd, import the test image; yield; remove containers, stop it, delete its files."""
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).is_file():
        raise EngineStartError("dockerd not found: install Debian's docker.io (scripts/system-deps.sh does)")
    if os.geteuid() != 0:
        raise EngineStartError("the test Docker engine runs dockerd as root; run the tests as root")
    root = Path(tempfile.mkdtemp(prefix="neuroflow-docker-"))
    root.chmod(0o755)
    log = open(root / "dockerd.log", "ab")  # dockerd keeps it; closed here after the start
    proc = subprocess.Popen(
        [dockerd, f"--data-root={root / 'data'}", f"--exec-root={root / 'exec'}", f"--pidfile={root / 'docker.pid'}",
         "-H", f"unix://{root / 'docker.sock'}", "--bridge=none", "--iptables=false", "--ip-masq=false",
         "--log-level=warn", *extra_args],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    engine = DockerEngine(root=root, proc=proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise EngineStartError(f"dockerd exited with {proc.returncode}:\n{engine.log_tail()}")
            if engine.socket.exists():
                try:
                    if engine.client().ping():
                        break
                except Exception:  # not answering yet
                    pass
            if time.monotonic() > deadline:
                raise EngineStartError(f"dockerd did not answer within 60 s:\n{engine.log_tail()}")
            time.sleep(0.2)
        tar_path = build_rootfs_tar(root)
        imported = subprocess.run(
            [_docker_cli(), "import", "-c", "ENV PATH=/usr/local/bin:/usr/bin:/bin", str(tar_path), IMAGE],
            env={**os.environ, "DOCKER_HOST": engine.host}, capture_output=True, text=True, timeout=120, check=False)
        if imported.returncode != 0:
            raise EngineStartError(f"docker import failed: {imported.stderr}\n{engine.log_tail()}")
        yield engine
    finally:
        try:
            client = engine.client()
            for container in client.containers.list(all=True):
                container.remove(force=True)
        except Exception:
            pass
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        subprocess.run(["umount", "-R", str(root / "data")], capture_output=True, check=False)
        subprocess.run(["umount", "-R", str(root / "exec")], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
