"""The instance's storage is created once: racing clients on a fresh DAGSTER_HOME cannot corrupt it.

Real processes of the installed `neuroflow` command race against a fresh
SQLite instance (the default storage): `neuroflow instance init` (what
`neuroflow start`/`demo` run before Dagster) and operator commands
(`neuroflow status`). Without the lock and the refusal, concurrent creation
leaves two rows in a database's `alembic_version` and the code location never
loads again ("more than one head present").
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from neuroflow_dagster.control.storage import SQLITE_DATABASES
from neuroflow_dagster_tests.daemon_harness import REPO
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

NEUROFLOW = str(Path(sys.executable).with_name("neuroflow"))


def fresh_home(root: Path) -> Path:
    home = root / "home"
    home.mkdir(parents=True)
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    return home


def stamps(home: Path) -> dict[str, int]:
    out = {}
    for rel in SQLITE_DATABASES:
        conn = sqlite3.connect(home / rel)
        try:
            out[rel] = conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0]
        finally:
            conn.close()
    return out


def neuroflow(config: Path, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([NEUROFLOW, "--config", str(config), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_racing_clients_on_a_fresh_instance_leave_one_migration_stamp(tmp_path: Path) -> None:
    config = make_workspace(tmp_path / "ws", mapping={})
    for trial in range(2):
        home = fresh_home(tmp_path / f"trial{trial}")
        procs = []
        for _ in range(3):
            procs.append(("init", neuroflow(config.source, "instance", "init", "--dagster-home", str(home))))
            procs.append(("status", neuroflow(config.source, "status", "--dagster-home", str(home))))
        for kind, proc in procs:
            _, err = proc.communicate(timeout=300)
            if kind == "init":
                assert proc.returncode == 0, err
            else:  # either it ran on ready storage, or it refused clearly: never a traceback, never creation
                assert proc.returncode in (0, 2), err
                assert "Traceback" not in err
                if proc.returncode == 2:
                    assert "neuroflow instance init" in err, err
        assert stamps(home) == dict.fromkeys(SQLITE_DATABASES, 1)
        done = neuroflow(config.source, "status", "--dagster-home", str(home))
        _, err = done.communicate(timeout=300)
        assert done.returncode == 0, err


def test_operator_commands_refuse_an_uninitialized_instance_and_create_nothing(tmp_path: Path) -> None:
    from neuroflow_dagster import cli

    config = make_workspace(tmp_path / "ws", mapping={})
    home = fresh_home(tmp_path)
    code = cli.main(["--config", str(config.source), "status", "--dagster-home", str(home)])
    assert code == 2
    assert sorted(p.name for p in home.iterdir()) == ["dagster.yaml"]


def test_storage_damaged_by_an_earlier_race_is_named_with_the_way_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the race used to leave (two revisions in one alembic_version): named, never guessed at."""
    from neuroflow_dagster import cli

    config = make_workspace(tmp_path / "ws", mapping={})
    home = fresh_home(tmp_path)
    assert cli.main(["instance", "init", "--dagster-home", str(home)]) == 0
    conn = sqlite3.connect(home / "schedules/schedules.db")
    with conn:
        (current,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        # The pair seen after a real race: an older revision stamped beside the current one.
        other = next(r for r in ("29b539ebc72a", "5771160a95ad") if r != current)
        conn.execute("INSERT INTO alembic_version VALUES (?)", (other,))
    conn.close()
    capsys.readouterr()
    assert cli.main(["--config", str(config.source), "status", "--dagster-home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "is damaged: schedules/schedules.db has 2 rows in alembic_version" in err and "move" in err
    assert cli.main(["instance", "init", "--dagster-home", str(home)]) == 2
    assert "is damaged" in capsys.readouterr().err
