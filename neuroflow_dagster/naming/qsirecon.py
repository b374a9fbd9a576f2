"""QSIRecon 1.1.1's own names: its built-in recon specs and what each needs, the atlases its image ships.

Plain data, read from QSIRecon 1.1.1's source (``qsirecon/data/pipelines/*.yaml``, the scheme table
"Which workflows are appropriate for your dMRI data?" of its ``docs/builtin_workflows.rst``,
``cli/parser.py``, ``utils/atlases.py``) and from the image it builds on (``pennlinc/qsirecon_build:25.1.0``:
AtlasPack 0.1.0 and QSIRecon's atlas archive). The configuration validates against it when it is loaded,
so a name the real tool does not know is an error before any compute (docs/tools.md, "QSIRecon").
"""

from __future__ import annotations

from dataclasses import dataclass

SINGLE_SHELL = "single_shell"
MULTI_SHELL = "multi_shell"
# Not shelled (DSI, q-space grids): more b-value clusters than the square root of the diffusion-weighted
# volumes, the test QSIRecon copies from MRtrix3 before it calls a scheme shelled.
CARTESIAN = "cartesian"
SCHEMES = (SINGLE_SHELL, MULTI_SHELL, CARTESIAN)
SCHEME_TEXT = {SINGLE_SHELL: "single-shell", MULTI_SHELL: "multi-shell", CARTESIAN: "Cartesian (not shelled)"}

# Atlases in QSIRecon 1.1.1's image: QSIRecon's archive (/atlas/qsirecon_atlases) and AtlasPack 0.1.0's
# 4S family (/atlas/AtlasPack: Schaefer 2018 at 100..1000 cortical parcels + 56 subcortical/cerebellar).
SHIPPED_ATLASES = (
    "AAL116",
    "AICHA384Ext",
    "Brainnetome246Ext",
    "Gordon333Ext",
    *(f"4S{n}56Parcels" for n in range(1, 11)),
)
# QSIRecon's --datasets names it uses itself: a site dataset under one of them would replace it (or is refused).
RESERVED_DATASETS = {
    "preprocessed": "QSIRecon reserves it for its input",
    "qsireconatlases": "QSIRecon's own atlases (AAL116, ...) go by that name",
    "qsirecon4s": "QSIRecon's 4S atlases go by that name",
}
# QSIRecon looks atlases up in the space of QSIPrep's template transform (MNI152NLin2009cAsym in QSIPrep 1.x).
ATLAS_SPACE = "MNI152NLin2009cAsym"

TENSOR = "tensor"  # a tensor fit (DSI Studio's export, TORTOISE): needs 6 non-collinear directions and S0
DKI = "dki"  # dipy's DiffusionKurtosisModel (QSIRecon's KurtosisReconstruction)
MAPMRI = "mapmri"  # dipy's MapmriModel (QSIRecon's MAPMRIReconstruction)


@dataclass(frozen=True)
class BuiltinSpec:
    """One built-in recon spec of QSIRecon 1.1.1, as far as running it is concerned."""

    name: str
    schemes: frozenset[str]  # where QSIRecon's documentation says it works ("Yes" in its scheme table)
    suffixes: tuple[str, ...]  # the derivatives/qsirecon-<suffix> folders its nodes write
    scalar_maps: bool  # writes *_model-*_param-*_dwimap.nii.gz maps (what QSIParc parcellates)
    connectivity: bool = False  # has a connectivity node: QSIRecon refuses to build it without --atlases
    models: tuple[str, ...] = ()  # fits checked against each session's gradient table before a run
    needs_fs_subjects_dir: bool = False  # ACT with hsvs: FreeSurfer outputs (--fs-subjects-dir)


def _spec(name: str, schemes: str, suffixes: str, scalar_maps: bool, **kw: object) -> BuiltinSpec:
    codes = {"S": SINGLE_SHELL, "M": MULTI_SHELL, "C": CARTESIAN}
    return BuiltinSpec(name, frozenset(codes[c] for c in schemes), tuple(suffixes.split()), scalar_maps, **kw)  # type: ignore[arg-type]


BUILTIN_SPECS: dict[str, BuiltinSpec] = {
    s.name: s
    for s in (
        _spec("amico_noddi", "M", "NODDI", True),
        _spec("csdsi_3dshore", "MC", "3dSHORE msmtcsd ifod2 msmtconnectome", True, connectivity=True),
        _spec("dipy_3dshore", "MC", "3dSHORE 3dshorenetwork", True, connectivity=True),
        _spec("dipy_dki", "M", "DKI", True, models=(DKI,)),
        _spec("dipy_mapmri", "MC", "DIPYMAPMRI", True, models=(MAPMRI,)),
        _spec("dsi_studio_autotrack", "MCS", "DSIStudio", False),
        # The scheme table marks single-shell "Yes*" (not recommended): allowed, not a default.
        _spec("dsi_studio_gqi", "MCS", "DSIStudio", True, connectivity=True, models=(TENSOR,)),
        _spec("hbcd_scalar_maps", "M", "DIPYDKI TORTOISE_model-MAPMRI TORTOISE_model-tensor DSIStudio", True,
              models=(DKI, TENSOR)),
        _spec("mrtrix_multishell_msmt_ACT-fast", "M", "MRtrix3_act-FAST", True, connectivity=True),
        _spec("mrtrix_multishell_msmt_ACT-hsvs", "M", "MRtrix3_act-HSVS", True, connectivity=True,
              needs_fs_subjects_dir=True),
        _spec("mrtrix_multishell_msmt_noACT", "M", "MRtrix3_act-None", True, connectivity=True),
        _spec("mrtrix_multishell_msmt_pyafq_tractometry", "MS", "MRtrix3 PYAFQ", True),
        _spec("mrtrix_singleshell_ss3t_ACT-fast", "S", "MRtrix3_fork-SS3T_act-FAST", True, connectivity=True),
        _spec("mrtrix_singleshell_ss3t_ACT-hsvs", "S", "MRtrix3_fork-SS3T_act-HSVS", True, connectivity=True,
              needs_fs_subjects_dir=True),
        _spec("mrtrix_singleshell_ss3t_noACT", "S", "MRtrix3_fork-SS3T_act-None", True, connectivity=True),
        _spec("multishell_scalarfest", "M", "msmtcsd wmNODDI gmNODDI SOP MAPMRI DKI DIPY3dSHORE csmsmtcsd DSIStudio",
              True, models=(DKI, MAPMRI, TENSOR)),
        _spec("pyafq_tractometry", "MS", "PYAFQ", False),
        _spec("reorient_fslstd", "MCS", "FSL", False),
        _spec("ss3t_fod_autotrack", "MS", "SS3TAutoTrack", True, models=(TENSOR,)),
        _spec("TORTOISE", "M", "TORTOISE", True, models=(TENSOR,)),
        # Not in the scheme table; shipped for QSIRecon's own tests (DKI: multi-shell; empty files: any).
        _spec("test_scalar_maps", "M", "DIPYDKI DSIStudio", True, models=(DKI, TENSOR)),
        _spec("test_workflow", "MCS", "test", False),
    )
}

# The defaults: accepted by QSIRecon 1.1.1 for the scheme, needing nothing beyond QSIPrep's output and the
# image (no FreeSurfer, no ACT); each writes the scalar maps QSIParc parcellates (docs/tools.md says why).
DEFAULT_SPECS = {SINGLE_SHELL: "ss3t_fod_autotrack", MULTI_SHELL: "dipy_dki", CARTESIAN: "dsi_studio_gqi"}
DEFAULT_ATLASES = ("4S156Parcels", "4S456Parcels")
# The specs the built-in stand-in (tools/builtin/recon.py) writes the scalar maps of: the defaults.
STAND_IN_SPECS = frozenset(DEFAULT_SPECS.values())

SPEC_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def is_spec_file(value: str) -> bool:
    """A recon spec given as a file (a path, or a .yaml/.yml/.json name) rather than a built-in name."""
    return "/" in value or value.endswith(SPEC_FILE_SUFFIXES)
