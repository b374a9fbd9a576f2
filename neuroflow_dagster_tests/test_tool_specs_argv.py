"""Exact command lines, mounts and golden outputs of the QSIPrep / QSIRecon / QSIParc specs.

The argv lists below are written out in full on purpose: a changed option,
order or path shows up as a diff here. That the real tools accept these
command lines is checked by test_tool_specs_parsers.py against their own
parsers; these tests pin down what we generate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.tools import layout, qsiparc, qsiprep, qsirecon
from neuroflow_dagster.tools.layout import SpecError
from neuroflow_dagster.tools.spec import Mount

PY = sys.executable


def make_config(tmp_path: Path, **pipelines: dict) -> NeuroflowConfig:
    """A config whose QSIPrep resolution is a number (``auto`` reads the DWI headers: tested on its own)."""
    paths = {k: str(tmp_path / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}
    pipelines = {**pipelines, "qsiprep": {"output_resolution": 1.6, **pipelines.get("qsiprep", {})}}
    return NeuroflowConfig.model_validate({"paths": paths, "pipelines": pipelines})


@pytest.fixture
def license_file(tmp_path: Path) -> Path:
    path = tmp_path / "fs" / "license.txt"
    path.parent.mkdir()
    path.write_text("license\n")
    return path


# --------------------------------------------------------------------------- QSIPrep


def test_qsiprep_local_argv(tmp_path: Path, license_file: Path) -> None:
    config = make_config(tmp_path, qsiprep={
        "runtime": "local", "fs_license": str(license_file), "omp_nthreads": 4, "denoise_method": "patch2self",
        "unringing_method": "mrdegibbs", "hmc_model": "eddy", "extra_args": ["--b0-threshold", "50"],
    })  # fmt: skip
    spec = qsiprep.build_spec(config, "0075", ["02", "01"])
    t = str(tmp_path)
    assert spec.argv == (
        "qsiprep", f"{t}/bids_root", f"{t}/derivatives/qsiprep", "participant",
        "--participant-label", "0075",
        "--session-id", "01", "02",
        "--bids-filter-file", f"{t}/work_dir/qsiprep/sub-0075_bids_filter.json",
        "--output-resolution", "1.6",
        "--anatomical-template", "MNI152NLin2009cAsym",
        "--anat-modality", "T1w",
        "--subject-anatomical-reference", "unbiased",
        "--skip-bids-validation",
        "--denoise-method", "patch2self",
        "--unringing-method", "mrdegibbs",
        "--hmc-model", "eddy",
        "--nprocs", "8", "--omp-nthreads", "4", "--mem-mb", "16000",
        "-w", f"{t}/work_dir/qsiprep/sub-0075",
        "--fs-license-file", str(license_file),
        "--notrack",
        "--b0-threshold", "50",
    )  # fmt: skip
    # Local: the mounts are identity entries, for the record.
    assert all(m.container == m.host.as_posix() for m in spec.mounts)
    assert {m.container: m.read_only for m in spec.mounts} == {
        f"{t}/bids_root": True, f"{t}/derivatives/qsiprep": False,
        f"{t}/work_dir/qsiprep/sub-0075_bids_filter.json": True,
        f"{t}/work_dir/qsiprep/sub-0075": False, str(license_file): True,
    }  # fmt: skip
    assert spec.image == "pennlinc/qsiprep:1.1.1" and not spec.stand_in
    assert spec.workdir == tmp_path / "work_dir" / "qsiprep" / "sub-0075" and spec.workdir.is_dir()
    assert spec.output_dir == tmp_path / "derivatives" / "qsiprep" and spec.output_dir.is_dir()
    assert spec.nprocs == 8 and spec.mem_mb == 16000
    assert spec.env == {"NIPYPE_NO_ET": "1", "NO_ET": "1"}


def test_qsiprep_docker_argv_and_mounts(tmp_path: Path, license_file: Path) -> None:
    config = make_config(tmp_path, qsiprep={"runtime": "docker", "fs_license": str(license_file)})
    spec = qsiprep.build_spec(config, "0075", ["01", "02"])
    assert spec.argv == (
        "qsiprep", "/data/bids", "/out", "participant",
        "--participant-label", "0075",
        "--session-id", "01", "02",
        "--bids-filter-file", "/neuroflow/bids_filter.json",
        "--output-resolution", "1.6",
        "--anatomical-template", "MNI152NLin2009cAsym",
        "--anat-modality", "T1w",
        "--subject-anatomical-reference", "unbiased",
        "--skip-bids-validation",
        "--nprocs", "8", "--mem-mb", "16000",
        "-w", "/work",
        "--fs-license-file", "/opt/freesurfer/license.txt",
        "--notrack",
    )  # fmt: skip
    assert spec.mounts == (
        Mount(tmp_path / "bids_root", "/data/bids", True),
        Mount(tmp_path / "derivatives" / "qsiprep", "/out", False),
        Mount(tmp_path / "work_dir" / "qsiprep" / "sub-0075_bids_filter.json", "/neuroflow/bids_filter.json", True),
        Mount(tmp_path / "work_dir" / "qsiprep" / "sub-0075", "/work", False),
        Mount(license_file, "/opt/freesurfer/license.txt", True),
    )
    assert spec.workdir == Path("/work") and spec.image == "pennlinc/qsiprep:1.1.1"
    # Apptainer sees the same container paths.
    apptainer = qsiprep.build_spec(
        make_config(tmp_path, qsiprep={"runtime": "apptainer", "fs_license": str(license_file)}), "0075", ["01", "02"]
    )
    assert apptainer.argv == spec.argv and apptainer.mounts == spec.mounts


def test_qsiprep_26_dialect(tmp_path: Path, license_file: Path) -> None:
    """QSIPrep 26 renamed --session-id/--hmc-model and has no --fs-license-file (checked on its parser)."""
    config = make_config(tmp_path, qsiprep={
        "runtime": "docker", "image": "pennlinc/qsiprep:26.1.1", "fs_license": str(license_file), "hmc_model": "eddy",
    })  # fmt: skip
    spec = qsiprep.build_spec(config, "0075", ["01"])
    assert spec.argv == (
        "qsiprep", "/data/bids", "/out", "participant",
        "--participant-label", "0075",
        "--session-label", "01",
        "--bids-filter-file", "/neuroflow/bids_filter.json",
        "--output-resolution", "1.6",
        "--anatomical-template", "MNI152NLin2009cAsym",
        "--anat-modality", "T1w",
        "--subject-anatomical-reference", "unbiased",
        "--skip-bids-validation",
        "--hmc-method", "eddy",
        "--nprocs", "8", "--mem-mb", "16000",
        "-w", "/work",
        "--notrack",
    )  # fmt: skip
    assert "/opt/freesurfer/license.txt" not in {m.container for m in spec.mounts}
    # 26.x needs no FreeSurfer licence, so docker without one is fine there ...
    qsiprep.build_spec(
        make_config(tmp_path, qsiprep={"runtime": "docker", "image": "pennlinc/qsiprep:26.1.1"}), "0075", ["01"]
    )
    # ... but not for 1.x.
    with pytest.raises(SpecError, match=r"pipelines\.qsiprep\.fs_license: required when runtime is docker"):
        qsiprep.build_spec(make_config(tmp_path, qsiprep={"runtime": "docker"}), "0075", ["01"])


def test_qsiprep_builtin_stand_in(tmp_path: Path) -> None:
    spec = qsiprep.build_spec(make_config(tmp_path, qsiprep={"runtime": "builtin", "nprocs": 2}), "0075", ["02", "01"])
    t = str(tmp_path)
    assert spec.argv == (
        PY, "-m", "neuroflow_dagster.tools.builtin.preproc",
        "--bids-dir", f"{t}/bids_root",
        "--output-dir", f"{t}/derivatives/qsiprep",
        "--participant-label", "0075",
        "--session-label", "01", "02",
        "--work-dir", f"{t}/work_dir/qsiprep/sub-0075",
        "--nprocs", "2", "--anat-modality", "T1w", "--subject-anatomical-reference", "unbiased",
    )  # fmt: skip
    assert spec.stand_in and spec.image is None
    assert all(m.container == m.host.as_posix() for m in spec.mounts)
    assert spec.outputs == qsiprep.golden_outputs("0075", ["01", "02"])


def test_qsiprep_golden_outputs_and_filter_file(tmp_path: Path) -> None:
    assert qsiprep.golden_outputs("0075", ["01"]) == (
        "dataset_description.json",
        "sub-0075.html",
        "sub-0075/ses-01/dwi/sub-0075_ses-01_*space-ACPC_desc-preproc_dwi.nii.gz",
        "sub-0075/ses-01/dwi/sub-0075_ses-01_*space-ACPC_desc-preproc_dwi.bval",
        "sub-0075/ses-01/dwi/sub-0075_ses-01_*space-ACPC_desc-preproc_dwi.bvec",
        "sub-0075/ses-01/dwi/sub-0075_ses-01_*space-ACPC_desc-brain_mask.nii.gz",
    )
    config = make_config(tmp_path, qsiprep={"runtime": "local", "bids_filters": {"t1w": {"reconstruction": None}}})
    spec = qsiprep.build_spec(config, "0075", ["02", "01"])
    path = qsiprep.bids_filter_path(config, "0075")
    assert json.loads(path.read_text()) == {
        "dwi": {"session": ["01", "02"]},
        "fmap": {"session": ["01", "02"]},
        "roi": {"session": ["01", "02"]},
        "t1w": {"reconstruction": None, "session": ["01", "02"]},
        "t2w": {"session": ["01", "02"]},
    }
    # Unchanged content is not rewritten; changed sessions are.
    os.utime(path, (1, 1))
    qsiprep.build_spec(config, "0075", ["01", "02"])
    assert path.stat().st_mtime == 1
    qsiprep.build_spec(config, "0075", ["01"])
    assert json.loads(path.read_text())["dwi"] == {"session": ["01"]}
    # A real run tree with the QSIPrep 1.1.1 names satisfies the golden list; a missing bvec does not.
    out = spec.output_dir
    for rel in ("dataset_description.json", "sub-0075.html"):
        (out / rel).write_text("{}")
    for ses in ("01", "02"):
        dwi = out / f"sub-0075/ses-{ses}/dwi"
        dwi.mkdir(parents=True)
        for suffix in ("desc-preproc_dwi.nii.gz", "desc-preproc_dwi.bval", "desc-preproc_dwi.bvec",
                       "desc-brain_mask.nii.gz"):
            (dwi / f"sub-0075_ses-{ses}_acq-realistic_space-ACPC_{suffix}").write_text("x")
    assert spec.missing_outputs() == []
    (out / "sub-0075/ses-02/dwi/sub-0075_ses-02_acq-realistic_space-ACPC_desc-preproc_dwi.bvec").unlink()
    assert spec.missing_outputs() == ["sub-0075/ses-02/dwi/sub-0075_ses-02_*space-ACPC_desc-preproc_dwi.bvec"]


def test_qsiprep_refuses_bad_configuration(tmp_path: Path, license_file: Path) -> None:
    def build(sessions: list[str] = ["01"], **cfg: object) -> None:  # noqa: B006
        qsiprep.build_spec(make_config(tmp_path, qsiprep={"runtime": "local", **cfg}), "0075", sessions)

    with pytest.raises(SpecError, match=r"bids_filters\.dwi\.session: sessions are chosen per run"):
        build(bids_filters={"dwi": {"session": "01"}})
    with pytest.raises(SpecError, match=r"bids_filters\.t1w: must be a mapping"):
        build(bids_filters={"t1w": "autobox"})
    with pytest.raises(SpecError, match="non-empty list"):
        build(sessions=[])
    with pytest.raises(SpecError, match="non-empty list"):
        build(sessions="01")  # a string is not a list of sessions
    with pytest.raises(SpecError, match="repeat"):
        build(sessions=["01", "01"])
    with pytest.raises(SpecError, match=r"pipelines\.qsiprep\.image: required when runtime is docker"):
        build(runtime="docker", image=None, fs_license=str(license_file))
    with pytest.raises(SpecError, match=r"0\.x is not supported"):
        build(image="pennlinc/qsiprep:0.24.0")
    inside = NeuroflowConfig.model_validate({"paths": {
        "dicom_incoming": str(tmp_path / "in"), "bids_root": str(tmp_path / "bids"),
        "derivatives": str(tmp_path / "deriv"), "work_dir": str(tmp_path / "bids" / "work"), "log_dir": str(tmp_path),
    }})  # fmt: skip
    with pytest.raises(SpecError, match=r"work folder .* must not be inside the input folder"):
        qsiprep.build_spec(inside, "0075", ["01"])


def write_dwi(bids: Path, participant: str, session: str, zooms: tuple[float, float, float], run: str = "") -> Path:
    """A tiny real NIfTI DWI with these voxel sizes (what output_resolution: auto reads)."""
    import nibabel as nib
    import numpy as np

    folder = bids / f"sub-{participant}" / f"ses-{session}" / "dwi"
    folder.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.zeros((4, 4, 3, 2), dtype=np.int16), np.diag([*zooms, 1.0]))
    img.header.set_zooms((*zooms, 3.0))
    path = folder / f"sub-{participant}_ses-{session}{run}_dwi.nii.gz"
    nib.save(img, path)
    return path


def test_qsiprep_dialect_starts_with_26_1_not_26_0(tmp_path: Path, license_file: Path) -> None:
    """The 26.0.0 tag's parser is 1.1.1's (--session-id, --hmc-model, --fs-license-file); 26.1.0 renamed them.
    Checked against the real 26.0.0 and 26.1.1 parsers in test_tool_specs_parsers.py."""
    def argv(image: str) -> tuple[str, ...]:
        cfg = {"runtime": "docker", "image": image, "fs_license": str(license_file), "hmc_model": "eddy"}
        return qsiprep.build_spec(make_config(tmp_path, qsiprep=cfg), "0075", ["01"]).argv

    for old in ("pennlinc/qsiprep:1.1.1", "pennlinc/qsiprep:26.0.0", "qsiprep_26.0.0.sif", "pennlinc/qsiprep"):
        a = argv(old)
        assert "--session-id" in a and "--hmc-model" in a and "--fs-license-file" in a, old
    for new in ("pennlinc/qsiprep:26.1.0", "pennlinc/qsiprep:26.1.1", "pennlinc/qsiprep:27.0.0"):
        a = argv(new)
        assert "--session-label" in a and "--hmc-method" in a and "--fs-license-file" not in a, new
    with pytest.raises(SpecError, match=r"fs_license: required when runtime is docker \(QSIPrep before 26\.1\)"):
        qsiprep.build_spec(make_config(tmp_path, qsiprep={"runtime": "docker", "image": "pennlinc/qsiprep:26.0.0"}),
                           "0075", ["01"])


def test_qsiprep_subject_anatomical_reference_and_sessionwise_filter(tmp_path: Path) -> None:
    """Every supported QSIPrep takes --subject-anatomical-reference; sessionwise runs get no session in the
    filter file (in QSIPrep's collect_data a filter-file session overrides each group's own session)."""
    for value in ("first-lex", "unbiased", "sessionwise"):
        config = make_config(tmp_path, qsiprep={"runtime": "local", "subject_anatomical_reference": value,
                                                "bids_filters": {"t1w": {"reconstruction": None}}})
        spec = qsiprep.build_spec(config, "0075", ["02", "01"])
        i = spec.argv.index("--subject-anatomical-reference")
        assert spec.argv[i + 1] == value
        content = json.loads(qsiprep.bids_filter_path(config, "0075").read_text())
        if value == "sessionwise":
            assert content == {"t1w": {"reconstruction": None}}
            assert "sub-0075.html" not in spec.outputs  # one report per session
        else:
            assert content["t1w"] == {"reconstruction": None, "session": ["01", "02"]}
            assert "sub-0075.html" in spec.outputs
        assert spec.argv[spec.argv.index("--session-id") + 1:][:2] == ("01", "02")


def test_qsiprep_anatomy_only_sessions_are_given_but_not_expected_as_outputs(tmp_path: Path) -> None:
    config = make_config(tmp_path, qsiprep={"runtime": "local"})
    spec = qsiprep.build_spec(config, "0075", ["02"], anat_sessions=["01"])
    assert spec.argv[spec.argv.index("--session-id"):][:3] == ("--session-id", "01", "02")
    assert json.loads(qsiprep.bids_filter_path(config, "0075").read_text())["t1w"] == {"session": ["01", "02"]}
    assert not any("ses-01" in pattern for pattern in spec.outputs)
    assert any("ses-02" in pattern for pattern in spec.outputs)
    reads = qsiprep.reads(config, "0075", ["02"], anat_sessions=["01"])
    assert reads[0][2] == ["dataset_description.json", "sub-0075/ses-01", "sub-0075/ses-02"]
    builtin = qsiprep.build_spec(make_config(tmp_path, qsiprep={"runtime": "builtin"}), "0075", ["02"],
                                 anat_sessions=["01"])
    assert builtin.argv[builtin.argv.index("--session-label"):][:3] == ("--session-label", "01", "02")


def test_qsiprep_output_resolution_auto_follows_the_dwi(tmp_path: Path) -> None:
    """auto = the finest voxel edge of the DWI of the sessions going into the run (QSIPrep's VoxelSizeChooser
    rule, 'min'), from the NIfTI headers; sessions not in the run do not count; a number is kept as is."""
    bids = tmp_path / "bids_root"
    write_dwi(bids, "0075", "01", (2.0, 2.0, 2.5))
    write_dwi(bids, "0075", "02", (1.7999999523, 1.7999999523, 3.0))
    write_dwi(bids, "0075", "02", (2.2, 2.2, 2.2), run="_run-02")
    write_dwi(bids, "0075", "03", (1.25, 1.25, 1.25))  # not in the run
    config = make_config(tmp_path, qsiprep={"runtime": "local", "output_resolution": "auto"})
    assert config.pipelines.qsiprep.output_resolution == "auto"

    def resolution(sessions: list[str]) -> str:
        argv = qsiprep.build_spec(config, "0075", sessions).argv
        return argv[argv.index("--output-resolution") + 1]

    assert resolution(["01"]) == "2"
    assert resolution(["01", "02"]) == "1.8"
    assert qsiprep.native_resolution(bids, "0075", ["03"]) == 1.25
    fixed = make_config(tmp_path, qsiprep={"runtime": "local", "output_resolution": 2.5})
    argv = qsiprep.build_spec(fixed, "0075", ["03"]).argv
    assert argv[argv.index("--output-resolution") + 1] == "2.5"
    # Nothing readable: the run cannot be described, and the message names the key.
    (bids / "sub-0075" / "ses-04" / "dwi").mkdir(parents=True)
    (bids / "sub-0075" / "ses-04" / "dwi" / "sub-0075_ses-04_dwi.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(SpecError, match=r"pipelines\.qsiprep\.output_resolution: auto, .* sub-0075 ses-04 "
                                        r"\(sub-0075_ses-04_dwi\.nii\.gz: .*set a number"):
        qsiprep.build_spec(config, "0075", ["04"])


def test_templateflow_home_is_bound_read_only_and_named_in_the_environment(tmp_path: Path,
                                                                          license_file: Path) -> None:
    tf = tmp_path / "templateflow"
    tf.mkdir()

    def config(runtime: str) -> NeuroflowConfig:
        c = make_config(tmp_path, qsiprep={"runtime": runtime, "fs_license": str(license_file)},
                        qsirecon={"runtime": runtime, "fs_license": str(license_file)})
        c.paths.templateflow_home = tf
        return c

    for tool, build in (("qsiprep", lambda c: qsiprep.build_spec(c, "0075", ["01"])),
                        ("qsirecon", lambda c: qsirecon.build_spec(c, "0075", "01", plan=recon_plan(c)))):
        docker = build(config("docker"))
        assert Mount(tf, "/templateflow", True) in docker.mounts, tool
        assert docker.env == {"NIPYPE_NO_ET": "1", "NO_ET": "1", "TEMPLATEFLOW_HOME": "/templateflow"}, tool
        local = build(config("local"))
        assert Mount(tf, str(tf), True) in local.mounts and local.env["TEMPLATEFLOW_HOME"] == str(tf), tool
        stand_in = build(config("builtin"))
        assert "TEMPLATEFLOW_HOME" not in stand_in.env, tool  # the stand-ins use no templates
    # Without the setting nothing is bound (docker then uses the templates inside the image).
    unset = qsiprep.build_spec(make_config(tmp_path, qsiprep={"runtime": "docker", "fs_license": str(license_file)}),
                               "0075", ["01"])
    assert "TEMPLATEFLOW_HOME" not in unset.env


# --------------------------------------------------------------------------- QSIRecon


def recon_plan(config: NeuroflowConfig, scheme: str = "single_shell") -> qsirecon.ReconPlan:
    """The plan the asset makes from QSIPrep's output (here without reading one): the configured spec of ``scheme``."""
    return qsirecon.ReconPlan("0075", "01", (), scheme, config.pipelines.qsirecon.recon_specs.for_scheme(scheme))


def atlas_dataset(root: Path, atlas: str = "Site") -> Path:
    """A site's BIDS-Atlas dataset as QSIRecon reads one (DatasetType atlas, the atlas in MNI152NLin2009cAsym)."""
    folder = root / f"atlas-{atlas}"
    folder.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "site atlases", "BIDSVersion": "1.9.0", '
                                                   '"DatasetType": "atlas"}')
    (folder / f"atlas-{atlas}_space-MNI152NLin2009cAsym_res-01_dseg.nii.gz").write_bytes(b"image")
    (folder / f"atlas-{atlas}_dseg.tsv").write_text("index\tlabel\n1\tA\n")
    return root


def test_qsirecon_local_and_docker_argv(tmp_path: Path, license_file: Path) -> None:
    spec_yaml = tmp_path / "specs" / "my_recon.yaml"
    spec_yaml.parent.mkdir()
    spec_yaml.write_text("name: my_recon\nnodes: []\n")
    site = atlas_dataset(tmp_path / "site_atlases")
    base = {"fs_license": str(license_file), "recon_specs": {"single_shell": str(spec_yaml)},
            "atlases": ["4S156Parcels", "AAL116", "Site"], "datasets": {"site": str(site)}}
    t = str(tmp_path)

    config = make_config(tmp_path, qsirecon={**base, "runtime": "local"})
    local = qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config))
    assert local.argv == (
        "qsirecon", f"{t}/derivatives/qsiprep", f"{t}/derivatives/qsirecon-neuroflow", "participant",
        "--participant-label", "0075",
        "--session-id", "01",
        "--input-type", "qsiprep",
        "--recon-spec", str(spec_yaml),
        "--report-output-level", "session",
        "--datasets", f"site={site}",
        "--atlases", "4S156Parcels", "AAL116", "Site",
        "--nprocs", "4", "--mem-mb", "8000",
        "-w", f"{t}/work_dir/qsirecon/sub-0075_ses-01",
        "--fs-license-file", str(license_file),
        "--notrack",
    )  # fmt: skip

    config = make_config(tmp_path, qsirecon={**base, "runtime": "docker"})
    docker = qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config))
    assert docker.argv == (
        "qsirecon", "/data/qsiprep", "/out", "participant",
        "--participant-label", "0075",
        "--session-id", "01",
        "--input-type", "qsiprep",
        "--recon-spec", "/neuroflow/recon_spec.yaml",
        "--report-output-level", "session",
        "--datasets", "site=/data/atlases/site",
        "--atlases", "4S156Parcels", "AAL116", "Site",
        "--nprocs", "4", "--mem-mb", "8000",
        "-w", "/work",
        "--fs-license-file", "/opt/freesurfer/license.txt",
        "--notrack",
    )  # fmt: skip
    assert docker.mounts == (
        Mount(tmp_path / "derivatives" / "qsiprep", "/data/qsiprep", True),
        Mount(tmp_path / "derivatives" / "qsirecon-neuroflow", "/out", False),
        Mount(spec_yaml, "/neuroflow/recon_spec.yaml", True),
        Mount(site, "/data/atlases/site", True),
        Mount(tmp_path / "work_dir" / "qsirecon" / "sub-0075_ses-01", "/work", False),
        Mount(license_file, "/opt/freesurfer/license.txt", True),
    )
    assert docker.image == "pennlinc/qsirecon:1.1.1" and docker.nprocs == 4 and docker.mem_mb == 8000
    # A built-in spec name is passed as is, nothing mounted for it: each scheme its own default.
    config = make_config(tmp_path, qsirecon={"runtime": "docker", "fs_license": str(license_file)})
    for scheme, name in (("single_shell", "ss3t_fod_autotrack"), ("multi_shell", "dipy_dki"),
                         ("cartesian", "dsi_studio_gqi")):
        named = qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config, scheme))
        assert named.argv[named.argv.index("--recon-spec") + 1] == name
        assert named.argv[named.argv.index("--atlases") + 1 :][:2] == ("4S156Parcels", "4S456Parcels")
        assert len(named.mounts) == 4


def test_qsirecon_builtin_and_errors(tmp_path: Path, license_file: Path) -> None:
    atlas, labels = tmp_path / "atlas-AAL116_dseg.nii.gz", tmp_path / "atlas-AAL116_dseg.tsv"
    cfg = {"runtime": "builtin", "atlas_file": str(atlas), "atlas_labels": str(labels)}
    config = make_config(tmp_path, qsirecon=cfg)
    spec = qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config, "multi_shell"))
    t = str(tmp_path)
    assert spec.argv == (
        PY, "-m", "neuroflow_dagster.tools.builtin.recon",
        "--qsiprep-dir", f"{t}/derivatives/qsiprep",
        "--output-dir", f"{t}/derivatives/qsirecon-neuroflow",
        "--participant-label", "0075",
        "--session-label", "01",
        "--work-dir", f"{t}/work_dir/qsirecon/sub-0075_ses-01",
        "--recon-spec", "dipy_dki",
        "--atlas-file", str(atlas),
        "--atlas-labels", str(labels),
    )  # fmt: skip
    assert spec.stand_in and spec.image is None
    config = make_config(tmp_path, qsirecon={"runtime": "builtin"})
    plain = qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config))
    assert "--atlas-file" not in plain.argv and plain.argv[-1] == "ss3t_fod_autotrack"

    config = make_config(tmp_path, qsirecon={"runtime": "builtin", "atlas_labels": str(labels)})
    with pytest.raises(SpecError, match="atlas_labels is set without atlas_file"):
        qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config))
    config = make_config(tmp_path, qsirecon={"runtime": "local", "recon_specs": {"multi_shell": f"{t}/missing.yaml"}})
    with pytest.raises(SpecError, match=r"qsirecon\.recon_specs\.multi_shell: .*missing\.yaml does not exist"):
        qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config, "multi_shell"))
    config = make_config(tmp_path, qsirecon={"runtime": "apptainer"})
    with pytest.raises(SpecError, match=r"pipelines\.qsirecon\.fs_license: required when runtime is apptainer"):
        qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config))
    config = make_config(tmp_path, qsirecon={"runtime": "local", "workflow_name": "a/b"})
    with pytest.raises(SpecError, match="workflow_name"):
        qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config))
    # No spec for the session's scheme: nothing to build (the asset records the session as not applicable).
    config = make_config(tmp_path, qsirecon={"runtime": "local", "recon_specs": {"single_shell": None}})
    with pytest.raises(SpecError, match=r"is single-shell .*recon_specs\.single_shell is not set"):
        qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config))
    # Without a plan, build_spec reads QSIPrep's output itself: none here.
    with pytest.raises(SpecError, match="no QSIPrep output for sub-0075 ses-01"):
        qsirecon.build_spec(make_config(tmp_path, qsirecon={"runtime": "local"}), "0075", "01")


def test_qsirecon_golden_outputs_follow_the_real_layout(tmp_path: Path, license_file: Path) -> None:
    """Names from QSIRecon 1.1.1's own golden lists (tests/data/*_outputs.txt), with a session and ACPC space."""
    cfg = {"runtime": "docker", "fs_license": str(license_file), "atlases": ["4S156Parcels"]}
    config = make_config(tmp_path, qsirecon=cfg)
    spec = qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config, "multi_shell"))
    assert spec.outputs == (
        "derivatives/qsirecon-*/sub-0075/ses-01/dwi/sub-0075_ses-01_*space-ACPC_model-*_param-*_dwimap.nii.gz",
        "sub-0075/ses-01/dwi/sub-0075_ses-01_*space-ACPC_seg-4S156Parcels_dseg.nii.gz",
        "atlases/atlas-4S156Parcels/atlas-4S156Parcels_dseg.tsv",
    )
    out = spec.output_dir
    maps = out / "derivatives/qsirecon-DKI/sub-0075/ses-01/dwi"
    seg = out / "sub-0075/ses-01/dwi"
    for folder in (maps, seg, out / "atlases/atlas-4S156Parcels"):
        folder.mkdir(parents=True)
    # The model maps at the root (not where QSIRecon puts them) do not count.
    (seg / "sub-0075_ses-01_space-ACPC_model-dki_param-fa_dwimap.nii.gz").write_text("x")
    (seg / "sub-0075_ses-01_space-ACPC_seg-4S156Parcels_dseg.nii.gz").write_text("x")
    (out / "atlases/atlas-4S156Parcels/atlas-4S156Parcels_dseg.tsv").write_text("index\tlabel\n")
    assert spec.missing_outputs() == [spec.outputs[0]]
    (maps / "sub-0075_ses-01_space-ACPC_model-dki_param-fa_dwimap.nii.gz").write_text("x")
    assert spec.missing_outputs() == []
    fa = maps / "sub-0075_ses-01_space-ACPC_model-dki_param-fa_dwimap.nii.gz"
    assert layout.qsirecon_maps(out, "0075", "01") == [fa]
    # A spec without scalar maps (bundles only) must leave something in the session's folder of a workflow.
    config = make_config(tmp_path, qsirecon={**cfg, "recon_specs": {"single_shell": "dsi_studio_autotrack"}})
    bundles = qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config))
    assert bundles.outputs[0] == "derivatives/qsirecon-*/sub-0075/ses-01/**/sub-0075_ses-01_*"
    # The stand-in draws its own atlas: any seg-* counts for it.
    config = make_config(tmp_path, qsirecon={"runtime": "builtin"})
    stand_in = qsirecon.build_spec(config, "0075", "01", plan=recon_plan(config))
    assert stand_in.outputs[1:] == (
        "sub-0075/ses-01/dwi/sub-0075_ses-01_*space-ACPC_seg-*_dseg.nii.gz",
        "atlases/atlas-*/atlas-*_dseg.tsv",
    )


# --------------------------------------------------------------------------- QSIParc


def test_qsiparc_argv_all_runtimes(tmp_path: Path) -> None:
    t = str(tmp_path)
    local = qsiparc.build_spec(
        make_config(tmp_path, qsiparc={"runtime": "local", "n_jobs": 2, "stat_tier": "core", "force": True}),
        "0075", "01",
    )  # fmt: skip
    assert local.argv == (
        "qsiparc", "run", f"{t}/derivatives/qsirecon-neuroflow", f"{t}/derivatives/qsiparc",
        "--participant-label", "0075", "--session-label", "01",
        "--n-procs", "2", "--stat-tier", "core", "--force",
    )  # fmt: skip
    assert local.outputs == ("sub-0075/ses-01/dwi/atlas-*/sub-0075_ses-01_atlas-*_diffmap.tsv",)

    docker = qsiparc.build_spec(
        make_config(tmp_path, qsiparc={"runtime": "docker", "image": "example/qsiparc:0.1.2"}), "0075", "01"
    )
    assert docker.argv == (
        "qsiparc", "run", "/data/qsirecon", "/out", "--participant-label", "0075", "--session-label", "01",
        "--n-procs", "1",
    )  # fmt: skip
    assert docker.mounts == (
        Mount(tmp_path / "derivatives" / "qsirecon-neuroflow", "/data/qsirecon", True),
        Mount(tmp_path / "derivatives" / "qsiparc", "/out", False),
    )
    with pytest.raises(SpecError, match=r"pipelines\.qsiparc\.image: required when runtime is docker"):
        qsiparc.build_spec(make_config(tmp_path, qsiparc={"runtime": "docker"}), "0075", "01")

    builtin = qsiparc.build_spec(make_config(tmp_path, qsiparc={"runtime": "builtin", "mask": "wm"}), "0075", "01")
    assert builtin.argv == (
        PY, "-m", "neuroflow_dagster.tools.builtin.parcellate",
        "--qsirecon-dir", f"{t}/derivatives/qsirecon-neuroflow",
        "--output-dir", f"{t}/derivatives/qsiparc",
        "--participant-label", "0075", "--session-label", "01",
        "--mask", "wm",
    )  # fmt: skip
    assert builtin.stand_in and builtin.outputs == local.outputs


# --------------------------------------------------------------------------- code versions


def test_code_versions_change_only_with_output_relevant_fields(tmp_path: Path) -> None:
    def versions(**pipelines: dict) -> tuple[str, str, str]:
        config = make_config(tmp_path, **pipelines)
        return qsiprep.code_version(config), qsirecon.code_version(config), qsiparc.code_version(config)

    docker = {"runtime": "docker"}
    base = versions(qsiprep=docker, qsirecon=docker)
    assert base == versions(qsiprep=docker, qsirecon=docker)
    assert base[0].startswith("1.1.1-") and base[1].startswith("1.1.1-")

    spec_changed = versions(qsiprep=docker, qsirecon={**docker, "recon_specs": {"multi_shell": "amico_noddi"}})
    assert spec_changed[1] != base[1] and spec_changed[0] == base[0] and spec_changed[2] == base[2]
    single_changed = versions(qsiprep=docker, qsirecon={**docker, "recon_specs": {"single_shell": "dsi_studio_gqi"}})
    none_for_cartesian = versions(qsiprep=docker, qsirecon={**docker, "recon_specs": {"cartesian": None}})
    assert len({base[1], spec_changed[1], single_changed[1], none_for_cartesian[1]}) == 4
    # The old key reads as the spec of the schemes it works with: dipy_dki is the multi-shell default already.
    assert versions(qsiprep=docker, qsirecon={**docker, "recon_spec": "dipy_dki"}) == base

    resources = versions(
        qsiprep={**docker, "nprocs": 16, "mem_mb": 32000, "omp_nthreads": 4, "max_concurrent": 3,
                 "timeout_minutes": 5, "skip_bids_validation": False},
        qsirecon={**docker, "nprocs": 8, "mem_mb": 16000},
        qsiparc={"n_jobs": 4, "force": True, "max_concurrent": 8},
    )  # fmt: skip
    assert resources == base

    assert versions(qsiprep={**docker, "output_resolution": 2.0}, qsirecon=docker)[0] != base[0]
    assert versions(qsiprep={**docker, "denoise_method": "patch2self"}, qsirecon=docker)[0] != base[0]
    assert versions(qsiprep={**docker, "image": "pennlinc/qsiprep:1.1.0"}, qsirecon=docker)[0].startswith("1.1.0-")
    assert versions(qsiprep=docker, qsirecon={**docker, "atlases": ["AAL116"]})[1] != base[1]
    site = atlas_dataset(tmp_path / "site")
    with_site = {**docker, "atlases": ["Site"], "datasets": {"site": str(site)}}
    site_version = versions(qsiprep=docker, qsirecon=with_site)[1]
    (site / "atlas-Site/atlas-Site_dseg.tsv").write_text("index\tlabel\n1\tB\n")  # the site edits its atlas
    assert versions(qsiprep=docker, qsirecon=with_site)[1] != site_version
    assert versions(qsiprep=docker, qsirecon=docker, qsiparc={"stat_tier": "all"})[2] != base[2]
    # Same image, local or docker: same tool, same version; the stand-in is a different tool.
    assert versions(qsiprep={"runtime": "local"}, qsirecon=docker)[0] == base[0]
    builtin = versions(qsiprep={"runtime": "builtin"}, qsirecon={"runtime": "builtin"})
    assert builtin[0].startswith("builtin-") and builtin[0] != base[0] and builtin[1] != base[1]


def test_code_version_follows_recon_spec_file_content_and_is_stable_across_processes(tmp_path: Path) -> None:
    spec_yaml = tmp_path / "recon.yaml"
    spec_yaml.write_text("nodes: [a]\n")
    config = make_config(tmp_path, qsirecon={"runtime": "docker", "recon_spec": str(spec_yaml)})
    before = qsirecon.code_version(config)
    spec_yaml.write_text("nodes: [b]\n")
    assert qsirecon.code_version(config) != before

    code = (
        "import sys; from pathlib import Path; from neuroflow_dagster.config import NeuroflowConfig;"
        "from neuroflow_dagster.tools import qsiprep;"
        "t = Path(sys.argv[1]); p = {k: str(t / k) for k in "
        "('dicom_incoming', 'bids_root', 'derivatives', 'work_dir', 'log_dir')};"
        "print(qsiprep.code_version(NeuroflowConfig.model_validate({'paths': p, 'pipelines': "
        "{'qsiprep': {'runtime': 'docker', 'bids_filters': {'t1w': {'a': 1, 'b': [2, 3]}}}}})))"
    )
    runs = {
        subprocess.run([PY, "-c", code, str(tmp_path)], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout.strip()
        for seed in ("1", "2")
    }  # fmt: skip
    assert len(runs) == 1 and runs.pop().startswith("1.1.1-")


# --------------------------------------------------------------------------- labels and layout


@pytest.mark.parametrize("label", ["00-75", "sub-0075", "../x", "01 02", "", "ü75", "0075\n"])
def test_labels_are_validated_before_any_path(tmp_path: Path, label: str) -> None:
    config = make_config(tmp_path, qsiprep={"runtime": "local"})
    with pytest.raises(SpecError, match="is not a BIDS label"):
        qsiprep.build_spec(config, label, ["01"])
    with pytest.raises(SpecError, match=r"session label .* is not a BIDS label"):
        qsiprep.build_spec(config, "0075", [label])
    with pytest.raises(SpecError, match="is not a BIDS label"):
        qsirecon.build_spec(config, "0075", label)
    with pytest.raises(SpecError, match="is not a BIDS label"):
        qsiparc.build_spec(config, label, "01")
    with pytest.raises(SpecError):
        layout.session_dir(tmp_path, label, "01")
    assert not (tmp_path / "work_dir").exists()  # nothing was written for a refused label


def test_layout_helpers(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert layout.qsiprep_dir(config) == tmp_path / "derivatives" / "qsiprep"
    assert layout.qsirecon_dir(config) == tmp_path / "derivatives" / "qsirecon-neuroflow"
    assert layout.qsiparc_dir(config) == tmp_path / "derivatives" / "qsiparc"
    assert layout.session_dir(tmp_path, "0075", "01") == tmp_path / "sub-0075" / "ses-01"
    assert layout.entities("0075", "01") == "sub-0075_ses-01" and layout.entities("0075") == "sub-0075"
    assert layout.work_dir(config, "qsirecon", "0075", "01") == tmp_path / "work_dir/qsirecon/sub-0075_ses-01"
    with pytest.raises(SpecError, match=r"give it without the 'sub-' prefix"):
        layout.validate_label("sub-0075")
    assert layout.image_version("pennlinc/qsiprep:1.1.1") == (1, 1, 1)
    assert layout.image_version("registry:5000/pennlinc/qsiprep:26.1.1@sha256:ab12") == (26, 1, 1)
    assert layout.image_version("/images/qsiprep_1.1.1.sif") == (1, 1, 1)
    assert layout.image_version("pennlinc/qsiprep@sha256:1234") is None
    assert layout.image_version("pennlinc/qsiprep:latest") is None
    assert layout.image_version(None) is None
