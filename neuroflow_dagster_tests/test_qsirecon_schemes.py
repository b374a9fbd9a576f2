"""QSIRecon per shell scheme: counting shells on real gradient tables, choosing the spec, what dipy refuses,
and the configuration errors (recon specs, atlases, datasets) that name their key at load time.

Real parts: dipy's own data files (``small_64D``: one noisy shell at b~1000; ``small_101D``: a q-space
grid) and dipy's own model constructors, the ones QSIRecon's nodes call. QSIRecon itself is not on PyPI:
its spec names, scheme table and shipped atlases are read from its 1.1.1 source into naming/qsirecon.py,
and this file holds the configuration to them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from neuroflow_dagster.cli import main
from neuroflow_dagster.config import ConfigError, NeuroflowConfig, check_paths, load_config
from neuroflow_dagster.naming import qsirecon as names
from neuroflow_dagster.scaffold import init_workspace
from neuroflow_dagster.tools import qsirecon, shells
from neuroflow_dagster_tests.test_builtin_recon import gradient_scheme, two_shell_scheme
from neuroflow_dagster_tests.test_tool_specs_argv import atlas_dataset


def dipy_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    from dipy.data import get_fnames

    _, fbval, fbvec = get_fnames(name=name)
    return np.loadtxt(fbval), np.loadtxt(fbvec)


def write_preproc(dwi: Path, bvals: np.ndarray, bvecs: np.ndarray, stem: str = "sub-01_ses-01_space-ACPC") -> Path:
    """QSIPrep's preprocessed gradient table (FSL layout) of one series."""
    dwi.mkdir(parents=True, exist_ok=True)
    bval = dwi / f"{stem}_desc-preproc_dwi.bval"
    np.savetxt(bval, np.asarray(bvals)[None], fmt="%g")
    np.savetxt(bval.with_suffix(".bvec"), np.asarray(bvecs).reshape(-1, 3).T, fmt="%.6f")
    return bval


# --------------------------------------------------------------------------- counting shells


def test_real_tables_dipy_small_64d_is_one_shell_and_small_101d_is_not_shelled() -> None:
    bvals, _ = dipy_table("small_64D")
    assert bvals.max() - bvals[bvals > 50].min() > 5  # the b-values of the one shell vary, as scanners write them
    one = shells.count_shells(bvals)
    assert (one.n_b0, len(one.shells), one.n_dw, one.scheme) == (1, 1, 64, names.SINGLE_SHELL)
    grid = shells.count_shells(dipy_table("small_101D")[0])
    assert grid.scheme == names.CARTESIAN and len(grid.shells) > np.sqrt(grid.n_dw)
    assert "b-value clusters" in grid.describe()


@pytest.mark.parametrize(
    ("bvals", "expected"),
    [
        ([0, 0] + [1000] * 30, "b=0 x2, b=1000 x30: single-shell"),
        ([5, 5, 1500], "b=0 x2, b=1500 x1: single-shell"),  # the demo's real Prisma series
        ([50, 55] + [1000] * 6, "b=0 x1, b=55 x1, b=1000 x6: multi-shell"),  # 50 is b=0, 55 is not
        ([0] + [995, 1000, 1005] * 10 + [1990, 2000, 2010] * 10, "b=0 x1, b=1000 x30, b=2000 x30: multi-shell"),
        ([0] + [1000] * 10 + [1080] * 10, "b=0 x1, b=1040 x20: single-shell"),  # within MRtrix3's epsilon of 80
        ([0] + [1000] * 10 + [1081] * 10, "b=0 x1, b=1000 x10, b=1081 x10: multi-shell"),
        ([0, 0, 0], "b=0 x3, no diffusion-weighted volume (b > 50): single-shell"),
        ([1000] * 12, "no b=0, b=1000 x12: single-shell"),
    ],
)
def test_count_shells(bvals: list[float], expected: str) -> None:
    assert shells.count_shells(bvals).describe() == expected


def test_session_series_and_scheme(tmp_path: Path) -> None:
    dwi = tmp_path / "dwi"
    single = gradient_scheme(12)
    write_preproc(dwi, *single, stem="sub-01_ses-01_acq-a_space-ACPC")
    assert shells.session_scheme(shells.session_series(dwi)) == names.SINGLE_SHELL
    write_preproc(dwi, *two_shell_scheme(12), stem="sub-01_ses-01_acq-b_space-ACPC")
    series = shells.session_series(dwi)
    assert [s.shells.scheme for s in series] == [names.SINGLE_SHELL, names.MULTI_SHELL]
    assert shells.session_scheme(series) == names.SINGLE_SHELL  # one spec for all: the one each can take
    (dwi / "sub-01_ses-01_acq-b_space-ACPC_desc-preproc_dwi.bvec").unlink()
    with pytest.raises(shells.GradientError, match=r"missing required file .*acq-b_space-ACPC_desc-preproc_dwi\.bvec"):
        shells.session_series(dwi)
    write_preproc(dwi, *single, stem="sub-01_ses-01_acq-b_space-ACPC")
    (dwi / "sub-01_ses-01_acq-b_space-ACPC_desc-preproc_dwi.bvec").write_text("0 0\n1 1\n0 0\n")
    with pytest.raises(shells.GradientError, match=r"has shape \(3, 2\), expected \(3, 13\)"):
        shells.session_series(dwi)


# --------------------------------------------------------------------------- what dipy refuses


def series_of(tmp_path: Path, bvals: np.ndarray, bvecs: np.ndarray) -> shells.Series:
    return shells.read_series(write_preproc(tmp_path / "dwi", bvals, bvecs))


def test_dki_is_refused_on_one_shell_with_dipys_own_message(tmp_path: Path) -> None:
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dki import DiffusionKurtosisModel

    bvals, bvecs = dipy_table("small_64D")
    with pytest.raises(ValueError) as dipy_says:
        DiffusionKurtosisModel(gradient_table(bvals, bvecs=bvecs, b0_threshold=50))
    s = series_of(tmp_path, bvals, bvecs)
    found = shells.model_refusals("dipy_dki", [(names.DKI, {})], [s], "sub-01 ses-01")
    assert found == [
        f"sub-01 ses-01: dipy_dki cannot reconstruct sub-01_ses-01_space-ACPC_desc-preproc_dwi.nii.gz "
        f"({s.shells.describe()}): dipy's DiffusionKurtosisModel refuses its gradient table: {dipy_says.value}"
    ]
    assert "DKI requires at least 3 b-values (which can include b=0)." in found[0]
    # Two shells: accepted.
    assert shells.model_refusals("dipy_dki", [(names.DKI, {})], [series_of(tmp_path / "ms", *two_shell_scheme())],
                                 "sub-01 ses-01") == []


def test_mapmri_and_tensor_refusals(tmp_path: Path) -> None:
    bvals, bvecs = two_shell_scheme(12)
    no_b0 = series_of(tmp_path / "a", bvals[1:], bvecs[1:])
    mapmri = shells.model_refusals("dipy_mapmri", [(names.MAPMRI, {})], [no_b0], "sub-01 ses-01")
    assert len(mapmri) == 1 and mapmri[0].endswith(
        "dipy's MapmriModel refuses its gradient table: gtab does not have any b0s, check in the gradient_table "
        "if b0_threshold needs to be increased.")
    tensor = shells.model_refusals("dsi_studio_gqi", [(names.TENSOR, {})], [no_b0], "sub-01 ses-01")
    assert tensor == ["sub-01 ses-01 has no b=0 volume (b <= 50); the tensor model needs one "
                      "(sub-01_ses-01_space-ACPC_desc-preproc_dwi.nii.gz)"]
    five = series_of(tmp_path / "b", *gradient_scheme(5))
    assert shells.model_refusals("ss3t_fod_autotrack", [(names.TENSOR, {})], [five], "sub-01 ses-01") == [
        "sub-01 ses-01 has 5 diffusion direction(s); the tensor model needs at least 6 "
        "(sub-01_ses-01_space-ACPC_desc-preproc_dwi.nii.gz)"]
    six = series_of(tmp_path / "c", *gradient_scheme(6))
    assert shells.model_refusals("ss3t_fod_autotrack", [(names.TENSOR, {})], [six], "sub-01 ses-01") == []


def test_a_spec_file_is_checked_by_its_nodes(tmp_path: Path) -> None:
    spec = tmp_path / "dki_and_export.yaml"
    spec.write_text(yaml.safe_dump({"name": "site", "nodes": [
        {"action": "DKI_reconstruction", "name": "dki", "software": "Dipy", "input": "qsirecon"},
        {"action": "export", "name": "x", "software": "DSI Studio", "input": "dki"},
        {"action": "csd", "name": "c", "software": "MRTrix3", "input": "qsirecon"}]}))
    assert [m for m, _ in qsirecon.spec_models(str(spec))] == [names.DKI, names.TENSOR]
    assert qsirecon.spec_models("dipy_dki") == [(names.DKI, {})]
    assert qsirecon.spec_models("mrtrix_singleshell_ss3t_noACT") == []  # MRtrix3, not dipy: nothing to check here


# --------------------------------------------------------------------------- choosing the spec


def make_config(tmp_path: Path, **qsirecon_cfg: object) -> NeuroflowConfig:
    paths = {k: str(tmp_path / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}
    return NeuroflowConfig.model_validate({"paths": paths, "pipelines": {"qsirecon": qsirecon_cfg}})


def test_plan_picks_the_spec_of_the_scheme_or_none(tmp_path: Path) -> None:
    dwi = tmp_path / "derivatives/qsiprep/sub-01/ses-01/dwi"
    write_preproc(dwi, *gradient_scheme(30))
    plan = qsirecon.plan_session(make_config(tmp_path), "01", "01")
    assert (plan.scheme, plan.spec) == (names.SINGLE_SHELL, "ss3t_fod_autotrack")
    assert qsirecon.refusals(plan) == []
    off = qsirecon.plan_session(make_config(tmp_path, recon_specs={"single_shell": None}), "01", "01")
    assert off.spec is None and qsirecon.refusals(off) == []
    assert off.reason == ("sub-01 ses-01 is single-shell (b=0 x1, b=994 x30: single-shell) and "
                          "pipelines.qsirecon.recon_specs.single_shell is not set: no reconstruction for that scheme")
    write_preproc(dwi, *two_shell_scheme(), stem="sub-01_ses-01_space-ACPC")
    multi = qsirecon.plan_session(make_config(tmp_path), "01", "01")
    assert (multi.scheme, multi.spec) == (names.MULTI_SHELL, "dipy_dki")


# --------------------------------------------------------------------------- the configuration


def test_defaults_name_only_what_qsirecon_ships_and_accepts() -> None:
    cfg = make_config(Path("/x")).pipelines.qsirecon
    assert set(cfg.atlases) <= set(names.SHIPPED_ATLASES) and "Schaefer2018N100n7Tian2020S1" not in cfg.atlases
    for scheme, spec in cfg.recon_specs.named().items():
        builtin = names.BUILTIN_SPECS[spec]
        assert scheme in builtin.schemes and not builtin.needs_fs_subjects_dir and builtin.scalar_maps
    assert set(cfg.recon_specs.named()) == set(names.SCHEMES)
    assert names.SHIPPED_ATLASES[-1] == "4S1056Parcels" and len(names.SHIPPED_ATLASES) == 14


def test_init_template_names_only_what_the_real_tools_ship(tmp_path: Path) -> None:
    config = load_config(init_workspace(tmp_path / "ws"), environ={})
    cfg = config.pipelines.qsirecon
    raw = yaml.safe_load((tmp_path / "ws" / "neuroflow.yaml").read_text())["pipelines"]["qsirecon"]
    assert "recon_spec" not in raw and set(raw["recon_specs"]) == set(names.SCHEMES)
    assert set(raw["atlases"]) <= set(names.SHIPPED_ATLASES)
    assert all(v in names.BUILTIN_SPECS for v in cfg.recon_specs.named().values())


def config_error(tmp_path: Path, qsirecon_block: dict, environ: dict | None = None) -> str:
    path = init_workspace(tmp_path / "ws")
    raw = yaml.safe_load(path.read_text())
    raw["pipelines"]["qsirecon"] = {**{k: v for k, v in raw["pipelines"]["qsirecon"].items()
                                       if k not in qsirecon_block and not (k == "recon_specs" and
                                                                            "recon_spec" in qsirecon_block)},
                                    **qsirecon_block}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path, environ=environ or {})
    return str(err.value)


def test_an_atlas_qsirecon_does_not_ship_is_a_config_error_at_load(tmp_path: Path, capsys) -> None:
    text = config_error(tmp_path, {"atlases": ["4S156Parcels", "Schaefer2018N100n7Tian2020S1"]})
    assert "pipelines.qsirecon.atlases:" in text
    assert "Schaefer2018N100n7Tian2020S1 is neither an atlas QSIRecon 1.1.1 ships" in text
    assert "pipelines.qsirecon.datasets (none configured)" in text
    path = tmp_path / "ws" / "neuroflow.yaml"
    assert main(["--config", str(path), "config", "validate"]) == 2  # the operator's exit code for it
    assert "pipelines.qsirecon.atlases" in capsys.readouterr().err
    assert "listed twice" in config_error(tmp_path / "b", {"atlases": ["AAL116", "AAL116"]})
    assert "letters and digits only" in config_error(tmp_path / "c", {"atlases": ["../x"]})


def test_a_site_atlas_comes_in_through_a_dataset(tmp_path: Path) -> None:
    site = atlas_dataset(tmp_path / "ws" / "site_atlases", "Site")
    path = init_workspace(tmp_path / "ws")
    raw = yaml.safe_load(path.read_text())
    raw["pipelines"]["qsirecon"].update({"atlases": ["AAL116", "Site"], "datasets": {"site": "site_atlases"}})
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, environ={}).pipelines.qsirecon
    assert cfg.datasets == {"site": site.resolve()}  # relative to the config file's folder
    assert cfg.atlases == ["AAL116", "Site"]
    block = {"datasets": {"site": str(site)}}
    text = config_error(tmp_path / "b", {**block, "atlases": ["Other"]})
    assert "pipelines.qsirecon.atlases" in text and f"site ({site})" in text
    (site / "atlas-AAL116").mkdir()
    (site / "atlas-AAL116/atlas-AAL116_space-MNI152NLin2009cAsym_dseg.nii.gz").write_bytes(b"x")
    (site / "atlas-AAL116/atlas-AAL116_dseg.tsv").write_text("index\tlabel\n")
    assert "AAL116 is shipped with QSIRecon and also in dataset site" in config_error(
        tmp_path / "c", {**block, "atlases": ["AAL116"]})
    other = atlas_dataset(tmp_path / "other", "Site")
    assert "Site is in datasets other, site" in config_error(  # (yaml.safe_dump sorts the keys)
        tmp_path / "d", {"datasets": {"site": str(site), "other": str(other)}, "atlases": ["Site"]})


@pytest.mark.parametrize(
    ("datasets", "named"),
    [
        ({"qsireconatlases": "SITE"}, "QSIRecon's own atlases (AAL116, ...) go by that name"),
        ({"preprocessed": "SITE"}, "QSIRecon reserves it for its input"),
        ({"a=b": "SITE"}, "a dataset name is letters, digits"),
        ({"site": "MISSING"}, "does not exist or is not a folder"),
        ({"site": "DERIV"}, "QSIRecon skips every dataset that is not DatasetType 'atlas'"),
    ],
)
def test_bad_datasets_are_named(tmp_path: Path, datasets: dict[str, str], named: str) -> None:
    site = atlas_dataset(tmp_path / "site")
    deriv = tmp_path / "deriv"
    deriv.mkdir()
    (deriv / "dataset_description.json").write_text('{"DatasetType": "derivative"}')
    where = {"SITE": str(site), "MISSING": str(tmp_path / "nope"), "DERIV": str(deriv)}
    text = config_error(tmp_path / "ws0", {"datasets": {k: where[v] for k, v in datasets.items()}})
    assert "pipelines.qsirecon.datasets:" in text and named in text


@pytest.mark.parametrize(
    ("block", "named"),
    [
        ({"recon_specs": {"single_shell": "dipy_dki"}},
         "pipelines.qsirecon.recon_specs.single_shell: Value error, QSIRecon's documentation lists dipy_dki for "
         "multi-shell data only"),
        ({"recon_specs": {"multi_shell": "dipy_dti"}},
         "pipelines.qsirecon.recon_specs.multi_shell: Value error, 'dipy_dti' is neither a built-in recon spec"),
        ({"runtime": "docker", "recon_specs": {"multi_shell": "mrtrix_multishell_msmt_ACT-hsvs"}},
         "pipelines.qsirecon.recon_specs.multi_shell: mrtrix_multishell_msmt_ACT-hsvs needs FreeSurfer outputs"),
        ({"runtime": "docker", "atlases": [], "recon_specs": {"cartesian": "dsi_studio_gqi"}},
         "pipelines.qsirecon.recon_specs.cartesian: dsi_studio_gqi builds connectivity matrices, which QSIRecon "
         "refuses without atlases"),
        ({"recon_specs": {"multi_shell": "amico_noddi"}},
         "pipelines.qsirecon.recon_specs.multi_shell: amico_noddi cannot run on the built-in stand-in"),
        ({"recon_specs": {"multi_shell": "site_spec.yaml"}},
         "site_spec.yaml cannot run on the built-in stand-in"),
        ({"runtime": "docker", "atlas_file": "atlas.nii.gz", "atlas_labels": "atlas.tsv"},
         "pipelines.qsirecon.atlas_file: the built-in stand-in's atlas"),
        ({"recon_spec": "dipy_dki", "recon_specs": {"multi_shell": "dipy_dki"}},
         "recon_spec and recon_specs are both set"),
        ({"recon_spec": "dipy_dti"}, "recon_spec: 'dipy_dti' is neither a built-in recon spec"),
    ],
)
def test_recon_spec_errors_name_the_key(tmp_path: Path, block: dict, named: str) -> None:
    assert named in config_error(tmp_path, block)


def test_the_old_recon_spec_key_is_read_per_scheme(tmp_path: Path) -> None:
    path = init_workspace(tmp_path / "ws")
    raw = yaml.safe_load(path.read_text())
    del raw["pipelines"]["qsirecon"]["recon_specs"]
    raw["pipelines"]["qsirecon"]["recon_spec"] = "dipy_dki"  # what `neuroflow init` wrote before
    path.write_text(yaml.safe_dump(raw))
    specs = load_config(path, environ={}).pipelines.qsirecon.recon_specs
    # dipy_dki only for multi-shell data; the single-shell sessions it used to fail get their default.
    assert specs.named() == {"single_shell": "ss3t_fod_autotrack", "multi_shell": "dipy_dki",
                             "cartesian": "dsi_studio_gqi"}
    env = {"NEUROFLOW_PIPELINES__QSIRECON__RUNTIME": "docker",
           "NEUROFLOW_PIPELINES__QSIRECON__RECON_SPEC": "my_spec.yaml"}
    specs = load_config(path, environ=env).pipelines.qsirecon.recon_specs
    assert set(specs.named().values()) == {str((tmp_path / "ws" / "my_spec.yaml").resolve())}  # a file: every scheme
    specs = load_config(path, environ={"NEUROFLOW_PIPELINES__QSIRECON__RECON_SPEC": "dsi_studio_gqi"}).pipelines
    assert specs.qsirecon.recon_specs.named() == dict.fromkeys(names.SCHEMES, "dsi_studio_gqi")


def test_a_spec_file_that_is_missing_is_a_start_up_problem(tmp_path: Path) -> None:
    path = init_workspace(tmp_path / "ws")
    env = {"NEUROFLOW_PIPELINES__QSIRECON__RUNTIME": "docker",
           "NEUROFLOW_PIPELINES__QSIRECON__RECON_SPECS__MULTI_SHELL": "specs/site.yaml"}
    config = load_config(path, environ=env)
    site = (tmp_path / "ws" / "specs" / "site.yaml").resolve()
    assert config.pipelines.qsirecon.recon_specs.multi_shell == str(site)  # relative to the config file
    assert f"pipelines.qsirecon.recon_specs.multi_shell: {site} does not exist" in check_paths(config)
    site.parent.mkdir()
    site.write_text("name: site\nnodes: []\n")
    assert not [p for p in check_paths(config) if "recon_specs" in p]
