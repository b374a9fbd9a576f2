"""What an operator looks at: `neuroflow qc report`, `neuroflow qc rejudge`, and the cohort on the QC asset.

Real workspaces (ScanID registry, QSIPrep-shaped QC tables and raw BIDS sidecars, the store), the real
CLI in-process, matplotlib's real PNGs, and for the asset the real definitions executed by Dagster
in-process. The relaunch of `qc rejudge` goes to a recorder that answers like Dagster's webserver (the
mutation itself is accepted by Dagster's real GraphQL schema in test_operator_cli).
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import dagster as dg
import pytest
from matplotlib.image import imread

from neuroflow_dagster import cli
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.definitions import build_definitions
from neuroflow_dagster.discovery.exclusions import exclude
from neuroflow_dagster.discovery.identity import Registry
from neuroflow_dagster.qc import approvals, rejudge
from neuroflow_dagster.qc.gate import store_of
from neuroflow_dagster.qc.report import write_report
from neuroflow_dagster_tests.test_operator_cli import fake_webserver  # noqa: F401  (fixture)
from neuroflow_dagster_tests.test_qc_cohort import add_session, spread_values
from neuroflow_dagster_tests.workspace_fixtures import make_workspace

QC = dg.AssetKey("image_qc_session")


def registered(config: NeuroflowConfig, n: int, corr: float, bad: float = 0, **kw: object) -> str:
    """A registered session ``n`` (ScanID SCAN<n>, subject S<n>, ses-01), judged as the QC asset judges."""
    Registry(config.paths.state).assign(f"SCAN{n:03d}", f"S{n:03d}")
    return add_session(config, n, corr, bad, **kw)  # type: ignore[arg-type]


def study(root: Path) -> NeuroflowConfig:
    """24 ordinary sessions of one protocol, then one held, one approved, one warned session."""
    config = make_workspace(root)
    for i, value in enumerate(spread_values(24)):
        registered(config, 100 + i, value)
    registered(config, 1, 0.95, bad=7)  # held: 7 bad slices, beyond the floor of 5
    registered(config, 2, 0.70)  # 6.2 MADs below: held, then approved
    approvals.approve(config, "SCAN002", "S002", "01", "dropouts in 2 volumes only", by="dr.who")
    registered(config, 3, 0.81)  # 3.4 MADs below the 26 others: warned
    qsiprep = config.paths.derivatives / "qsiprep"
    (qsiprep / "sub-S001.html").write_text("<html>QSIPrep's report</html>")
    figures = qsiprep / "sub-S001" / "figures"
    figures.mkdir(parents=True)
    (figures / "sub-S001_ses-01_desc-carpetplot_dwi.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    return config


def run_cli(capsys: pytest.CaptureFixture[str], config: NeuroflowConfig, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["--config", str(config.source), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_plots_the_cohort_and_names_held_approved_and_warned_sessions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = study(tmp_path / "ws")
    code, out, err = run_cli(capsys, config, "qc", "report", "--output", str(tmp_path / "report"))
    assert code == 0, err
    assert "held by image QC: sub-S001 ses-01 (ScanID SCAN001)" in out
    page = (tmp_path / "report" / "index.html").read_text()
    for metric in ("raw_masked_neighbor_corr", "raw_num_bad_slices"):
        png = tmp_path / "report" / f"{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(png).shape[0] > 200  # a real picture, decodable
        assert f"<img src='{metric}.png'" in page
    held = page.split("<h2>Held by image QC</h2>")[1].split("<h2>")[0]
    assert "sub-S001 ses-01 (ScanID SCAN001)" in held and "S002" not in held and "S003" not in held
    assert "27 session(s) judged: <b>1 held</b>, 1 approved, 1 warned, 24 passed." in page
    rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr class='\w+'><td>(sub-S\d+ ses-01).*?</tr>", page)}
    assert "held" in rows["sub-S001 ses-01"] and "raw_num_bad_slices 7 &gt; 5 (floor;" in rows["sub-S001 ses-01"]
    assert "approved by dr.who" in rows["sub-S002 ses-01"]
    assert "0.81 is 3.4 MADs below the median 0.93 of 26 sessions of protocol" in rows["sub-S003 ses-01"]
    # links to QSIPrep's report and figures, relative to the report's folder, that resolve
    links = re.findall(r'href="([^"]+)"', rows["sub-S001 ses-01"])
    assert [Path(link).name for link in links] == ["sub-S001.html", "sub-S001_ses-01_desc-carpetplot_dwi.svg"]
    for link in links:
        assert not link.startswith("/") and (tmp_path / "report" / link).resolve().is_file()
    # the names written on the plots
    result = write_report(config, tmp_path / "again")
    assert {"sub-S001 ses-01", "sub-S002 ses-01", "sub-S003 ses-01"} <= set(result.named)
    assert result.held == ["sub-S001 ses-01 (ScanID SCAN001)"]
    assert "Every recorded verdict stands under today's cohort." in page
    exclude(config, "SCAN001", "unusable: motion")  # an excluded session leaves the page and the cohort
    result = write_report(config, tmp_path / "excluded")
    page = result.index.read_text()
    assert result.held == [] and "26 session(s) judged: <b>0 held</b>" in page and "SCAN001" not in page


def test_rejudge_lists_without_recording_and_applies_only_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_webserver  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    config = make_workspace(tmp_path / "ws")
    for i, value in enumerate(spread_values(24)):
        registered(config, 100 + i, value)
    for i, value in enumerate(spread_values(24, centre=0.90)):
        registered(config, 200 + i, value, protocol="DTI_B")
    registered(config, 1, 0.78)  # protocol A: 4.2 MADs below, held
    registered(config, 2, 0.83, protocol="DTI_B")  # protocol B: 2 MADs below, passes
    assert store_of(config).standing("SCAN001").level == "failed"  # type: ignore[union-attr]
    for i, value in enumerate(spread_values(60, centre=0.85)):  # protocol A turns out wider
        registered(config, 300 + i, value)
    for i, value in enumerate(spread_values(40, centre=0.95, step=0.001)):  # protocol B tighter and higher
        registered(config, 400 + i, value, protocol="DTI_B")
    history = {s: len(store_of(config).history(s)) for s in ("SCAN001", "SCAN002")}

    code, out, err = run_cli(capsys, config, "qc", "rejudge", "SCAN001", "sub-S002/ses-01", "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["SUBJECT", "SESSION", "SCAN_ID", "RECORDED", "TODAY", "APPROVED_BY", "DETAIL"]
    assert lines[1].split()[:5] == ["S001", "01", "SCAN001", "failed", "passed"]
    assert lines[2].split()[:5] == ["S002", "01", "SCAN002", "passed", "failed"]
    assert "2 session(s) whose standing today's cohort would change: 1 released, 1 newly held, 0 other" in out
    assert "nothing recorded (--dry-run)" in out
    everyone = json.loads(run_cli(capsys, config, "qc", "rejudge", "--dry-run", "--format", "json")[1])
    assert {"SCAN001", "SCAN002"} <= {r["scan_id"] for r in everyone} and not any(r["applied"] for r in everyone)
    code, _, err = run_cli(capsys, config, "qc", "rejudge", "SCAN001")
    assert code == 5 and "--reason must say why" in err
    # nothing was recorded, nothing changed: the gate still holds SCAN001 and lets SCAN002 through
    assert {s: len(store_of(config).history(s)) for s in history} == history
    assert not (config.paths.state / rejudge.AUDIT).exists() and fake_webserver.bodies == []

    url = f"http://127.0.0.1:{fake_webserver.server_address[1]}"
    code, out, err = run_cli(capsys, config, "qc", "rejudge", "SCAN001", "SCAN002", "--reason",
                             "protocol spreads measured on 100 sessions", "--by", "dr.who", "--url", url)
    assert code == 0, err
    assert "recorded 2 re-judgement(s)" in out
    assert "relaunched image_qc_session, qsirecon_session, qsiparc_session for 01|S001: backfill abcdefgh" in out
    assert "relaunched image_qc_session for 01|S002: backfill abcdefgh" in out
    released, held = (b["variables"]["backfillParams"] for b in fake_webserver.bodies)
    assert [a["path"][0] for a in released["assetSelection"]] == [
        "image_qc_session", "qsirecon_session", "qsiparc_session"]
    assert released["partitionNames"] == ["01|S001"]
    assert [a["path"][0] for a in held["assetSelection"]] == ["image_qc_session"] and held["partitionNames"] == [
        "01|S002"]
    assert store_of(config).standing("SCAN001").level == "passed"  # type: ignore[union-attr]
    assert store_of(config).standing("SCAN002").by == "dr.who"  # type: ignore[union-attr]
    listed = json.loads(run_cli(capsys, config, "qc", "list", "--format", "json")[1])
    assert [(r["scan_id"], r["qc"]) for r in listed if r["scan_id"] in history] == [("SCAN002", "FAILED")]
    assert "re-judged by dr.who" in next(r["judged"] for r in listed if r["scan_id"] == "SCAN002")
    audit = (config.paths.state / rejudge.AUDIT).read_text().splitlines()
    assert [json.loads(a)["after"] for a in audit] == ["passed", "failed"]


def test_the_qc_asset_shows_the_cohort_plot_and_keeps_its_verdict(tmp_path: Path) -> None:
    config = make_workspace(tmp_path / "ws")
    for i, value in enumerate(spread_values(24)):
        registered(config, 100 + i, value)
    Registry(config.paths.state).assign("SCAN001", "S001")
    add_session(config, 1, 0.78, judge=False)
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions("subjects", ["S001"])
        instance.add_dynamic_partitions("session_labels", ["01"])
        job = build_definitions(config).resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(instance=instance, asset_selection=[QC], partition_key="01|S001",
                                        raise_on_error=False)
        (evaluation,) = result.get_asset_check_evaluations()
        assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
        assert evaluation.description.startswith(
            "QC failed: raw_masked_neighbor_corr 0.78 is 4.2 MADs below the median 0.93 of 24 sessions of protocol "
            "ep2d_diff_mddw_12dir on Prisma_fit")
        meta = {k: v.value for k, v in evaluation.metadata.items()}
        assert meta["raw_masked_neighbor_corr rule"] == "cohort"
        assert meta["raw_masked_neighbor_corr MADs from median"] == pytest.approx(-4.21, abs=0.01)
        assert meta["raw_num_bad_slices rule"] == "cohort"
        (mat,) = result.asset_materializations_for_node("image_qc_session")
        cohort_md = mat.metadata["cohort"].value
        match = re.match(r"!\[cohort of SCAN001\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", cohort_md)
        assert match, cohort_md[:200]
        picture = imread(io.BytesIO(base64.b64decode(match.group(1))), format="png")
        assert picture.shape[0] > 200 and picture.shape[1] > 400
        assert mat.metadata["verdict"].value.startswith("judged ")

        # the cohort grows wider; the same tables judged again keep their verdict, and say what today would give
        for i, value in enumerate(spread_values(60, centre=0.85)):
            registered(config, 300 + i, value)
        again = job.execute_in_process(instance=instance, asset_selection=[QC], partition_key="01|S001",
                                       raise_on_error=False)
        (evaluation,) = again.get_asset_check_evaluations()
        assert not evaluation.passed and "4.2 MADs below the median 0.93 of 24 sessions" in evaluation.description
        (mat,) = again.asset_materializations_for_node("image_qc_session")
        assert "kept (the same QC tables and settings); under today's cohort it would be passed" in \
            mat.metadata["verdict"].value
        assert mat.metadata["under today's cohort"].value.startswith("QC passed")
    assert store_of(config).standing("SCAN001").level == "failed"  # type: ignore[union-attr]


def test_seed_adds_sessions_judged_before_the_store_to_the_cohort_without_verdicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_workspace(tmp_path / "ws")
    for i, value in enumerate(spread_values(24)):  # judged by an earlier version: QC tables, nothing in the store
        Registry(config.paths.state).assign(f"SCAN{100 + i:03d}", f"S{100 + i:03d}")
        add_session(config, 100 + i, value, judge=False)
    Registry(config.paths.state).assign("SCAN099", "S099")  # registered, no QSIPrep output
    code, out, err = run_cli(capsys, config, "qc", "seed")
    assert code == 0, err
    assert "24 session(s) added to the cohort" in out and "(1 without a QC table, 0 already there)" in out
    assert store_of(config).standings() == {}  # no verdict was made
    held = registered(config, 1, 0.78)
    assert store_of(config).standing(held).summary.startswith(  # type: ignore[union-attr]
        "QC failed: raw_masked_neighbor_corr 0.78 is 4.2 MADs below the median 0.93 of 24 sessions")
    assert rejudge.plan(config) == []
    assert "0 session(s) added" in run_cli(capsys, config, "qc", "seed")[1]
    result = write_report(config, tmp_path / "report")
    page = result.index.read_text()
    assert result.held == ["sub-S001 ses-01 (ScanID SCAN001)"] and "1 session(s) judged: <b>1 held</b>" in page


def test_the_asset_plot_draws_a_stable_sample_of_a_large_group_with_every_flagged_session() -> None:
    from matplotlib.figure import Figure

    from neuroflow_dagster.config import QcConfig
    from neuroflow_dagster.qc.cohort import Group, GroupValues
    from neuroflow_dagster.qc.report import APPROVED, PASSED, Point, Row, draw_metric

    values = GroupValues("protocol X")
    points = []
    for n in range(300):
        values.add(f"S{n}", 0.9 + (n % 7) / 100)
        points.append(Point(f"S{n}", f"sub-S{n} ses-01", 0.9 + (n % 7) / 100, APPROVED if n == 5 else PASSED))
    qc = QcConfig()
    row = Row(Group((("SeriesDescription", "X"),)), values.stats(), points, True)

    def drawn(**kw: object) -> tuple[int, list[str]]:
        ax = Figure().subplots()
        names = draw_metric(ax, "raw_masked_neighbor_corr", [row], qc.metrics["raw_masked_neighbor_corr"], qc,
                            **kw)  # type: ignore[arg-type]
        return sum(len(c.get_offsets()) for c in ax.collections), names

    assert drawn() == (300, ["sub-S5 ses-01"])
    count, names = drawn(max_points=50, highlight="S299")
    assert count == 50 + 1 + 1 + 1  # 50 sampled, the highlighted one (not among them) and its ring, the approved one
    assert names == ["sub-S299 ses-01", "sub-S5 ses-01"]
    assert drawn(max_points=50, highlight="S299") == (count, names)  # the same sample every time
    # a group judged by the fixed thresholds shows them, however far from its values
    alone = Row(row.group, values.stats(), [Point("P", "sub-P ses-01", 0.128, "held")], False)
    ax = Figure().subplots()
    draw_metric(ax, "raw_masked_neighbor_corr", [alone], qc.metrics["raw_masked_neighbor_corr"], qc)
    low, high = ax.get_xlim()
    assert low < 0.128 and high > 0.8
