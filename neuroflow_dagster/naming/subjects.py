"""When two SubjectCodes or two participant labels are the same (docs/domain-rules.md#identity).

Shared by the registry (discovery/identity.py) and the check of ``mapping.label_overrides`` in
config.py, which must agree on it.
"""

from __future__ import annotations


def code_key(subject_code: str) -> str:
    """What makes two SubjectCodes the same person: equal keys.

    Surrounding whitespace is ignored and a purely numeric code is compared as a number (``75``,
    ``075`` and ``0075`` are one person). Anything else must match exactly, case included: ``ab1`` and
    ``AB1``, ``CLM_L_01`` and ``CLML01`` may be two people, so they are never merged silently.
    """
    text = (subject_code or "").strip()
    if text.isascii() and text.isdigit():
        return str(int(text))
    return text


def label_fold(label: str) -> str:
    """Labels that differ only in case are one folder on a case-insensitive file system."""
    return label.lower()
