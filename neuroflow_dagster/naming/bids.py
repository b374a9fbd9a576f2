"""BIDS entities and session folders: ``sub-<label>``, ``ses-<label>``, ``root/sub-X/ses-Y``.

The same shape names the BIDS dataset, the staging folders, every derivative
tree (QSIPrep, QSIRecon, QSIParc) and the work folders. A label is ASCII
letters and digits only (BIDS labels, and safe as a Dagster partition key and
as a path component): a folder name or subject code must never escape its
directory or split an argument. These functions spell; checking a label that
comes from outside is the caller's (``is_label``; tools/layout.py raises).
"""

from __future__ import annotations

import re
from pathlib import Path

# The BIDS specification version the datasets written here declare.
BIDS_VERSION = "1.10.0"
SUBJECT_PREFIX = "sub-"
SESSION_PREFIX = "ses-"
LABEL = re.compile(r"[A-Za-z0-9]+")


def is_label(text: object) -> bool:
    """Letters and digits (ASCII) only - nothing a path, a shell or Dagster could read as structure."""
    return isinstance(text, str) and LABEL.fullmatch(text) is not None


def sub(participant: str) -> str:
    return f"{SUBJECT_PREFIX}{participant}"


def ses(session: str) -> str:
    return f"{SESSION_PREFIX}{session}"


def entities(participant: str, session: str | None = None) -> str:
    """The file-name prefix ``sub-X_ses-Y`` (or ``sub-X``)."""
    return sub(participant) if session is None else f"{sub(participant)}_{ses(session)}"


def session_path(participant: str, session: str) -> str:
    """``sub-X/ses-Y``, relative (for glob patterns and dataset-relative paths)."""
    return f"{sub(participant)}/{ses(session)}"


def subject_dir(root: Path, participant: str) -> Path:
    return Path(root) / sub(participant)


def session_dir(root: Path, participant: str, session: str) -> Path:
    """``root/sub-X/ses-Y`` (root: bids_root, a staging dir or a derivatives tree)."""
    return subject_dir(root, participant) / ses(session)


def describe(participant: str, session: str | None = None) -> str:
    """How messages name a session (``sub-X ses-Y``) or a subject (``sub-X``)."""
    return sub(participant) if session is None else f"{sub(participant)} {ses(session)}"


# Provenance beside the data (docs/provenance.md): one JSON file per published unit, named like a BIDS
# file so that it sorts with the files it describes. In the raw dataset it has no desc entity; in the
# derivatives it carries desc-neuroflow (BIDS-Derivatives style: who wrote it).
PROVENANCE_SUFFIX = "provenance"
PROVENANCE_DESC = "neuroflow"


def provenance_name(participant: str, session: str | None = None, *, derivative: bool = True) -> str:
    """``sub-X_ses-Y_desc-neuroflow_provenance.json`` (derivatives) or ``sub-X_ses-Y_provenance.json`` (raw)."""
    desc = f"_desc-{PROVENANCE_DESC}" if derivative else ""
    return f"{entities(participant, session)}{desc}_{PROVENANCE_SUFFIX}.json"


def provenance_path(participant: str, session: str | None = None, *, derivative: bool = True) -> str:
    """Where a unit's provenance lives, relative to its tree: ``sub-X/ses-Y/<name>`` or ``sub-X/<name>``."""
    folder = sub(participant) if session is None else session_path(participant, session)
    return f"{folder}/{provenance_name(participant, session, derivative=derivative)}"
