"""QSIPrep's image QC table (``*_space-ACPC_desc-image_qc.tsv``): the reader, and the stand-in's measures.

The REAL tables below were written by QSIPrep's own ``SeriesQC`` + ``DSIStudioMergeQC``
(qsiprep 1.1.1 and 26.1.1 wheels) from the DSI Studio QC row quoted in QSIPrep's
tests and a 4-volume confounds table; ``test_real_qsiprep_writes_these_tables`` (slow)
re-creates them with that code and checks they are byte-for-byte what the fast tests
use. QSIPrep cannot run here; its table writer can (the modules SeriesQC never uses -
niworkflows, svgutils, SimpleITK... - are stubbed at import).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from neuroflow_dagster.tools.builtin.image_qc import bad_slices, qc_row, series_qc
from neuroflow_dagster.tools.qc_table import find_image_qc, image_qc_name, read_image_qc

REAL_HEADER_1_1_1 = (
    "raw_dimension_x\traw_dimension_y\traw_dimension_z\traw_voxel_size_x\traw_voxel_size_y\traw_voxel_size_z\t"
    "raw_max_b\traw_neighbor_corr\traw_masked_neighbor_corr\traw_dwi_contrast\traw_num_bad_slices\t"
    "raw_num_directions\traw_coherence_index\tt1_dimension_x\tt1_dimension_y\tt1_dimension_z\tt1_voxel_size_x\t"
    "t1_voxel_size_y\tt1_voxel_size_z\tt1_max_b\tt1_neighbor_corr\tt1_masked_neighbor_corr\tt1_dwi_contrast\t"
    "t1_num_bad_slices\tt1_num_directions\tt1_coherence_index\tmean_fd\tmax_fd\tmax_rotation\tmax_translation\t"
    "max_rel_rotation\tmax_rel_translation\tt1_dice_distance\tfile_name\tsubject_id\tsession_id\ttask_id\tdir_id\t"
    "acq_id\tspace_id\trec_id\trun_id"
)
_MEASURES = (
    "32.0\t39.0\t34.0\t5.0\t5.0\t5.0\t800.0\t0.996735\t0.991714\t1.054243\t0.0\t32.0\t0.42\t32.0\t39.0\t34.0\t5.0\t"
    "5.0\t5.0\t800.0\t0.996735\t0.991714\t1.054243\t0.0\t32.0\t0.42\t0.30000000000000004\t0.6000000000000001\t0.003\t"
    "0.30000000000000004\t0.001\t0.10000000000000003\t0.12\tsub-01_ses-01_space-ACPC_desc-preproc_dwi.nii.gz\t"
    "sub-01\tses-01"
)
REAL_TABLE_1_1_1 = REAL_HEADER_1_1_1 + "\n" + _MEASURES + "\t\t\t\tspace-ACPC\t\t\n"  # NaN as empty cells
REAL_TABLE_26_1_1 = (REAL_HEADER_1_1_1.replace("\tsession_id\t", "\tsession_label\t") + "\n" + _MEASURES
                     + "\tn/a\tn/a\tn/a\tspace-ACPC\tn/a\tn/a\n")  # NaN as n/a


@pytest.mark.parametrize("table", [REAL_TABLE_1_1_1, REAL_TABLE_26_1_1], ids=["qsiprep-1.1.1", "qsiprep-26.1.1"])
def test_read_real_tables(tmp_path: Path, table: str) -> None:
    path = tmp_path / "sub-01_ses-01_space-ACPC_desc-image_qc.tsv"
    path.write_text(table)
    qc = read_image_qc(path)
    assert len(qc) == 33 and all(isinstance(v, float) for v in qc.values())
    assert qc["raw_neighbor_corr"] == 0.996735 and qc["raw_masked_neighbor_corr"] == 0.991714
    assert qc["raw_num_bad_slices"] == 0.0 and qc["raw_num_directions"] == 32.0
    assert qc["mean_fd"] == pytest.approx(0.3) and qc["t1_dice_distance"] == 0.12
    assert "file_name" not in qc and "session_id" not in qc and "session_label" not in qc


def test_read_missing_values_and_bad_tables(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("raw_neighbor_corr\tmean_fd\tt1_neighbor_corr\tCNR0_mean\tfile_name\n0.9\tn/a\t\tNaN\tx.nii.gz\n")
    assert read_image_qc(path) == {"raw_neighbor_corr": 0.9, "mean_fd": None, "t1_neighbor_corr": None,
                                   "CNR0_mean": None}
    path.write_text("a\tb\n1\t2\n3\t4\n")
    with pytest.raises(ValueError, match="found 3 non-empty line"):
        read_image_qc(path)
    path.write_text("a\tb\n1\t2\t3\n")
    with pytest.raises(ValueError, match="header has 2 columns but the row has 3"):
        read_image_qc(path)
    with pytest.raises(FileNotFoundError):
        read_image_qc(tmp_path / "absent.tsv")


def test_find_image_qc_names(tmp_path: Path) -> None:
    d = tmp_path / "sub-01/ses-02/dwi"
    d.mkdir(parents=True)
    for name in ("sub-01_ses-02_space-ACPC_desc-image_qc.tsv",
                 "sub-01_ses-02_acq-HASC55AP_space-ACPC_desc-image_qc.tsv",
                 "sub-01_ses-02_space-ACPC_desc-slice_qc.tsv", "sub-01_ses-02_space-ACPC_desc-image_qc.json"):
        (d / name).write_text("x")
    assert [p.name for p in find_image_qc(tmp_path, "01", "02")] == [
        "sub-01_ses-02_acq-HASC55AP_space-ACPC_desc-image_qc.tsv", "sub-01_ses-02_space-ACPC_desc-image_qc.tsv"]
    assert image_qc_name("01", "02") == "sub-01_ses-02_space-ACPC_desc-image_qc.tsv"
    assert image_qc_name("01") == "sub-01_space-ACPC_desc-image_qc.tsv"


def test_stand_in_row_has_the_real_tables_columns_in_order() -> None:
    row = qc_row({}, {}, "f.nii.gz", {"subject_id": "sub-01"})
    assert "\t".join(row) == REAL_HEADER_1_1_1


def _paired_scheme() -> tuple[np.ndarray, np.ndarray]:
    """Six directions, each with a partner 3 degrees away: every nearest neighbour is mutual."""
    base = np.eye(3).tolist() + (np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]]) / np.sqrt(2)).tolist()
    vecs = []
    for v in np.array(base):
        helper = np.array([0.0, 0.0, 1.0]) if abs(v[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
        w = np.cross(v, helper)
        w /= np.linalg.norm(w)
        vecs += [v, np.cos(np.radians(3)) * v + np.sin(np.radians(3)) * w]
    bvecs = np.r_[[[0.0, 0.0, 0.0]], vecs]
    return np.r_[0.0, np.full(len(vecs), 1000.0)], bvecs


def test_neighbor_corr_matches_dipy_when_neighbours_are_mutual() -> None:
    """dipy's neighboring_dwi_correlation averages every volume's pair; DSI Studio keeps pairs with i > j.

    With mutual nearest neighbours both give the same mean, so dipy is an independent check."""
    from dipy.core.gradients import gradient_table
    from dipy.stats.qc import neighboring_dwi_correlation

    bvals, bvecs = _paired_scheme()
    rng = np.random.default_rng(1)
    base = rng.uniform(100, 1000, (8, 8, 5, 1))
    data = (base * rng.uniform(0.2, 1.0, (1, 1, 1, len(bvals))) + rng.normal(0, 80, (8, 8, 5, len(bvals))))
    mask = np.zeros((8, 8, 5), dtype=bool)
    mask[2:6, 2:6, 1:4] = True
    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=50)
    qc = series_qc(data.astype(np.float32), bvals, bvecs, mask, (2.0, 2.0, 2.5))
    assert qc["neighbor_corr"] == pytest.approx(neighboring_dwi_correlation(data, gtab), abs=1e-5)
    assert qc["masked_neighbor_corr"] == pytest.approx(neighboring_dwi_correlation(data, gtab, mask=mask), abs=1e-5)
    assert qc["num_directions"] == 12 and qc["max_b"] == 1000 and qc["voxel_size_z"] == 2.5
    assert qc["dimension_x"] == 8 and qc["coherence_index"] is None


def test_dwi_contrast_and_too_few_volumes() -> None:
    """Neighbouring directions carry more similar images than orthogonal ones -> contrast > 1."""
    from dipy.core.gradients import gradient_table
    from dipy.sims.voxel import single_tensor

    from neuroflow_dagster.demo.synth import hemisphere_directions

    bvals = np.r_[0.0, np.full(30, 1000.0)]
    bvecs = np.r_[[[0.0, 0.0, 0.0]], hemisphere_directions(30)]
    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=50)
    rng = np.random.default_rng(0)
    data = np.zeros((6, 6, 4, 31), dtype=np.float32)
    for idx in np.ndindex(6, 6, 4):  # a different fibre direction and S0 in every voxel
        evecs = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        s0 = rng.uniform(500.0, 1500.0)
        data[idx] = single_tensor(gtab, S0=s0, evals=np.array([1.7e-3, 0.3e-3, 0.3e-3]), evecs=evecs)
    qc = series_qc(data, bvals, bvecs, np.ones((6, 6, 4), dtype=bool), (2.0, 2.0, 2.0))
    assert qc["dwi_contrast"] > 1.2
    one = series_qc(data[..., :2], bvals[:2], bvecs[:2], np.ones((6, 6, 4), dtype=bool), (2.0, 2.0, 2.0))
    assert one["neighbor_corr"] is None and one["masked_neighbor_corr"] is None and one["dwi_contrast"] is None
    assert one["num_directions"] == 1


def test_bad_slices_counts_dropout_slices_only() -> None:
    z = np.arange(10, dtype=np.float32)
    clean = np.broadcast_to(500 + 20 * z[None, None, :, None], (8, 8, 10, 4)).copy()
    assert bad_slices(clean) == 0
    hit = clean.copy()
    hit[..., 5, 2] *= 0.2  # one slice of volume 2 lost its signal
    assert bad_slices(hit) == 1  # the neighbours differ from it, but less than twice as much as from each other
    assert bad_slices(clean[:, :, :2]) == 0  # no interior slice


# Run inside the tools venv (scripts/tool-parsers-venv.sh): QSIPrep's SeriesQC writes a table.
SERIES_QC_SCRIPT = r"""
import importlib.abc, importlib.machinery, os, sys, types
from types import SimpleNamespace
STUBBED = {"niworkflows", "seaborn", "svgutils", "lxml", "transforms3d", "SimpleITK", "cs_dmri", "nireports"}
class _Any:
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k): return _Any()
    def __getattr__(self, name): return _Any()
class _Mod(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"): raise AttributeError(name)
        return type(name, (_Any,), {}) if name[:1].isupper() or name.startswith("_") else _Any()
class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = _Mod(spec.name); m.__path__ = []; return m
    def exec_module(self, module): pass
sys.meta_path.insert(0, _Finder())
from qsiprep.interfaces.dsi_studio import DSIStudioMergeQC
from qsiprep.interfaces.reports import SeriesQC
out, fib_text = sys.argv[1], sys.argv[2]
src = os.path.join(out, "src_qc.txt")
with open(src, "w") as f:
    f.write("file name\tdimension\tresolution\tdwi count(b0/dwi)\tmax b-value\tDWI contrast\t"
            "neighboring DWI correlation\tneighboring DWI correlation(masked)\t#bad slices\n"
            "scaled_merged\t32 39 34 \t5 5 5 \t1/32\t800.000000\t1.054243\t0.996735\t0.991714\t0\t\t\n")
fib = os.path.join(out, "fib_qc.txt")
with open(fib, "w") as f:
    f.write(fib_text)
rt = SimpleNamespace(cwd=out)
merge = DSIStudioMergeQC(src_qc=src, fib_qc=fib)
merge._run_interface(rt)
conf = os.path.join(out, "confounds.tsv")
with open(conf, "w") as f:
    f.write("trans_x\ttrans_y\ttrans_z\trot_x\trot_y\trot_z\tframewise_displacement\toriginal_file\n")
    for i in range(4):
        f.write(f"{0.1 * i}\t0\t0\t0\t{0.001 * i}\t0\t{0.2 * i}\tsub-01_ses-01_dwi.nii.gz\n")
qc = SeriesQC(pre_qc=merge._results["qc_file"], t1_qc=merge._results["qc_file"], confounds_file=conf,
              t1_dice_score=0.12, output_file_name="sub-01_ses-01_space-ACPC_desc-preproc_dwi.nii.gz")
qc._run_interface(rt)
print(qc._results["series_qc_file"])
"""
FIB_QC = ("FileName\tImage dimension\tResolution\tCoherence Index\tR2 (QSDR)\n"
          "scaled_merged.fib.gz\t32 39 34\t5 5 5\t0.42\n")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(("version", "expected"), [("1.1.1", REAL_TABLE_1_1_1), ("26.1.1", REAL_TABLE_26_1_1)])
def test_real_qsiprep_writes_these_tables(tmp_path: Path, version: str, expected: str) -> None:
    import os

    proc = subprocess.run(["bash", str(REPO / "scripts" / "tool-parsers-venv.sh")], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, f"cannot build the tools venv (needs the package index): {proc.stderr[-2000:]}"
    tools = Path(proc.stdout.strip().splitlines()[-1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({"NO_ET": "1", "NIPYPE_NO_ET": "1", "TEMPLATEFLOW_HOME": str(tools / "templateflow"),
                "PYTHONPATH": str(tools / f"qsiprep-{version}")})

    def run(fib_text: str, folder: Path) -> Path:
        folder.mkdir()
        done = subprocess.run([str(tools / "bin" / "python"), "-c", SERIES_QC_SCRIPT, str(folder), fib_text],
                              capture_output=True, text=True, env=env, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return Path(done.stdout.strip().splitlines()[-1])

    table = run(FIB_QC, tmp_path / "full")
    assert table.read_text() == expected
    if version == "26.1.1":  # 26.x turns a failed QC stage into n/a instead of crashing
        missing = read_image_qc(run("", tmp_path / "no-fib"))
        assert missing["raw_coherence_index"] is None and missing["raw_neighbor_corr"] == 0.996735
