"""The partition space: dynamic `subjects` x per-subject ordinal `session_labels`.

Dagster has no supported custom PartitionMapping (a subclass is silently
replaced by identity in the serialized graph the daemon uses), so session
assets live on subject x session and subject assets on `subjects`, joined by
the built-in MultiToSingleDimensionPartitionMapping. Session labels are
per-subject ordinals (01, 02, ...) so the cross-product stays small; pairs
that do not exist ("phantoms") are never materialized and are filtered out
by the automation conditions (their dicom_session is missing).
"""

from __future__ import annotations

import dagster as dg

SUBJECT_DIM = "subject"
SESSION_DIM = "session"

subjects_partitions = dg.DynamicPartitionsDefinition(name="subjects")
session_labels_partitions = dg.DynamicPartitionsDefinition(name="session_labels")
session_partitions = dg.MultiPartitionsDefinition(
    {SUBJECT_DIM: subjects_partitions, SESSION_DIM: session_labels_partitions}
)
subject_of_session = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=SUBJECT_DIM)


def session_key(participant: str, session: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({SUBJECT_DIM: participant, SESSION_DIM: session})


def split_session_key(key: str | dg.MultiPartitionKey) -> tuple[str, str]:
    """(participant, session) from a multi-partition key (string keys are ordered by dimension name)."""
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
    else:
        dims = session_partitions.get_partition_key_from_str(key).keys_by_dimension
    return dims[SUBJECT_DIM], dims[SESSION_DIM]
