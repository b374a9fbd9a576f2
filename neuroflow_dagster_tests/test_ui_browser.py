"""The Dagster UI in a real browser: headless Chromium renders the project's asset lineage graph.

A real `dagster dev` (webserver, daemon, code server) runs the project's code
location on a temporary workspace; Debian's Chromium opens the global lineage
page with every asset group expanded and is driven over the DevTools protocol
(websockets, which dagster-webserver already depends on): the test waits
until the six asset names are in the rendered graph, then, on an instance
holding sessions at several stages (reported as the stages report them), takes
the screenshot the documentation uses: the pipeline drawn in full, each node
with its partitions' fill, checks and latest event, so the picture shows
partitions materialized. With NEUROFLOW_UPDATE_SCREENSHOTS=1 it is
written to docs/img/asset-graph.png. Skipped when Chromium is not installed
(scripts/system-deps.sh installs it in CI). The same `dagster dev` also takes a
`neuroflow reprocess` over HTTP, the path the CLI uses in production.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from neuroflow_dagster_tests.daemon_harness import REPO, dagster_dev, wait_for
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

ASSETS = ["dicom_session", "bids_session", "qsiprep_subject", "image_qc_session", "qsirecon_session", "qsiparc_session"]
GROUPS = ["discovery", "conversion", "preprocessing", "reconstruction", "parcellation"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=2100,1000",  # wide enough for Dagster to draw the six nodes in full
]
SCREENSHOT = REPO / "docs" / "img" / "asset-graph.png"


def chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def lineage_url(port: int) -> str:
    """The global lineage page with all groups open (the UI keeps open groups in `?expanded=`)."""
    expanded = ",".join(f"global@global:{g}" for g in GROUPS)
    return f"http://127.0.0.1:{port}/asset-groups?expanded={quote(expanded, safe='@:,')}"


def pipeline_url(port: int) -> str:
    """Everything upstream of the last stage, drawn in full (partitions, checks, latest event per node)."""
    return f"http://127.0.0.1:{port}/assets/qsiparc_session?view=lineage&lineageScope=upstream&lineageDepth=6"


def http_ok(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.read() or b"ok"
    except OSError:
        return None


class DevTools:
    """The few DevTools protocol calls the test needs, over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == msg_id:
                if "error" in message:
                    raise AssertionError(f"DevTools {method} failed: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.ws.close()


def start_chromium(binary: str, profile: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Chromium with a DevTools port of its choosing; returns the process and the page's websocket URL."""
    proc = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    port_file = profile / "DevToolsActivePort"
    wait_for("Chromium's DevTools port", lambda: port_file.is_file() and port_file.read_text().strip(), 60, None, 0.2)
    port = int(port_file.read_text().splitlines()[0])

    def page() -> str | None:
        raw = http_ok(f"http://127.0.0.1:{port}/json/list")
        pages = [t for t in json.loads(raw) if t.get("type") == "page"] if raw else []
        return pages[0]["webSocketDebuggerUrl"] if pages else None

    return proc, wait_for("a Chromium page target", page, 30, None, 0.2)


@dataclass
class DevServer:
    port: int
    log: Path
    home: Path
    config_file: Path
    webserver_s: float


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """A real `dagster dev` on a temporary workspace, up and answering /server_info."""
    root = tmp_path_factory.mktemp("ui")
    config = make_workspace(root / "ws")
    assert config.source is not None
    # The project's instance settings, minus the first-visit newsletter dialog that would cover the graph.
    dagster_yaml = root / "dagster.yaml"
    dagster_yaml.write_text((REPO / "dagster.yaml").read_text() + "\nnux:\n  enabled: false\n")
    with dagster_dev(Path(config.source), root / "home", dagster_yaml=dagster_yaml) as dev:
        port = dev["port"]
        started = time.monotonic()
        info = wait_for("the webserver", lambda: http_ok(f"http://127.0.0.1:{port}/server_info"), 240, dev["log"], 1)
        assert json.loads(info)["dagster_webserver_version"]
        yield DevServer(port, dev["log"], dev["home"], Path(config.source), time.monotonic() - started)


def populate(home: Path) -> None:
    """Sessions at several stages, as the stages record them (runless reports of the real keys), so the
    picture shows partitions materialized: SUBJA's two sessions and SUBJB's one all the way through,
    SUBJC's held by a failed protocol check. Reported in pipeline order, so the automation sensors of
    the running `dagster dev` find every partition handled and request nothing."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    done = {"neuroflow/status": "done"}
    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
    try:
        instance.add_dynamic_partitions("subjects", ["SUBJA", "SUBJB", "SUBJC"])
        instance.add_dynamic_partitions("session_labels", ["01", "02"])
        sessions = ["01|SUBJA", "02|SUBJA", "01|SUBJB"]

        def report(asset: str, partitions: list[str], **metadata: Any) -> None:
            for p in partitions:
                instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=p, metadata=metadata))

        report("dicom_session", [*sessions, "01|SUBJC"])
        for p, passed in [*((p, True) for p in sessions), ("01|SUBJC", False)]:
            instance.report_runless_asset_event(dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey("dicom_session"), check_name="protocol", passed=passed, partition=p,
                description="Session valid: 2 scan types found" if passed else "Missing required scans: DWI"))
        report("bids_session", sessions, **done)
        report("qsiprep_subject", ["SUBJA", "SUBJB"], **done)
        report("image_qc_session", sessions, **done)
        report("qsirecon_session", sessions, **done)
        report("qsiparc_session", sessions, **done)
    finally:
        instance.dispose()


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_asset_graph_renders_in_chromium(dev_server: DevServer, tmp_path: Path) -> None:
    binary = chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; CI: scripts/system-deps.sh)")
    populate(dev_server.home)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    proc, ws_url = start_chromium(binary, profile)
    tools = DevTools(ws_url)
    try:
        tools.call("Page.enable")
        started = time.monotonic()
        tools.call("Page.navigate", url=lineage_url(dev_server.port))

        def rendered() -> list[str] | None:
            text = tools.evaluate("document.body ? document.body.innerText : ''") or ""
            return [a for a in ASSETS if a in text] if all(a in text for a in ASSETS) else None

        found = wait_for("the asset names in the rendered lineage graph", rendered, 180, dev_server.log, 0.5)
        render_s = time.monotonic() - started
        assert found == ASSETS
        # The graph's nodes, not only the asset list beside it: each name inside the graph canvas.
        in_graph = tools.evaluate(
            "Array.from(document.querySelectorAll('foreignObject, svg text')).map(e => e.textContent).join(' ')"
        )
        assert all(a in in_graph for a in ASSETS), in_graph[:2000]
        # The picture: the whole pipeline upstream of parcellation, as the asset's lineage tab draws it (the
        # global page's asset tree leaves the graph too little room for Dagster to draw nodes in full),
        # with the navigation folded away, once every node shows its partitions' fill and latest event.
        tools.evaluate("Array.from(document.querySelectorAll('button')).find(b => "
                       "b.innerText.trim() === 'Hide navigation')?.click()")  # fmt: skip
        tools.call("Page.navigate", url=pipeline_url(dev_server.port))

        def drawn() -> str | None:
            text = tools.evaluate("document.body ? document.body.innerText : ''") or ""
            return text if text.count("filled") >= len(ASSETS) and all(a in text for a in ASSETS) else None

        picture = wait_for("every node with its partitions in the pipeline picture", drawn, 180, dev_server.log, 0.5)
        assert "Latest event" in picture and "partitions" in picture
        time.sleep(1.5)  # let zoom-to-fit settle before the picture
        png = base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"])
    finally:
        tools.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

    shot = tmp_path / "asset-graph.png"
    shot.write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(png) < 300_000, len(png)
    if os.environ.get("NEUROFLOW_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)
    print(f"webserver up in {dev_server.webserver_s:.1f}s; graph rendered in {render_s:.1f}s; {len(png)} bytes")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reprocess_launches_a_backfill_on_the_real_webserver(dev_server: DevServer) -> None:
    """`neuroflow reprocess` over HTTP against the running webserver: the backfill exists, tagged and titled."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    from neuroflow_dagster import cli
    from neuroflow_dagster.config import load_config
    from neuroflow_dagster.discovery.identity import Registry

    config = load_config(dev_server.config_file, environ={})
    Registry(config.paths.state).assign("SCAN_A1", "SUBJA")
    Registry(config.paths.state).assign("SCAN_A2", "SUBJA")
    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dev_server.home)))
    try:
        instance.add_dynamic_partitions("subjects", ["SUBJA"])
        instance.add_dynamic_partitions("session_labels", ["01", "02"])
        argv = ["--config", str(dev_server.config_file), "reprocess", "--stage", "qsiprep", "--subject", "SUBJA"]
        url = f"http://127.0.0.1:{dev_server.port}"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main([*argv, "--url", url, "--format", "json"])
        assert code == 0, out.getvalue()
        result = json.loads(out.getvalue())
        assert result["partitions"] == ["SUBJA"] and result["url"] == url + "/graphql"
        backfill = instance.get_backfill(result["backfill_id"])
        assert backfill is not None
        assert backfill.tags == {"neuroflow/stage": "qsiprep"}
        assert backfill.title.startswith("neuroflow reprocess qsiprep: 1 partition(s)")
        assert backfill.asset_selection == [dg.AssetKey("qsiprep_subject")]
        target = backfill.asset_backfill_data.target_subset.partitions_subsets_by_asset_key
        assert set(target[dg.AssetKey("qsiprep_subject")].get_partition_keys()) == {"SUBJA"}
    finally:
        instance.dispose()
