"""QSIPrep's own input handling judges each run before it starts (neuroflow_dagster/preflight/).

Real parts: QSIPrep 1.1.1 and 26.1.1, fully installed from the committed locks into their own venvs by
scripts/qsiprep-preflight-venv.sh (built once per machine: ~1.5 GB and 2-6 min each; then cached in
.venv-preflight), running their argument parser, BIDS grouping and whole workflow construction on
small real NIfTI datasets (neuroflow_dagster_tests/bids_shapes.py). QSIPrep's binaries (ANTs, FSL,
MRtrix, FreeSurfer) are not installed: that is the nearest real boundary to the container, and the
preflight records them as missing instead of failing. The command lines are the ones
tools/qsiprep.py builds for each runtime. A venv that cannot be built fails the tests, never skips them.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.preflight import qsiprep as preflight
from neuroflow_dagster.tools import qsiprep
from neuroflow_dagster_tests import bids_shapes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "qsiprep-preflight-venv.sh"
VERSIONS = ("1.1.1", "26.1.1")
P = "0075"


def build_venvs() -> Path:
    """The preflight venvs, built by the project's own script (a no-op once built); fails if it cannot."""
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=3000, check=False)
    assert proc.returncode == 0, f"{SCRIPT.name} failed:\n{proc.stderr[-3000:]}"
    built = [Path(line) for line in proc.stdout.split()]
    assert [p.name for p in built] == [f"qsiprep-{v}" for v in VERSIONS], proc.stdout
    return built[0].parent


@pytest.fixture(scope="module")
def venvs_root() -> Path:
    return build_venvs()


def config_for(tmp: Path, venvs_root: Path | None = None, **qsiprep_cfg: object) -> NeuroflowConfig:
    paths = {k: str(tmp / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}
    for key in ("bids_root", "derivatives"):
        Path(paths[key]).mkdir(parents=True, exist_ok=True)
    preflight_cfg = {"venvs_dir": str(venvs_root or tmp / "no-venvs")}
    # A fixed resolution unless a test asks for `auto` (which reads the DWI headers in build_spec).
    qsiprep_cfg = {"preflight": preflight_cfg, "output_resolution": 1.6, **qsiprep_cfg}
    return NeuroflowConfig.model_validate({"paths": paths, "pipelines": {"qsiprep": qsiprep_cfg}})


def image(version: str) -> str:
    return f"pennlinc/qsiprep:{version}"


# --------------------------------------------------------------------------- the request (no venv needed)


def test_container_argv_is_mapped_back_to_host_folders_and_only_out_and_work_move(tmp_path: Path) -> None:
    licence = tmp_path / "license.txt"
    licence.write_text("x\n")
    for runtime in ("docker", "apptainer"):
        config = config_for(tmp_path, runtime=runtime, fs_license=str(licence), extra_args=["--b0-threshold", "50"])
        spec = qsiprep.build_spec(config, P, ["02", "01"])
        assert spec.argv[1:3] == ("/data/bids", "/out")
        scratch = tmp_path / "scratch"
        argv = preflight.preflight_argv(preflight.real_spec(config, spec, P, ["01", "02"], scratch), scratch)
        assert argv[:4] == ["qsiprep", str(config.paths.bids_root), str(scratch / "out"), "participant"]
        assert argv[argv.index("-w") + 1] == str(scratch / "work")
        assert argv[argv.index("--bids-filter-file") + 1] == str(qsiprep.bids_filter_path(config, P))
        assert argv[argv.index("--fs-license-file") + 1] == str(licence)
        assert argv[argv.index("--session-id") + 1 : argv.index("--session-id") + 3] == ["01", "02"]
        assert argv[-3:] == ["--notrack", "--b0-threshold", "50"]
        assert not any(a.startswith(("/data/", "/out", "/work", "/neuroflow/", "/opt/")) for a in argv), argv


def test_the_stand_in_is_judged_with_the_argv_the_real_qsiprep_would_get(tmp_path: Path) -> None:
    """runtime builtin (and slurm running the stand-in): the real tool's local argv, in the dialect of the
    configured image tag."""
    cases = (("builtin", "1.1.1", "--session-id"), ("slurm", "26.1.1", "--session-label"))
    for runtime, version, session_flag in cases:
        config = config_for(tmp_path, runtime=runtime, image=image(version))
        spec = qsiprep.build_spec(config, P, ["01"])
        assert spec.stand_in
        assert preflight.preflight_version(config) == version
        scratch = tmp_path / f"scratch-{runtime}"
        argv = preflight.preflight_argv(preflight.real_spec(config, spec, P, ["01"], scratch), scratch)
        assert argv[0] == "qsiprep" and argv[2] == str(scratch / "out")
        assert argv[argv.index(session_flag) + 1] == "01"
        assert "--anat-modality" in argv and "--notrack" in argv
        assert config.pipelines.qsiprep.runtime == runtime  # the stage's config is not changed


def test_the_venv_follows_the_qsiprep_version_the_stage_runs(tmp_path: Path) -> None:
    assert preflight.preflight_version(config_for(tmp_path)) == "1.1.1"  # the default image
    assert preflight.preflight_version(config_for(tmp_path, image="pennlinc/qsiprep:1.0.2")) == "1.1.1"
    # 26.0.0 still takes 1.x's flags (its parser is 1.1.1's): the 1.1.1 venv judges its command lines.
    assert preflight.preflight_version(config_for(tmp_path, image="pennlinc/qsiprep:26.0.0")) == "1.1.1"
    assert preflight.preflight_version(config_for(tmp_path, image="pennlinc/qsiprep:26.1.1")) == "26.1.1"
    assert preflight.preflight_version(config_for(tmp_path, image="/sif/qsiprep_27.0.0.sif")) == "26.1.1"


def test_a_missing_venv_is_said_once_and_the_run_goes_ahead(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    spec = qsiprep.build_spec(config, P, ["01"])
    log = tmp_path / "logs" / "p.preflight.log"
    first = preflight.run(config, spec, P, ["01"], log_path=log)
    second = preflight.run(config, spec, P, ["01"], log_path=log)
    assert first.status == second.status == "unavailable"
    assert first.news and not second.news
    assert "not built" in first.message and "neuroflow preflight install" in first.message
    assert preflight.unavailable_notes(config) == {"1.1.1": first.message}
    assert not log.exists()  # nothing was run
    # A different reason (a half-built venv) is news again; a working venv clears the note.
    (tmp_path / "no-venvs" / "qsiprep-1.1.1").mkdir(parents=True)
    third = preflight.run(config, spec, P, ["01"], log_path=log)
    assert third.news and "incomplete" in third.message
    assert list(preflight.unavailable_notes(config)) == ["1.1.1"]
    preflight.clear_unavailable(config, "1.1.1")
    assert preflight.unavailable_notes(config) == {}
    off = config.model_copy(deep=True)
    off.pipelines.qsiprep.preflight.enabled = False
    assert preflight.run(off, spec, P, ["01"], log_path=log).status == "off"


def test_the_pandas_error_of_a_dwi_without_phase_encoding_is_said_plainly(tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    bids_shapes.write_subject(bids, P, ["01"], "dwi_no_pe")
    nifti = bids / f"sub-{P}/ses-01/dwi/sub-{P}_ses-01_dir-AP_dwi.nii.gz"
    result = {
        "verdict": "refused",
        "qsiprep_version": "1.1.1",
        "message": "AttributeError: Can only use .str accessor with string values!",
        "dwi_without_phase_encoding": [str(nifti)],
    }
    verdict = preflight.judge(result, "1.1.1", ["qsiprep"], P, bids, tmp_path / "x.log", 1.0)
    assert verdict.refused
    assert f"sub-{P}/ses-01/dwi/sub-{P}_ses-01_dir-AP_dwi.json: no PhaseEncodingDirection" in verdict.message
    assert verdict.message.endswith("QSIPrep 1.1.1's own error: " + result["message"])
    assert verdict.tool_message == result["message"]


def test_preflight_settings_are_validated_and_relative_venvs_dir_follows_the_config_file(tmp_path: Path) -> None:
    from neuroflow_dagster.config import load_config
    from neuroflow_dagster.errors import ConfigError

    path = tmp_path / "neuroflow.yaml"
    base = {"paths": {k: k for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}}
    path.write_text(json.dumps({**base, "pipelines": {"qsiprep": {"preflight": {"venvs_dir": "tools/pf"}}}}))
    config = load_config(path, environ={})
    assert preflight.venvs_dir(config) == tmp_path / "tools" / "pf"
    assert config.pipelines.qsiprep.preflight.enabled and config.pipelines.qsiprep.preflight.timeout_seconds == 600
    default = load_config(path, environ={"NEUROFLOW_PIPELINES__QSIPREP__PREFLIGHT": "{}"})
    assert preflight.venvs_dir(default) == tmp_path / "work_dir" / "preflight" / "venvs"
    path.write_text(json.dumps({**base, "pipelines": {"qsiprep": {"preflight": {"venv": "x"}}}}))
    with pytest.raises(ConfigError, match=r"pipelines\.qsiprep\.preflight\.venv: unknown key"):
        load_config(path, environ={})


# --------------------------------------------------------------------------- the real QSIPrep judges


def judge(tmp: Path, venvs_root: Path, version: str, shape: str | None, *, participant: str = P,
          sessions: tuple[str, ...] = ("01",), **qsiprep_cfg: object) -> preflight.Verdict:  # fmt: skip
    """Write ``shape`` for sub-0075, build the run's spec as the stage does (the default
    ``output_resolution: auto`` unless given), and run the preflight."""
    qsiprep_cfg.setdefault("output_resolution", "auto")
    config = config_for(tmp, venvs_root, image=image(version), **qsiprep_cfg)
    if shape is not None:
        bids_shapes.write_subject(config.paths.bids_root, P, sessions, shape)
    spec = qsiprep.build_spec(config, participant, list(sessions))
    verdict = preflight.run(config, spec, participant, sessions, log_path=tmp / "logs" / f"{version}.preflight.log")
    assert verdict.qsiprep_version == version
    assert verdict.status in ("ok", "refused"), verdict  # judged, not unavailable
    assert not list((Path(config.paths.work_dir) / "preflight" / "runs").iterdir())  # scratch removed
    return verdict


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_real_qsiprep_accepts_dwi_with_t1w_and_uses_a_reverse_pe_field_map(
    venvs_root: Path, tmp_path: Path, version: str
) -> None:
    plain = judge(tmp_path / "plain", venvs_root, version, "dwi_t1w", sessions=("01", "02"))
    assert plain.status == "ok", plain.message
    assert plain.details["processing_list"] == [[P, ["01", "02"]]]
    assert "antsRegistration" in plain.details["missing_binaries"]  # recorded, not fatal
    assert plain.seconds < 300
    with_fmap = judge(tmp_path / "pepolar", venvs_root, version, "fmap_epi", sessions=("01", "02"))
    assert with_fmap.status == "ok", with_fmap.message
    # The field map was found through IntendedFor: QSIPrep added its distortion-correction nodes.
    assert with_fmap.details["nodes"] > plain.details["nodes"], (with_fmap.details, plain.details)
    log = Path(with_fmap.log_path or "").read_text()
    assert "dir-PA_epi" in log


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_real_qsiprep_refuses_a_subject_without_t1w(venvs_root: Path, tmp_path: Path, version: str) -> None:
    verdict = judge(tmp_path, venvs_root, version, "dwi_only")
    assert verdict.refused
    assert f"No T1w images found for participant {P}" in verdict.message
    assert "--anat-modality none" in verdict.message
    # With anat_modality none QSIPrep takes the same subject.
    assert judge(tmp_path / "none", venvs_root, version, "dwi_only", anat_modality="none").status == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_real_qsiprep_refuses_a_3d_file_among_the_dwis(venvs_root: Path, tmp_path: Path, version: str) -> None:
    verdict = judge(tmp_path, venvs_root, version, "dwi_3d")
    assert verdict.refused
    assert "DWI file not 4D" in verdict.message and f"sub-{P}_ses-01_dir-AP_dwi.nii.gz" in verdict.message


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_a_dwi_sidecar_without_phase_encoding_direction_is_named(
    venvs_root: Path, tmp_path: Path, version: str
) -> None:
    verdict = judge(tmp_path, venvs_root, version, "dwi_no_pe")
    assert verdict.refused
    sidecar = f"sub-{P}/ses-01/dwi/sub-{P}_ses-01_dir-AP_dwi.json"
    assert f"{sidecar}: no PhaseEncodingDirection" in verdict.message
    assert "Can only use .str accessor with string values" in verdict.message  # QSIPrep's own words kept
    assert verdict.details["dwi_without_phase_encoding"][0].endswith(f"sub-{P}_ses-01_dir-AP_dwi.nii.gz")


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_a_bids_filter_that_leaves_no_t1w_is_refused(venvs_root: Path, tmp_path: Path, version: str) -> None:
    """The run's own --bids-filter-file is what QSIPrep reads: an operator filter matching no T1w."""
    verdict = judge(tmp_path, venvs_root, version, "dwi_t1w", bids_filters={"t1w": {"reconstruction": "norm"}})
    assert verdict.refused
    assert f"No T1w images found for participant {P}" in verdict.message


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_a_participant_not_in_the_dataset_is_refused(venvs_root: Path, tmp_path: Path, version: str) -> None:
    # A fixed resolution: with `auto` build_spec itself refuses a participant without DWI files.
    config = config_for(tmp_path, venvs_root, image=image(version))
    bids_shapes.write_subject(config.paths.bids_root, P, ["01"], "dwi_t1w")
    verdict = judge(tmp_path, venvs_root, version, None, participant="0099", output_resolution=1.6)
    assert verdict.refused
    assert "participant labels were not found in the BIDS directory: 0099" in verdict.message
    assert verdict.details["phase"] == "parse"


@pytest.mark.slow
def test_a_preflight_past_its_timeout_is_stopped_and_the_run_goes_ahead(venvs_root: Path, tmp_path: Path) -> None:
    config = config_for(tmp_path, venvs_root, preflight={"venvs_dir": str(venvs_root), "timeout_seconds": 1})
    bids_shapes.write_subject(config.paths.bids_root, P, ["01"], "dwi_t1w")
    spec = qsiprep.build_spec(config, P, ["01"])
    verdict = preflight.run(config, spec, P, ["01"], log_path=tmp_path / "t.preflight.log")
    assert verdict.status == "unavailable" and "did not finish within 1 s" in verdict.message
    assert not verdict.news  # a slow machine is not a missing venv: said in that run only
    runner = str(preflight.RUNNER)
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if runner in cmdline and str(tmp_path) in cmdline:
            alive.append(proc.name)
    assert not alive, f"runner processes left: {alive}"


# --------------------------------------------------------------------------- in a Dagster run


@pytest.mark.slow
def test_a_refused_preflight_fails_the_run_in_seconds_as_validation_and_starts_no_tool(
    venvs_root: Path, tmp_path: Path
) -> None:
    """The qsiprep job on a real (temporary) Dagster instance, the builtin stand-in as the tool: a subject
    whose DWI sidecar lacks PhaseEncodingDirection (the stand-in would take it) fails in the preflight,
    class validation, not retried although retries are configured, and no tool process starts; a good
    subject's run records the preflight's verdict in its metadata and provenance file."""
    import dagster as dg

    from neuroflow_dagster.bids.verdicts import save_verdict
    from neuroflow_dagster.definitions import build_definitions
    from neuroflow_dagster.discovery.identity import Registry
    from neuroflow_dagster.naming.partitions import SUBJECTS
    from neuroflow_dagster.naming.tags import FAILURE_CLASS_KEY, LOG_PATH_KEY
    from neuroflow_dagster_tests.workspace_fixtures import make_workspace

    config = make_workspace(
        tmp_path / "ws",
        mapping={},
        overrides={"pipelines": {"qsiprep": {"preflight": {"venvs_dir": str(venvs_root)}}}},
    )
    assert config.pipelines.qsiprep.retry.max_retries == 3 and config.pipelines.qsiprep.runtime == "builtin"
    shapes = {"BAD": "dwi_no_pe", "GOOD": "dwi_t1w"}
    for n, (subject, shape) in enumerate(shapes.items()):
        entry = Registry(config.paths.state).assign(f"20240101_100{n}", subject).entry
        bids_shapes.write_subject(config.paths.bids_root, entry.participant_id, [entry.session_id], shape)
        save_verdict(config.paths.state, entry.participant_id, entry.session_id, True, "valid")
    job = build_definitions(config).resolve_job_def("qsiprep_job")
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions(SUBJECTS, list(shapes))
        started = time.monotonic()
        bad = job.execute_in_process(instance=instance, partition_key="BAD", raise_on_error=False)
        seconds = time.monotonic() - started
        assert not bad.success
        failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
        data = failure.step_failure_data.user_failure_data
        assert data is not None
        meta = {k: getattr(v, "value", v) for k, v in data.metadata.items()}
        assert meta[FAILURE_CLASS_KEY] == "validation"
        assert "[validation; preflight, not started, not retried]" in (data.description or "")
        assert "sub-BAD_ses-01_dir-AP_dwi.json: no PhaseEncodingDirection" in (data.description or "")
        assert meta["preflight"]["status"] == "refused" and meta["preflight"]["qsiprep_version"] == "1.1.1"
        assert str(meta[LOG_PATH_KEY]).endswith(".preflight.log") and Path(meta[LOG_PATH_KEY]).is_file()
        assert not [e for e in bad.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        # No tool started: no tool log beside the preflight's, nothing staged or published.
        logs = sorted(p.name for p in (config.paths.log_dir / "qsiprep").iterdir())
        assert logs and all(name.endswith(".preflight.log") for name in logs), logs
        assert not (config.paths.derivatives / "qsiprep" / "sub-BAD").exists()
        staged = config.paths.derivatives / "qsiprep"
        assert not [p for p in staged.rglob("*") if p.name != ".neuroflow-staging"]  # its empty staging folder too
        assert seconds < 300, seconds  # seconds (one QSIPrep import and parse, on a loaded machine), not hours

        good = job.execute_in_process(instance=instance, partition_key="GOOD", raise_on_error=False)
        assert good.success
        mat = good.asset_materializations_for_node("qsiprep_subject")[0]
        verdict = mat.metadata["preflight"].value
        assert verdict["status"] == "ok" and verdict["details"]["processing_list"] == [["GOOD", ["01"]]]
        provenance = json.loads(Path(mat.metadata["provenance"].value).read_text())
        assert provenance["tool"]["preflight"]["status"] == "ok"
        assert provenance["tool"]["stand_in"] is True


@pytest.mark.slow
def test_cli_install_is_idempotent_and_status_names_the_venv_in_use(
    venvs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from neuroflow_dagster.cli import main

    path = tmp_path / "neuroflow.yaml"
    paths = {k: str(tmp_path / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}
    qsiprep_cfg = {"image": "pennlinc/qsiprep:26.1.1", "preflight": {"venvs_dir": str(venvs_root)}}
    path.write_text(json.dumps({"paths": paths, "pipelines": {"qsiprep": qsiprep_cfg}}))
    assert main(["--config", str(path), "preflight", "install"]) == 0  # built already: returns at once
    assert capsys.readouterr().out.split() == [str(venvs_root / "qsiprep-26.1.1")]
    assert main(["--config", str(path), "preflight", "status", "--format", "json"]) == 0
    rows = {row["qsiprep"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["26.1.1"]["used"] == "yes" and rows["1.1.1"]["used"] == "no"
    assert rows["26.1.1"]["state"] == rows["1.1.1"]["state"] == "ready"
