"""Curation of a converted session by content (bids/curate.py) on small hand-written BIDS sessions.

Fast: NIfTI headers, sidecars and b-values written here stand in for dcm2niix's output, so each rule of
docs/domain-rules.md#conversion is checked alone. The same rules on real HeudiConv + dcm2niix output of
site protocols: test_conversion_protocols.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from neuroflow_dagster.bids import curate, dataset

P, S = "01", "01"
# dcm2niix writes axial slices as LAS: i points left, j anterior, k superior.
LAS = np.diag([-2.0, 2.0, 2.0, 1.0])
PREFIX = f"sub-{P}_ses-{S}"
SHIM_A = [1, 2, 3, 4]
SHIM_B = [1, 2, 3, 9]


class Session:
    """A staged session as HeudiConv leaves it: images with sidecars, b-values and a scans table."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / f"sub-{P}" / f"ses-{S}"
        self.rows: list[dict[str, str]] = []

    def add(self, name: str, *, volumes: int = 1, bvals: list[float] | None = None, shape=(4, 4, 3),
            affine: np.ndarray = LAS, time: str = "10:00", trace: bool = False, **sidecar: Any) -> str:
        rel = f"{name.split('/')[0]}/{PREFIX}_{name.split('/')[1]}.nii.gz"
        path = self.folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = np.zeros((*shape, volumes) if volumes > 1 else shape, dtype=np.uint8)
        nib.save(nib.Nifti1Image(data, affine), path)
        stem = str(path)[: -len(".nii.gz")]
        Path(f"{stem}.json").write_text(json.dumps(sidecar))
        if bvals is not None:
            Path(f"{stem}.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
            vectors = np.array([[1.0, 0.0, 0.0] if b > 100 and not trace else [0.0, 0.0, 0.0] for b in bvals]).T
            Path(f"{stem}.bvec").write_text("\n".join(" ".join(f"{v:g}" for v in row) for row in vectors) + "\n")
        self.rows.append({"filename": rel, "acq_time": f"2024-01-01T{time}:00", "operator": "n/a", "randstr": "x"})
        dataset.write_tsv(self.folder / f"{PREFIX}_scans.tsv", ["filename", "acq_time", "operator", "randstr"],
                          self.rows)
        return rel

    def curate(self) -> curate.CurationReport:
        return curate.curate_session(self.root, P, S)

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.folder)) for p in self.folder.rglob("*") if p.is_file())

    def sidecar(self, name: str) -> dict[str, Any]:
        return json.loads((self.folder / f"{name.split('/')[0]}/{PREFIX}_{name.split('/')[1]}.json").read_text())

    def scans(self) -> list[str]:
        return [r["filename"] for r in dataset.read_tsv(self.folder / f"{PREFIX}_scans.tsv")[1]]


def dwi_sidecar(pe: str = "j-", **extra: Any) -> dict[str, Any]:
    return {"PhaseEncodingDirection": pe, "TotalReadoutTime": 0.05, "SeriesNumber": 5,
            "SeriesDescription": "ep2d_diff", **extra}


FULL = [0.0] + [1000.0] * 6


@pytest.fixture
def ses(tmp_path: Path) -> Session:
    return Session(tmp_path / "stage")


@pytest.mark.parametrize(
    ("pe", "affine", "label"),
    [
        ("j-", LAS, "AP"),  # the real Prisma series dMRI_mb3_AP_1.5 reads j- (test_conversion_protocols)
        ("j", LAS, "PA"),
        ("j-", np.diag([2.0, 2.0, 2.0, 1.0]), "AP"),  # RAS
        ("j", np.diag([-2.0, -2.0, 2.0, 1.0]), "AP"),  # LPS: j points posterior
        ("i", LAS, "RL"),
        ("i-", LAS, "LR"),
        ("k", LAS, "IS"),
        ("k-", LAS, "SI"),
        ("j-", np.array([[0, 0, 2, 0], [-2, 0, 0, 0], [0, -2, 0, 0], [0, 0, 0, 1.0]]), "IS"),  # sagittal: j points down
        (None, LAS, None),
        ("y", LAS, None),
    ],
)
def test_dir_label_follows_polarity_and_orientation(pe: str | None, affine: np.ndarray, label: str | None) -> None:
    assert curate.direction_label(pe, affine) == label


def test_a_b0_only_series_in_dwi_becomes_an_epi_field_map_for_the_dwi(ses: Session) -> None:
    ses.add("dwi/dwi", volumes=7, bvals=FULL, time="10:00", **dwi_sidecar("j-"))
    ses.add("dwi/dir-PA_dwi", volumes=1, bvals=[5.0], time="10:05",
            **dwi_sidecar("j", SeriesNumber=6, SeriesDescription="ep2d_diff_b0_PA"))
    report = ses.curate()
    assert ses.files() == [
        f"dwi/{PREFIX}_dir-AP_dwi.bval", f"dwi/{PREFIX}_dir-AP_dwi.bvec", f"dwi/{PREFIX}_dir-AP_dwi.json",
        f"dwi/{PREFIX}_dir-AP_dwi.nii.gz",
        f"fmap/{PREFIX}_acq-dwi_dir-PA_epi.json", f"fmap/{PREFIX}_acq-dwi_dir-PA_epi.nii.gz",  # no bval/bvec
        f"{PREFIX}_scans.tsv",
    ]  # fmt: skip
    assert ses.scans() == [f"dwi/{PREFIX}_dir-AP_dwi.nii.gz", f"fmap/{PREFIX}_acq-dwi_dir-PA_epi.nii.gz"]
    fmap, dwi = ses.sidecar("fmap/acq-dwi_dir-PA_epi"), ses.sidecar("dwi/dir-AP_dwi")
    assert fmap["IntendedFor"] == [f"ses-{S}/dwi/{PREFIX}_dir-AP_dwi.nii.gz"]  # relative: QSIPrep 1.1.1 reads these
    ident = fmap["B0FieldIdentifier"]
    # One polarity in the field map: the DWI joins the estimation (QSIPrep 26 needs two signatures).
    assert dwi["B0FieldSource"] == ident and dwi["B0FieldIdentifier"] == ident and ident == f"ses{S}_dwifmap1"
    moved = next(f for f in report.files if f.series == "6 ep2d_diff_b0_PA")
    assert moved.action == "moved" and "b=0 only (1 volume(s)" in moved.reason
    assert moved.target == f"fmap/{PREFIX}_acq-dwi_dir-PA_epi.nii.gz"
    assert report.warnings == []
    assert report.field_maps[0]["serves"] == [f"dwi/{PREFIX}_dir-AP_dwi.nii.gz"]


def test_a_full_reverse_pe_dwi_named_as_a_field_map_stays_a_dwi(ses: Session) -> None:
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=FULL, **dwi_sidecar("j-"))
    ses.add("fmap/acq-dwi_dir-PA_epi", volumes=7, bvals=FULL, time="10:10",
            **dwi_sidecar("j", SeriesDescription="dMRI_blip_revPE", IntendedFor=["ses-01/dwi/x.nii.gz"]))
    report = ses.curate()
    assert [f for f in ses.files() if f.endswith(".nii.gz")] == [
        f"dwi/{PREFIX}_dir-AP_dwi.nii.gz", f"dwi/{PREFIX}_dir-PA_dwi.nii.gz"
    ]
    assert (ses.folder / f"dwi/{PREFIX}_dir-PA_dwi.bval").read_text().split() == ["0"] + ["1000"] * 6
    for name in ("dwi/dir-PA_dwi", "dwi/dir-AP_dwi"):  # a reverse-PE DWI pair: QSIPrep pairs them itself
        assert not {"IntendedFor", "B0FieldIdentifier", "B0FieldSource"} & set(ses.sidecar(name))
    assert any(f.action == "moved" and "named as a field map" in f.reason for f in report.files)


def test_one_diffusion_weighted_volume_is_left_out_with_a_warning(ses: Session) -> None:
    ses.add("dwi/dir-AP_dwi", volumes=1, bvals=[1000.0], **dwi_sidecar())
    report = ses.curate()
    assert ses.files() == [f"{PREFIX}_scans.tsv"] and ses.scans() == []
    assert "DWI file not 4D" in report.warnings[0] and report.files[0].action == "left out"


def test_a_series_without_b_values_is_a_field_map_unless_it_is_a_diffusion_series(ses: Session) -> None:
    """dcm2niix writes no .bval for a spin-echo b=0 without diffusion tags (named like a DWI): a field map;
    a DIFFUSION series whose b-values it could not read is left out."""
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=FULL, **dwi_sidecar())
    ses.add("dwi/acq-b0_dir-PA_dwi", volumes=3, time="10:05", **dwi_sidecar("j", SeriesDescription="B0_PA"))
    ses.add("dwi/acq-x_dir-AP_dwi", volumes=9, time="10:10",
            **dwi_sidecar(SeriesDescription="DTI_x", ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION"]))
    report = ses.curate()
    assert [f for f in ses.scans() if "fmap" in f] == [f"fmap/{PREFIX}_acq-dwi_dir-PA_epi.nii.gz"]
    assert not any("acq-x" in f for f in ses.scans())
    assert len(report.warnings) == 1 and "without b-values" in report.warnings[0]


def test_trace_weighted_series_without_gradient_directions_is_left_out(ses: Session) -> None:
    """A clinical 3-scan trace (GE 'Ax DWI'): b=0 and b=1000 volumes, no direction: not a DWI for QSIPrep."""
    ses.add("dwi/dwi", volumes=2, bvals=[0.0, 1000.0], trace=True, **dwi_sidecar(SeriesDescription="Ax DWI 1000b"))
    report = ses.curate()
    assert ses.scans() == [] and "no gradient direction" in report.warnings[0]


@pytest.mark.parametrize(
    ("name", "sidecar", "kept", "missing"),
    [
        ("fmap/acq-dwi_dir-PA_epi", {"TotalReadoutTime": 0.05}, False, "PhaseEncodingDirection"),
        ("fmap/acq-dwi_dir-PA_epi", {"PhaseEncodingDirection": "j"}, False, "TotalReadoutTime or EffectiveEchoSpacing"),
        ("fmap/acq-dwi_dir-PA_epi", {"PhaseEncodingDirection": "j", "EffectiveEchoSpacing": 0.0005}, True, None),
        ("fmap/phasediff", {"EchoTime1": 0.00492}, False, "EchoTime2"),
        ("fmap/phasediff", {"EchoTime1": 0.00492, "EchoTime2": 0.00738}, True, None),
        ("fmap/fieldmap", {}, False, "Units"),
    ],
)
def test_a_field_map_lacking_what_bids_requires_is_left_out_with_a_warning(
    ses: Session, name: str, sidecar: dict[str, Any], kept: bool, missing: str | None
) -> None:
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=FULL, **dwi_sidecar())
    ses.add(name, SeriesNumber=9, SeriesDescription="fmap", **sidecar)
    report = ses.curate()
    present = any(f.startswith(f"fmap/{PREFIX}") for f in ses.files())
    assert present == kept
    if kept:
        assert report.warnings == []
    else:
        assert len(report.warnings) == 1 and missing in report.warnings[0] and "left out" in report.warnings[0]
        assert "9 fmap" in report.warnings[0]  # the DICOM series it came from
        assert len(ses.scans()) == 1


def _gre(ses: Session, acq: str | None, time: str, shim: list[int] | None, description: str) -> None:
    entity = f"acq-{acq}_" if acq else ""
    extra = {"ShimSetting": shim} if shim else {}
    for suffix, meta in (("magnitude1", {}), ("phasediff", {"EchoTime1": 0.00492, "EchoTime2": 0.00738})):
        ses.add(f"fmap/{entity}{suffix}", time=time, SeriesDescription=description, **meta, **extra)


def test_a_gre_field_map_serves_the_dwi_only_when_acquired_for_it(ses: Session) -> None:
    """The fMRI's field map, acquired just before the DWI, does not take the DWI's IntendedFor."""
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=FULL, time="10:30", **dwi_sidecar(ShimSetting=SHIM_A))
    _gre(ses, "dwi", "10:00", SHIM_A, "gre_field_mapping_dwi")
    _gre(ses, "func", "10:25", SHIM_A, "gre_field_mapping_bold")
    report = ses.curate()
    assert ses.sidecar("fmap/acq-dwi_phasediff")["IntendedFor"] == [f"ses-{S}/dwi/{PREFIX}_dir-AP_dwi.nii.gz"]
    assert ses.sidecar("fmap/acq-dwi_magnitude1")["B0FieldIdentifier"] == ses.sidecar("dwi/dir-AP_dwi")["B0FieldSource"]
    assert "B0FieldIdentifier" not in ses.sidecar("dwi/dir-AP_dwi")  # a GRE field map needs no DWI signature
    func = ses.sidecar("fmap/acq-func_phasediff")
    assert "IntendedFor" not in func and "B0FieldIdentifier" not in func
    unused = next(g for g in report.field_maps if not g["serves"])
    assert "acquired for another scan (its name says so)" in unused["reason"]


def test_neutral_gre_field_maps_are_told_apart_by_the_dwi_shim(ses: Session) -> None:
    """Two ``gre_field_mapping`` runs: the one with the DWI's shim serves it, not the one closer in time."""
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=FULL, time="10:30", **dwi_sidecar(ShimSetting=SHIM_A))
    _gre(ses, "run1", "10:00", SHIM_A, "gre_field_mapping")
    _gre(ses, "run2", "10:29", SHIM_B, "gre_field_mapping")
    report = ses.curate()
    assert ses.sidecar("fmap/acq-run1_phasediff")["IntendedFor"] == [f"ses-{S}/dwi/{PREFIX}_dir-AP_dwi.nii.gz"]
    assert "IntendedFor" not in ses.sidecar("fmap/acq-run2_phasediff")
    reasons = " ".join(g["reason"] for g in report.field_maps)
    assert "acquired with the DWI's shim settings" in reasons and "shimmed differently" in reasons


def test_a_neutral_gre_field_map_without_shim_records_serves_no_dwi(ses: Session) -> None:
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=FULL, **dwi_sidecar())
    _gre(ses, None, "10:01", None, "gre_field_mapping")
    report = ses.curate()
    assert "IntendedFor" not in ses.sidecar("fmap/phasediff")
    assert "no ShimSetting shows" in report.field_maps[0]["reason"]


def test_each_dwi_takes_the_closest_epi_field_map_before_a_gre_one(ses: Session) -> None:
    ses.add("dwi/run-01_dwi", volumes=7, bvals=FULL, time="10:00", **dwi_sidecar())
    ses.add("dwi/run-02_dwi", volumes=7, bvals=FULL, time="11:00", **dwi_sidecar())
    ses.add("fmap/acq-early_dir-PA_epi", time="10:01", **dwi_sidecar("j", SeriesDescription="dwi_b0_PA_early"))
    ses.add("fmap/acq-late_dir-PA_epi", time="11:01", **dwi_sidecar("j", SeriesDescription="dwi_b0_PA_late"))
    _gre(ses, "dwi", "10:59", None, "gre_field_mapping_dwi")
    ses.curate()
    dwis = [f"ses-{S}/dwi/{PREFIX}_dir-AP_run-0{n}_dwi.nii.gz" for n in (1, 2)]
    assert ses.sidecar("fmap/acq-early_dir-PA_epi")["IntendedFor"] == [dwis[0]]
    assert ses.sidecar("fmap/acq-late_dir-PA_epi")["IntendedFor"] == [dwis[1]]
    assert "IntendedFor" not in ses.sidecar("fmap/acq-dwi_phasediff")
    ids = {ses.sidecar(f"dwi/dir-AP_run-0{n}_dwi")["B0FieldSource"] for n in (1, 2)}
    assert len(ids) == 2


def test_epi_field_maps_that_add_no_reverse_phase_encoding_or_were_shimmed_apart_serve_no_dwi(ses: Session) -> None:
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=FULL, **dwi_sidecar(ShimSetting=SHIM_A))
    ses.add("fmap/acq-dwi_dir-AP_epi", time="10:01", **dwi_sidecar("j-", SeriesDescription="dwi_b0_AP"))
    ses.add("fmap/acq-dwib_dir-PA_epi", time="10:02",
            **dwi_sidecar("j", SeriesDescription="dwi_b0_PA", ShimSetting=SHIM_B))
    report = ses.curate()
    assert all("IntendedFor" not in ses.sidecar(n) for n in ("fmap/acq-dwi_dir-AP_epi", "fmap/acq-dwib_dir-PA_epi"))
    assert not {"B0FieldSource", "B0FieldIdentifier"} & set(ses.sidecar("dwi/dir-AP_dwi"))
    reasons = " ".join(g["reason"] for g in report.field_maps)
    assert "no reverse-PE information" in reasons and "shimmed differently" in reasons


def test_reverse_pe_dwis_pair_themselves_when_a_field_map_serves_only_some_of_them(ses: Session) -> None:
    """AP and PA full DWIs and a PA b=0 field map: the PA one serves only the AP DWI; linking it would leave
    the PA DWI without correction (QSIPrep 26 infers no pairs in a curated session). So nothing is linked."""
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=FULL, time="10:00", **dwi_sidecar("j-"))
    ses.add("dwi/dir-PA_dwi", volumes=7, bvals=FULL, time="10:10", **dwi_sidecar("j"))
    ses.add("fmap/acq-dwi_dir-PA_epi", time="10:20", **dwi_sidecar("j", SeriesDescription="dwi_b0_PA"))
    report = ses.curate()
    for name in ("dwi/dir-AP_dwi", "dwi/dir-PA_dwi", "fmap/acq-dwi_dir-PA_epi"):
        assert not {"IntendedFor", "B0FieldIdentifier", "B0FieldSource"} & set(ses.sidecar(name)), name
    assert "pair by reverse phase encoding themselves" in report.field_maps[0]["reason"]


def test_a_neutral_epi_field_map_serves_the_dwi_in_its_imaging_volume_only(ses: Session) -> None:
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=FULL, **dwi_sidecar())
    ses.add("fmap/dir-PA_epi", time="10:01", **dwi_sidecar("j", SeriesDescription="SpinEchoFieldMap_PA"))
    ses.add("fmap/acq-se_dir-PA_epi", time="10:02", shape=(5, 5, 3), affine=np.diag([-2.4, 2.4, 2.4, 1.0]),
            **dwi_sidecar("j", SeriesDescription="SE_EPI_PA"))
    report = ses.curate()
    # The neutral name would inherit acq-se's sidecar (BIDS inheritance): it gets its series' name as acq-.
    assert ses.sidecar("fmap/acq-SpinEchoFieldMap_dir-PA_epi")["IntendedFor"] == [
        f"ses-{S}/dwi/{PREFIX}_dir-AP_dwi.nii.gz"
    ]
    assert "IntendedFor" not in ses.sidecar("fmap/acq-se_dir-PA_epi")
    assert any("imaging volume is another" in g["reason"] for g in report.field_maps)
    renamed = next(f for f in report.files if f.source.endswith("_dir-PA_epi.nii.gz") and "acq-" not in f.source)
    assert renamed.action == "renamed" and "BIDS inheritance" in renamed.reason


def test_a_dwi_without_polarity_keeps_its_name_with_a_warning(ses: Session) -> None:
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=FULL, SeriesNumber=3, SeriesDescription="DTI_AP",
            PhaseEncodingAxis="j")
    report = ses.curate()
    assert f"dwi/{PREFIX}_dir-AP_dwi.nii.gz" in ses.files()
    assert len(report.warnings) == 1 and "no PhaseEncodingDirection" in report.warnings[0]


def test_intendedfor_a_site_heuristic_wrote_for_other_images_is_kept(ses: Session) -> None:
    bold = ses.add("func/task-rest_bold", volumes=3)
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=FULL, **dwi_sidecar())
    ses.add("fmap/acq-dwi_dir-PA_epi", **dwi_sidecar("j", IntendedFor=[f"ses-{S}/{bold}", f"ses-{S}/gone.nii.gz"]))
    ses.curate()
    assert ses.sidecar("fmap/acq-dwi_dir-PA_epi")["IntendedFor"] == [
        f"ses-{S}/dwi/{PREFIX}_dir-AP_dwi.nii.gz", f"ses-{S}/{bold}"
    ]


def test_curation_is_idempotent_and_names_may_swap(ses: Session) -> None:
    # Named the wrong way round by a heuristic: the two files swap names through temporary ones.
    ses.add("dwi/dir-PA_dwi", volumes=7, bvals=FULL, time="10:00", **dwi_sidecar("j-", SeriesDescription="a"))
    ses.add("dwi/dir-AP_dwi", volumes=7, bvals=[0.0] + [2000.0] * 6, time="10:05",
            **dwi_sidecar("j", SeriesDescription="b"))
    ses.curate()
    first = {f: (ses.folder / f).read_bytes() for f in ses.files()}
    assert (ses.folder / f"dwi/{PREFIX}_dir-PA_dwi.bval").read_text().split()[-1] == "2000"
    ses.curate()
    assert {f: (ses.folder / f).read_bytes() for f in ses.files()} == first
    assert not list(ses.folder.rglob(".curate-*"))


def test_series_decisions_come_from_the_heuristic_on_heudiconvs_dicominfo(tmp_path: Path) -> None:
    from neuroflow_dagster.heuristics import neuroflow_default
    from neuroflow_dagster_tests import protocol_corpus

    info = tmp_path / ".heudiconv" / P / f"ses-{S}" / "info"
    info.mkdir(parents=True)
    rows = protocol_corpus.seqinfo("hcp")
    columns = list(rows[0]._fields)
    dataset.write_tsv(info / f"dicominfo_ses-{S}.tsv", columns,
                      [{c: str(getattr(r, c)) for c in columns} for r in rows])
    decided = curate.series_decisions(tmp_path, P, S, neuroflow_default.__file__)
    assert [d["target"] for d in decided] == [s.first_cut for s in protocol_corpus.PROTOCOLS["hcp"]]
    assert "RMS combination" in decided[1]["reason"]
    # A site's heuristic without decide(): recorded by the names HeudiConv's .edit.txt gives each series.
    site = tmp_path / "site.py"
    site.write_text("def infotodict(seqinfo):\n    return {}\n")
    (info / f"{P}_ses-{S}.edit.txt").write_text(
        "{('{bids_subject_session_dir}/anat/{bids_subject_session_prefix}_T1w', ('nii.gz',), None): "
        f"['{rows[5].series_id}']}}"
    )
    decided = curate.series_decisions(tmp_path, P, S, site)
    assert decided[5]["target"] == "{bids_subject_session_prefix}_T1w" and decided[0]["target"] is None
    assert curate.series_decisions(tmp_path / "nothing", P, S, site) == []
