"""ScanID -> SubjectCode (docs/domain-rules.md#mapping): local CSV first, else a Google Sheet, else the last good copy.

The mapping is fetched once per discovery tick. Every successful read is cached on disk (atomically) in
``paths.state``; when the source cannot be read, the cache is used and the result carries a warning that
says so and why, because an outage must neither stop discovery nor go unnoticed. With no cache either,
the mapping is empty and ``error`` says why, so every folder is held as unmapped with that reason.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroflow_dagster.config import GoogleSheetConfig, NeuroflowConfig
from neuroflow_dagster.discovery.identity import atomic_write_text

if TYPE_CHECKING:
    from gspread.http_client import HTTPClient

READONLY_SCOPE = "https://www.googleapis.com/auth/spreadsheets.readonly"
CACHE_FILENAME = "mapping_cache.json"
SHEET_TIMEOUT_SECONDS = 30.0


class MappingSourceError(Exception):
    """The configured mapping source could not be read; the message names the source and the reason."""


@dataclass(frozen=True)
class MappingResult:
    """What the tick maps with. ``error`` is set when there is no usable mapping at all."""

    mapping: dict[str, str] = field(default_factory=dict)
    source: str = ""
    warning: str | None = None
    error: str | None = None
    # True when ``mapping`` came from the on-disk cache rather than a fresh read.
    from_cache: bool = False

    @property
    def usable(self) -> bool:
        return self.error is None


def rows_to_mapping(rows: list[list[str]], scan_col: str, subject_col: str, where: str) -> dict[str, str]:
    """Header row + data rows -> mapping. Cells are stripped; rows with a blank cell are skipped."""
    if not rows:
        raise MappingSourceError(f"{where}: empty (no header row)")
    header = [str(c).strip() for c in rows[0]]
    missing = [c for c in (scan_col, subject_col) if c not in header]
    if missing:
        raise MappingSourceError(f"{where}: column(s) {', '.join(map(repr, missing))} not in header {header}")
    i_scan, i_subj = header.index(scan_col), header.index(subject_col)
    mapping: dict[str, str] = {}
    for row in rows[1:]:
        scan = str(row[i_scan]).strip() if i_scan < len(row) else ""
        subject = str(row[i_subj]).strip() if i_subj < len(row) else ""
        if scan and subject:
            mapping[scan] = subject
    return mapping


def read_csv_mapping(path: Path, scan_col: str = "ScanID", subject_col: str = "SubjectCode") -> dict[str, str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise MappingSourceError(f"mapping CSV {path}: cannot read: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MappingSourceError(f"mapping CSV {path}: not a UTF-8 CSV file: {exc}") from exc
    return rows_to_mapping(rows, scan_col, subject_col, f"mapping CSV {path}")


def read_sheet_mapping(
    sheet: GoogleSheetConfig,
    http_client: type[HTTPClient] | None = None,
    timeout: float = SHEET_TIMEOUT_SECONDS,
) -> dict[str, str]:
    """Read the worksheet with a service account, read-only scope.

    ``http_client`` is gspread's transport class (default ``gspread.HTTPClient``); tests pass a subclass
    that sends the Sheets API requests to a local server instead of sheets.googleapis.com.
    """
    import gspread
    from google.auth.exceptions import GoogleAuthError, TransportError
    from requests import RequestException

    where = f"Google Sheet {sheet.spreadsheet_key} worksheet {sheet.worksheet_name!r}"
    kwargs: dict[str, Any] = {"filename": str(sheet.service_account_file), "scopes": [READONLY_SCOPE]}
    if http_client is not None:
        kwargs["http_client"] = http_client
    try:
        client = gspread.service_account(**kwargs)
        client.set_timeout(timeout)
        worksheet = client.open_by_key(sheet.spreadsheet_key).worksheet(sheet.worksheet_name)
        rows = worksheet.get_all_values()
    except FileNotFoundError as exc:
        raise MappingSourceError(f"{where}: service account file {sheet.service_account_file} not found") from exc
    except (ValueError, KeyError) as exc:  # malformed service-account JSON
        raise MappingSourceError(
            f"{where}: service account file {sheet.service_account_file} is not valid: {exc}"
        ) from exc
    except gspread.exceptions.WorksheetNotFound as exc:
        raise MappingSourceError(f"{where}: no such worksheet") from exc
    except gspread.exceptions.SpreadsheetNotFound as exc:
        raise MappingSourceError(f"{where}: spreadsheet not found or not shared with the account") from exc
    except gspread.exceptions.APIError as exc:
        raise MappingSourceError(f"{where}: Sheets API error {exc.code}: {exc.error.get('message', exc)}") from exc
    except TransportError as exc:
        raise MappingSourceError(f"{where}: cannot reach the token endpoint: {exc}") from exc
    except GoogleAuthError as exc:
        raise MappingSourceError(f"{where}: authentication failed: {exc}") from exc
    except RequestException as exc:
        raise MappingSourceError(f"{where}: cannot reach the Sheets API: {type(exc).__name__}: {exc}") from exc
    return rows_to_mapping(rows, sheet.scan_id_column, sheet.subject_code_column, where)


def cache_path(config: NeuroflowConfig) -> Path:
    return config.paths.state / CACHE_FILENAME


def write_cache(path: Path, mapping: dict[str, str], source: str) -> None:
    payload = {"source": source, "fetched_at": datetime.now(timezone.utc).isoformat(), "mapping": mapping}
    atomic_write_text(path, json.dumps(payload, ensure_ascii=False, sort_keys=True, indent=0))


def read_cache(path: Path) -> tuple[dict[str, str], str, str] | None:
    """Return (mapping, source, fetched_at) or None if there is no readable cache."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        mapping = {str(k): str(v) for k, v in payload["mapping"].items()}
        return mapping, str(payload.get("source", "?")), str(payload.get("fetched_at", "?"))
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None


def load_mapping(
    config: NeuroflowConfig,
    *,
    http_client: type[HTTPClient] | None = None,
    write: bool = True,
) -> MappingResult:
    """Fetch the mapping for one tick. Never raises for source problems: they become warning/error.

    ``write=False`` (dry runs) does not refresh the on-disk cache.
    """
    cfg = config.mapping
    if cfg.csv_file is not None:
        source = f"csv:{cfg.csv_file}"
    elif cfg.google_sheet is not None:
        source = f"google_sheet:{cfg.google_sheet.spreadsheet_key}/{cfg.google_sheet.worksheet_name}"
    else:
        return MappingResult(
            source="none",
            error="no mapping configured (set mapping.csv_file or mapping.google_sheet)",
        )
    try:
        if cfg.csv_file is not None:
            mapping = read_csv_mapping(cfg.csv_file, cfg.scan_id_column, cfg.subject_code_column)
        else:
            assert cfg.google_sheet is not None
            mapping = read_sheet_mapping(cfg.google_sheet, http_client=http_client)
    except MappingSourceError as exc:
        reason = str(exc)
        cached = read_cache(cache_path(config))
        if cached is None:
            return MappingResult(
                source=source,
                error=f"mapping unavailable and no cached copy in {cache_path(config)}: {reason}",
            )
        mapping, cached_source, fetched_at = cached
        return MappingResult(
            mapping=mapping,
            source=f"cache:{cached_source}@{fetched_at}",
            warning=f"using the cached mapping from {fetched_at} ({len(mapping)} rows) because {reason}",
            from_cache=True,
        )
    if write:
        try:
            write_cache(cache_path(config), mapping, source)
        except OSError as exc:
            return MappingResult(
                mapping=mapping,
                source=source,
                warning=f"mapping read, but the cache {cache_path(config)} cannot be written: {exc.strerror}",
            )
    return MappingResult(mapping=mapping, source=source)
