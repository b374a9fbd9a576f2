"""The deployment files, checked without a Docker engine or systemd.

- docker-compose.yaml is parsed as YAML and held to the essentials: DICOM
  read-only wherever it is mounted, the UI on loopback only, the database not
  published, no secret values in the file. Debian's `docker-compose` (1.29)
  then checks it with `config`, after the deployment doc's own steps (copy
  .env.example to .env, set DOCKER_GID); `up` would need images from a
  registry, which the test machines cannot reach.
- deploy/dagster.yaml and deploy/systemd/dagster.yaml go through Dagster's own
  instance-config validation; their storage section is resolved from the
  environment (`env:`) with dagster-postgres' schema, and the
  DockerRunLauncher is constructed from its config (that needs no engine).
  Whether that storage really works against PostgreSQL is test_postgres.py.
- The systemd units' ExecStart lines are parsed by the real Dagster CLIs
  (click), so a wrong flag fails here, not on the server.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._serdes import ConfigurableClassData
from dagster_postgres.utils import pg_url_from_config

from neuroflow_dagster.pooled_storage import PooledPostgresStorage

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DICOM = "/srv/neuroflow/dicom"
SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|WEBHOOK|API_KEY", re.I)
PG_ENV = {
    "DAGSTER_POSTGRES_USER": "neuroflow",
    "DAGSTER_POSTGRES_PASSWORD": "pw-from-env",
    "DAGSTER_POSTGRES_HOST": "postgres",
    "DAGSTER_POSTGRES_DB": "dagster",
    "DAGSTER_POSTGRES_PORT": "5432",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "docker-compose.yaml")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


# --------------------------------------------------------------------------- docker compose


def test_compose_has_the_four_services_and_one_named_network(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "neuroflow_code", "webserver", "daemon"}
    assert compose["networks"]["neuroflow"]["name"] == "neuroflow"
    for name, service in compose["services"].items():
        assert service["networks"] == ["neuroflow"], name
    launcher = load_yaml(DEPLOY / "dagster.yaml")["run_launcher"]["config"]
    assert launcher["network"] == "neuroflow"  # run containers join the services' network


def test_dicom_is_read_only_wherever_it_is_mounted(compose: dict[str, Any]) -> None:
    mounts = []
    for name, service in compose["services"].items():
        mounts += [(name, v) for v in service.get("volumes", []) if v.split(":")[0] == DICOM]
    run_volumes = load_yaml(DEPLOY / "dagster.yaml")["run_launcher"]["config"]["container_kwargs"]["volumes"]
    mounts += [("run containers", v) for v in run_volumes if v.split(":")[0] == DICOM]
    assert {name for name, _ in mounts} == {"neuroflow_code", "run containers"}  # sensors and runs read it
    for name, volume in mounts:
        source, target, mode = volume.split(":")
        assert mode == "ro", f"{name}: {volume} is not read-only"
        assert target == source, f"{name}: {volume}: tool containers need the host path inside too"


def test_only_the_webserver_is_published_and_only_on_loopback(compose: dict[str, Any]) -> None:
    published = {name: s["ports"] for name, s in compose["services"].items() if s.get("ports")}
    assert published == {"webserver": ["127.0.0.1:3000:3000"]}
    assert "postgres" not in published


def test_no_secret_values_in_compose_or_dagster_yaml(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name != "postgres":
            assert service["env_file"] == ".env", name
        environment = service.get("environment") or {}
        for key, value in environment.items():
            assert not SECRET_WORDS.search(key), f"{name}: {key} must come from .env, not the compose file"
            assert not SECRET_WORDS.search(str(value)), f"{name}: {key}"
    assert compose["services"]["postgres"]["env_file"] == ".env"
    text = (DEPLOY / "docker-compose.yaml").read_text() + (DEPLOY / "dagster.yaml").read_text()
    assert not re.search(r"(password|secret)[ \t]*[:=][ \t]*[^\s{]", text, re.I), "literal credential in a deploy file"
    db = load_yaml(DEPLOY / "dagster.yaml")["storage"]["custom"]["config"]["postgres_db"]
    assert {k: v for k, v in db.items() if k != "scheme"} == {
        "username": {"env": "DAGSTER_POSTGRES_USER"},
        "password": {"env": "DAGSTER_POSTGRES_PASSWORD"},
        "hostname": {"env": "DAGSTER_POSTGRES_HOST"},
        "db_name": {"env": "DAGSTER_POSTGRES_DB"},
        "port": {"env": "DAGSTER_POSTGRES_PORT"},
    }
    for key, value in env_example().items():
        if SECRET_WORDS.search(key):
            assert value == "", f".env.example: {key} must be empty (a placeholder), not {value!r}"


def test_every_variable_the_instance_reads_is_in_env_example() -> None:
    config = load_yaml(DEPLOY / "dagster.yaml")
    needed = set(re.findall(r"env: (\w+)", (DEPLOY / "dagster.yaml").read_text()))
    needed |= set(config["run_launcher"]["config"]["env_vars"])
    assert needed - set(env_example()) == set()
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(env_example())  # the postgres image's


def test_code_server_runs_the_code_location_and_names_its_image(compose: dict[str, Any]) -> None:
    code = compose["services"]["neuroflow_code"]
    assert code["environment"]["DAGSTER_CURRENT_IMAGE"] == code["image"]
    assert code["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    command = code["command"]
    assert command[:3] == ["dagster", "code-server", "start"]
    assert "neuroflow_dagster.definitions" in command
    port = command[command.index("-p") + 1]
    workspace = load_yaml(DEPLOY / "workspace.yaml")["load_from"][0]["grpc_server"]
    found = (workspace["host"], str(workspace["port"]), workspace["location_name"])
    assert found == ("neuroflow_code", port, "neuroflow")
    for name in ("webserver", "daemon"):
        assert "/opt/dagster/dagster_home/workspace.yaml" in compose["services"][name]["command"]


def test_docker_compose_config_accepts_the_file_after_the_documented_steps(tmp_path: Path) -> None:
    """docs/deployment.md: `cp deploy/.env.example deploy/.env`, DOCKER_GID into .env, then compose.

    Run on a copy of deploy/ (the test must not leave a .env in the repository)."""
    compose_cli = shutil.which("docker-compose")
    assert compose_cli, "Debian's docker-compose is not installed (scripts/system-deps.sh installs it)"
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    env_file = tmp_path / "deploy" / ".env"
    shutil.copyfile(tmp_path / "deploy" / ".env.example", env_file)
    env_file.chmod(0o600)
    env_file.write_text(re.sub(r"(?m)^DOCKER_GID=.*$", "DOCKER_GID=4242", env_file.read_text()))
    out = subprocess.run([compose_cli, "-f", "deploy/docker-compose.yaml", "config"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False,
                         env={k: v for k, v in os.environ.items() if k != "DOCKER_GID"})
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert set(resolved["services"]) == {"postgres", "neuroflow_code", "webserver", "daemon"}
    for name in ("neuroflow_code", "webserver", "daemon"):
        assert resolved["services"][name]["group_add"] == ["4242"], name  # the documented DOCKER_GID step
    assert resolved["services"]["webserver"]["ports"] == ["127.0.0.1:3000:3000/tcp"]
    code_volumes = resolved["services"]["neuroflow_code"]["volumes"]
    assert any(str(v).startswith(f"{DICOM}:{DICOM}:ro") for v in code_volumes), code_volumes
    assert "ports" not in resolved["services"]["postgres"]


def test_dockerfile_installs_the_project_and_its_files_exist() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"pip install \.", text)
    assert "dcm2niix" not in re.sub(r"#.*", "", text.split("pip install")[0]), "dcm2niix comes from PyPI"
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _target = line.split()
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert re.search(r"^USER neuroflow$", text, re.M)


# --------------------------------------------------------------------------- dagster.yaml


@pytest.mark.parametrize("path", ["dagster.yaml", "systemd/dagster.yaml"])
def test_production_instance_config_validates_and_resolves_postgres_from_env(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = (DEPLOY / path).parent
    config, _ = dagster_instance_config(str(folder), config_filename=Path(path).name)  # Dagster's own schema
    # The pooled dagster-postgres storage (neuroflow_dagster/pooled_storage.py): dagster-postgres' fields + pool.
    assert config["storage"]["custom"]["class"] == "PooledPostgresStorage"
    storage = config["storage"]["custom"]["config"]
    for key, value in PG_ENV.items():
        monkeypatch.setenv(key, value)
    resolved = process_config(PooledPostgresStorage.config_type(), storage)
    assert resolved.success, resolved.errors
    assert pg_url_from_config(resolved.value) == "postgresql+psycopg2://neuroflow:pw-from-env@postgres:5432/dagster"
    # Without the password in the environment the config does not resolve, and says which variable.
    monkeypatch.delenv("DAGSTER_POSTGRES_PASSWORD")
    missing = process_config(PooledPostgresStorage.config_type(), storage)
    assert not missing.success
    assert "DAGSTER_POSTGRES_PASSWORD" in str(missing.errors)


def test_docker_run_launcher_is_built_from_its_config_without_an_engine() -> None:
    config, _ = dagster_instance_config(str(DEPLOY))
    section = config["run_launcher"]
    launcher = ConfigurableClassData(section["module"], section["class"], yaml.safe_dump(section["config"])).rehydrate(
        as_type=object
    )
    assert type(launcher).__name__ == "DockerRunLauncher"
    assert launcher.networks == ["neuroflow"]
    assert "DAGSTER_POSTGRES_PASSWORD" in launcher.env_vars  # by name: the value stays in the environment
    assert f"{DICOM}:{DICOM}:ro" in launcher.container_kwargs["volumes"]
    # No Docker there: runs are local processes of the default launcher, with the run-worker health check.
    assert load_yaml(DEPLOY / "systemd" / "dagster.yaml")["run_launcher"] == load_yaml(REPO / "dagster.yaml")[
        "run_launcher"
    ] == {"module": "neuroflow_dagster.defs.launcher", "class": "HealthCheckedRunLauncher"}


@pytest.mark.parametrize("path", ["dagster.yaml", "systemd/dagster.yaml"])
def test_same_limits_retries_and_monitoring_as_the_embedded_default(path: str) -> None:
    root = load_yaml(REPO / "dagster.yaml")
    prod = load_yaml(DEPLOY / path)
    for section in ("concurrency", "run_retries", "run_monitoring", "sensors", "telemetry"):
        assert prod[section] == root[section], f"deploy/{path}: {section} differs from dagster.yaml"


# --------------------------------------------------------------------------- systemd


def unit(name: str) -> dict[str, list[str]]:
    """key -> values of a unit file (keys may repeat, e.g. Environment=)."""
    values: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def parse_cli(argv: list[str]) -> click.Context:
    """Parse an ExecStart command line with the real Dagster CLI (nothing is run)."""
    from dagster._cli import cli as dagster_cli
    from dagster._daemon.cli import cli as daemon_cli
    from dagster_webserver.cli import dagster_webserver

    program = Path(argv[0]).name
    # The units read the workspace file installed from deploy/systemd/; parse against that copy.
    argv = [str(DEPLOY / "systemd" / "workspace.yaml") if a == "/etc/neuroflow/workspace.yaml" else a for a in argv]
    command: click.Command = {"dagster": dagster_cli, "dagster-daemon": daemon_cli,
                              "dagster-webserver": dagster_webserver}[program]  # fmt: skip
    args = argv[1:]
    while isinstance(command, click.Group):
        name, *args = args
        sub = command.commands.get(name)
        assert sub is not None, f"{program}: unknown sub-command {name!r}"
        command = sub
    return command.make_context(program, list(args))


UNITS = ["neuroflow-code-server.service", "neuroflow-webserver.service", "neuroflow-daemon.service"]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_units_parse_and_keep_dicom_read_only(name: str) -> None:
    values = unit(name)
    (exec_start,) = values["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].startswith("/opt/neuroflow/.venv/bin/")
    ctx = parse_cli(argv)
    assert values["ReadOnlyPaths"] == [DICOM]
    assert values["User"] == ["neuroflow"]
    assert values["EnvironmentFile"] == ["/etc/neuroflow/neuroflow.env"]
    assert "DAGSTER_HOME=/var/lib/neuroflow/dagster_home" in values["Environment"]
    assert not any(SECRET_WORDS.search(v) for v in values["Environment"]), "secrets belong in the EnvironmentFile"
    if name == "neuroflow-webserver.service":
        assert ctx.params["host"] == "127.0.0.1"
        assert ctx.params["port"] == 3000
    if name == "neuroflow-code-server.service":
        assert ctx.params["host"] == "127.0.0.1" and ctx.params["port"] == 4000
        assert ctx.params["module_name"] in ("neuroflow_dagster.definitions", ("neuroflow_dagster.definitions",))
        workspace = load_yaml(DEPLOY / "systemd" / "workspace.yaml")["load_from"][0]["grpc_server"]
        assert (workspace["host"], workspace["port"]) == ("127.0.0.1", 4000)
    else:
        assert "/etc/neuroflow/workspace.yaml" in argv
        assert ctx.params["workspace"] in (str(DEPLOY / "systemd" / "workspace.yaml"),
                                           (str(DEPLOY / "systemd" / "workspace.yaml"),))
