"""A real PostgreSQL server for the tests, started from Debian's binaries on a temporary data folder.

Production runs on PostgreSQL, so the storage claims are tested on it, not on
SQLite. The server listens on 127.0.0.1 (a free port, password auth) and on a
private unix socket; it is tuned for throw-away data (fsync off). initdb
refuses to run as root, so as root the server runs as the `postgres` system
user (via runuser). Absent binaries skip the tests with the reason
(scripts/system-deps.sh installs them in CI).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVICE_USERS = ("postgres", "nobody")
DB_USER = "neuroflow"


def find_pg_bin() -> Path | None:
    """The folder holding initdb/pg_ctl/postgres: Debian's versioned folder (newest), else $PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version(p.parent.name))
    for folder in reversed(candidates):
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        folder = Path(pg_ctl).resolve().parent
        if (folder / "initdb").is_file():
            return folder
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)) or (0,)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    bin_dir: Path
    root: Path
    port: int
    password: str
    run_as: str | None
    user: str = DB_USER
    host: str = "127.0.0.1"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL with the psycopg2 driver (dagster-postgres + SQLAlchemy 2.1 need it spelled out)."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):  # -> psycopg2 connection
        import psycopg2

        conn = psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname=database, connect_timeout=10
        )
        conn.autocommit = True
        return conn

    def create_database(self, name: str) -> str:
        """A fresh, empty database (dropped first if it exists); returns its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and _ only")
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                cur.execute(f"CREATE DATABASE {name}")
        finally:
            conn.close()
        return self.url(name)

    def connection_count(self) -> int:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
                return int(cur.fetchone()[0])
        finally:
            conn.close()

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *argv] if self.run_as else list(argv)

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self._cmd(*argv), capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-3000:] if self.log_file.exists() else ""
            raise RuntimeError(
                f"{' '.join(argv[:2])} failed with exit {proc.returncode} for data folder {self.data_dir}:\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}\n--- server log ---\n{log}"
            )
        return proc


def _service_user() -> str | None:
    """None when not root (run as ourselves); else the first system user that exists."""
    if os.geteuid() != 0:
        return None
    for name in SERVICE_USERS:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError(f"running as root and none of the users {SERVICE_USERS} exists; initdb refuses root")


@contextmanager
def pg_server() -> Iterator[PgServer]:
    """Start a throw-away PostgreSQL server; yields it; always stops it and removes its files."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl, postgres) not found")
    run_as = _service_user()
    # Not under pytest's tmp_path: that folder is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="neuroflow-pg-"))
    server = PgServer(bin_dir=bin_dir, root=root, port=0, password=secrets.token_hex(12), run_as=run_as)
    started = False
    try:
        pwfile = root / "pwfile"
        pwfile.write_text(server.password + "\n")
        (root / "socket").mkdir()
        if run_as:
            entry = pwd.getpwnam(run_as)
            for path in (root, pwfile, root / "socket"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        server.run(
            str(bin_dir / "initdb"),
            "-D", str(server.data_dir),
            "-U", server.user,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256",
            "-E", "UTF8",
            "--no-instructions",
        )  # fmt: skip
        pwfile.unlink()
        last_error: Exception | None = None
        for _attempt in range(3):  # a free port can be taken between bind() and the server's start
            server.port = _free_port()
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(server.port),
                "unix_socket_directories": f"'{root / 'socket'}'",
                "max_connections": "300",  # dagster-postgres opens a connection per query (NullPool)
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
            }
            conf = server.data_dir / "postgresql.auto.conf"
            base = conf.read_text() if conf.exists() else ""
            base = base.split("# neuroflow tests\n")[0]
            conf.write_text(base + "# neuroflow tests\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
            try:
                server.run(str(bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-l", str(server.log_file),
                           "-w", "-t", "60", "start")  # fmt: skip
                started = True
                break
            except RuntimeError as exc:
                last_error = exc
        if not started:
            raise RuntimeError(f"PostgreSQL did not start: {last_error}")
        yield server
    finally:
        if started:
            try:
                server.run(str(bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """One real PostgreSQL server for the test session; skips with the reason when it cannot run here."""
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL binaries not installed (initdb/pg_ctl/postgres); scripts/system-deps.sh installs them")
    with pg_server() as server:
        yield server


@pytest.fixture
def pg_database(postgres: PgServer, request: pytest.FixtureRequest) -> str:
    """A fresh database per test (named after the test); returns its postgresql+psycopg2 URL."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50]
    return postgres.create_database(f"t_{name}")
