"""The partition space's names and the spelling of a subject x session partition key.

Session-level assets are partitioned by two dynamic sets, ``subjects`` and
``session_labels``, on the dimensions ``subject`` and ``session``; subject-level
assets by ``subjects`` alone, so a subject's key is its participant label.
Dagster spells a multi-dimensional key as the dimension values joined by ``|``
in the order of the dimension NAMES, sorted ("session" < "subject"): sub-0075
ses-01 is ``01|0075``. Building and splitting that string here, without
dagster, lets the operator commands read keys exactly as Dagster writes them.
Labels are letters and digits only (naming.bids), so ``|`` and ``,`` (reserved
by Dagster) never occur inside a value.
"""

from __future__ import annotations

SUBJECT_DIM = "subject"
SESSION_DIM = "session"
# The dynamic partition sets (names stored in the instance: never rename them).
SUBJECTS = "subjects"
SESSION_LABELS = "session_labels"
SEPARATOR = "|"
_DIMENSION_ORDER = tuple(sorted((SUBJECT_DIM, SESSION_DIM)))


def session_key(participant: str, session: str) -> str:
    """The key string of a session, as Dagster writes it (``01|0075``)."""
    values = {SUBJECT_DIM: participant, SESSION_DIM: session}
    return SEPARATOR.join(values[dim] for dim in _DIMENSION_ORDER)


def split_session_key(key: str) -> tuple[str, str]:
    """(participant, session) of a session key string; a key of another shape raises ValueError."""
    parts = str(key).split(SEPARATOR)
    if len(parts) != len(_DIMENSION_ORDER):
        raise ValueError(f"{key!r} is not a subject x session partition key (expected 'SESSION{SEPARATOR}SUBJECT')")
    values = dict(zip(_DIMENSION_ORDER, parts, strict=True))
    return values[SUBJECT_DIM], values[SESSION_DIM]


def is_session_key(key: str) -> bool:
    """True for a subject x session key, False for a subject key."""
    return SEPARATOR in str(key)
