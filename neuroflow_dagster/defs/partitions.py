"""The partition space: dynamic `subjects` x per-subject ordinal `session_labels`.

Dagster has no supported custom PartitionMapping (a subclass is silently
replaced by identity in the serialized graph the daemon uses), so session
assets live on subject x session and subject assets on `subjects`, joined by
the built-in MultiToSingleDimensionPartitionMapping. Session labels are
per-subject ordinals (01, 02, ...) so the cross-product stays small; pairs
that do not exist ("phantoms") are never materialized and are filtered out
by the automation conditions (their dicom_session is missing). The names and
the key spelling are in naming/partitions.py; these are their Dagster objects.
"""

from __future__ import annotations

import dagster as dg

from neuroflow_dagster.naming import partitions as keys

subjects_partitions = dg.DynamicPartitionsDefinition(name=keys.SUBJECTS)
session_labels_partitions = dg.DynamicPartitionsDefinition(name=keys.SESSION_LABELS)
session_partitions = dg.MultiPartitionsDefinition(
    {keys.SUBJECT_DIM: subjects_partitions, keys.SESSION_DIM: session_labels_partitions}
)
subject_of_session = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=keys.SUBJECT_DIM)
