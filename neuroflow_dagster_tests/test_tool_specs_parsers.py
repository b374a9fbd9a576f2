"""The command lines neuroflow generates, fed to the REAL QSIPrep and QSIParc argument parsers.

QSIPrep cannot run here (no FSL/ANTs/FreeSurfer, no container engine), so the
nearest real boundary is its own parser: ``qsiprep.cli.parser._build_parser()``
of the PyPI wheels 1.1.1 (the default image's version), 26.0.0 and 26.1.1, including
their post-parse checks (option choices, paths that must exist, the BIDS
filter file read through pybids, 26.x's cross-option checks). QSIParc's is
its click command ``qsiparc.cli.main`` -> ``run``. The parsers live in a
separate venv built by scripts/tool-parsers-venv.sh (their pins clash with
the project's), in one long-lived process per tool version.

Container paths in docker argv are mapped back to the mounts' host folders
(the parsers check that input folders exist). Each tool also has cases the
real parser must REJECT, so a parser that accepted anything would fail here.
QSIRecon is not on PyPI (container only) and is not covered here; QSIParc's own
discovery is, on the QSIRecon stand-in's outputs of both shell schemes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.tools import qsiparc, qsiprep
from neuroflow_dagster.tools.spec import ToolSpec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tool-parsers-venv.sh"

# A parser server inside the tools venv: imports the tool once, then answers one JSON request per
# stdin line with one "@@" line (the tools may print other lines). Modes: "parse" (the parser only)
# and, for QSIPrep, "full" (its complete parse_args: BIDS layout, participants, session grouping),
# "groups" (then its collect_data per processing group: the files each group reads) and "refusal"
# (then its input checks per group: collect_data, and init_single_subject_wf's anatomical check run
# from QSIPrep's own source, since its workflow modules need niworkflows, which this venv lacks).
SERVER = r"""
import contextlib, io, json, sys
from pathlib import Path
tool = sys.argv[1]
if tool == "qsiprep":
    import qsiprep
    from qsiprep import config
    from qsiprep.cli.parser import _build_parser, parse_args
    version = qsiprep.__version__
else:
    import click
    from importlib.metadata import version as dist_version
    from qsiparc.cli import main
    version = dist_version("qsiparc")

def parse_one(argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if tool == "qsiparc":
                try:
                    ctx = main.get_command(click.Context(main), argv[1]).make_context(argv[1], list(argv[2:]))
                except click.ClickException as exc:
                    return {"ok": False, "code": exc.exit_code, "error": [exc.format_message()]}
                return {"ok": True, "values": ctx.params}
            return {"ok": True, "values": vars(_build_parser().parse_args(argv[1:]))}
    except SystemExit as exc:
        return {"ok": False, "code": exc.code, "error": err.getvalue().strip().splitlines()[-1:]}

def groups():
    # QSIPrep's own input collection for each processing group: what a run would read.
    from qsiprep.utils.bids import collect_data
    out = []
    for subject, sessions in config.execution.processing_list:
        data = collect_data(config.execution.layout, subject, sessions, filters=config.execution.bids_filters,
                            bids_validate=False)[0]
        out.append({"sessions": sessions, **{k: sorted(Path(f).name for f in data[k]) for k in ("dwi", "t1w")}})
    return out

def anat_check():
    # The anatomical check of QSIPrep's init_single_subject_wf, taken from its source (workflows/base.py
    # imports niworkflows & co., which this parser venv does not hold): its `if` test and its message.
    import ast
    base = Path(qsiprep.__file__).parent / "workflows" / "base.py"
    tree = ast.parse(base.read_text())
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "init_single_subject_wf")
    for node in ast.walk(func):
        if isinstance(node, ast.If) and isinstance(node.body[0], ast.Raise):
            message = node.body[0].exc.args[0]
            if "anat_modality" in ast.unparse(node.test) and "images found" in ast.unparse(message):
                return [compile(ast.Expression(e), str(base), "eval") for e in (node.test, message)]
    raise LookupError(f"no anatomical check in {base}")

def refusal():
    # QSIPrep's input checks per processing group, in its order: collect_data (the real function: it
    # refuses a DWI file that is not 4D), then its own anatomical check: the exception it raises.
    from qsiprep.utils.bids import collect_data
    test, message = anat_check()
    for subject, sessions in config.execution.processing_list:
        try:
            data = collect_data(config.execution.layout, subject, sessions, filters=config.execution.bids_filters,
                                bids_validate=False)[0]
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        scope = {"config": config, "subject_data": data, "subject_id": subject}
        if eval(test, scope):
            return f"Exception: {eval(message, scope)}"
    return None

for line in sys.stdin:
    req = json.loads(line)
    if req["mode"] in ("full", "groups", "refusal"):
        # A new BIDS layout per request: 1.1.1 keeps the first one (and its database) for the process.
        config.execution._layout = None
        config.execution.bids_database_dir = None
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse_args(req["argvs"][0][1:])
                extra = {"groups": groups()} if req["mode"] == "groups" else {}
                if req["mode"] == "refusal":
                    extra = {"refusal": refusal()}
            results = [{"ok": True, "values": {"processing_list": config.execution.processing_list,
                                               "participant_label": config.execution.participant_label, **extra}}]
        except SystemExit as exc:
            results = [{"ok": False, "code": exc.code, "error": err.getvalue().strip().splitlines()[-1:]}]
    else:
        results = [parse_one(argv) for argv in req["argvs"]]
    print("@@" + json.dumps({"version": version, "results": results}, default=str), flush=True)
"""


@pytest.fixture(scope="module")
def tools_venv() -> Path:
    """The parsers' venv (built once: ~26 s and 34 MB here; then cached in .venv-tools)."""
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        pytest.skip(f"cannot build the parsers' venv with {SCRIPT.name} (needs PyPI): {tail}")
    return Path(proc.stdout.strip().splitlines()[-1])


class ParserServer:
    def __init__(self, tools: Path, tool: str, version: str | None, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update({"NO_ET": "1", "NIPYPE_NO_ET": "1", "TEMPLATEFLOW_HOME": str(tools / "templateflow")})
        if version:
            env["PYTHONPATH"] = str(tools / f"qsiprep-{version}")
        self.log = log
        self.stderr = log.open("w")
        self.proc = subprocess.Popen(
            [str(tools / "bin" / "python"), "-c", SERVER, tool], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True, env=env,
        )  # fmt: skip

    def ask(self, mode: str, argvs: list[list[str]]) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"mode": mode, "argvs": argvs}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise AssertionError(f"parser process ended: {self.log.read_text()[-3000:]}")

    def close(self) -> None:
        # Nothing to save in the server: end it rather than wait for the tools' exit handlers.
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def servers(tools_venv: Path, tmp_path_factory: pytest.TempPathFactory):
    """One parser process per tool version, reused by the tests (each import costs 2-7 s)."""
    running: dict[tuple[str, str | None], ParserServer] = {}
    logs = tmp_path_factory.mktemp("parser-logs")

    def get(tool: str, version: str | None = None) -> ParserServer:
        if (tool, version) not in running:
            running[tool, version] = ParserServer(tools_venv, tool, version, logs / f"{tool}-{version}.log")
        return running[tool, version]

    yield get
    for server in running.values():
        server.close()


def parse(servers, tool: str, argvs: list[list[str]], qsiprep_version: str | None = None, mode: str = "parse"):
    return servers(tool, qsiprep_version).ask(mode, argvs)


def host_argv(spec: ToolSpec) -> list[str]:
    """A container argv with each mount's container path replaced by its host path."""
    by_container = {m.container: str(m.host) for m in spec.mounts}
    return [by_container.get(arg, arg) for arg in spec.argv]


def make_config(tmp_path: Path, **pipelines: dict) -> NeuroflowConfig:
    """QSIPrep's resolution fixed at 1.6 unless given (``auto`` reads DWI headers; the trees here are names)."""
    paths = {k: str(tmp_path / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}
    for key in ("bids_root", "derivatives"):
        Path(paths[key]).mkdir(parents=True, exist_ok=True)
    pipelines = {**pipelines, "qsiprep": {"output_resolution": 1.6, **pipelines.get("qsiprep", {})}}
    return NeuroflowConfig.model_validate({"paths": paths, "pipelines": pipelines})


def test_qsiprep_1_1_1_parser_accepts_local_and_docker_argv(servers, tmp_path: Path) -> None:
    license_file = tmp_path / "license.txt"
    license_file.write_text("not a real license\n")
    qsiprep_cfg = {
        "image": "pennlinc/qsiprep:1.1.1", "fs_license": str(license_file), "omp_nthreads": 2,
        "denoise_method": "patch2self", "unringing_method": "mrdegibbs", "hmc_model": "3dSHORE",
        "bids_filters": {"t1w": {"reconstruction": "autobox"}}, "extra_args": ["--b0-threshold", "50"],
    }  # fmt: skip
    local_cfg = make_config(tmp_path, qsiprep={**qsiprep_cfg, "runtime": "local"})
    docker_cfg = make_config(tmp_path, qsiprep={**qsiprep_cfg, "runtime": "docker"})
    local = qsiprep.build_spec(local_cfg, "0075", ["02", "01"])
    docker = qsiprep.build_spec(docker_cfg, "0075", ["01", "02"])
    assert docker.argv[1:3] == ("/data/bids", "/out")

    report = parse(servers, "qsiprep", [list(local.argv), host_argv(docker)], qsiprep_version="1.1.1")
    assert report["version"] == "1.1.1"
    for result in report["results"]:
        assert result["ok"], result
        values = result["values"]
        assert values["participant_label"] == ["0075"]
        assert values["session_id"] == ["01", "02"]
        assert values["output_resolution"] == 1.6
        assert values["analysis_level"] == "participant"
        assert values["nprocs"] == 8 and values["omp_nthreads"] == 2
        assert values["memory_gb"] == 16  # --mem-mb 16000 read as megabytes
        assert values["anatomical_template"] == "MNI152NLin2009cAsym" and values["anat_modality"] == "T1w"
        assert values["subject_anatomical_reference"] == "unbiased"
        assert values["denoise_method"] == "patch2self" and values["unringing_method"] == "mrdegibbs"
        assert values["hmc_model"] == "3dSHORE" and values["b0_threshold"] == 50
        assert values["skip_bids_validation"] is True and values["notrack"] is True
        assert values["work_dir"] == str(tmp_path / "work_dir" / "qsiprep" / "sub-0075")
        assert values["fs_license_file"] == str(license_file)
        # The filter file was read by QSIPrep's own reader (through pybids).
        filters = values["bids_filters"]
        assert filters["dwi"] == {"session": ["01", "02"]}
        assert filters["t1w"] == {"reconstruction": "autobox", "session": ["01", "02"]}


def test_qsiprep_1_1_1_parser_rejects_wrong_arguments(servers, tmp_path: Path) -> None:
    spec = qsiprep.build_spec(make_config(tmp_path, qsiprep={"runtime": "local"}), "0075", ["01"])
    argv = list(spec.argv)
    bad = [
        [*argv, "--denoise-method", "bogus"],  # not one of QSIPrep's choices
        [*argv[:1], str(tmp_path / "no-such-bids"), *argv[2:]],  # input folder must exist
        [a for a in argv if a not in ("--output-resolution", "1.6")],  # required option
        [*argv, "--session-label", "01"],  # the 26.x spelling
    ]
    results = parse(servers, "qsiprep", [argv, *bad], qsiprep_version="1.1.1")["results"]
    assert results[0]["ok"], results[0]
    for case, result in zip(bad, results[1:], strict=True):
        assert not result["ok"] and result["code"] == 2, (case, result)
    assert "invalid choice: 'bogus'" in results[1]["error"][0]
    assert "Path does not exist" in results[2]["error"][0]
    assert "--output-resolution" in results[3]["error"][0]
    assert "unrecognized arguments: --session-label" in results[4]["error"][0]


def test_qsiprep_26_parser_accepts_the_new_dialect_and_rejects_the_old(servers, tmp_path: Path) -> None:
    license_file = tmp_path / "license.txt"
    license_file.write_text("x\n")
    cfg = {"runtime": "local", "fs_license": str(license_file), "hmc_model": "eddy", "denoise_method": "dwidenoise2"}
    new = qsiprep.build_spec(make_config(tmp_path, qsiprep={**cfg, "image": "pennlinc/qsiprep:26.1.1"}), "0075", ["01"])
    old = qsiprep.build_spec(make_config(tmp_path, qsiprep={**cfg, "image": "pennlinc/qsiprep:1.1.1"}), "0075", ["01"])
    assert "--session-label" in new.argv and "--fs-license-file" not in new.argv

    report = parse(servers, "qsiprep", [list(new.argv), list(old.argv)], qsiprep_version="26.1.1")
    assert report["version"] == "26.1.1"
    accepted, rejected = report["results"]
    assert accepted["ok"], accepted
    assert accepted["values"]["session_label"] == ["01"]
    assert accepted["values"]["hmc_method"] == "eddy" and accepted["values"]["denoise_method"] == "dwidenoise2"
    assert not rejected["ok"] and rejected["code"] == 2
    assert "unrecognized arguments" in rejected["error"][0] and "--session-id" in rejected["error"][0]


def test_qsiparc_parser_accepts_generated_argv_and_rejects_a_mask_option(servers, tmp_path: Path) -> None:
    cfg = {"runtime": "local", "n_jobs": 3, "stat_tier": "core", "force": True}
    config = make_config(tmp_path, qsiparc=cfg)
    (tmp_path / "derivatives" / "qsirecon-neuroflow").mkdir()
    local = qsiparc.build_spec(config, "0075", "01")
    docker = qsiparc.build_spec(make_config(tmp_path, qsiparc={**cfg, "runtime": "docker", "image": "x/qsiparc:0.1.2"}),
                                "0075", "01")
    assert docker.argv[2:4] == ("/data/qsirecon", "/out")
    bad = [
        [*local.argv, "--mask", "gm"],  # the stand-in's option; the real tool has none
        [*local.argv, "--stat-tier", "bogus"],
        [*local.argv[:2], str(tmp_path / "missing"), *local.argv[3:]],  # QSIRECON_DIR must exist
    ]
    report = parse(servers, "qsiparc", [list(local.argv), host_argv(docker), *bad])
    assert report["version"] == "0.1.2"
    for result in report["results"][:2]:
        assert result["ok"], result
        values = result["values"]
        assert values["qsirecon_dir"] == str(tmp_path / "derivatives" / "qsirecon-neuroflow")
        assert values["output_dir"] == str(tmp_path / "derivatives" / "qsiparc")
        assert values["participant_label"] == "0075" and values["session_label"] == "01"
        assert values["n_procs"] == 3 and values["stat_tier"] == "core" and values["force"] is True
    for result in report["results"][2:]:
        assert not result["ok"] and result["code"] == 2, result
    assert "No such option" in report["results"][2]["error"][0] and "--mask" in report["results"][2]["error"][0]
    assert "'bogus' is not one of" in report["results"][3]["error"][0]
    assert "does not exist" in report["results"][4]["error"][0]


def test_qsiprep_full_parse_groups_exactly_the_given_sessions(servers, tmp_path: Path) -> None:
    """QSIPrep's whole ``parse_args`` (BIDS layout included) on a tiny BIDS tree with three sessions:
    the run for sessions 02 and 01 forms ONE processing group of exactly those two - the subject-level
    anatomical template is built from them, not from ses-03. Files are empty: only names are indexed."""
    bids = tmp_path / "bids_root"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.8.0"}))
    for ses in ("01", "02", "03"):
        for rel in ("dwi/{}_dwi.nii.gz", "dwi/{}_dwi.bval", "dwi/{}_dwi.bvec", "anat/{}_T1w.nii.gz"):
            path = bids / f"sub-0075/ses-{ses}" / rel.format(f"sub-0075_ses-{ses}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    license_file = tmp_path / "license.txt"
    license_file.write_text("x\n")
    for version in ("1.1.1", "26.1.1"):
        cfg = {"runtime": "local", "image": f"pennlinc/qsiprep:{version}", "fs_license": str(license_file)}
        spec = qsiprep.build_spec(make_config(tmp_path, qsiprep=cfg), "0075", ["02", "01"])
        report = parse(servers, "qsiprep", [list(spec.argv)], qsiprep_version=version, mode="full")
        assert report["version"] == version
        assert report["results"][0]["ok"], report
        values = report["results"][0]["values"]
        assert values["processing_list"] == [["0075", ["01", "02"]]], version
        assert values["participant_label"] == ["0075"]


QSIPREP_VERSIONS = ("1.1.1", "26.0.0", "26.1.1")


def test_qsiprep_26_0_0_still_takes_the_old_flags(servers, tmp_path: Path) -> None:
    """The dialect switches at 26.1: the 26.0.0 parser accepts what neuroflow builds for a 26.0.0 image
    (--session-id, --hmc-model, --fs-license-file) and rejects the 26.1 spellings."""
    license_file = tmp_path / "license.txt"
    license_file.write_text("x\n")
    cfg = {"runtime": "local", "fs_license": str(license_file), "hmc_model": "eddy"}
    built = {v: qsiprep.build_spec(make_config(tmp_path, qsiprep={**cfg, "image": f"pennlinc/qsiprep:{v}"}),
                                   "0075", ["01"]) for v in ("26.0.0", "26.1.1")}
    report = parse(servers, "qsiprep", [list(built["26.0.0"].argv), list(built["26.1.1"].argv)],
                   qsiprep_version="26.0.0")
    assert report["version"] == "26.0.0"
    accepted, rejected = report["results"]
    assert accepted["ok"], accepted
    values = accepted["values"]
    assert values["session_id"] == ["01"] and values["hmc_model"] == "eddy"
    assert values["fs_license_file"] == str(license_file)
    assert not rejected["ok"] and rejected["code"] == 2
    assert "unrecognized arguments" in rejected["error"][0] and "--session-label" in rejected["error"][0]


def test_subject_anatomical_reference_is_taken_by_every_supported_qsiprep(servers, tmp_path: Path) -> None:
    for version in QSIPREP_VERSIONS:
        argvs = []
        for value in ("first-lex", "unbiased", "sessionwise"):
            config = make_config(tmp_path, qsiprep={"runtime": "local", "image": f"pennlinc/qsiprep:{version}",
                                                    "subject_anatomical_reference": value})
            argvs.append(list(qsiprep.build_spec(config, "0075", ["01"]).argv))
        results = parse(servers, "qsiprep", argvs, qsiprep_version=version)["results"]
        assert [r["ok"] and r["values"]["subject_anatomical_reference"] for r in results] == [
            "first-lex", "unbiased", "sessionwise"], (version, results)


def bids_tree(root: Path, files: dict[str, list[str]], dwi_3d: str | None = None) -> Path:
    """``sub-0075/ses-X/...`` named files; DWI files are real 4D NIfTIs (QSIPrep reads their headers),
    ``dwi_3d`` a real 3D one; other files are empty (only their names are indexed)."""
    import nibabel as nib
    import numpy as np

    bids = root / "bids_root"
    bids.mkdir(exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.8.0"}))
    for ses, kinds in files.items():
        for kind in kinds:
            folder = "dwi" if kind == "dwi" else "anat"
            path = bids / f"sub-0075/ses-{ses}/{folder}/sub-0075_ses-{ses}_{kind}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "dwi":
                shape = (4, 4, 3) if ses == dwi_3d else (4, 4, 3, 20)
                nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.int16), np.eye(4)), path)
                for ext in ("bval", "bvec"):
                    path.with_name(path.name.replace(".nii.gz", f".{ext}")).write_text("0\n")
            else:
                path.write_bytes(b"")
    return bids


def test_qsiprep_collects_what_each_run_is_meant_to_read(servers, tmp_path: Path) -> None:
    """QSIPrep's own grouping and collect_data on the runs neuroflow builds: an anatomy-only visit lends its
    T1w to the subject's group; sessionwise, each session's group reads that session only - which a
    filter-file session list would break (QSIPrep applies the filter's session after its own)."""
    bids_tree(tmp_path, {"01": ["dwi"], "02": ["T1w"], "03": ["dwi", "T1w"]})
    for version in QSIPREP_VERSIONS:
        image = f"pennlinc/qsiprep:{version}"
        joint = qsiprep.build_spec(make_config(tmp_path, qsiprep={"runtime": "local", "image": image}), "0075",
                                   ["01", "03"], anat_sessions=["02"])
        values = parse(servers, "qsiprep", [list(joint.argv)], qsiprep_version=version, mode="groups")["results"][0]
        assert values["ok"], (version, values)
        assert values["values"]["groups"] == [{"sessions": ["01", "02", "03"],
                                               "dwi": ["sub-0075_ses-01_dwi.nii.gz", "sub-0075_ses-03_dwi.nii.gz"],
                                               "t1w": ["sub-0075_ses-02_T1w.nii.gz", "sub-0075_ses-03_T1w.nii.gz"]}]

        sessionwise = make_config(tmp_path, qsiprep={"runtime": "local", "image": image,
                                                     "subject_anatomical_reference": "sessionwise"})
        spec = qsiprep.build_spec(sessionwise, "0075", ["03"])
        groups = parse(servers, "qsiprep", [list(spec.argv)], qsiprep_version=version, mode="groups")["results"][0]
        assert groups["values"]["groups"] == [{"sessions": ["03"], "dwi": ["sub-0075_ses-03_dwi.nii.gz"],
                                               "t1w": ["sub-0075_ses-03_T1w.nii.gz"]}], (version, groups)
        # Why sessionwise runs get no session in the filter file: with one, QSIPrep's group for ses-01
        # would read ses-03's files too.
        filter_file = qsiprep.bids_filter_path(sessionwise, "0075")
        qsiprep.write_bids_filter(filter_file, ["01", "03"])
        argv = [*qsiprep.build_spec(sessionwise, "0075", ["01", "03"]).argv]
        qsiprep.write_bids_filter(filter_file, ["01", "03"])  # build_spec rewrote it without sessions
        mixed = parse(servers, "qsiprep", [argv], qsiprep_version=version, mode="groups")["results"][0]
        first = mixed["values"]["groups"][0]
        assert first["sessions"] == ["01"] and "sub-0075_ses-03_dwi.nii.gz" in first["dwi"], (version, mixed)


def test_the_stand_in_refuses_with_the_real_qsiprep_messages(servers, tmp_path: Path, capsys) -> None:
    """The same BIDS tree through the real QSIPrep and through the stand-in: the same refusal, word for word,
    in every supported version. Real: parse_args and collect_data (which refuses a 3D DWI); the anatomical
    check of init_single_subject_wf is compiled from QSIPrep's own workflows/base.py and run with its real
    config and collected data (importing that module needs niworkflows, ANTs interfaces ..., which the
    parser venv does not hold)."""
    from neuroflow_dagster.tools.builtin import preproc
    from neuroflow_dagster.tools.builtin.common import run_cli

    cases = {
        "no T1w": ({"01": ["dwi"], "02": ["dwi"]}, None),
        "3D DWI": ({"01": ["dwi", "T1w"], "02": ["dwi", "T1w"]}, "02"),
    }
    for name, (files, dwi_3d) in cases.items():
        root = tmp_path / name.replace(" ", "_")
        root.mkdir()
        bids = bids_tree(root, files, dwi_3d)
        code = run_cli(preproc.main, ["--bids-dir", str(bids), "--output-dir", str(root / "out"),
                                      "--participant-label", "0075", "--session-label", "01", "02",
                                      "--work-dir", str(root / "work")])
        stand_in = capsys.readouterr().err.strip()
        assert code == 2 and stand_in.startswith("validation error: "), stand_in
        for version in QSIPREP_VERSIONS:
            config = make_config(root, qsiprep={"runtime": "local", "image": f"pennlinc/qsiprep:{version}"})
            spec = qsiprep.build_spec(config, "0075", ["01", "02"])
            result = parse(servers, "qsiprep", [list(spec.argv)], qsiprep_version=version, mode="refusal")
            real = result["results"][0]["values"]["refusal"]
            assert real is not None, (name, version)
            # The exception's message, as the real tool's log ends with it.
            assert real.split(": ", 1)[1] == stand_in.removeprefix("validation error: "), (name, version, real)


DISCOVER = r"""
import json, sys
from pathlib import Path
from qsiparc.discover import discover_dseg_files, discover_scalar_maps, load_lut_for_dseg
root = Path(sys.argv[1])
out = {}
for ses in sys.argv[2:]:
    dsegs = discover_dseg_files(root, "0075", ses)
    maps = discover_scalar_maps(root, "0075", ses)
    out[ses] = {"dsegs": [(d.atlas_name, len(load_lut_for_dseg(d).regions), d.lut_path is not None) for d in dsegs],
                "maps": sorted((m.path.parent.parent.parent.parent.name, m.entities.get("model"),
                                m.entities.get("param")) for m in maps)}
print("@@" + json.dumps(out))
"""


def test_qsiparc_discovers_the_recon_stand_ins_outputs_of_both_schemes(tools_venv: Path, tmp_path: Path) -> None:
    """QSIParc 0.1.2's own discovery finds the atlas (with its table) and every scalar map the recon stand-in
    writes for a single-shell session (ss3t_fod_autotrack) and a multi-shell one (dipy_dki) of one subject."""
    from neuroflow_dagster.tools.builtin import recon
    from neuroflow_dagster_tests.test_builtin_recon import (
        gradient_scheme,
        phantom,
        two_shell_scheme,
        write_qsiprep_session,
    )

    for ses, (bvals, bvecs), spec in (("01", gradient_scheme(12), "ss3t_fod_autotrack"),
                                      ("02", two_shell_scheme(12), "dipy_dki")):
        data, mask = phantom(bvals, bvecs, snr=None)
        write_qsiprep_session(tmp_path / "qsiprep", "0075", ses, data, bvals, bvecs, mask)
        recon.run_recon(tmp_path / "qsiprep", tmp_path / "qsirecon", "0075", ses, tmp_path / "work", spec)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    argv = [str(tools_venv / "bin" / "python"), "-c", DISCOVER, str(tmp_path / "qsirecon"), "01", "02"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("@@"))[2:])
    for ses in ("01", "02"):
        assert found[ses]["dsegs"] == [["DemoQuantileGrid", 12, True]]
    tensor_gqi = [["qsirecon-SS3TAutoTrack", m, p] for m, p in recon.STAND_IN_SPECS["ss3t_fod_autotrack"].maps]
    dki = [["qsirecon-DKI", m, p] for m, p in recon.STAND_IN_SPECS["dipy_dki"].maps]
    assert found["01"]["maps"] == sorted(tensor_gqi) and found["02"]["maps"] == sorted(dki)
