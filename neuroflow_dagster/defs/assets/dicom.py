"""`dicom_session`: a DICOM folder registered by the discovery sensor (external asset), and its protocol check."""

import dagster as dg

from neuroflow_dagster.defs.partitions import session_partitions
from neuroflow_dagster.defs.resources import NeuroflowResource
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.discovery.status_report import recheck_protocol
from neuroflow_dagster.naming.partitions import split_session_key
from neuroflow_dagster.stages import PROTOCOL_CHECK, SOURCE_ASSET

dicom_session = dg.AssetSpec(
    SOURCE_ASSET,
    partitions_def=session_partitions,
    group_name="discovery",
    kinds={"dicom"},
    description=(
        "One scanner session folder (one ScanID), registered by the `dicom_discovery` sensor once it "
        "stopped changing. Materialized by the sensor, never by a run: the folder is the data, and "
        "it is never written."
    ),
)


@dg.asset_check(
    asset=SOURCE_ASSET,
    name=PROTOCOL_CHECK,
    blocking=True,
    partitions_def=session_partitions,
    description="The session against the scan protocol (DICOM headers only). Reported by the discovery "
    "sensor; running it by hand re-reads the headers now.",
)
def dicom_protocol_check(context: dg.AssetCheckExecutionContext, neuroflow: NeuroflowResource) -> dg.AssetCheckResult:
    config = neuroflow.load()
    participant, session = split_session_key(context.partition_key)
    entry = Registry(config.paths.state).get(participant, session)
    if entry is None:
        return dg.AssetCheckResult(
            passed=False, metadata={"reason": f"sub-{participant} ses-{session} is not in the registry"}
        )
    verdict = recheck_protocol(config, entry.dicom_path)
    return dg.AssetCheckResult(
        passed=verdict.valid,
        severity=dg.AssetCheckSeverity.ERROR,
        description=verdict.message,
        metadata={"reason": verdict.message, "scan_id": entry.scan_id},
    )
