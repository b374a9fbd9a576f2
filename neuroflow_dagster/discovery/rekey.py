"""`neuroflow rekey`: make the registry agree with the mapping for ScanIDs held as ``remapped``.

A registered ScanID is never moved silently (its labels name BIDS folders, derivatives and partitions).
When the mapping now names another SubjectCode for it, or ``mapping.label_overrides`` gives its code
another label, discovery holds it as ``remapped`` and every stage refuses it. The operator then either
fixes the mapping back (nothing else to do), or re-keys it here:

- same participant label (the code was spelled differently, ``CLM_L_01`` -> ``CLML01`` of the same
  person): the row's SubjectCode is corrected in place; labels, outputs and partitions stay; nothing
  re-runs. Every ScanID of that label must end with one code, so re-key them together.
- another label: the binding is *retired* (kept in the registry with the reason: its labels are never
  given again, its outputs stay on disk, every stage refuses it, QSIPrep leaves it out) and the ScanID
  is free: the next discovery tick registers it under the label the mapping gives now, as that
  subject's next session.

The whole plan is checked against the one-person-one-label rule before anything is written, and is
written in one atomic registry update; every step is appended to ``registry_audit.jsonl``.
"""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.discovery.identity import (
    IdentityError,
    Registry,
    RegistryEntry,
    code_key,
    normalize_overrides,
    participant_label,
    retire,
)
from neuroflow_dagster.discovery.mapping import MappingResult


class RekeyError(Exception):
    """The re-key cannot be done as asked; the message says which ScanID and why."""


@dataclass(frozen=True)
class RekeyStep:
    scan_id: str
    before: RegistryEntry
    action: Literal["recode", "retire"]
    new_code: str
    # The label it keeps (recode) or will be registered under by the next discovery tick (retire).
    new_label: str
    after: RegistryEntry

    def describe(self) -> str:
        b = self.before
        if self.action == "recode":
            return (
                f"{self.scan_id!r}: {b.labels} stays; its SubjectCode {b.recruitment_id!r} is corrected to "
                f"{self.new_code!r} (same participant, nothing re-runs)"
            )
        return (
            f"{self.scan_id!r}: {b.labels} (SubjectCode {b.recruitment_id!r}) is retired (its outputs are kept and "
            f"no longer processed); the next discovery tick registers it as sub-{self.new_label} "
            f"(SubjectCode {self.new_code!r}). Rebuild sub-{b.participant_id}'s template without it: "
            f"neuroflow reprocess --stage qsiprep --subject {b.participant_id}"
        )


def _subject_folder(config: NeuroflowConfig, scan_id: str) -> str:
    outer, _, inner = scan_id.partition("/")
    return outer if config.discovery.participant_first else inner


def plan_rekey(
    config: NeuroflowConfig,
    registry: Registry,
    scan_ids: Sequence[str],
    mapping: MappingResult,
    reason: str,
    by: str | None = None,
) -> list[RekeyStep]:
    """What re-keying ``scan_ids`` would do under the current mapping; RekeyError if it cannot be done."""
    if not reason.strip():
        raise RekeyError("--reason must say why the session is re-keyed (it goes into the registry and the audit)")
    by = by or getpass.getuser()
    at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    overrides = normalize_overrides(config.mapping.label_overrides)
    flat = config.discovery.layout == "flat"
    errors: list[str] = []
    planned: list[tuple[RegistryEntry, str]] = []
    for sid in dict.fromkeys(scan_ids):
        entry = registry.lookup(sid)
        if entry is None:
            retired = [e for e in registry.retired() if e.scan_id == sid]
            errors.append(
                f"{sid!r}: not a registered ScanID"
                + (" (already re-keyed: discovery registers it again on its next tick)" if retired else "")
            )
            continue
        if flat:
            if not mapping.usable:
                errors.append(f"{sid!r}: no mapping to re-key against: {mapping.error}")
                continue
            if sid in mapping.problems:
                errors.append(f"{sid!r}: fix the mapping first: {mapping.problems[sid]}")
                continue
            code = mapping.mapping.get(sid)
            if code is None:
                errors.append(f"{sid!r}: not in the mapping ({mapping.source}); add the row it should have first")
                continue
        else:
            code = _subject_folder(config, sid)
        planned.append((entry, code))
    if errors:
        raise RekeyError("\n".join(errors))

    # Labels as they will be once every listed ScanID is re-coded or retired.
    moving = [e.scan_id for e, _ in planned]
    without = registry.with_changes([(e, retire(e, "")) for e, _ in planned])
    steps: list[RekeyStep] = []
    for entry, code in planned:
        key = code_key(code)
        try:
            label = _label_for(without, code, overrides)
        except (IdentityError, RekeyError) as exc:
            errors.append(f"{entry.scan_id!r}: {exc}")
            continue
        if key == code_key(entry.recruitment_id) and label == entry.participant_id:
            errors.append(
                f"{entry.scan_id!r}: nothing to re-key: the mapping agrees with the registry ({entry.labels}, "
                f"SubjectCode {entry.recruitment_id!r})"
            )
        elif label == entry.participant_id:
            note = f"{at} {by}: SubjectCode {entry.recruitment_id!r} -> {code!r}: {reason.strip()}"
            after = replace(entry, recruitment_id=code, note=note)
            steps.append(RekeyStep(entry.scan_id, entry, "recode", code, label, after))
        else:
            note = f"{at} {by}: re-keyed to SubjectCode {code!r}: {reason.strip()}"
            steps.append(RekeyStep(entry.scan_id, entry, "retire", code, label, retire(entry, note)))
    if errors:
        raise RekeyError("\n".join(errors))

    # The registry after the plan must keep the rule: one code per label, one label per code.
    after = registry.with_changes([(s.before, s.after) for s in steps])
    touched = {s.before.participant_id for s in steps}
    for problem in after.problems():
        if problem.kind == "merged" and touched & set(problem.blocks):
            label = problem.blocks[0]
            targets = {code_key(s.new_code) for s in steps if s.action == "recode" and s.new_label == label}
            others = sorted(
                e.scan_id
                for e in after.sessions_of(label)
                if e.scan_id not in moving and code_key(e.recruitment_id) not in targets
            )
            codes = sorted({e.recruitment_id for e in after.sessions_of(label)})
            errors.append(
                f"after this re-key sub-{label} would hold SubjectCodes {', '.join(map(repr, codes))}: one person "
                f"has one code. Give all its ScanIDs one SubjectCode in the mapping and re-key them together: "
                f"neuroflow rekey {' '.join([*moving, *others])} --reason ..."
            )
    for step in steps:
        if step.action == "retire":
            decision = after.decide_label(step.new_code, overrides)
            if decision.problem:
                errors.append(f"{step.scan_id!r} could not be registered again: {decision.problem}")
    if errors:
        raise RekeyError("\n".join(dict.fromkeys(errors)))
    return steps


def _label_for(registry: Registry, code: str, overrides: dict[str, str]) -> str:
    """The label ``code`` gets, ignoring who owns it: override, else its registered label, else cleaned."""
    key = code_key(code)
    if key in overrides:
        return overrides[key]
    labels = registry.labels_of(code)
    if len(labels) > 1:
        raise RekeyError(
            f"SubjectCode {code!r} is registered under {len(labels)} labels ({', '.join(sorted(labels))}); "
            "choose one with mapping.label_overrides"
        )
    return next(iter(labels)) if labels else participant_label(code)


def apply_rekey(config: NeuroflowConfig, registry: Registry, steps: Sequence[RekeyStep], reason: str) -> None:
    """Write the plan in one atomic registry update and append it to the audit trail."""
    registry.replace_entries([(s.before, s.after) for s in steps])
    by = getpass.getuser()
    with registry.audit_path.open("a", encoding="utf-8") as fh:
        for s in steps:
            fh.write(
                json.dumps(
                    {
                        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "by": by,
                        "action": s.action,
                        "scan_id": s.scan_id,
                        "before": {"labels": s.before.labels, "subject_code": s.before.recruitment_id},
                        "after": {"label": s.new_label, "subject_code": s.new_code},
                        "reason": reason.strip(),
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
