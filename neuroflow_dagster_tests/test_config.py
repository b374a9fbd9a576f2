"""Configuration: search order, env overrides, and errors that name the key and the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neuroflow_dagster.cli import main
from neuroflow_dagster.config import ConfigError, check_paths, find_config_file, load_config
from neuroflow_dagster.scaffold import init_workspace


def test_init_writes_a_config_that_validates(tmp_path: Path) -> None:
    path = init_workspace(tmp_path / "ws")
    config = load_config(path, environ={})
    assert config.paths.dicom_incoming == (tmp_path / "ws" / "incoming").resolve()
    assert config.discovery.stability_wait_minutes == 180
    assert config.pipelines.qsiprep.max_concurrent == 1
    assert config.pipelines.bids_conversion.heuristic == "neuroflow_default"
    assert check_paths(config) == []


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = init_workspace(tmp_path / "ws")
    monkeypatch.chdir(tmp_path)
    config = load_config(path, environ={})
    assert config.paths.bids_root == (tmp_path / "ws" / "bids").resolve()


def test_unknown_key_is_named_with_the_file(tmp_path: Path) -> None:
    path = init_workspace(tmp_path)
    path.write_text(path.read_text().replace("stability_wait_minutes:", "stability_wait_minuts:"))
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert "discovery.stability_wait_minuts: unknown key" in str(err.value)
    assert str(path) in str(err.value)


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "neuroflow.yaml"
    path.write_text("paths:\n  dicom_incoming: in\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert "paths.bids_root: required key is missing" in str(err.value)


def test_bad_value_is_named(tmp_path: Path) -> None:
    path = init_workspace(tmp_path)
    path.write_text(path.read_text().replace("layout: flat", "layout: sideways"))
    with pytest.raises(ConfigError, match=r"discovery\.layout"):
        load_config(path, environ={})


def test_bad_regex_is_named(tmp_path: Path) -> None:
    path = init_workspace(tmp_path)
    path.write_text(path.read_text().replace('".*DTI.*|.*DWI.*|.*diffusion.*"', '"(unclosed"'))
    with pytest.raises(ConfigError, match=r"protocol\.optional_scans\.0\.series_description_pattern"):
        load_config(path, environ={})


def test_env_overrides_every_level(tmp_path: Path) -> None:
    path = init_workspace(tmp_path)
    env = {
        "NEUROFLOW_DISCOVERY__STABILITY_WAIT_MINUTES": "30",
        "NEUROFLOW_PIPELINES__QSIPREP__RUNTIME": "docker",
        "NEUROFLOW_PIPELINES__QSIPREP__REQUIRES_BIDS_SUFFIXES": "[dwi, T1w]",
        "NEUROFLOW_MAPPING__GOOGLE_SHEET__SPREADSHEET_KEY": "abc",
        "NEUROFLOW_MAPPING__GOOGLE_SHEET__SERVICE_ACCOUNT_FILE": "sa.json",
    }
    config = load_config(path, environ=env)
    assert config.discovery.stability_wait_minutes == 30
    assert config.pipelines.qsiprep.runtime == "docker"
    assert config.pipelines.qsiprep.requires_bids_suffixes == ["dwi", "T1w"]
    assert config.mapping.google_sheet is not None
    assert config.mapping.google_sheet.worksheet_name == "Sheet1"
    assert config.mapping.google_sheet.service_account_file == (tmp_path / "sa.json").resolve()


def test_env_override_with_a_typo_is_an_error_naming_it(tmp_path: Path) -> None:
    path = init_workspace(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={"NEUROFLOW_DISCOVERY__INTERVAL_SECOND": "5"})
    assert "discovery.interval_second: unknown key" in str(err.value)
    assert "environment overrides" in str(err.value)


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = init_workspace(tmp_path / "a")
    b = init_workspace(tmp_path / "b")
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.delenv("NEUROFLOW_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert find_config_file() == Path("neuroflow.yaml").resolve() == a
    monkeypatch.setenv("NEUROFLOW_CONFIG", str(b))
    assert find_config_file() == b
    assert find_config_file(a) == a
    with pytest.raises(ConfigError, match="given with --config"):
        find_config_file(tmp_path / "nope.yaml")


def test_no_config_anywhere_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEUROFLOW_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    if Path("/etc/neuroflow/neuroflow.yaml").exists():
        pytest.skip("a system-wide config exists on this machine")
    with pytest.raises(ConfigError, match="neuroflow init"):
        find_config_file()


def test_check_paths_reports_each_problem(tmp_path: Path) -> None:
    path = init_workspace(tmp_path)
    (tmp_path / "incoming").rmdir()
    (tmp_path / "mapping.csv").unlink()
    problems = check_paths(load_config(path, environ={}))
    assert any(p.startswith("paths.dicom_incoming:") for p in problems)
    assert any(p.startswith("mapping.csv_file:") for p in problems)


@pytest.mark.parametrize(("key", "value", "words"), [
    ("ANAT_MODALITY", "T1", "Input should be 'T1w', 'T2w' or 'none'"),
    ("SUBJECT_ANATOMICAL_REFERENCE", "first-alphabetically", "'first-lex', 'unbiased' or 'sessionwise'"),
    ("OUTPUT_RESOLUTION", "fine", "give a voxel size in mm (e.g. 1.6) or auto"),
    ("OUTPUT_RESOLUTION", "0", "give a voxel size in mm"),
    ("OUTPUT_RESOLUTION", "true", "give a voxel size in mm"),
    ("ANATOMICAL_TEMPLATE", "[MNI152NLin6Asym]", "QSIPrep accepts exactly one template, MNI152NLin2009cAsym"),
])
def test_qsiprep_keys_are_checked_at_load_naming_the_key(tmp_path: Path, key: str, value: str, words: str) -> None:
    """QSIPrep's own choices (its parser, 1.1.1 to 26.1.1), refused at start, not hours into a run."""
    path = init_workspace(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={f"NEUROFLOW_PIPELINES__QSIPREP__{key}": value})
    assert f"pipelines.qsiprep.{key.lower()}: " in str(err.value) and words in str(err.value)


def test_qsiprep_defaults_and_accepted_values(tmp_path: Path) -> None:
    path = init_workspace(tmp_path)
    qsiprep = load_config(path, environ={}).pipelines.qsiprep
    assert (qsiprep.output_resolution, qsiprep.anat_modality, qsiprep.subject_anatomical_reference) == (
        "auto", "T1w", "unbiased")
    for value, expected in (("AUTO", "auto"), ("1.25", 1.25), ("2", 2.0)):
        env = {"NEUROFLOW_PIPELINES__QSIPREP__OUTPUT_RESOLUTION": value}
        assert load_config(path, environ=env).pipelines.qsiprep.output_resolution == expected
    env = {"NEUROFLOW_PIPELINES__QSIPREP__ANAT_MODALITY": "none",
           "NEUROFLOW_PIPELINES__QSIPREP__SUBJECT_ANATOMICAL_REFERENCE": "sessionwise"}
    qsiprep = load_config(path, environ=env).pipelines.qsiprep
    assert qsiprep.anat_modality == "none" and qsiprep.sessionwise


def test_the_freesurfer_licence_is_required_only_by_qsiprep_before_26_1(tmp_path: Path) -> None:
    path = init_workspace(tmp_path)

    def licence_problems(image: str) -> list[str]:
        env = {"NEUROFLOW_PIPELINES__QSIPREP__RUNTIME": "docker", "NEUROFLOW_PIPELINES__QSIPREP__IMAGE": image}
        return [p for p in check_paths(load_config(path, environ=env)) if "fs_license" in p]

    required = "pipelines.qsiprep.fs_license: required when runtime is docker"
    assert licence_problems("pennlinc/qsiprep:1.1.1") == [required]
    assert licence_problems("pennlinc/qsiprep:26.0.0") != []  # 26.0.0 still has --fs-license-file
    assert licence_problems("pennlinc/qsiprep:26.1.1") == []


def test_templateflow_home_is_checked_at_start(tmp_path: Path) -> None:
    path = init_workspace(tmp_path)

    def problems(**env: str) -> list[str]:
        environ = {f"NEUROFLOW_{k}": v for k, v in env.items()}
        return [p for p in check_paths(load_config(path, environ=environ)) if p.startswith("paths.templateflow_home")]

    assert problems() == []  # the stand-ins need no templates
    assert problems(PIPELINES__QSIPREP__RUNTIME="docker") == []  # docker: the images' own templates
    (required,) = problems(PIPELINES__QSIPREP__RUNTIME="slurm", PIPELINES__QSIPREP__SLURM__INSIDE="apptainer",
                           PIPELINES__QSIRECON__RUNTIME="apptainer")
    assert "required when pipelines.qsiprep, pipelines.qsirecon runs in apptainer" in required
    assert "docs/deployment.md" in required
    tf = tmp_path / "templateflow"
    (missing,) = problems(PATHS__TEMPLATEFLOW_HOME=str(tf))
    assert "does not exist or is not a folder" in missing
    tf.mkdir()
    assert problems(PATHS__TEMPLATEFLOW_HOME=str(tf)) == []  # only stand-ins: nothing is fetched
    (lacking,) = problems(PATHS__TEMPLATEFLOW_HOME=str(tf), PIPELINES__QSIPREP__RUNTIME="apptainer")
    assert "tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz" in lacking
    assert "tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_desc-brain_mask.nii.gz" in lacking
    tpl = tf / "tpl-MNI152NLin2009cAsym"
    tpl.mkdir()
    for name in ("res-01_T1w", "res-01_desc-brain_mask"):
        (tpl / f"tpl-MNI152NLin2009cAsym_{name}.nii.gz").write_bytes(b"x")
    assert problems(PATHS__TEMPLATEFLOW_HOME=str(tf), PIPELINES__QSIPREP__RUNTIME="apptainer") == []
    (t2w,) = problems(PATHS__TEMPLATEFLOW_HOME=str(tf), PIPELINES__QSIPREP__RUNTIME="docker",
                      PIPELINES__QSIPREP__ANAT_MODALITY="T2w")
    assert t2w.endswith("lacks tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_T2w.nii.gz (bound read-only, "
                        "so the tools cannot download them); pre-fetch them as docs/deployment.md "
                        '("TemplateFlow") shows')


def test_cli_config_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = init_workspace(tmp_path)
    assert main(["--config", str(path), "config", "validate"]) == 0
    path.write_text(path.read_text() + "\nbogus_section: {}\n")
    assert main(["--config", str(path), "config", "validate"]) == 2
    assert "bogus_section: unknown key" in capsys.readouterr().err
    assert main(["config", "frobnicate"]) == 5


def _keys(model: type, prefix: str = "") -> list[str]:
    import typing

    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        if name == "source":
            continue
        ann = field.annotation
        subs = [a for a in (*typing.get_args(ann), ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if subs and typing.get_origin(ann) is dict:  # a mapping of named entries: qc.metrics.<measure>.fail_below
            out.extend(_keys(subs[0], f"{prefix}{name}.<measure>."))
        elif subs and typing.get_origin(ann) is not list:
            out.extend(_keys(subs[0], f"{prefix}{name}."))
        else:
            out.append(f"{prefix}{name}")
    return out


def test_every_config_key_is_documented() -> None:
    """docs/configuration.md stays true to the model: each leaf key is named there."""
    from neuroflow_dagster.config import NeuroflowConfig

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    generic = {
        "runtime",
        "image",
        "max_concurrent",
        "soft_timeout_minutes",
        "timeout_minutes",
        "cpus",
        "memory_mb",
        "user",
        "requires_bids_suffixes",
        "retry.max_retries",
        "retry.delay_seconds",
        "retry.max_delay_seconds",
        "retry.jitter",
        *(f"slurm.{key}" for key in ("inside", "partition", "account", "qos", "time_limit_minutes", "mem_mb",
                                     "cpus", "extra_args", "apptainer", "binds", "poll_seconds")),
    }
    missing = []
    for key in _keys(NeuroflowConfig):
        stage_key = key.split(".", 2)[2] if key.startswith("pipelines.") else None
        if stage_key in generic:
            if f"`{stage_key}`" not in doc:
                missing.append(key)
        elif f"`{key}`" not in doc:
            missing.append(key)
    assert missing == []


def _with_overrides(tmp_path: Path, block: str) -> Path:
    path = init_workspace(tmp_path)
    text = path.read_text()
    assert "  label_overrides: {}\n" in text
    path.write_text(text.replace("  label_overrides: {}\n", block))
    return path


def test_label_overrides_are_read_and_keyed_as_written(tmp_path: Path) -> None:
    path = _with_overrides(tmp_path, '  label_overrides:\n    "CLML01": "CLML01B"\n    "075": "P75"\n')
    config = load_config(path, environ={})
    assert config.mapping.label_overrides == {"CLML01": "CLML01B", "075": "P75"}


@pytest.mark.parametrize(
    ("block", "named"),
    [
        ('    "CLM_L_01": "CLM-01"\n', r"'CLM_L_01': label 'CLM-01' is not a valid BIDS label"),
        ('    "A1": "X1"\n    "B1": "x1"\n', r"'B1': label 'x1' is also given to 'A1'"),
        ('    "75": "P1"\n    "0075": "P2"\n', r"'0075' and '75' are the same SubjectCode"),
        ("    0075: P1\n", r"61: 61 is not text; quote SubjectCodes"),
        ('    "": P1\n', r"an empty SubjectCode"),
    ],
)
def test_bad_label_overrides_are_named(tmp_path: Path, block: str, named: str) -> None:
    path = _with_overrides(tmp_path, "  label_overrides:\n" + block)
    with pytest.raises(ConfigError, match=r"mapping\.label_overrides") as info:
        load_config(path, environ={})
    assert re.search(named, str(info.value)), str(info.value)
