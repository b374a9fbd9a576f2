"""The stage registry: one record per processing stage, in pipeline order.

Every layer that lists stages reads them here: the Dagster definitions (assets,
stage jobs), the automation sensors and pool limits, the failure alerts, the
operator commands (status, failures, reprocess, retry, logs) and the CLI's
help. Adding a stage is its config section (config.py), its tool module
(tools/), its asset module (defs/assets/) and one ``register(Stage(...))`` below
(docs/architecture.md, "Adding a stage").

Plain Python (no dagster import): a record names its asset builder as
``"module:function"``, imported by definitions.py only when the Definitions are
built, so this module, the CLI and the operator commands never load the asset
code. Readers call the functions below when they run (never copy the registry
at import time), so a stage registered later - a test's toy stage - is seen
everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from neuroflow_dagster.errors import UsageError

Level = Literal["session", "subject"]
SESSION: Level = "session"
SUBJECT: Level = "subject"

# Where every stage starts: the DICOM sessions the discovery sensor reports. Not a stage (no run
# materializes it), but a valid `upstream` entry; its blocking check is the protocol check.
SOURCE = "discovery"
SOURCE_ASSET = "dicom_session"
PROTOCOL_CHECK = "protocol"
# The image QC gate after preprocessing (qc/, docs/operations.md "The QC gate"): a session asset read
# from QSIPrep's QC table, with a blocking check, run before (and in the same run as) the stages it
# gates; a failed check holds those stages for that session until an operator approves it.
QC_ASSET = "image_qc_session"
QC_CHECK = "image_qc"
QC_GATED_STAGES = ("qsirecon", "qsiparc")


@dataclass(frozen=True)
class Stage:
    """One processing stage: what it is called, what it materializes, per what, after what.

    ``pool``, ``tag`` and ``config_section`` default to ``name``: the stage's runs carry
    ``neuroflow/stage=<tag>``, its asset sits in Dagster pool ``<pool>`` and its settings are
    ``pipelines.<config_section>`` in neuroflow.yaml. ``upstream`` names stages (or SOURCE)
    whose assets this one reads, in the order of its asset's inputs; the partition mapping
    follows from the two levels. ``builder`` is ``"module:function"``, a function of the
    NeuroflowConfig returning the stage's AssetsDefinition.
    """

    name: str
    asset: str
    level: Level
    upstream: tuple[str, ...]
    builder: str
    aliases: tuple[str, ...] = ()
    pool: str = ""
    tag: str = ""
    config_section: str = ""

    def __post_init__(self) -> None:
        for attr in ("pool", "tag", "config_section"):
            if not getattr(self, attr):
                object.__setattr__(self, attr, self.name)

    @property
    def per_subject(self) -> bool:
        return self.level == SUBJECT


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Append a stage (after its upstream stages); names, assets and aliases must be new."""
    taken = {s.name for s in _REGISTRY.values()} | {a for s in _REGISTRY.values() for a in s.aliases}
    clashes = ({stage.name, *stage.aliases} & taken) | ({stage.asset} & {s.asset for s in _REGISTRY.values()})
    if clashes or stage.asset == SOURCE_ASSET or SOURCE in {stage.name, *stage.aliases}:
        raise ValueError(f"stage {stage.name!r}: {', '.join(sorted(clashes)) or SOURCE} already registered")
    unknown = [u for u in stage.upstream if u != SOURCE and u not in _REGISTRY]
    if unknown or not stage.upstream:
        raise ValueError(f"stage {stage.name!r}: upstream {unknown or 'missing'} (register upstream stages first)")
    _REGISTRY[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Remove a stage no other stage reads (tests remove their toy stage this way)."""
    readers = [s.name for s in _REGISTRY.values() if name in s.upstream]
    if readers:
        raise ValueError(f"stage {name!r} is read by {', '.join(readers)}")
    del _REGISTRY[name]


@contextmanager
def registered(*extra: Stage) -> Iterator[list[Stage]]:
    """Register ``extra`` for the duration of a block (tests), then remove them again."""
    added: list[Stage] = []
    try:
        for stage in extra:
            added.append(register(stage))
        yield added
    finally:
        for stage in reversed(added):
            unregister(stage.name)


def stages() -> list[Stage]:
    """Every stage, in pipeline order."""
    return list(_REGISTRY.values())


def names() -> list[str]:
    return list(_REGISTRY)


def stage(name: str) -> Stage:
    """The stage called ``name`` (case-insensitive, aliases such as ``bids`` accepted).

    Unknown names raise UsageError listing what is accepted (the CLI turns it into exit 5).
    """
    key = (name or "").strip().lower()
    for candidate in _REGISTRY.values():
        if key == candidate.name or key in candidate.aliases:
            return candidate
    accepted = [*_REGISTRY, *(f"{a} (= {s.name})" for s in _REGISTRY.values() for a in s.aliases)]
    raise UsageError(f"unknown stage {name!r}; accepted: {', '.join(accepted)}")


def by_asset(asset: str) -> Stage | None:
    """The stage that materializes ``asset`` (None for the DICOM source and foreign assets)."""
    return next((s for s in _REGISTRY.values() if s.asset == asset), None)


def by_tag(tag: str) -> Stage | None:
    """The stage whose runs carry ``neuroflow/stage=<tag>`` (None for discovery runs and foreign tags)."""
    return next((s for s in _REGISTRY.values() if s.tag == tag), None)


def upstream_assets(of: Stage) -> list[tuple[str, Level]]:
    """(asset, level) of what ``of`` reads, in its input order."""
    out: list[tuple[str, Level]] = []
    for name in of.upstream:
        if name == SOURCE:
            out.append((SOURCE_ASSET, SESSION))
        else:
            up = _REGISTRY[name]
            out.append((up.asset, up.level))
    return out


def with_qc(names: list[str]) -> list[str]:
    """Stage names as status shows them: the QC gate's column ("qc") before the first stage it gates
    (when more than one stage is shown)."""
    if len(names) < 2 or QC_GATED_STAGES[0] not in names:
        return names
    at = names.index(QC_GATED_STAGES[0])
    return [*names[:at], "qc", *names[at:]]


def help_names(last: str = ", ") -> str:
    """The stages as help texts list them: ``bids_conversion (bids), qsiprep, qsirecon, qsiparc``."""
    shown = [f"{s.name} ({s.aliases[0]})" if s.aliases else s.name for s in _REGISTRY.values()]
    return ", ".join(shown[:-1]) + last + shown[-1] if len(shown) > 1 else "".join(shown)


# --------------------------------------------------------------------------- the pipeline

register(
    Stage(
        name="bids_conversion",
        asset="bids_session",
        level=SESSION,
        upstream=(SOURCE,),
        builder="neuroflow_dagster.defs.assets.bids:build_bids_asset",
        aliases=("bids", "conversion"),
    )
)
register(
    Stage(
        name="qsiprep",
        asset="qsiprep_subject",
        level=SUBJECT,
        upstream=("bids_conversion",),
        builder="neuroflow_dagster.defs.assets.qsiprep:build_qsiprep_asset",
    )
)
register(
    Stage(
        name="qsirecon",
        asset="qsirecon_session",
        level=SESSION,
        upstream=("qsiprep", "bids_conversion"),
        builder="neuroflow_dagster.defs.assets.qsirecon:build_qsirecon_asset",
    )
)
register(
    Stage(
        name="qsiparc",
        asset="qsiparc_session",
        level=SESSION,
        upstream=("qsirecon",),
        builder="neuroflow_dagster.defs.assets.qsiparc:build_qsiparc_asset",
    )
)
