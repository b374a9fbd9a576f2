"""Helpers that build a neuroflow workspace (config + folders) for the Dagster-layer tests."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml

from neuroflow_dagster.config import NeuroflowConfig, load_config
from neuroflow_dagster.scaffold import init_workspace


def make_workspace(
    root: Path, overrides: dict[str, Any] | None = None, mapping: dict[str, str] | None = None
) -> NeuroflowConfig:
    """`neuroflow init` in `root`, with nested `overrides` merged into the YAML; returns the loaded config.

    The disk guard's floor is 1 GB (the starter file says 10): a test machine with little free space
    must not refuse the stage runs that other tests are about. The guard's own tests set their floors.
    """
    path = init_workspace(root, stability_minutes=0, interval_seconds=5, min_free_gb=1, force=True)
    data = yaml.safe_load(path.read_text())
    for dotted, value in _flatten(overrides or {}):
        node = data
        *parents, last = dotted
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    if mapping is not None:
        write_mapping(root / "mapping.csv", mapping)
    return load_config(path, environ={})


def write_mapping(path: Path, mapping: dict[str, str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ScanID", "SubjectCode"])
        writer.writerows(mapping.items())


def _flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out: list[tuple[tuple[str, ...], Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, (*prefix, key)))
        else:
            out.append(((*prefix, key), value))
    return out
