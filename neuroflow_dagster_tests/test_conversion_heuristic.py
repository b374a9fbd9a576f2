"""The shipped heuristic's first cut (HeudiConv SeqInfo -> BIDS name) and the HeudiConv ToolSpec (no tools run).

The series names come from the protocol corpus (protocol_corpus.py): ABCD, HCP/Lifespan, HCP-YA, ADNI3,
UK Biobank and the Siemens, Philips and GE defaults, as HeudiConv's own ``SeqInfo`` rows. What curation
does after dcm2niix (b=0 series to fmap/, dir- from the headers) is test_conversion_curate.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from neuroflow_dagster.bids.dataset import present_suffixes
from neuroflow_dagster.config import ConfigError
from neuroflow_dagster.heuristics import neuroflow_default as heur
from neuroflow_dagster.tools import heudiconv
from neuroflow_dagster_tests import protocol_corpus


@dataclass
class Seq:
    """The SeqInfo fields the heuristic reads (HeudiConv passes its own SeqInfo namedtuple)."""

    series_description: str
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND")
    series_id: str = ""
    protocol_name: str = ""
    dim4: int = 1
    time: str = ""
    is_derived: bool = False
    is_motion_corrected: bool = False


DIFF = ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND")
# (SeriesDescription, ImageType) -> expected path under sub-X/ses-Y, or None = skipped
TABLE: list[tuple[str, tuple[str, ...], str | None]] = [
    ("T1_MPRAGE_SAG", ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), "anat/sub-01_ses-A_T1w"),
    ("MPRAGE_S2 SENSE", ("ORIGINAL", "PRIMARY", "T1", "NONE"), "anat/sub-01_ses-A_T1w"),
    ("Sag 3D FSPGR BRAVO", ("ORIGINAL", "PRIMARY", "OTHER"), "anat/sub-01_ses-A_T1w"),
    ("T2_FLAIR_3D", ("ORIGINAL", "PRIMARY", "M", "ND"), "anat/sub-01_ses-A_FLAIR"),
    ("t2_FLAIR_ax", ("ORIGINAL", "PRIMARY", "M", "ND"), "anat/sub-01_ses-A_FLAIR"),
    ("T2star_gre_tra", ("ORIGINAL", "PRIMARY", "M", "ND"), None),
    ("ep2d_diff_mddw_30", DIFF, "dwi/sub-01_ses-A_dwi"),
    ("dMRI_mb3_AP_1.5", (*DIFF, "MB", "MOSAIC"), "dwi/sub-01_ses-A_dir-AP_dwi"),
    ("DTI_64dir_b0_1000", DIFF, "dwi/sub-01_ses-A_dwi"),
    ("Axial DTI", ("ORIGINAL", "PRIMARY", "OTHER"), "dwi/sub-01_ses-A_dwi"),  # name only (GE)
    ("dMRI_AP_SBRef", (*DIFF, "SBREF"), "dwi/sub-01_ses-A_dir-AP_sbref"),
    # A b=0 series of the diffusion sequence goes to dwi/ first: curation moves it by its b-values.
    ("ep2d_diff_b0_PA", DIFF, "dwi/sub-01_ses-A_dir-PA_dwi"),
    ("topup_b0", DIFF, "dwi/sub-01_ses-A_dwi"),
    ("SpinEchoFieldMap_AP", ("ORIGINAL", "PRIMARY", "M", "ND"), "fmap/sub-01_ses-A_dir-AP_epi"),
    ("dMRI_DistortionMap_PA", ("ORIGINAL", "PRIMARY", "M", "ND"), "fmap/sub-01_ses-A_acq-dwi_dir-PA_epi"),
    ("gre_field_mapping", ("ORIGINAL", "PRIMARY", "M", "ND"), "fmap/sub-01_ses-A_magnitude"),
    ("gre_field_mapping", ("ORIGINAL", "PRIMARY", "P", "ND"), "fmap/sub-01_ses-A_phasediff"),
    ("fmap_dwi", ("ORIGINAL", "PRIMARY", "P", "ND"), "fmap/sub-01_ses-A_acq-dwi_phasediff"),
    ("gre_field_mapping_fMRI", ("ORIGINAL", "PRIMARY", "P", "ND"), None),
    ("AAHead_Scout_32ch-head-coil", ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), None),
    ("3Plane Loc SSFSE", ("ORIGINAL", "PRIMARY", "OTHER"), None),
    ("T1_MPRAGE_SAG_MPR_cor", ("DERIVED", "SECONDARY", "MPR"), None),
    ("resting_state_bold", ("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"), None),
    ("", (), None),
]
BIDS_NAME = re.compile(
    r"^(anat|dwi|fmap)/sub-[A-Za-z0-9]+_ses-[A-Za-z0-9]+(_acq-[A-Za-z0-9]+)?(_dir-[A-Za-z0-9]+)?"
    r"(_run-[0-9]+)?_(T1w|T2w|FLAIR|dwi|sbref|epi|phasediff|magnitude|magnitude1|magnitude2)$"
)


@pytest.mark.parametrize(("description", "image_type", "expected"), TABLE)
def test_heuristic_names_each_series(description: str, image_type: tuple[str, ...], expected: str | None) -> None:
    seq = Seq(description, image_type, series_id="5-x", protocol_name=description)
    names = heur.names_for([seq], subject="01", session="A")
    if expected is None:
        assert names == {}, f"{description} should be skipped"
    else:
        assert names == {"5-x": f"sub-01/ses-A/{expected}"}
        assert BIDS_NAME.match(expected), expected


@pytest.mark.parametrize("protocol", list(protocol_corpus.PROTOCOLS))
def test_public_protocols_get_their_first_cut_with_a_reason(protocol: str) -> None:
    """Every series of a real protocol, as HeudiConv's SeqInfo: named or skipped as the corpus says."""
    rows = protocol_corpus.seqinfo(protocol)
    decided = {d.series_id: d for d in heur.decide(rows)}
    got = [(s.series_description, decided[s.series_id].target) for s in rows]
    assert got == [(s.description, s.first_cut) for s in protocol_corpus.PROTOCOLS[protocol]]
    assert all(d.reason for d in decided.values())
    for name in heur.names_for(rows, subject="01", session="A").values():
        assert BIDS_NAME.match(name.split("/", 2)[2]), name


def test_ge_protocol_name_is_not_read_when_a_description_is_there() -> None:
    """GE writes the exam's protocol in ProtocolName ('... DTI ...' on every series): the description decides."""
    seq = Seq("Sag CUBE T2", ("ORIGINAL", "PRIMARY", "OTHER"), series_id="3-x", protocol_name="BRAIN DTI STUDY")
    assert heur.decide([seq])[0].target == "anat/T2w"
    nameless = Seq("", ("ORIGINAL", "PRIMARY", "OTHER"), series_id="4-x", protocol_name="Ax DTI")
    assert heur.decide([nameless])[0].target == "dwi/dwi"


def test_copies_and_echoes_of_one_acquisition_give_one_image_repeats_give_runs() -> None:
    norm, nd = ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), ("ORIGINAL", "PRIMARY", "M", "ND")
    dis2d = ("ORIGINAL", "PRIMARY", "M", "DIS2D")
    seqs = [
        Seq("t1_mprage_sag_p2_iso", nd, series_id="2-a", time="100000"),
        Seq("t1_mprage_sag_p2_iso", norm, series_id="3-a", time="100000"),
        Seq("t1_mprage_sag_p2_iso", nd, series_id="9-b", time="103000"),  # a repeat, with its own NORM copy
        Seq("t1_mprage_sag_p2_iso", norm, series_id="10-b", time="103000"),
        Seq("t2_spc_sag_p2_iso", nd, series_id="4-c", time="101000"),
        Seq("t2_spc_sag_p2_iso_ND", dis2d, series_id="5-c", time="101000"),  # XA names the ND copy *_ND
    ]
    names = heur.names_for(seqs, subject="1", session="1")
    assert names == {
        "3-a": "sub-1/ses-1/anat/sub-1_ses-1_run-01_T1w",
        "10-b": "sub-1/ses-1/anat/sub-1_ses-1_run-02_T1w",
        "5-c": "sub-1/ses-1/anat/sub-1_ses-1_T2w",
    }
    reasons = {d.series_id: d.reason for d in heur.decide(seqs)}
    assert reasons["2-a"].startswith("less corrected copy (ND) of one acquisition: kept 3-a (ND/NORM)")


def test_repeated_series_get_runs_in_acquisition_order_single_ones_do_not() -> None:
    seqs = [
        Seq("T1_MPRAGE_SAG", series_id="9-b", time="101500"),
        Seq("T1_MPRAGE_SAG", series_id="3-a", time="100000"),
        Seq("ep2d_diff_mddw_30", DIFF, series_id="4-d", dim4=31),
        Seq("AAHead_Scout", series_id="1-s"),
    ]
    names = heur.names_for(seqs, subject="0075", session="01")
    assert names == {
        "3-a": "sub-0075/ses-01/anat/sub-0075_ses-01_run-01_T1w",
        "9-b": "sub-0075/ses-01/anat/sub-0075_ses-01_run-02_T1w",
        "4-d": "sub-0075/ses-01/dwi/sub-0075_ses-01_dwi",
    }


def test_heuristic_keys_use_heudiconv_session_fields_and_are_self_contained() -> None:
    info = heur.infotodict([Seq("T1_MPRAGE_SAG", series_id="2-t1")])
    (template, outtypes, annotations), series = next(iter(info.items()))
    assert template == "{bids_subject_session_dir}/anat/{bids_subject_session_prefix}_T1w"
    assert outtypes == ("nii.gz",) and annotations is None and series == ["2-t1"]
    # Runs inside a heudiconv container without neuroflow installed: stdlib imports only.
    source = Path(heur.__file__).read_text()
    imports = set(re.findall(r"^(?:from|import) ([a-zA-Z_.]+)", source, re.MULTILINE))
    assert imports <= {"__future__", "re", "struct", "collections.abc", "typing"}, imports
    # Curation writes IntendedFor after dcm2niix (it moves files first): HeudiConv must not.
    assert not hasattr(heur, "POPULATE_INTENDED_FOR_OPTS")


def test_resolve_heuristic_by_name_or_path(tmp_path: Path) -> None:
    shipped = heudiconv.resolve_heuristic("neuroflow_default")
    assert shipped == Path(heur.__file__).resolve()
    custom = tmp_path / "mine.py"
    custom.write_text("def infotodict(seqinfo):\n    return {}\n")
    assert heudiconv.resolve_heuristic(str(custom)) == custom.resolve()
    with pytest.raises(ConfigError, match="convertall"):
        heudiconv.resolve_heuristic("convertall")  # HeudiConv's own: not BIDS-valid, not shipped by us
    with pytest.raises(ConfigError, match="does not exist"):
        heudiconv.resolve_heuristic(str(tmp_path / "missing.py"))


def test_build_spec_local_uses_host_paths_and_venv_path(make_config, tmp_path: Path) -> None:
    config = make_config()
    dicom = tmp_path / "dicom" / "20240115_1430"
    dicom.mkdir(parents=True)
    staging = tmp_path / "work" / "stage"
    spec = heudiconv.build_spec(config, dicom_dir=dicom, participant="0075", session="01", staging_dir=staging)
    heuristic = str(heudiconv.resolve_heuristic("neuroflow_default"))
    assert spec.argv == (
        "heudiconv", "--files", str(dicom), "-s", "0075", "-ss", "01", "-f", heuristic,
        "-c", "dcm2niix", "-b", "--overwrite", "-o", str(staging), "-g", "all", "--minmeta",
    )  # fmt: skip
    assert spec.image is None and spec.output_dir == staging and spec.workdir == staging
    assert spec.env["NO_ET"] == "1"
    first_on_path = spec.env["PATH"].split(":")[0]
    assert (Path(first_on_path) / "dcm2niix").exists() and (Path(first_on_path) / "heudiconv").exists()
    assert "sub-0075/ses-01/*/*.nii.gz" in spec.outputs
    assert {(m.container, m.read_only) for m in spec.mounts} == {
        (str(dicom), True),
        (str(staging), False),
        (heuristic, True),
    }


@pytest.mark.parametrize("runtime", ["docker", "apptainer"])
def test_build_spec_container_uses_container_paths(make_config, tmp_path: Path, runtime: str) -> None:
    config = make_config(
        pipelines={"bids_conversion": {"runtime": runtime, "overwrite": False, "image": "nipy/heudiconv:1.3.4"}}
    )
    dicom = tmp_path / "dicom" / "s"
    dicom.mkdir(parents=True)
    spec = heudiconv.build_spec(config, dicom_dir=dicom, participant="0075", session="01", staging_dir=tmp_path / "o")
    assert spec.argv == (
        "heudiconv", "--files", "/dicom", "-s", "0075", "-ss", "01", "-f", "/heuristic.py",
        "-c", "dcm2niix", "-b", "-o", "/out", "-g", "all", "--minmeta",
    )  # fmt: skip
    assert spec.image == "nipy/heudiconv:1.3.4"
    mounts = {m.container: (m.host, m.read_only) for m in spec.mounts}
    assert mounts["/dicom"] == (dicom.resolve(), True)
    assert mounts["/out"] == ((tmp_path / "o").resolve(), False)
    assert mounts["/heuristic.py"] == (heudiconv.resolve_heuristic("neuroflow_default"), True)
    assert "PATH" not in spec.env and spec.env["NO_ET"] == "1"


def test_build_spec_refuses_used_staging_and_bad_labels(make_config, tmp_path: Path) -> None:
    config = make_config()
    dicom = tmp_path / "d"
    dicom.mkdir()
    used = tmp_path / "used"
    (used / ".heudiconv").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not empty"):
        heudiconv.build_spec(config, dicom_dir=dicom, participant="0075", session="01", staging_dir=used)
    with pytest.raises(ValueError, match="not a BIDS label"):
        heudiconv.build_spec(config, dicom_dir=dicom, participant="00_75", session="01", staging_dir=tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        heudiconv.build_spec(config, dicom_dir=tmp_path / "nope", participant="1", session="1", staging_dir=used)


def test_code_version_follows_the_heuristic_content(make_config, tmp_path: Path) -> None:
    custom = tmp_path / "h.py"
    custom.write_text("def infotodict(seqinfo):\n    return {}\n")
    a = heudiconv.code_version(make_config(pipelines={"bids_conversion": {"heuristic": str(custom)}}))
    assert a == heudiconv.code_version(make_config(pipelines={"bids_conversion": {"heuristic": str(custom)}}))
    custom.write_text("def infotodict(seqinfo):\n    return {1: 2}\n")
    b = heudiconv.code_version(make_config(pipelines={"bids_conversion": {"heuristic": str(custom)}}))
    assert a != b
    assert heudiconv.code_version(make_config()) not in (a, b)
    # A change of the curation rules (bids/curate.py CURATION_VERSION) marks conversions stale too.
    assert heudiconv.code_version(make_config(), curation="1") != heudiconv.code_version(make_config(), curation="2")


def test_present_suffixes(tmp_path: Path) -> None:
    ses = tmp_path / "sub-1" / "ses-1"
    for rel in [
        "anat/sub-1_ses-1_T1w.nii.gz",
        "dwi/sub-1_ses-1_dir-AP_dwi.nii.gz",
        "dwi/sub-1_ses-1_dir-AP_dwi.bval",
        "fmap/sub-1_ses-1_acq-dwi_dir-PA_epi.nii.gz",
        "fmap/sub-1_ses-1_acq-dwi_dir-PA_epi.json",
    ]:
        (ses / rel).parent.mkdir(parents=True, exist_ok=True)
        (ses / rel).write_text("x")
    assert present_suffixes(ses) == {"T1w", "dwi", "epi"}
    assert present_suffixes(tmp_path / "missing") == set()


def test_tool_versions_are_the_installed_tools() -> None:
    versions = heudiconv.tool_versions()
    assert versions["heudiconv"] == "1.5.1"
    assert versions["dcm2niix"] and re.match(r"1\.0\.\d{8}", versions["dcm2niix"])


def test_custom_seqinfo_reads_volumes_and_b_values_from_the_headers(tmp_path: Path) -> None:
    """What HeudiConv's SeqInfo lacks, read by the heuristic's custom_seqinfo hook (pydicom, headers only)."""
    from types import SimpleNamespace

    import pydicom

    from neuroflow_dagster.demo import sources

    def custom(files: list[Path]) -> object:
        wrapper = SimpleNamespace(dcm_data=pydicom.dcmread(files[0], stop_before_pixels=True))
        return heur.custom_seqinfo(wrapper=wrapper, series_files=[str(f) for f in files])

    session = protocol_corpus.build_session("siemens", tmp_path / "siemens")
    series = session.series
    assert custom(list(series["ep2d_diff_mddw_6_p2"].files)) == (("volumes", -1), ("max_b", 1000.0))  # several
    assert custom(list(series["ep2d_diff_b0_PA"].files)) == (("volumes", 1), ("max_b", 0.0))
    assert custom(list(series["t1_mprage_sag_p2_iso_a"].files)) is None  # not diffusion-like: no file read
    assert custom(list(series["ep2d_diff_mddw_6_p2_ADC_a"].files)) is None  # derived
    prisma = sources.copy_real_session(tmp_path / "prisma", "b0dwiForFmap")  # mosaics, Siemens (0019,100C)
    assert custom(prisma) == (("volumes", -1), ("max_b", 1500.0))
    assert custom(prisma[:2]) == (("volumes", 2), ("max_b", 5.0))  # its two b=5 volumes alone: a field map
    # ... and what the first cut makes of it.
    seq = Seq("ep2d_diff_b0_PA", DIFF, series_id="4-b0")
    seq.custom = (("volumes", 1), ("max_b", 5.0))  # type: ignore[attr-defined]
    assert heur.decide([seq])[0].target == "fmap/acq-dwi_dir-PA_epi"
    seq.custom = (("volumes", 1), ("max_b", 1000.0))  # type: ignore[attr-defined]
    assert heur.decide([seq])[0].target is None
