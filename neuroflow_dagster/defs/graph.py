"""The stage registry (stages.py) as Dagster objects: asset keys, partitions, dependencies, the assets.

Every stage asset module takes its name, partitions, inputs and pool from
``stage_asset_args``, so the registry entry is the one place those facts live;
``build_stage_assets`` imports each stage's builder named by its record.
"""

from __future__ import annotations

import importlib
from typing import Any

import dagster as dg

from neuroflow_dagster import stages
from neuroflow_dagster.config import NeuroflowConfig, StageConfig
from neuroflow_dagster.defs.partitions import session_partitions, subject_of_session, subjects_partitions

DICOM_KEY = dg.AssetKey(stages.SOURCE_ASSET)


def asset_key(stage: stages.Stage | str) -> dg.AssetKey:
    """The asset key of a stage (record or name)."""
    return dg.AssetKey((stages.stage(stage) if isinstance(stage, str) else stage).asset)


def partitions_def(level: stages.Level) -> dg.PartitionsDefinition:
    return subjects_partitions if level == stages.SUBJECT else session_partitions


def deps(stage: stages.Stage) -> list[dg.AssetDep]:
    """The stage's inputs; a subject-level asset reads (or is read by) all of a subject's sessions."""
    out = [
        dg.AssetDep(asset, partition_mapping=subject_of_session if level != stage.level else None)
        for asset, level in stages.upstream_assets(stage)
    ]
    if stage.name == stages.QC_GATED_STAGES[0]:  # the first gated stage waits for the session's image QC
        out.append(dg.AssetDep(stages.QC_ASSET))
    return out


def stage_asset_args(stage: stages.Stage, settings: StageConfig | None = None) -> dict[str, Any]:
    """``@dg.asset`` arguments that come from the registry: name, partitions, inputs, pool; with the
    stage's settings also its kind (where its tool runs)."""
    args: dict[str, Any] = {
        "name": stage.asset,
        "partitions_def": partitions_def(stage.level),
        "deps": deps(stage),
        "pool": stage.pool,
    }
    if settings is not None:
        args["kinds"] = {runtime_kind(settings)}
    return args


def stage_settings(config: NeuroflowConfig, stage: stages.Stage | str) -> StageConfig:
    """The stage's section of the configuration (``pipelines.<config_section>``)."""
    record = stages.stage(stage) if isinstance(stage, str) else stage
    return config.stage(record.config_section)


def runtime_kind(settings: StageConfig) -> str:
    """The asset's kind tag: where its tool runs (the embedded stand-ins are plain Python)."""
    return "python" if settings.runtime == "builtin" else settings.runtime


def tool_label(settings: StageConfig, tool: str) -> str:
    """How descriptions and metadata name the tool: a stand-in is never presented as the real one."""
    return f"{tool} stand-in (builtin)" if settings.tool_runtime == "builtin" else tool


def build_stage_assets(config: NeuroflowConfig) -> list[dg.AssetsDefinition]:
    """Every registered stage's asset, from the builder its record names."""
    built = []
    for stage in stages.stages():
        module, _, function = stage.builder.partition(":")
        built.append(getattr(importlib.import_module(module), function)(config))
    return built
