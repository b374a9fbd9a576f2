"""A new neuroflow workspace on disk: the commented starter neuroflow.yaml, its folders, a DAGSTER_HOME.

Plain Python, used by `neuroflow init`, `neuroflow demo` and the demo workspace
(demo/workspace.py), so none of them imports another's command code.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from neuroflow_dagster.config import CONFIG_FILENAME
from neuroflow_dagster.errors import UsageError

FOLDERS = ("incoming", "bids", "derivatives", "work", "logs", "state")


def template_text(stability_minutes: float = 180, interval_seconds: int = 60, min_free_gb: float = 10) -> str:
    text = resources.files("neuroflow_dagster").joinpath("templates/neuroflow.yaml").read_text(encoding="utf-8")
    return (
        text.replace("__STABILITY__", f"{stability_minutes:g}")
        .replace("__INTERVAL__", str(interval_seconds))
        .replace("__DISK_FLOOR__", f"{min_free_gb:g}")
    )


def init_workspace(
    directory: Path,
    *,
    stability_minutes: float = 180,
    interval_seconds: int = 60,
    min_free_gb: float = 10,
    force: bool = False,
) -> Path:
    """Write DIR/neuroflow.yaml (commented starter config for the embedded default) and its folders."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CONFIG_FILENAME
    if target.exists() and not force:
        raise UsageError(f"{target} exists; use --force to overwrite")
    target.write_text(template_text(stability_minutes, interval_seconds, min_free_gb), encoding="utf-8")
    for sub in FOLDERS:
        (directory / sub).mkdir(exist_ok=True)
    mapping = directory / "mapping.csv"
    if not mapping.exists():
        mapping.write_text("ScanID,SubjectCode\n", encoding="utf-8")
    return target


def dagster_home(directory: Path) -> Path:
    """A DAGSTER_HOME with the project's dagster.yaml (instance settings: limits, retries, monitoring)."""
    home = directory / ".dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(project_dagster_yaml(), home / "dagster.yaml")
    return home


def project_dagster_yaml() -> Path:
    """The repository's dagster.yaml in a checkout, else the copy shipped inside the package."""
    shipped = Path(str(resources.files("neuroflow_dagster").joinpath("templates/dagster.yaml")))
    top = Path(__file__).resolve().parent.parent / "dagster.yaml"
    return top if top.is_file() else shipped
