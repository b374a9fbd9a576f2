"""The Dagster instance the operator commands read: which folder, opened read-only.

`open_db` (status) reads the instance's tables directly and imports no dagster; `open_instance`
(the other commands) opens it through Dagster.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.errors import ConfigError

if TYPE_CHECKING:
    import dagster as dg

    from neuroflow_dagster.control.dagster_db import Db


def resolve_dagster_home(option: str | None, config: NeuroflowConfig | None) -> Path:
    """--dagster-home, else $DAGSTER_HOME, else <folder of neuroflow.yaml>/.dagster_home (as `neuroflow demo`)."""
    if option:
        candidate, origin = Path(option), "--dagster-home"
    elif os.environ.get("DAGSTER_HOME"):
        candidate, origin = Path(os.environ["DAGSTER_HOME"]), "$DAGSTER_HOME"
    elif config is not None and config.source is not None:
        candidate, origin = Path(config.source).resolve().parent / ".dagster_home", "the config's folder"
    else:
        raise ConfigError("no Dagster instance: pass --dagster-home or set DAGSTER_HOME")
    if not candidate.is_dir():
        raise ConfigError(
            f"Dagster home {candidate} (from {origin}) does not exist; pass --dagster-home or set DAGSTER_HOME "
            "to the folder holding dagster.yaml"
        )
    return candidate.resolve()


@contextmanager
def open_instance(home: Path) -> Iterator[dg.DagsterInstance]:
    """The instance of `home`, opened from its dagster.yaml for reading (the CLI never writes Dagster records)."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    from neuroflow_dagster.control.storage import storage_problem

    # Opening creates missing storage: never do that here, beside a starting `dagster dev`.
    problem = storage_problem(home)
    if problem:
        raise ConfigError(problem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
    try:
        yield instance
    finally:
        instance.dispose()


@contextmanager
def open_db(home: Path) -> Iterator[Db]:
    """The tables of the instance at `home`, read directly (control/dagster_db.py); refused like
    `open_instance` while its SQLite storage is not ready (and never created here)."""
    from neuroflow_dagster.control.dagster_db import Db, StorageConfigError, storage_location
    from neuroflow_dagster.control.storage import storage_problem

    try:
        storage_location(home)
    except StorageConfigError:  # a storage this reader does not open itself: Dagster's connections
        with open_instance(home) as instance, Db.from_instance(instance) as db:
            yield db
        return
    problem = storage_problem(home)
    if problem:
        raise ConfigError(problem)
    with Db.from_home(home) as db:
        yield db
