"""The one Definitions object: assets, checks, sensors, jobs and the resource, built from neuroflow.yaml.

`dagster dev -m neuroflow_dagster.definitions` (or workspace.yaml) loads
this module; the configuration is found as the CLI finds it (--config is
replaced by $NEUROFLOW_CONFIG here). A missing or invalid config stops the
code location from loading, with a message naming the key and the file.
The stages come from the registry (stages.py): one asset, one job and one
automation sensor each.
"""

from __future__ import annotations

import dagster as dg

from neuroflow_dagster import stages
from neuroflow_dagster.config import ConfigError, NeuroflowConfig, check_paths, load_config
from neuroflow_dagster.defs.alerts import build_alert_sensor, build_discovery_alert_sensor
from neuroflow_dagster.defs.assets.dicom import dicom_protocol_check, dicom_session
from neuroflow_dagster.defs.assets.image_qc import build_image_qc_asset
from neuroflow_dagster.defs.automation import build_automation_sensors
from neuroflow_dagster.defs.diskguard import build_disk_guard_sensor
from neuroflow_dagster.defs.graph import build_stage_assets, partitions_def
from neuroflow_dagster.defs.launcher import build_run_worker_watchdog, hold_run_worker_for_test
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.defs.sensors import build_discovery_sensor, max_runtime_tags
from neuroflow_dagster.naming.tags import STAGE_TAG


def stage_jobs(config: NeuroflowConfig) -> list[dg.UnresolvedAssetJobDefinition]:
    """One job per stage, tagged with its stage, for CLI backfills (`dagster job backfill -j ...`)."""
    return [
        dg.define_asset_job(
            f"{stage.name}_job",
            selection=dg.AssetSelection.assets(stage.asset),
            partitions_def=partitions_def(stage.level),
            tags={STAGE_TAG: stage.tag, **max_runtime_tags(config, stage)},
            description=f"Reprocess {stage.asset} for chosen partitions (tagged {STAGE_TAG}={stage.tag}).",
        )
        for stage in stages.stages()
    ]


def optional(sensor: dg.SensorDefinition | None) -> list[dg.SensorDefinition]:
    return [sensor] if sensor is not None else []


def build_definitions(config: NeuroflowConfig) -> dg.Definitions:
    if config.source is None:
        raise ConfigError("build_definitions needs a config loaded from a file (load_config)")
    problems = check_paths(config)
    if problems:
        raise ConfigError(f"configuration {config.source} cannot be used:\n  " + "\n  ".join(problems))
    return dg.Definitions(
        assets=[dicom_session, *build_stage_assets(config), build_image_qc_asset(config)],
        asset_checks=[dicom_protocol_check],
        sensors=[
            build_discovery_sensor(config),
            build_disk_guard_sensor(config),
            build_run_worker_watchdog(),
            *build_automation_sensors(config, max_runtime_tags),
            *optional(build_alert_sensor(config)),
            *optional(build_discovery_alert_sensor(config)),
        ],
        jobs=stage_jobs(config),
        resources={"neuroflow": NeuroflowResource(config_file=str(config.source))},
        # One step per run here: running it in the run worker saves a process start per run. Scaling out
        # beyond one machine swaps the run launcher (Docker, Kubernetes) or this executor (Celery).
        executor=dg.in_process_executor,
    )


@dg.definitions
def defs() -> dg.Definitions:
    hold_run_worker_for_test()  # a no-op unless a power-cut test asks for it (defs/launcher.py)
    return build_definitions(load_config())
