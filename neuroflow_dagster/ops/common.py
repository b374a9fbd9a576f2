"""Shared pieces of the operator helpers: stage names, the Dagster instance, partition spellings."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.discovery.identity import Registry, RegistryEntry

STAGE_TAG = "neuroflow/stage"
FAILURE_CLASS_KEY = "neuroflow/failure_class"
STATUS_KEY = "neuroflow/status"

# Pipeline order; the asset each stage materializes.
STAGE_ASSETS: dict[str, str] = {
    "bids_conversion": "bids_session",
    "qsiprep": "qsiprep_subject",
    "qsirecon": "qsirecon_session",
    "qsiparc": "qsiparc_session",
}
STAGE_OF_ASSET = {asset: stage for stage, asset in STAGE_ASSETS.items()}
SUBJECT_STAGES = frozenset({"qsiprep"})
STAGE_ALIASES = {"bids": "bids_conversion", "conversion": "bids_conversion"}
DICOM_ASSET = "dicom_session"
PROTOCOL_CHECK = "protocol"


class OpsUsageError(ValueError):
    """The operator asked for something that cannot name a stage, session or run (exit 5)."""


class OpsConfigError(ValueError):
    """The Dagster instance cannot be found or opened (exit 2)."""


def normalize_stage(name: str) -> str:
    """`bids` -> `bids_conversion`; unknown names raise with the accepted list."""
    key = (name or "").strip().lower()
    key = STAGE_ALIASES.get(key, key)
    if key not in STAGE_ASSETS:
        accepted = ", ".join([*STAGE_ASSETS, *(f"{a} (= {t})" for a, t in STAGE_ALIASES.items())])
        raise OpsUsageError(f"unknown stage {name!r}; accepted: {accepted}")
    return key


# --------------------------------------------------------------------------- the instance


def resolve_dagster_home(option: str | None, config: NeuroflowConfig | None) -> Path:
    """--dagster-home, else $DAGSTER_HOME, else <folder of neuroflow.yaml>/.dagster_home (as `neuroflow demo`)."""
    if option:
        candidate, origin = Path(option), "--dagster-home"
    elif os.environ.get("DAGSTER_HOME"):
        candidate, origin = Path(os.environ["DAGSTER_HOME"]), "$DAGSTER_HOME"
    elif config is not None and config.source is not None:
        candidate, origin = Path(config.source).resolve().parent / ".dagster_home", "the config's folder"
    else:
        raise OpsConfigError("no Dagster instance: pass --dagster-home or set DAGSTER_HOME")
    if not candidate.is_dir():
        raise OpsConfigError(
            f"Dagster home {candidate} (from {origin}) does not exist; pass --dagster-home or set DAGSTER_HOME "
            "to the folder holding dagster.yaml"
        )
    return candidate.resolve()


@contextmanager
def open_instance(home: Path) -> Iterator[dg.DagsterInstance]:
    """The instance of `home`, opened from its dagster.yaml for reading (the CLI never writes Dagster records)."""
    from dagster._core.instance.ref import InstanceRef

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
    try:
        yield instance
    finally:
        instance.dispose()


# --------------------------------------------------------------------------- partitions


def session_partition(participant: str, session: str) -> str:
    """The multi-partition key string of a session ("01|SUBJA": dimension names sorted: session|subject).

    Spelled out rather than built as a dg.MultiPartitionKey: status builds one per session and stage
    (a fifth of its time at 20,000 sessions); test_operator_cli checks both agree.
    """
    return f"{session}|{participant}"


def split_partition(key: str) -> tuple[str, str]:
    """(participant, session) of "01|SUBJA"."""
    session, _, participant = key.partition("|")
    return participant, session


@dataclass(frozen=True)
class PartitionRef:
    """What an operator typed, as a subject (session None) or a session."""

    participant: str
    session: str | None = None

    @property
    def key(self) -> str:
        return self.participant if self.session is None else session_partition(self.participant, self.session)


_SUB_SES = re.compile(r"^(?:sub-)?([A-Za-z0-9]+)/(?:ses-)?([A-Za-z0-9]+)$")
_SES_PIPE_SUB = re.compile(r"^([A-Za-z0-9]+)\|([A-Za-z0-9]+)$")
_SUB = re.compile(r"^(?:sub-)?([A-Za-z0-9]+)$")


def parse_partition(text: str) -> PartitionRef:
    """ "01|SUBJA", "sub-SUBJA/ses-01", "SUBJA/01" -> a session; "sub-SUBJA" or "SUBJA" -> a subject."""
    value = text.strip()
    if m := _SES_PIPE_SUB.match(value):
        return PartitionRef(m.group(2), m.group(1))
    if m := _SUB_SES.match(value):
        return PartitionRef(m.group(1), m.group(2))
    if m := _SUB.match(value):
        return PartitionRef(m.group(1))
    raise OpsUsageError(
        f"{text!r} is not a partition: use '01|SUBJA', 'sub-SUBJA/ses-01', 'SUBJA/01' or a subject label"
    )


def resolve_session(registry: Registry, text: str) -> RegistryEntry:
    """A ScanID, or "sub-X/ses-Y" / "X/Y" / "Y|X", to its registry entry; errors name what was looked for."""
    entry = registry.lookup(text)
    if entry is not None:
        return entry
    try:
        ref = parse_partition(text)
    except OpsUsageError:
        ref = None
    if ref is not None and ref.session is not None:
        entry = registry.get(ref.participant, ref.session)
        if entry is not None:
            return entry
        raise OpsUsageError(
            f"sub-{ref.participant} ses-{ref.session} is not in the ScanID registry {registry.path} "
            f"(and {text!r} is not a registered ScanID)"
        )
    raise OpsUsageError(f"{text!r} is neither a registered ScanID nor 'sub-X/ses-Y' (registry {registry.path})")
