"""ScanID -> SubjectCode mapping: CSV, Google Sheet through real gspread + google-auth, on-disk cache.

Google's API cannot be reached from here, so the sheet tests run the real client stack (gspread,
google-auth service-account JWT signing with a freshly generated RSA key, requests) against a local
HTTP server on 127.0.0.1 that plays both the OAuth token endpoint (``token_uri`` in the generated
service-account file) and the Sheets API v4 endpoints gspread calls (spreadsheet metadata, then
``values/'<worksheet>'``). That is the nearest real boundary: only the host name differs.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import gspread
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from neuroflow_dagster.discovery.mapping import (
    READONLY_SCOPE,
    MappingSourceError,
    cache_path,
    load_mapping,
    parse_rows,
    read_csv_mapping,
    rows_to_mapping,
)
from neuroflow_dagster_tests.discovery_fixtures import config_for, write_mapping_csv

SHEET_KEY = "1AbCdEfGhIjKlMnOp"
TOKEN = "ya29.local-test-token"


# --------------------------------------------------------------------------- CSV


def test_csv_strips_cells_and_skips_blank_rows(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(
        "ScanID,SubjectCode,Note\n 20240115_1430 , 75 ,x\n20240116_0900,,blank code\n,99,blank id\n"
        "20240117_1000,CLM_L_01,\n",
        encoding="utf-8",
    )
    assert read_csv_mapping(path) == {"20240115_1430": "75", "20240117_1000": "CLM_L_01"}


def test_csv_custom_columns_and_missing_column_is_named(tmp_path: Path) -> None:
    path = write_mapping_csv(tmp_path / "m.csv", {"A": "1"}, scan_col="Scan", subj_col="Subject")
    assert read_csv_mapping(path, "Scan", "Subject") == {"A": "1"}
    with pytest.raises(MappingSourceError, match=r"'ScanID'.*not in header"):
        read_csv_mapping(path)


def test_rows_to_mapping_short_rows() -> None:
    rows = [["ScanID", "SubjectCode"], ["only-id"], ["X", "7"]]
    assert rows_to_mapping(rows, "ScanID", "SubjectCode", "t") == {"X": "7"}


def test_csv_failure_uses_cache_with_warning(tmp_path: Path) -> None:
    csv_file = write_mapping_csv(tmp_path / "m.csv", {"S1": "75"})
    config = config_for(tmp_path, mapping={"csv_file": str(csv_file)})
    first = load_mapping(config)
    assert first.mapping == {"S1": "75"} and first.warning is None and not first.from_cache
    assert cache_path(config).is_file()

    csv_file.unlink()
    second = load_mapping(config)
    assert second.from_cache and second.usable
    assert second.mapping == {"S1": "75"}
    assert "cached mapping" in second.warning and str(csv_file) in second.warning


def test_no_source_no_cache_is_an_error(tmp_path: Path) -> None:
    config = config_for(tmp_path, mapping={"csv_file": str(tmp_path / "missing.csv")})
    result = load_mapping(config)
    assert not result.usable and result.mapping == {}
    assert "no cached copy" in result.error and "missing.csv" in result.error

    nothing = load_mapping(config_for(tmp_path / "b"))
    assert not nothing.usable and "no mapping configured" in nothing.error


def test_dry_run_does_not_write_cache(tmp_path: Path) -> None:
    csv_file = write_mapping_csv(tmp_path / "m.csv", {"S1": "75"})
    config = config_for(tmp_path, mapping={"csv_file": str(csv_file)})
    assert load_mapping(config, write=False).mapping == {"S1": "75"}
    assert not cache_path(config).exists()


def test_malformed_rows_are_named_with_sheet_row_numbers() -> None:
    """Row numbers as the sheet shows them: header = row 1, blank rows counted."""
    rows = [
        ["ScanID", "SubjectCode", "Note"],
        ["S1", "CLM_L_01"],  # row 2
        [],  # row 3: blank
        ["S2", "A"],  # row 4
        ["S1", "CLML01"],  # row 5: S1 again, another code
        ["S3", ""],  # row 6: empty code
        ["S4"],  # row 7: short row
        ["", "Z9", "orphan"],  # row 8: a code without a ScanID
        ["S2", " A "],  # row 9: S2 again, same code
        ["S5", "75"],  # row 10
        ["S5", "0075"],  # row 11: the same number
        ["S6", "ab1"],
        ["S6", "AB1"],  # row 13: not the same code
        ["S7", "B"],
        ["S7", ""],  # row 15: a blank duplicate is not harmless
        ["", "", "just a note"],
    ]
    parsed = parse_rows(rows, "ScanID", "SubjectCode", "sheet")
    assert parsed.mapping == {"S2": "A", "S5": "75"}
    assert parsed.rows["S1"] == 2 and parsed.rows["S2"] == 4 and parsed.rows["S4"] == 7
    assert parsed.problems["S1"] == (
        "ScanID 'S1' is listed in row 2 (SubjectCode 'CLM_L_01') and row 5 (SubjectCode 'CLML01') of sheet: "
        "which subject is it? Fix the mapping so that it names one SubjectCode"
    )
    assert parsed.problems["S3"] == "row 6 of sheet has ScanID 'S3' but an empty SubjectCode"
    assert parsed.problems["S4"] == "row 7 of sheet has ScanID 'S4' but an empty SubjectCode"
    assert "row 12 (SubjectCode 'ab1') and row 13 (SubjectCode 'AB1')" in parsed.problems["S6"]
    assert "row 14 (SubjectCode 'B') and row 15 (empty SubjectCode)" in parsed.problems["S7"]
    assert parsed.row_problems == ["row 8 of sheet: SubjectCode 'Z9' but an empty ScanID"]
    assert len(parsed.notes) == 2
    assert "'S2' is listed in rows 4, 9 of sheet with the same SubjectCode 'A' (harmless" in parsed.notes[0]
    assert "'S5' is listed in rows 10, 11" in parsed.notes[1]


def test_header_bom_duplicates_and_case_are_named() -> None:
    assert parse_rows([["\ufeffScanID", "SubjectCode"], ["S1", "7"]], "ScanID", "SubjectCode", "t").mapping == {
        "S1": "7"
    }
    with pytest.raises(MappingSourceError, match=r"column 'ScanID' appears 2 times in the header \(columns 1 and 3\)"):
        parse_rows([["ScanID", "SubjectCode", "ScanID"]], "ScanID", "SubjectCode", "t")
    with pytest.raises(MappingSourceError, match=r"found 'scanid': column names are case-sensitive"):
        parse_rows([["scanid", "SubjectCode"]], "ScanID", "SubjectCode", "t")


def test_csv_with_bom_and_problems_round_trips_through_the_cache(tmp_path: Path) -> None:
    csv_file = tmp_path / "m.csv"
    csv_file.write_bytes("ScanID,SubjectCode\r\nS1,A\r\nS1,B\r\nS2,C\r\n".encode("utf-8-sig"))
    config = config_for(tmp_path, mapping={"csv_file": str(csv_file)})
    fresh = load_mapping(config)
    assert fresh.mapping == {"S2": "C"} and "rows 2" not in fresh.problems["S1"]
    assert "row 2 (SubjectCode 'A') and row 3 (SubjectCode 'B')" in fresh.problems["S1"]
    assert fresh.where("S2") == f"row 4 of csv:{csv_file}"
    csv_file.unlink()
    cached = load_mapping(config)
    assert cached.from_cache and cached.problems == fresh.problems and cached.rows == fresh.rows


# --------------------------------------------------------------------------- Google Sheet


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeGoogle(ThreadingHTTPServer):
    """Token endpoint + Sheets API v4 subset; records requests and checks the signed JWT."""

    daemon_threads = True

    def __init__(self, public_key: rsa.RSAPublicKey, values: list[list[str]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.public_key = public_key
        self.values = values
        self.requests: list[tuple[str, str]] = []
        self.jwt_claims: dict[str, Any] = {}

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeGoogle

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        self.server.requests.append(("POST", self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        form = parse_qs(body)
        if self.path != "/token" or form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            self._json(400, {"error": "invalid_request"})
            return
        header_b64, claims_b64, sig_b64 = form["assertion"][0].split(".")
        try:
            self.server.public_key.verify(
                _b64url_decode(sig_b64),
                f"{header_b64}.{claims_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except Exception:
            self._json(400, {"error": "invalid_grant", "error_description": "bad signature"})
            return
        self.server.jwt_claims = json.loads(_b64url_decode(claims_b64))
        self._json(200, {"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"})

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._json(401, {"error": {"code": 401, "message": "no token", "status": "UNAUTHENTICATED"}})
            return
        url = urlparse(self.path)
        prefix = f"/v4/spreadsheets/{SHEET_KEY}"
        if url.path == prefix:
            self._json(
                200,
                {
                    "spreadsheetId": SHEET_KEY,
                    "properties": {"title": "Scans", "locale": "en_US", "timeZone": "Etc/GMT"},
                    "sheets": [
                        {
                            "properties": {
                                "sheetId": 0,
                                "title": "Scans",
                                "index": 0,
                                "sheetType": "GRID",
                                "gridProperties": {"rowCount": 100, "columnCount": 5},
                            }
                        }
                    ],
                },
            )
        elif url.path.startswith(prefix + "/values/") and unquote(url.path[len(prefix) + 8 :]) == "'Scans'":
            self._json(200, {"range": "Scans!A1:E100", "majorDimension": "ROWS", "values": self.server.values})
        else:
            self._json(404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})


@pytest.fixture
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _service_account_file(path: Path, key: rsa.RSAPrivateKey, token_uri: str) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "neuroflow-test",
        "private_key_id": "abc123",
        "private_key": pem,
        "client_email": "neuroflow@neuroflow-test.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "auth_uri": "http://127.0.0.1/auth",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info), encoding="utf-8")
    return path


def _redirecting_client(base: str) -> type[gspread.HTTPClient]:
    """gspread's own HTTPClient, with only the Sheets host swapped for the local server."""

    class LocalSheetsClient(gspread.HTTPClient):
        def request(self, method: str, endpoint: str, *args: Any, **kwargs: Any):  # type: ignore[override]
            assert endpoint.startswith("https://sheets.googleapis.com/"), endpoint
            return super().request(method, endpoint.replace("https://sheets.googleapis.com", base), *args, **kwargs)

    return LocalSheetsClient


@pytest.fixture
def google(rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGoogle]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    values = [
        ["ScanID", "Notes", "SubjectCode"],
        [" 20240115_1430 ", "first", " 75 "],
        ["20240116_0900", "", "CLM_L_01"],
        ["20240117_1000", "no code yet", ""],
        ["", "", "99"],
    ]
    server = FakeGoogle(rsa_key.public_key(), values)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _sheet_config(tmp_path: Path, sa_file: Path, **mapping: Any):
    sheet = {
        "spreadsheet_key": SHEET_KEY,
        "worksheet_name": "Scans",
        "service_account_file": str(sa_file),
    }
    return config_for(tmp_path, mapping={"google_sheet": sheet, **mapping})


def test_google_sheet_through_gspread_against_local_server(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, google: FakeGoogle
) -> None:
    sa = _service_account_file(tmp_path / "sa.json", rsa_key, f"{google.base}/token")
    config = _sheet_config(tmp_path, sa)
    result = load_mapping(config, http_client=_redirecting_client(google.base))

    assert result.usable and result.warning is None and not result.from_cache
    assert result.mapping == {"20240115_1430": "75", "20240116_0900": "CLM_L_01"}
    assert result.source == f"google_sheet:{SHEET_KEY}/Scans"
    # The token was obtained with a JWT signed by the service-account key, asking for read-only scope.
    assert google.jwt_claims["scope"] == READONLY_SCOPE
    assert google.jwt_claims["iss"] == "neuroflow@neuroflow-test.iam.gserviceaccount.com"
    assert google.requests[0] == ("POST", "/token")
    assert any(path.startswith(f"/v4/spreadsheets/{SHEET_KEY}/values/") for _, path in google.requests)
    assert json.loads(cache_path(config).read_text())["mapping"] == result.mapping


def test_csv_takes_priority_over_sheet(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, google: FakeGoogle) -> None:
    sa = _service_account_file(tmp_path / "sa.json", rsa_key, f"{google.base}/token")
    csv_file = write_mapping_csv(tmp_path / "m.csv", {"20240115_1430": "CSV_SUBJECT"})
    config = _sheet_config(tmp_path, sa, csv_file=str(csv_file))
    result = load_mapping(config, http_client=_redirecting_client(google.base))
    assert result.mapping == {"20240115_1430": "CSV_SUBJECT"}
    assert result.source.startswith("csv:")
    assert google.requests == []  # the sheet was not even asked


def test_sheet_outage_uses_cache_and_says_why(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, google: FakeGoogle) -> None:
    sa = _service_account_file(tmp_path / "sa.json", rsa_key, f"{google.base}/token")
    config = _sheet_config(tmp_path, sa)
    client = _redirecting_client(google.base)
    good = load_mapping(config, http_client=client)
    assert good.mapping and not good.from_cache

    google.shutdown()
    google.server_close()  # the port now refuses connections
    down = load_mapping(config, http_client=client)
    assert down.usable and down.from_cache
    assert down.mapping == good.mapping
    assert "cached mapping" in down.warning
    assert "cannot reach" in down.warning and "token" in down.warning
    assert down.source.startswith(f"cache:google_sheet:{SHEET_KEY}/Scans@")


def test_sheet_outage_without_cache_holds_everything(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, google: FakeGoogle
) -> None:
    google.shutdown()
    google.server_close()
    sa = _service_account_file(tmp_path / "sa.json", rsa_key, f"{google.base}/token")
    result = load_mapping(_sheet_config(tmp_path, sa), http_client=_redirecting_client(google.base))
    assert not result.usable and result.mapping == {}
    assert "no cached copy" in result.error and "cannot reach" in result.error


def test_sheet_api_errors_are_named(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, google: FakeGoogle) -> None:
    sa = _service_account_file(tmp_path / "sa.json", rsa_key, f"{google.base}/token")
    wrong_ws = _sheet_config(tmp_path, sa)
    wrong_ws.mapping.google_sheet.worksheet_name = "Nope"
    result = load_mapping(wrong_ws, http_client=_redirecting_client(google.base))
    assert not result.usable and "no such worksheet" in result.error

    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad_sa = _service_account_file(tmp_path / "bad.json", other_key, f"{google.base}/token")
    result = load_mapping(_sheet_config(tmp_path / "b", bad_sa), http_client=_redirecting_client(google.base))
    assert not result.usable and "authentication failed" in result.error
