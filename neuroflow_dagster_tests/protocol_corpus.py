"""A corpus of real sites' MRI protocols: series as their scanners name them, and what each must become.

Why: the conversion must route series by what they are, for protocols it was never shown, so the
tests judge it on the CLASS of input: the series names and ImageTypes public protocols and vendor
defaults write (ABCD, HCP/Lifespan, ADNI3, UK Biobank, Siemens, Philips, GE), each with the BIDS
name the heuristic's first cut gives it and the name it has after curation
(docs/domain-rules.md#conversion).

Three uses, one source of truth:

* ``seqinfo(protocol)``: HeudiConv's own ``SeqInfo`` rows of every series of a protocol, for fast
  unit tests of the heuristic (``PROTOCOLS``: also series that are never synthesized, e.g. GRE
  field maps, SWI, fMRI, MP2RAGE); a synthesized diffusion series carries in ``custom`` what the
  heuristic's ``custom_seqinfo`` reads from its headers (volumes, largest b-value), a row only its name;
* ``build_session(shape, folder)``: a small DICOM session of a site (``SHAPES``), written with
  pydicom (``synth.write_protocol``), that goes through the real HeudiConv, dcm2niix, curation and
  the BIDS validator; ``expected_files(shape, participant, session)`` is what it must give;
* the preflight runs QSIPrep's own input handling on the BIDS written for each shape
  (``shapes(qsiprep_accepts=True)``; ``Shape.qsiprep_refusal`` says why a shape must be refused).

The synthesized sessions carry Siemens XA vendor tags, so dcm2niix records phase-encoding
polarity and TotalReadoutTime whatever vendor names the series (the Philips and GE sessions
are named as those vendors name them; their real exports often lack polarity, which the
``no_polarity`` shape covers). Geometry is tiny (a few voxels, 6 slices, few volumes) so
a conversion takes seconds; the b-values, directions and polarity are real.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from heudiconv.utils import SeqInfo

from neuroflow_dagster.demo import synth

# ImageTypes as the vendors write them.
SIEMENS_ND = ("ORIGINAL", "PRIMARY", "M", "ND")
SIEMENS_NORM = ("ORIGINAL", "PRIMARY", "M", "ND", "NORM")
# Classic (one file per slice) exports, as synthesized here; a Siemens mosaic adds MOSAIC.
SIEMENS_DWI = ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND")
SIEMENS_EPI = ("ORIGINAL", "PRIMARY", "M", "ND")
SIEMENS_PHASE = ("ORIGINAL", "PRIMARY", "P", "ND")
PHILIPS_T1 = ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE")
PHILIPS_SE = ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE")
PHILIPS_IR = ("ORIGINAL", "PRIMARY", "M_IR", "M", "IR")
GE = ("ORIGINAL", "PRIMARY", "OTHER")
GE_PROTOCOL = "NEURO BRAIN DTI RESEARCH"  # GE's ProtocolName is the exam's, the same for every series


SAME = "="  # Series.final: the name after curation is the heuristic's first cut


def derived(kind: str) -> tuple[str, ...]:
    return ("DERIVED", "PRIMARY", "DIFFUSION", kind, "ND")


# Geometry of the synthesized series (columns, rows, slices, mm): tiny, so conversions take seconds.
ANAT = {"rows": 16, "columns": 16, "slices": 6, "spacing_mm": 2.0}
DWI = {"rows": 12, "columns": 12, "slices": 6, "spacing_mm": 2.0}
FMRI = {"rows": 10, "columns": 10, "slices": 6, "spacing_mm": 2.4}  # an fMRI field map: another geometry


@dataclass(frozen=True)
class Series:
    """One series of a protocol: its name and ImageType, the heuristic's first cut (``anat/T1w``,
    ``dwi/dir-AP_dwi``, ... or None = skipped) and the name after curation (``final``; defaults to the
    first cut; None = not in the session). ``synth`` describes how ``build_session`` writes it (None: a
    SeqInfo row only)."""

    description: str
    image_type: tuple[str, ...]
    first_cut: str | None
    final: str | None = SAME
    synth: synth.ProtocolSeries | None = None
    protocol_name: str | None = None

    @property
    def expected(self) -> str | None:
        return self.first_cut if self.final == SAME else self.final


def _plan(description: str, image_type: tuple[str, ...], kind: str, *, pe: str | None = None,
          geometry: dict | None = None, tags: bool = True, protocol: str | None = None) -> synth.SeriesPlan:
    sagittal = kind == "anat"
    return synth.SeriesPlan(
        description,
        image_type,
        kind,
        synth.SAGITTAL if sagittal else synth.AXIAL,
        **(geometry or (ANAT if sagittal else DWI)),
        repetition_time_ms=2300.0 if sagittal else 3000.0,
        echo_time_ms=2.98 if sagittal else 90.0,
        scanning_sequence="GR\\IR" if sagittal else "EP",
        acquisition_type="3D" if sagittal else "2D",
        phase_positive=pe != "PA",
        polarity_tags=tags,
        protocol_name=protocol,
    )


def anat(description: str, image_type: tuple[str, ...], first_cut: str | None, *, copy: bool = False,
         protocol: str | None = None, final: str | None = SAME) -> Series:
    key = f"{description}_{'copy' if copy else 'a'}"
    series = synth.ProtocolSeries(key, _plan(description, image_type, "anat", protocol=protocol), copy=copy)
    return Series(description, image_type, first_cut, final, series, protocol)


def dwi(description: str, image_type: tuple[str, ...], first_cut: str | None, *, pe: str, n_b0: int = 1,
        n_directions: int = 15, shells: tuple[float, ...] = (1000.0,), tags: bool = True,
        protocol: str | None = None, final: str | None = SAME) -> Series:
    """A diffusion EPI series (``n_directions`` 0: b=0 only)."""
    plan = _plan(description, image_type, "dwi", pe=pe, tags=tags, protocol=protocol)
    series = synth.ProtocolSeries(description, plan, n_b0=n_b0, n_directions=n_directions, shells=shells)
    return Series(description, image_type, first_cut, final, series, protocol)


def epi(description: str, image_type: tuple[str, ...], first_cut: str | None, *, pe: str, volumes: int = 1,
        geometry: dict | None = None, final: str | None = SAME) -> Series:
    """A spin-echo EPI field map (no diffusion tags)."""
    plan = _plan(description, image_type, "epi", pe=pe, geometry=geometry)
    return Series(description, image_type, first_cut, final, synth.ProtocolSeries(description, plan, volumes=volumes))


def row(description: str, image_type: tuple[str, ...], first_cut: str | None, protocol: str | None = None) -> Series:
    """A series known only as a SeqInfo row (not synthesized)."""
    return Series(description, image_type, first_cut, protocol_name=protocol)


@dataclass(frozen=True)
class Shape:
    """A site session ``build_session`` writes: its series in acquisition order, and what QSIPrep makes of it."""

    name: str
    site: str
    series: tuple[Series, ...]
    why: str
    warnings: tuple[str, ...] = ()  # substrings of the curation warnings this session must raise
    qsiprep_refusal: str | None = None  # None: QSIPrep's input handling must accept the converted session
    intended_for: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fmap -> DWIs it serves


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape(
            "abcd",
            "ABCD (Siemens)",
            (
                anat("AAHead_Scout_32ch-head-coil", SIEMENS_NORM, None),
                anat("ABCD_T1w_MPR_vNav_setter", SIEMENS_ND, None),
                anat("ABCD_T1w_MPR_vNav", SIEMENS_ND, None),
                anat("ABCD_T1w_MPR_vNav", SIEMENS_NORM, "anat/T1w", copy=True),
                anat("ABCD_T2w_SPC_vNav", SIEMENS_NORM, "anat/T2w"),
                anat("t2_space_dark-fluid_sag_p2_iso", SIEMENS_NORM, "anat/FLAIR"),
                epi("ABCD_dMRI_DistortionMap_AP", SIEMENS_EPI, "fmap/acq-dwi_dir-AP_epi", pe="AP"),
                epi("ABCD_dMRI_DistortionMap_PA", SIEMENS_EPI, "fmap/acq-dwi_dir-PA_epi", pe="PA"),
                dwi("ABCD_dMRI", SIEMENS_DWI, "dwi/dwi", pe="AP", n_directions=8, shells=(1000.0, 3000.0),
                    final="dwi/dir-AP_dwi"),
            ),
            "spin-echo distortion maps in both directions acquired for the multi-shell DWI; T1w as ND + NORM"
            " copies (one is kept), a vNav setter",
            intended_for={"acq-dwi_dir-AP_epi": ("dir-AP_dwi",), "acq-dwi_dir-PA_epi": ("dir-AP_dwi",)},
        ),
        Shape(
            "hcp",
            "HCP Lifespan (Siemens)",
            (
                anat("T1w_setter", SIEMENS_ND, None),
                anat("T1w_MPR_vNav_4e", SIEMENS_ND, None),
                anat("T1w_MPR_vNav_4e", SIEMENS_NORM, None, copy=True),
                anat("T1w_MPR_vNav_4e_RMS", SIEMENS_ND, None),
                anat("T1w_MPR_vNav_4e_RMS", SIEMENS_NORM, "anat/T1w", copy=True),
                anat("T2w_SPC_vNav", SIEMENS_NORM, "anat/T2w"),
                anat("3D_FLAIR_Sag", SIEMENS_NORM, "anat/FLAIR"),
                dwi("dMRI_dir98_AP_SBRef", (*SIEMENS_DWI, "SBREF"), "dwi/dir-AP_sbref", pe="AP", n_directions=0),
                dwi("dMRI_dir98_AP", SIEMENS_DWI, "dwi/dir-AP_dwi", pe="AP", n_directions=8, shells=(1500.0, 3000.0)),
                dwi("dMRI_dir98_PA", SIEMENS_DWI, "fmap/acq-dwi_dir-PA_epi", pe="PA", n_directions=0),
                epi("SpinEchoFieldMap_AP", SIEMENS_EPI, "fmap/dir-AP_epi", pe="AP", geometry=FMRI,
                    final="fmap/acq-SpinEchoFieldMap_dir-AP_epi"),
                epi("SpinEchoFieldMap_PA", SIEMENS_EPI, "fmap/dir-PA_epi", pe="PA", geometry=FMRI,
                    final="fmap/acq-SpinEchoFieldMap_dir-PA_epi"),
            ),
            "multi-echo MPRAGE (its RMS combination is the T1w), a 1-volume b=0 named like the DWI (dMRI_dir98_PA)"
            " moved to fmap/; the fMRI spin-echo field maps (other geometry) serve no DWI",
            intended_for={"acq-dwi_dir-PA_epi": ("dir-AP_dwi",), "acq-SpinEchoFieldMap_dir-AP_epi": (),
                          "acq-SpinEchoFieldMap_dir-PA_epi": ()},
        ),
        Shape(
            "hcp_pair",
            "HCP Lifespan (Siemens), full DWIs in both directions",
            (
                anat("T1w_MPR", SIEMENS_NORM, "anat/T1w"),
                dwi("dMRI_dir98_AP", SIEMENS_DWI, "dwi/dir-AP_dwi", pe="AP"),
                dwi("dMRI_dir98_PA", SIEMENS_DWI, "dwi/dir-PA_dwi", pe="PA", final="dwi/dir-PA_run-01_dwi"),
                dwi("dMRI_dir98_blip_revPE", SIEMENS_DWI, "dwi/dwi", pe="PA", final="dwi/dir-PA_run-02_dwi"),
            ),
            "full DWIs in both phase-encoding directions (a full reverse-PE DWI named blip/revPE stays a DWI);"
            " no field map, QSIPrep pairs them itself",
        ),
        Shape(
            "ukb",
            "UK Biobank (Siemens Skyra)",
            (
                anat("localizer", SIEMENS_NORM, None),
                anat("T1_p2_1mm_fov256_sag_TI_880", SIEMENS_ND, None),
                anat("T1_p2_1mm_fov256_sag_TI_880", SIEMENS_NORM, "anat/T1w", copy=True),
                anat("T2_FLAIR_sag_p2_1mm_fs_ellip_pf78", SIEMENS_ND, None),
                anat("T2_FLAIR_sag_p2_1mm_fs_ellip_pf78", SIEMENS_NORM, "anat/FLAIR", copy=True),
                dwi("MB3_diff_b1000_b2000_AP", (*SIEMENS_DWI, "MB"), "dwi/dir-AP_dwi", pe="AP", n_b0=3,
                    n_directions=8, shells=(1000.0, 2000.0)),
                dwi("MB3_diff_b0_PA", (*SIEMENS_DWI, "MB"), "fmap/acq-dwi_dir-PA_epi", pe="PA", n_b0=3,
                    n_directions=0),
            ),
            "two shells, a 3-volume reverse-PE b=0 series, ND + NORM copies of T1 and FLAIR",
            intended_for={"acq-dwi_dir-PA_epi": ("dir-AP_dwi",)},
        ),
        Shape(
            "siemens",
            "Siemens product protocol",
            (
                anat("AAHead_Scout_32ch-head-coil", SIEMENS_NORM, None),
                anat("t1_mprage_sag_p2_iso", SIEMENS_NORM, "anat/T1w"),
                anat("t2_tse_dark-fluid_tra", SIEMENS_NORM, "anat/FLAIR"),
                anat("t2_tse_tra", SIEMENS_NORM, "anat/T2w"),
                dwi("ep2d_diff_mddw_6_p2", SIEMENS_DWI, "dwi/dwi", pe="AP", final="dwi/dir-AP_dwi"),
                anat("ep2d_diff_mddw_6_p2_ADC", derived("ADC"), None),
                anat("ep2d_diff_mddw_6_p2_TRACEW", derived("TRACEW"), None),
                anat("ep2d_diff_mddw_6_p2_FA", derived("FA"), None),
                anat("ep2d_diff_mddw_6_p2_ColFA", derived("NONE"), None),
                dwi("ep2d_diff_b0_PA", SIEMENS_DWI, "fmap/acq-dwi_dir-PA_epi", pe="PA", n_directions=0),
            ),
            "vendor defaults: dark-fluid TSE is a FLAIR, derived ADC/TRACEW/FA/ColFA maps skipped, 1-volume b=0",
            intended_for={"acq-dwi_dir-PA_epi": ("dir-AP_dwi",)},
        ),
        Shape(
            "philips",
            "Philips",
            (
                anat("SURVEY", PHILIPS_T1, None),
                anat("sT1W_3D_TFE", PHILIPS_T1, "anat/T1w"),
                anat("T2W_TSE", PHILIPS_SE, "anat/T2w"),
                anat("3D_Brain_VIEW_FLAIR", PHILIPS_IR, "anat/FLAIR"),
                dwi("DTI_high_iso", PHILIPS_SE, "dwi/dwi", pe="AP", final="dwi/dir-AP_dwi"),
                dwi("DTI_b0_PA", PHILIPS_SE, "fmap/acq-dwi_dir-PA_epi", pe="PA", n_directions=0),
            ),
            "Philips names; no DIFFUSION in ImageType (routed by name, then by content)",
            intended_for={"acq-dwi_dir-PA_epi": ("dir-AP_dwi",)},
        ),
        Shape(
            "ge",
            "GE",
            (
                anat("3Plane Loc SSFSE", GE, None, protocol=GE_PROTOCOL),
                anat("Sag FSPGR BRAVO", GE, "anat/T1w", protocol=GE_PROTOCOL),
                anat("Sag CUBE T2", GE, "anat/T2w", protocol=GE_PROTOCOL),
                anat("Sag CUBE FLAIR", GE, "anat/FLAIR", protocol=GE_PROTOCOL),
                dwi("Ax DTI", GE, "dwi/dwi", pe="AP", protocol=GE_PROTOCOL, final="dwi/dir-AP_dwi"),
                dwi("Ax DTI RPG", GE, "fmap/acq-dwi_epi", pe="PA", n_directions=0, protocol=GE_PROTOCOL,
                    final="fmap/acq-dwi_dir-PA_epi"),
            ),
            "GE names; the ProtocolName (the exam's, 'DTI' in it) is the same on every series and ignored",
            intended_for={"acq-dwi_dir-PA_epi": ("dir-AP_dwi",)},
        ),
        Shape(
            "no_polarity",
            "Siemens names, exported without phase-encoding polarity (as much Philips data)",
            (
                anat("t1_mprage_sag_p2_iso", SIEMENS_NORM, "anat/T1w"),
                anat("t2_tse_dark-fluid_tra", SIEMENS_NORM, "anat/FLAIR"),
                dwi("ep2d_diff_mddw_6_AP", SIEMENS_DWI, "dwi/dir-AP_dwi", pe="AP", tags=False),
                dwi("ep2d_diff_b0_PA", SIEMENS_DWI, "fmap/acq-dwi_dir-PA_epi", pe="PA", n_directions=0,
                    tags=False, final=None),
            ),
            "dcm2niix cannot read the polarity: the b=0 field map is left out with a warning, the DWI keeps"
            " its name-given dir- and a warning",
            warnings=("PhaseEncodingDirection",),
            qsiprep_refusal="a DWI sidecar without PhaseEncodingDirection",
        ),
    )
}

# Series names of public protocols that are HeudiConv SeqInfo rows only (the heuristic's unit tests).
PROTOCOLS: dict[str, tuple[Series, ...]] = {
    **{name: shape.series for name, shape in SHAPES.items()},
    "adni3": (
        row("localizer", SIEMENS_NORM, None),
        row("Accelerated Sagittal MPRAGE", SIEMENS_NORM, "anat/T1w"),
        row("Accelerated Sagittal MPRAGE_ND", SIEMENS_ND, None),
        row("Sagittal 3D FLAIR", SIEMENS_NORM, "anat/FLAIR"),
        row("Axial 3TE T2 STAR", SIEMENS_NORM, None),
        row("Axial DTI", SIEMENS_DWI, "dwi/dwi"),
        row("Axial DTI_ADC", derived("ADC"), None),
        row("Field Mapping", SIEMENS_ND, "fmap/magnitude"),
        row("Field Mapping", SIEMENS_PHASE, "fmap/phasediff"),
        row("Axial rsfMRI (Eyes Open)", SIEMENS_EPI, None),
    ),
    "hcp_ya": (
        row("BIAS_BC", SIEMENS_ND, None),
        row("BIAS_32CH", SIEMENS_ND, None),
        row("T1w_MPR1", SIEMENS_NORM, "anat/T1w"),
        row("T2w_SPC1", SIEMENS_NORM, "anat/T2w"),
        row("FieldMap_Magnitude", SIEMENS_ND, "fmap/magnitude"),
        row("FieldMap_Phase", SIEMENS_PHASE, "fmap/phasediff"),
        row("SpinEchoFieldMap_LR", SIEMENS_EPI, "fmap/dir-LR_epi"),
        row("rfMRI_REST1_LR", SIEMENS_EPI, None),
        row("rfMRI_REST1_LR_SBRef", (*SIEMENS_EPI, "SBREF"), None),
        row("DWI_dir95_RL", SIEMENS_DWI, "dwi/dir-RL_dwi"),
        row("DWI_dir95_LR", SIEMENS_DWI, "dwi/dir-LR_dwi"),
    ),
    "abcd_extra": (
        row("ABCD_T2w_SPC_vNav_setter", SIEMENS_ND, None),
        row("ABCD_fMRI_DistortionMap_AP", SIEMENS_EPI, None),
        row("ABCD_fMRI_rest", SIEMENS_EPI, None),
        row("ABCD_dMRI_ADC", derived("ADC"), None),
    ),
    "siemens_extra": (
        row("localizer", SIEMENS_NORM, None),
        row("t1_mpr_sag_p2_iso", SIEMENS_NORM, "anat/T1w"),
        row("t1_mprage_sag_p2_iso_MPR_Cor", ("DERIVED", "SECONDARY", "MPR", "NORM"), None),
        row("t2_spc_sag_p2_iso", SIEMENS_NORM, "anat/T2w"),
        row("t2_tirm_tra_dark-fluid", SIEMENS_NORM, "anat/FLAIR"),
        row("t2_swi_tra", SIEMENS_NORM, None),
        row("t2_swi_tra_Pha", SIEMENS_PHASE, None),
        row("t1_mp2rage_sag_p3_UNI_Images", ("DERIVED", "PRIMARY", "M", "ND", "UNI"), None),
        row("t1_mp2rage_sag_p3_INV1", SIEMENS_ND, None),
        row("gre_field_mapping", SIEMENS_ND, "fmap/magnitude"),
        row("gre_field_mapping", SIEMENS_PHASE, "fmap/phasediff"),
        row("gre_field_mapping_dwi", SIEMENS_PHASE, "fmap/acq-dwi_phasediff"),
        row("ep2d_bold_rest", SIEMENS_EPI, None),
        row("MoCoSeries", (*SIEMENS_EPI, "MOSAIC", "MOCO"), None),
        row("PhoenixZIPReport", ("ORIGINAL", "PRIMARY", "OTHER", "CSA REPORT"), None),
        row("ep2d_diff_mddw_30_p2_TENSOR", derived("TENSOR"), None),
        row("pd_t2_tse_tra", SIEMENS_NORM, None),
        row("se_epi_dwi_topup_PA", SIEMENS_EPI, "fmap/acq-dwi_dir-PA_epi"),
        row("t2_spc_da-fl_sag_p2_iso", SIEMENS_NORM, "anat/FLAIR"),
        row("FieldMap_AP", SIEMENS_EPI, "fmap/dir-AP_epi"),  # a field map named with its direction is EPI
        row("DistortionCorrection_dwi_PA", SIEMENS_EPI, "fmap/acq-dwi_dir-PA_epi"),
    ),
    "philips_extra": (
        row("WIP sT1W_3D_TFE SENSE", PHILIPS_T1, "anat/T1w"),
        row("SENSE_REFSCAN", PHILIPS_T1, None),
        row("DWI_isotropic", ("DERIVED", "PRIMARY", "ISOTROPIC"), None),
        row("dADC", ("DERIVED", "PRIMARY", "ADC", "ADC"), None),
    ),
    "ge_extra": (
        row("ASSET calibration", GE, None, GE_PROTOCOL),
        row("Ax T2 FLAIR", GE, "anat/FLAIR", GE_PROTOCOL),
        row("Ax SWAN", GE, None, GE_PROTOCOL),
        row("Sag 3D IR-FSPGR", GE, "anat/T1w", GE_PROTOCOL),
        row("Sag T1 FLAIR", GE, "anat/T1w", GE_PROTOCOL),
        row("Ax DTI 30 dir", GE, "dwi/dwi", GE_PROTOCOL),
        row("Ax rsfMRI", GE, None, GE_PROTOCOL),
        row("NODDI_multishell", GE, "dwi/dwi", GE_PROTOCOL),
        row("b0_PA", GE, "dwi/dir-PA_dwi", GE_PROTOCOL),
        row("Ax DWI 1000b", GE, "dwi/dwi", GE_PROTOCOL),  # a 3-scan trace: curation leaves it out (no directions)
    ),
}


def shapes(*, qsiprep_accepts: bool | None = None) -> list[str]:
    """Names of the sessions ``build_session`` writes (all, or those QSIPrep must accept / refuse)."""
    return [n for n, s in SHAPES.items() if qsiprep_accepts is None or (s.qsiprep_refusal is None) == qsiprep_accepts]


def build_session(name: str, folder: str | Path, *, seed: int = 0, patient_id: str | None = None) -> synth.SynthSession:
    """Write the DICOM session of shape ``name`` into ``folder`` (pydicom, well under a second)."""
    shape = SHAPES[name]
    series = [s.synth for s in shape.series if s.synth is not None]
    return synth.write_protocol(
        folder, series, seed=seed, patient_id=patient_id or name.upper(), acquired=datetime(2024, 5, 6, 9, 0)
    )


def bids_name(target: str, participant: str, session: str) -> str:
    """``dwi/dir-AP_dwi`` -> ``dwi/sub-X_ses-Y_dir-AP_dwi``."""
    datatype, rest = target.split("/", 1)
    return f"{datatype}/sub-{participant}_ses-{session}_{rest}"


def expected_files(name: str, participant: str, session: str) -> set[str]:
    """The NIfTI files (relative to the session folder) the converted, curated session must hold exactly."""
    return {
        bids_name(s.expected, participant, session) + ".nii.gz"
        for s in SHAPES[name].series
        if s.synth is not None and s.expected is not None
    }


def seqinfo(protocol: str) -> list[SeqInfo]:
    """The protocol's series as HeudiConv ``SeqInfo`` rows (what a heuristic receives), in acquisition order."""
    return list(_seqinfo(PROTOCOLS[protocol]))


def _seqinfo(series: tuple[Series, ...]) -> Iterator[SeqInfo]:
    total = 0
    for number, s in enumerate(series, start=1):
        plan = s.synth.plan if s.synth is not None else None
        files = plan.slices if plan else 6
        total += files
        copy = s.synth is not None and s.synth.copy
        yield SeqInfo(
            total_files_till_now=total,
            example_dcm_file=f"{number:03d}_00001.dcm",
            series_id=f"{number}-{s.description}",
            dcm_dir_name="dicom",
            series_files=files,
            unspecified="",
            dim1=plan.columns if plan else 16,
            dim2=plan.rows if plan else 16,
            dim3=files,
            dim4=1,
            TR=(plan.repetition_time_ms if plan else 3000.0) / 1000,
            TE=plan.echo_time_ms if plan else 90.0,
            protocol_name=s.protocol_name or s.description,
            is_motion_corrected="MOCO" in s.image_type,
            is_derived="DERIVED" in s.image_type,
            patient_id="P",
            study_description="",
            referring_physician_name="",
            series_description=s.description,
            sequence_name="",
            image_type=s.image_type,
            accession_number="",
            patient_age=None,
            patient_sex=None,
            date="20240506",
            series_uid=f"1.2.3.{number}",
            time=f"09{(number - 1 if copy else number):02d}00.000000",
            custom=_content(s),
        )


def _content(series: Series) -> tuple[tuple[str, Any], ...] | None:
    """What the heuristic's custom_seqinfo reads from a synthesized diffusion series' headers."""
    item = series.synth
    if item is None or item.plan.kind != "dwi":
        return None
    if item.n_directions:  # it stops reading at the first weighted volume: "several"
        return (("volumes", -1), ("max_b", max(item.shells)))
    return (("volumes", item.n_b0), ("max_b", 0.0))
