"""Site protocols through the real conversion: pydicom sessions named as ABCD, HCP, UK Biobank, Siemens,
Philips and GE name their series, and real vendor DICOM shipped in packages, through the real HeudiConv +
dcm2niix, curation and the real BIDS validator (0 errors); then the real QSIPrep 1.1.1 and 26.1.1 judge
the converted sessions with their own input handling (parser, BIDS grouping, workflow build: the
preflight, neuroflow_dagster/preflight, in its locked venvs; QSIPrep's binaries are not installed, the
nearest real boundary to its container).

Each shape of protocol_corpus.SHAPES is converted once for this module (a few seconds each), as its own
session of one subject; the tests read the staged result. The routing rules: docs/domain-rules.md#conversion.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import pytest

from neuroflow_dagster.bids import validator
from neuroflow_dagster.bids.curate import CurationReport
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.demo import sources
from neuroflow_dagster_tests import protocol_corpus

pytestmark = pytest.mark.slow

P, S = "01", "01"
PREFIX = f"sub-{P}_ses-{S}"
# Each shape converts as its own session of one subject, so the sessions can also form one dataset.
LABELS = {name: f"{i:02d}" for i, name in enumerate(protocol_corpus.SHAPES, start=1)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, convert) -> Callable[[str], tuple[Path, CurationReport]]:
    """Converts each corpus shape on first use (real HeudiConv + dcm2niix + curation)."""
    root = tmp_path_factory.mktemp("protocols")
    config = NeuroflowConfig.model_validate(
        {"paths": {k: str(root / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}}
    )
    done: dict[str, tuple[Path, CurationReport]] = {}

    def get(shape: str) -> tuple[Path, CurationReport]:
        if shape not in done:
            session = protocol_corpus.build_session(shape, root / "dicom" / shape)
            staging = root / "stage" / shape
            _spec, report = convert(config, session.folder, staging, P, LABELS[shape])
            done[shape] = (staging, report)
        return done[shape]

    return get


def sidecar(folder: Path, rel: str) -> dict[str, Any]:
    return json.loads((folder / rel.replace(".nii.gz", ".json")).read_text())


@pytest.mark.parametrize("shape", protocol_corpus.shapes())
def test_site_session_converts_to_valid_bids_routed_by_content(converted, shape: str) -> None:
    staging, report = converted(shape)
    spec = protocol_corpus.SHAPES[shape]
    label = LABELS[shape]
    prefix = f"sub-{P}_ses-{label}"
    folder = staging / f"sub-{P}" / f"ses-{label}"
    files = {str(p.relative_to(folder)) for p in folder.rglob("*.nii.gz")}
    assert files == protocol_corpus.expected_files(shape, P, label)

    result = validator.validate_session(staging, P, label)
    assert result.passed and result.errors == [], result.summary()

    for rel in files:
        meta = sidecar(folder, rel)
        if rel.startswith("dwi/") and rel.endswith("_dwi.nii.gz"):
            assert nib.load(folder / rel).ndim == 4, f"{rel}: a DWI must be 4D (QSIPrep: 'DWI file not 4D')"
            assert (folder / rel.replace(".nii.gz", ".bval")).exists()
            assert ("PhaseEncodingDirection" in meta) == (spec.qsiprep_refusal is None), rel
        if rel.startswith("fmap/") and rel.endswith("_epi.nii.gz"):
            assert meta["PhaseEncodingDirection"] and meta["TotalReadoutTime"] > 0
            assert not (folder / rel.replace(".nii.gz", ".bval")).exists()

    # Field maps serve exactly the DWIs they were acquired for; B0Field* on both sides agree.
    for fmap, dwis in spec.intended_for.items():
        meta = sidecar(folder, f"fmap/{prefix}_{fmap}.nii.gz")
        expected = [f"ses-{label}/dwi/{prefix}_{d}.nii.gz" for d in dwis]
        assert meta.get("IntendedFor", []) == expected, fmap
        for dwi in dwis:
            dwi_meta = sidecar(folder, f"dwi/{prefix}_{dwi}.nii.gz")
            assert dwi_meta["B0FieldSource"] == meta["B0FieldIdentifier"]
            assert meta["B0FieldIdentifier"].startswith(f"ses{label}_")  # unique per subject (QSIPrep 26)
        if not dwis:
            assert "B0FieldIdentifier" not in meta
    if not spec.intended_for:
        assert not any("B0FieldSource" in sidecar(folder, r) for r in files if r.startswith("dwi/"))

    for expected_warning in spec.warnings:
        assert any(expected_warning in w for w in report.warnings), report.warnings
    if not spec.warnings:
        assert report.warnings == []

    # Every DICOM series is accounted for, with the heuristic's reason.
    synthesized = [s for s in spec.series if s.synth is not None]
    assert [d["target"] for d in report.series] == [s.first_cut for s in synthesized]
    assert all(d["reason"] for d in report.series)


def test_the_no_polarity_session_leaves_its_field_map_out_with_the_series_named(converted) -> None:
    _staging, report = converted("no_polarity")
    dropped = [f for f in report.files if f.action == "left out"]
    assert [f.series for f in dropped] == ["4 ep2d_diff_b0_PA"]
    assert "PhaseEncodingDirection" in dropped[0].reason
    assert any("ep2d_diff_b0_PA" in w and "left out of the session" in w for w in report.warnings)


def test_real_vendor_files_shipped_in_packages_as_one_session(make_config, tmp_path: Path, convert) -> None:
    """Real DICOM: HeudiConv's Siemens Prisma DWI (b0dwiForFmap), phase field map, scouts, an MPR reformat
    and a Phoenix report, and nibabel's Siemens DWI and Philips MPRAGE, in one folder (several studies)."""
    folder = tmp_path / "dicom" / "real"
    folder.mkdir(parents=True)
    data = sources.package_dir("heudiconv") / "tests" / "data"
    for part in ("b0dwiForFmap", "01-fmap_acq-3mm", "01-anat-scout", "Phoenix/01+AA", "Phoenix/99+PhoenixDocument"):
        for path in sorted((data / part).iterdir()):
            shutil.copyfile(path, folder / f"{part.replace('/', '_')}_{path.name}")
    for path in data.glob("MRI_102TD_*.dcm"):  # a DERIVED MPR reformat of a scout
        shutil.copyfile(path, folder / path.name)
    sources.copy_real_session(folder, "nibabel")
    staging = tmp_path / "stage"
    _spec, report = convert(make_config(), folder, staging, P, S)
    session = staging / f"sub-{P}" / f"ses-{S}"
    assert sorted(str(p.relative_to(session)) for p in session.rglob("*.nii.gz")) == [
        f"anat/{PREFIX}_T1w.nii.gz",  # nibabel's Philips MPRAGE_S2
        f"dwi/{PREFIX}_dir-AP_run-01_dwi.nii.gz",  # nibabel's CBU_DTI_64D_1A (b0, b1000)
        f"dwi/{PREFIX}_dir-AP_run-02_dwi.nii.gz",  # the Prisma's dMRI_mb3_AP_1.5 (PE j-: A>>P)
        f"fmap/{PREFIX}_phasediff.nii.gz",
    ]
    prisma = sidecar(session, f"dwi/{PREFIX}_dir-AP_run-02_dwi.nii.gz")
    assert prisma["SeriesDescription"] == "dMRI_mb3_AP_1.5" and prisma["PhaseEncodingDirection"] == "j-"
    assert validator.validate_session(staging, P, S).passed
    skipped = {d["series"]: d["reason"] for d in report.series if d["target"] is None}
    assert set(skipped) == {"1-anat-scout_ses-localizer", "3-anat-scout_ses-01", "1-AAHead_Scout_32ch-head-coil",
                            "99-Phoenix Document"}
    # The phase field map was shimmed for another scan than these DWIs: kept, but it serves none of them.
    phasediff = sidecar(session, f"fmap/{PREFIX}_phasediff.nii.gz")
    assert "IntendedFor" not in phasediff and "B0FieldIdentifier" not in phasediff
    assert "shimmed differently" in report.field_maps[0]["reason"]


# --------------------------------------------------------------------------- the real QSIPrep accepts them


@pytest.fixture(scope="module")
def venvs_root() -> Path:
    """QSIPrep 1.1.1 and 26.1.1 in their locked venvs (scripts/qsiprep-preflight-venv.sh; fails, never skips)."""
    from neuroflow_dagster_tests.test_qsiprep_preflight import build_venvs

    return build_venvs()


def preflight_of(converted, venvs_root: Path, tmp: Path, version: str, shapes: list[str]):
    """The shapes' converted sessions as one subject's dataset, judged by QSIPrep's own input handling
    (its parser, BIDS grouping and workflow build: neuroflow_dagster/preflight) with the argv the stage
    builds for that version."""
    from neuroflow_dagster.preflight import qsiprep as preflight
    from neuroflow_dagster.tools import qsiprep
    from neuroflow_dagster_tests.test_qsiprep_preflight import config_for, image

    config = config_for(tmp, venvs_root, image=image(version), output_resolution="auto")  # the stage default
    bids = Path(config.paths.bids_root)
    sessions = [LABELS[s] for s in shapes]
    for shape in shapes:
        staging, _report = converted(shape)
        shutil.copytree(staging / f"sub-{P}" / f"ses-{LABELS[shape]}", bids / f"sub-{P}" / f"ses-{LABELS[shape]}")
        shutil.copyfile(staging / "dataset_description.json", bids / "dataset_description.json")
    spec = qsiprep.build_spec(config, P, sessions)
    verdict = preflight.run(config, spec, P, sessions, log_path=tmp / f"{version}.preflight.log")
    assert verdict.qsiprep_version == version and verdict.status in ("ok", "refused"), verdict
    return verdict, sessions


@pytest.mark.parametrize("version", ["1.1.1", "26.1.1"])
def test_the_real_qsiprep_accepts_every_site_session_as_converted(converted, venvs_root, tmp_path, version) -> None:
    """ABCD, HCP (two shapes), UK Biobank, Siemens, Philips and GE sessions, as the sessions of one subject
    (B0FieldIdentifier unique per subject), with their field maps linked."""
    shapes = protocol_corpus.shapes(qsiprep_accepts=True)
    verdict, sessions = preflight_of(converted, venvs_root, tmp_path, version, shapes)
    assert verdict.status == "ok", verdict.message
    assert verdict.details["processing_list"] == [[P, sessions]]
    log = Path(verdict.log_path or "").read_text()
    assert "acq-dwi_dir-PA_epi" in log  # the b=0 field maps were found


@pytest.mark.parametrize("version", ["1.1.1", "26.1.1"])
def test_the_real_qsiprep_refuses_the_session_without_polarity_and_says_why(
    converted, venvs_root, tmp_path, version
) -> None:
    shapes = protocol_corpus.shapes(qsiprep_accepts=False)
    verdict, _ = preflight_of(converted, venvs_root, tmp_path, version, shapes)
    assert verdict.status == "refused" and "PhaseEncodingDirection" in verdict.message
