"""`neuroflow reprocess` / `retry`: a backfill launched exactly as the Dagster UI launches one.

The UI's "Materialize selected partitions" sends the GraphQL mutation
`launchPartitionBackfill` to the webserver; so does this. The backfill
daemon then submits one run per partition under the instance's pools and
run-queue limits, and the runs carry `neuroflow/stage` like automation runs.
"""

from __future__ import annotations

import getpass
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from neuroflow_dagster import stages
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.discovery.exclusions import load_exclusions
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.errors import UsageError
from neuroflow_dagster.naming.partitions import session_key
from neuroflow_dagster.naming.tags import STAGE_TAG

DEFAULT_URL = "http://127.0.0.1:3000/graphql"

LAUNCH_BACKFILL_MUTATION = """
mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess {
      backfillId
      launchedRunIds
    }
    ... on Error {
      message
    }
  }
}
""".strip()


class BackfillError(RuntimeError):
    """The webserver could not be reached or refused the backfill; the message says which and why."""


@dataclass
class Selection:
    """The partitions to (re)process for one stage, and the sessions left out with the reason."""

    stage: str
    asset: str
    partitions: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


def select_partitions(
    config: NeuroflowConfig,
    stage: str,
    *,
    subject: str | None = None,
    session: str | None = None,
    all_sessions: bool = False,
) -> Selection:
    """Registered, non-excluded sessions matching the filters; for QSIPrep their subjects.

    `session` is a session label ("01", "ses-01") or a ScanID. Nothing given and
    no `all_sessions`: refuse, so a typo never reprocesses the whole archive.
    """
    record = stages.stage(stage)
    if not (subject or session or all_sessions):
        raise UsageError("say which sessions: --subject, --session, or --all for every registered session")
    registry = Registry(config.paths.state)
    excluded = load_exclusions(config)
    wanted_subject = subject.removeprefix("sub-") if subject else None
    wanted_session = session.removeprefix("ses-") if session else None
    partitions: list[str] = []
    skipped: dict[str, str] = {}
    for entry in registry.all():
        if wanted_subject and entry.participant_id != wanted_subject:
            continue
        if session and not (entry.session_id == wanted_session or entry.scan_id == session):
            continue
        if entry.scan_id in excluded:
            skipped[entry.scan_id] = f"excluded: {excluded[entry.scan_id].get('reason')}"
            continue
        key = entry.participant_id if record.per_subject else session_key(entry.participant_id, entry.session_id)
        if key not in partitions:
            partitions.append(key)
    if not partitions:
        what = " ".join(x for x in (f"sub-{wanted_subject}" if wanted_subject else "", session or "") if x)
        raise UsageError(
            f"no registered, non-excluded session matches {what or 'the registry'} ({registry.path})"
            + (f"; left out: {skipped}" if skipped else "")
        )
    return Selection(record.name, record.asset, partitions, skipped)


def graphql_url(url: str | None) -> str:
    """`http://host:3000` or `.../graphql` -> the GraphQL endpoint."""
    base = (url or DEFAULT_URL).rstrip("/")
    return base if base.endswith("/graphql") else base + "/graphql"


def backfill_variables(asset: str | list[str], partitions: list[str], stage: str, title: str) -> dict[str, Any]:
    """One asset, or several run together per partition (the QC gate + recon + parcellation)."""
    assets = [asset] if isinstance(asset, str) else list(asset)
    return {
        "backfillParams": {
            "assetSelection": [{"path": [name]} for name in assets],
            "partitionNames": list(partitions),
            "tags": [{"key": STAGE_TAG, "value": stages.stage(stage).tag}],
            "title": title,
        }
    }


def default_title(command: str, stage: str, partitions: list[str]) -> str:
    return f"neuroflow {command} {stage}: {len(partitions)} partition(s) by {getpass.getuser()}"


def launch_backfill(
    url: str | None, asset: str | list[str], partitions: list[str], stage: str, title: str, timeout_s: float = 60.0
) -> dict[str, Any]:
    """POST the mutation; returns {"backfill_id", "launched_run_ids"} or raises BackfillError."""
    endpoint = graphql_url(url)
    body = json.dumps(
        {
            "query": LAUNCH_BACKFILL_MUTATION,
            "variables": backfill_variables(asset, partitions, stage, title),
            "operationName": "LaunchPartitionBackfill",
        }
    ).encode()
    request = urllib.request.Request(
        endpoint, data=body, headers={"Content-Type": "application/json", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = json.loads(response.read().decode() or "{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise BackfillError(f"{endpoint} answered HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BackfillError(
            f"cannot reach the Dagster webserver at {endpoint} ({reason}); start it (dagster dev / the "
            "webserver service) or pass --url"
        ) from exc
    except ValueError as exc:
        raise BackfillError(f"{endpoint} did not answer JSON: {exc}") from exc
    return parse_launch_response(payload, endpoint)


def parse_launch_response(payload: dict[str, Any], endpoint: str = "the webserver") -> dict[str, Any]:
    if payload.get("errors"):
        messages = "; ".join(str(e.get("message", e)) for e in payload["errors"])
        raise BackfillError(f"{endpoint} rejected the backfill request: {messages}")
    result = (payload.get("data") or {}).get("launchPartitionBackfill") or {}
    if result.get("__typename") != "LaunchBackfillSuccess":
        raise BackfillError(
            f"{endpoint} did not launch the backfill: {result.get('__typename', 'no result')}: "
            f"{result.get('message', json.dumps(result)[:500])}"
        )
    return {"backfill_id": result["backfillId"], "launched_run_ids": result.get("launchedRunIds") or []}
