"""ScanID -> SubjectCode (docs/domain-rules.md#mapping): local CSV first, else a Google Sheet, else the last good copy.

The mapping is fetched once per discovery tick. Every successful read is cached on disk (atomically) in
``paths.state``; when the source cannot be read, the cache is used and the result carries a warning that
says so and why, because an outage must neither stop discovery nor go unnoticed. With no cache either,
the mapping is empty and ``error`` says why, so every folder is held as unmapped with that reason.

A malformed row is named, never guessed at. Row numbers are the ones the operator sees in the sheet or
a spreadsheet program (header = row 1, blank rows counted). A ScanID listed twice with different
SubjectCodes (or once with an empty SubjectCode) is left out of the mapping and its folder is held
with the rows named, until the sheet is fixed; the same ScanID twice with the same SubjectCode is
harmless and only noted.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroflow_dagster.config import GoogleSheetConfig, NeuroflowConfig
from neuroflow_dagster.discovery.identity import code_key
from neuroflow_dagster.fsutil import atomic_write_text

if TYPE_CHECKING:
    from gspread.http_client import HTTPClient

READONLY_SCOPE = "https://www.googleapis.com/auth/spreadsheets.readonly"
CACHE_FILENAME = "mapping_cache.json"
SHEET_TIMEOUT_SECONDS = 30.0


class MappingSourceError(Exception):
    """The configured mapping source could not be read; the message names the source and the reason."""


@dataclass(frozen=True)
class ParsedMapping:
    """A mapping sheet read row by row: the usable pairs, and what is wrong with the rest."""

    # ScanID -> SubjectCode, only ScanIDs whose rows agree.
    mapping: dict[str, str] = field(default_factory=dict)
    # ScanID -> the sheet row it was read from (its first row when listed more than once).
    rows: dict[str, int] = field(default_factory=dict)
    # ScanID -> why it is not in ``mapping`` (its folder is held as ``mapping_error`` with this text).
    problems: dict[str, str] = field(default_factory=dict)
    # Rows that no folder can be held for (a SubjectCode without a ScanID).
    row_problems: list[str] = field(default_factory=list)
    # Harmless oddities worth a look (the same ScanID twice with the same SubjectCode).
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MappingResult:
    """What the tick maps with. ``error`` is set when there is no usable mapping at all."""

    mapping: dict[str, str] = field(default_factory=dict)
    source: str = ""
    warning: str | None = None
    error: str | None = None
    # True when ``mapping`` came from the on-disk cache rather than a fresh read.
    from_cache: bool = False
    rows: dict[str, int] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    row_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.error is None

    def where(self, scan_id: str) -> str:
        """'row N of <source>' for messages, or the source alone when the row is unknown."""
        row = self.rows.get(scan_id)
        return f"row {row} of {self.source}" if row else self.source


def _header(rows: list[list[str]], scan_col: str, subject_col: str, where: str) -> tuple[int, int]:
    if not rows:
        raise MappingSourceError(f"{where}: empty (no header row)")
    # A BOM survives in a Google Sheet cell pasted from a UTF-8 file; the CSV reader drops its own.
    header = [str(c).replace("\ufeff", "").strip() for c in rows[0]]
    indices: dict[str, int] = {}
    for col in (scan_col, subject_col):
        found = [i for i, name in enumerate(header) if name == col]
        if not found:
            near = [name for name in header if name.lower() == col.lower()]
            hint = f" (found {near[0]!r}: column names are case-sensitive)" if near else ""
            raise MappingSourceError(f"{where}: column {col!r} not in header {header}{hint}")
        if len(found) > 1:
            cols = " and ".join(str(i + 1) for i in found)
            raise MappingSourceError(
                f"{where}: column {col!r} appears {len(found)} times in the header (columns {cols})"
            )
        indices[col] = found[0]
    return indices[scan_col], indices[subject_col]


def parse_rows(rows: list[list[str]], scan_col: str, subject_col: str, where: str) -> ParsedMapping:
    """Header row + data rows -> :class:`ParsedMapping`. Cells are stripped; blank rows are skipped."""
    i_scan, i_subj = _header(rows, scan_col, subject_col, where)
    seen: dict[str, list[tuple[int, str]]] = {}
    row_problems: list[str] = []
    for number, row in enumerate(rows[1:], start=2):
        cells = [str(c).strip() for c in row]
        if not any(cells):
            continue
        scan = cells[i_scan] if i_scan < len(cells) else ""
        subject = cells[i_subj] if i_subj < len(cells) else ""
        if not scan:
            if subject:
                row_problems.append(f"row {number} of {where}: SubjectCode {subject!r} but an empty ScanID")
            continue
        seen.setdefault(scan, []).append((number, subject))
    parsed = ParsedMapping(row_problems=row_problems)
    for scan, found in seen.items():
        parsed.rows[scan] = found[0][0]
        listed = " and ".join(
            f"row {n} ({'SubjectCode ' + repr(code) if code else 'empty SubjectCode'})" for n, code in found
        )
        if any(not code for _, code in found):
            if len(found) == 1:
                parsed.problems[scan] = f"row {found[0][0]} of {where} has ScanID {scan!r} but an empty SubjectCode"
            else:
                parsed.problems[scan] = f"ScanID {scan!r} is listed in {listed} of {where}; fill in or delete the rows"
            continue
        if len({code_key(code) for _, code in found}) > 1:
            parsed.problems[scan] = (
                f"ScanID {scan!r} is listed in {listed} of {where}: which subject is it? Fix the mapping so that "
                "it names one SubjectCode"
            )
            continue
        if len(found) > 1:
            rows_text = ", ".join(str(n) for n, _ in found)
            parsed.notes.append(
                f"ScanID {scan!r} is listed in rows {rows_text} of {where} with the same SubjectCode "
                f"{found[0][1]!r} (harmless; the duplicate rows can be deleted)"
            )
        parsed.mapping[scan] = found[0][1]
    return parsed


def rows_to_mapping(rows: list[list[str]], scan_col: str, subject_col: str, where: str) -> dict[str, str]:
    """Header row + data rows -> the usable pairs (see :func:`parse_rows` for the rest)."""
    return parse_rows(rows, scan_col, subject_col, where).mapping


def read_csv_rows(path: Path, scan_col: str = "ScanID", subject_col: str = "SubjectCode") -> ParsedMapping:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise MappingSourceError(f"mapping CSV {path}: cannot read: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MappingSourceError(f"mapping CSV {path}: not a UTF-8 CSV file: {exc}") from exc
    return parse_rows(rows, scan_col, subject_col, f"mapping CSV {path}")


def read_csv_mapping(path: Path, scan_col: str = "ScanID", subject_col: str = "SubjectCode") -> dict[str, str]:
    return read_csv_rows(path, scan_col, subject_col).mapping


def read_sheet_mapping(
    sheet: GoogleSheetConfig,
    http_client: type[HTTPClient] | None = None,
    timeout: float = SHEET_TIMEOUT_SECONDS,
) -> ParsedMapping:
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
    return parse_rows(rows, sheet.scan_id_column, sheet.subject_code_column, where)


def cache_path(config: NeuroflowConfig) -> Path:
    return config.paths.state / CACHE_FILENAME


def write_cache(path: Path, parsed: ParsedMapping, source: str) -> None:
    payload = {
        "source": source,
        "fetched_at": datetime.now(timezone.utc).isoformat(),
        "mapping": parsed.mapping,
        "rows": parsed.rows,
        "problems": parsed.problems,
        "row_problems": parsed.row_problems,
        "notes": parsed.notes,
    }
    atomic_write_text(path, json.dumps(payload, ensure_ascii=False, sort_keys=True, indent=0))


def read_cache(path: Path) -> tuple[ParsedMapping, str, str] | None:
    """Return (parsed mapping, source, fetched_at) or None if there is no readable cache.

    Caches written before row problems were kept have only ``mapping``; they still load.
    """
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        parsed = ParsedMapping(
            mapping={str(k): str(v) for k, v in payload["mapping"].items()},
            rows={str(k): int(v) for k, v in payload.get("rows", {}).items()},
            problems={str(k): str(v) for k, v in payload.get("problems", {}).items()},
            row_problems=[str(x) for x in payload.get("row_problems", [])],
            notes=[str(x) for x in payload.get("notes", [])],
        )
        return parsed, str(payload.get("source", "?")), str(payload.get("fetched_at", "?"))
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None


def _result(parsed: ParsedMapping, source: str, **kwargs: Any) -> MappingResult:
    return MappingResult(
        mapping=parsed.mapping,
        source=source,
        rows=parsed.rows,
        problems=parsed.problems,
        row_problems=parsed.row_problems,
        notes=parsed.notes,
        **kwargs,
    )


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
            parsed = read_csv_rows(cfg.csv_file, cfg.scan_id_column, cfg.subject_code_column)
        else:
            assert cfg.google_sheet is not None
            parsed = read_sheet_mapping(cfg.google_sheet, http_client=http_client)
    except MappingSourceError as exc:
        reason = str(exc)
        cached = read_cache(cache_path(config))
        if cached is None:
            return MappingResult(
                source=source,
                error=f"mapping unavailable and no cached copy in {cache_path(config)}: {reason}",
            )
        parsed, cached_source, fetched_at = cached
        return _result(
            parsed,
            f"cache:{cached_source}@{fetched_at}",
            warning=f"using the cached mapping from {fetched_at} ({len(parsed.mapping)} rows) because {reason}",
            from_cache=True,
        )
    if write:
        try:
            write_cache(cache_path(config), parsed, source)
        except OSError as exc:
            return _result(
                parsed,
                source,
                warning=f"mapping read, but the cache {cache_path(config)} cannot be written: {exc.strerror}",
            )
    return _result(parsed, source)
