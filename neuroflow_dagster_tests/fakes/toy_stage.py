"""A toy stage, added the way docs/architecture.md says a stage is added (for test_stage_registry.py).

Its config section (a StageConfig subclass and a PipelinesConfig field: here
subclasses, where a real stage edits config.py), its asset module (this file's
builder), and one registry entry (``TOY``). It has no tool module: its asset
runs no tool, which is all the registry test needs.
"""

import dagster as dg
from pydantic import Field

from neuroflow_dagster.config import NeuroflowConfig, PipelinesConfig, StageConfig
from neuroflow_dagster.defs.graph import stage_asset_args
from neuroflow_dagster.naming.tags import STATUS_DONE, STATUS_KEY
from neuroflow_dagster.stages import SESSION, Stage, stage

TOY = Stage(
    name="toyqc",
    asset="toyqc_session",
    level=SESSION,
    upstream=("bids_conversion",),
    builder="neuroflow_dagster_tests.fakes.toy_stage:build_toyqc_asset",
    aliases=("toy",),
)


class ToyqcConfig(StageConfig):
    max_concurrent: int = Field(3, ge=1)
    timeout_minutes: float = Field(30, gt=0)


class ToyPipelines(PipelinesConfig):
    toyqc: ToyqcConfig = Field(default_factory=ToyqcConfig)


class ToyNeuroflowConfig(NeuroflowConfig):
    pipelines: ToyPipelines = Field(default_factory=ToyPipelines)


def with_toy_section(config: NeuroflowConfig) -> ToyNeuroflowConfig:
    """The same configuration, plus the toy stage's section with its defaults."""
    toy = ToyNeuroflowConfig.model_validate(config.model_dump())
    toy.source = config.source
    return toy


def build_toyqc_asset(config: NeuroflowConfig) -> dg.AssetsDefinition:
    @dg.asset(
        **stage_asset_args(stage("toyqc")),
        group_name="qc",
        kinds={"python"},
        automation_condition=dg.AutomationCondition.eager(),
        description="A toy quality check (test only): runs no tool.",
    )
    def toyqc_session(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={STATUS_KEY: STATUS_DONE, "partition": context.partition_key})

    return toyqc_session
