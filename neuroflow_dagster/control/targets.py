"""What an operator typed, read as a subject, a session or a ScanID (`neuroflow logs`, `exclude`, ...)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from neuroflow_dagster.discovery.identity import Registry, RegistryEntry
from neuroflow_dagster.errors import UsageError
from neuroflow_dagster.naming.bids import LABEL, SESSION_PREFIX, SUBJECT_PREFIX, describe, is_label
from neuroflow_dagster.naming.partitions import is_session_key, session_key, split_session_key


@dataclass(frozen=True)
class PartitionRef:
    """What an operator typed, as a subject (session None) or a session."""

    participant: str
    session: str | None = None

    @property
    def key(self) -> str:
        return self.participant if self.session is None else session_key(self.participant, self.session)


_SUB_SES = re.compile(rf"^(?:{SUBJECT_PREFIX})?({LABEL.pattern})/(?:{SESSION_PREFIX})?({LABEL.pattern})$")
_SUB = re.compile(rf"^(?:{SUBJECT_PREFIX})?({LABEL.pattern})$")


def parse_partition(text: str) -> PartitionRef:
    """ "01|SUBJA", "sub-SUBJA/ses-01", "SUBJA/01" -> a session; "sub-SUBJA" or "SUBJA" -> a subject."""
    value = text.strip()
    if is_session_key(value):
        try:
            participant, session = split_session_key(value)
        except ValueError:
            participant = session = ""
        if is_label(participant) and is_label(session):
            return PartitionRef(participant, session)
    elif m := _SUB_SES.match(value):
        return PartitionRef(m.group(1), m.group(2))
    elif m := _SUB.match(value):
        return PartitionRef(m.group(1))
    raise UsageError(f"{text!r} is not a partition: use '01|SUBJA', 'sub-SUBJA/ses-01', 'SUBJA/01' or a subject label")


def resolve_session(registry: Registry, text: str) -> RegistryEntry:
    """A ScanID, or "sub-X/ses-Y" / "X/Y" / "Y|X", to its registry entry; errors name what was looked for."""
    entry = registry.lookup(text)
    if entry is not None:
        return entry
    try:
        ref = parse_partition(text)
    except UsageError:
        ref = None
    if ref is not None and ref.session is not None:
        entry = registry.get(ref.participant, ref.session)
        if entry is not None:
            return entry
        raise UsageError(
            f"{describe(ref.participant, ref.session)} is not in the ScanID registry {registry.path} "
            f"(and {text!r} is not a registered ScanID)"
        )
    raise UsageError(f"{text!r} is neither a registered ScanID nor 'sub-X/ses-Y' (registry {registry.path})")
