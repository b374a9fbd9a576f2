"""QSIPrep's per-series image QC table (``*_space-ACPC_desc-image_qc.tsv``): names, columns, a reader.

QSIPrep writes one single-row, tab-separated table per preprocessed DWI series,
``sub-X[/ses-Y]/dwi/sub-X[_ses-Y][_acq-..][_dir-..][_run-..]_space-ACPC_desc-image_qc.tsv``
(its ``SeriesQC`` interface, qsiprep/interfaces/reports.py, 1.1.1 and 26.x). The
columns: DSI Studio's source-data QC of the raw series with prefix ``raw_`` and of
the series resampled to ACPC with prefix ``t1_`` (:data:`DSI_STUDIO_MEASURES`, from
``load_src_qc_file`` + ``load_fib_qc_file`` in qsiprep/interfaces/dsi_studio.py),
the motion summary (:data:`MOTION_COLUMNS`), ``t1_dice_distance``, optional
columns (``CNR*``, ``fieldmap_hz_*``, ``t1post_*``, 26.x's ``*gradient_table_ratio``...),
then bookkeeping text (:data:`TEXT_COLUMNS`). A value that was not measured is an
empty cell (1.1.1) or ``n/a`` (26.x). The builtin QSIPrep stand-in writes the same
file name in the same place with the columns it can measure (docs/stand-ins.md).

:func:`read_image_qc` reads either into ``{measure: float or None}`` for the image QC
checks. Plain Python (no pandas, no Dagster): cheap to call from an asset check.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: DSI Studio's QC measures, in QSIPrep's order (SRC QC, then the FIB QC's coherence index).
DSI_STUDIO_MEASURES: tuple[str, ...] = (
    "dimension_x",
    "dimension_y",
    "dimension_z",
    "voxel_size_x",
    "voxel_size_y",
    "voxel_size_z",
    "max_b",
    "neighbor_corr",
    "masked_neighbor_corr",
    "dwi_contrast",
    "num_bad_slices",
    "num_directions",
    "coherence_index",
)
#: QSIPrep's motion summary (calculate_motion_summary); all n/a when no motion was estimated.
MOTION_COLUMNS: tuple[str, ...] = (
    "mean_fd",
    "max_fd",
    "max_rotation",
    "max_translation",
    "max_rel_rotation",
    "max_rel_translation",
)
#: Bookkeeping columns (file name and BIDS entities; 26.x says session_label, 1.1.1 session_id).
TEXT_COLUMNS: frozenset[str] = frozenset(
    {
        "file_name",
        "subject_id",
        "session_id",
        "session_label",
        "task_id",
        "dir_id",
        "acq_id",
        "space_id",
        "rec_id",
        "run_id",
        "qc_warnings",
    }
)
#: Cell values that mean "not measured".
MISSING = frozenset({"", "n/a", "na", "nan", "none", "null"})
SUFFIX = "_space-ACPC_desc-image_qc.tsv"


def image_qc_name(participant: str, session: str | None = None) -> str:
    """The table's name for a series with only sub/ses entities (QSIPrep merges a session's runs)."""
    return f"sub-{participant}" + (f"_ses-{session}" if session else "") + SUFFIX


def find_image_qc(qsiprep_dir: str | os.PathLike[str], participant: str, session: str | None = None) -> list[Path]:
    """Every image QC table of one subject's session (several when QSIPrep kept runs or acq separate)."""
    folder = Path(qsiprep_dir) / f"sub-{participant}"
    prefix = f"sub-{participant}"
    if session:
        folder, prefix = folder / f"ses-{session}", f"{prefix}_ses-{session}"
    return sorted(p for p in (folder / "dwi").glob(f"{prefix}_*desc-image_qc.tsv") if p.name.endswith(SUFFIX))


def read_image_qc(path: str | os.PathLike[str]) -> dict[str, float | None]:
    """One image QC table -> ``{column: value}`` for every measure column; ``None`` where not measured.

    Works on QSIPrep 1.1.1's tables (missing values as empty cells), 26.x's (``n/a``)
    and the stand-in's. Bookkeeping columns (:data:`TEXT_COLUMNS`) and any other
    column whose value is text are left out, so every value is a number or None.
    Raises FileNotFoundError for a missing file and ValueError (naming the file) for
    a table that is not one header plus one row of the same width.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = [line.rstrip("\r") for line in text.split("\n")]
    lines = [line for line in lines if line.strip()]
    if len(lines) != 2:
        raise ValueError(f"{path}: an image QC table has a header and one row; found {len(lines)} non-empty line(s)")
    header = lines[0].split("\t")
    values = lines[1].split("\t")
    if len(values) != len(header):
        # pandas writes no trailing tabs, so a width mismatch is a damaged or foreign file
        raise ValueError(f"{path}: the header has {len(header)} columns but the row has {len(values)}")
    out: dict[str, float | None] = {}
    for name, raw in zip(header, values, strict=True):
        name = name.strip()
        if not name or name in TEXT_COLUMNS:
            continue
        cell = raw.strip()
        if cell.lower() in MISSING:
            out[name] = None
            continue
        try:
            number = float(cell)
        except ValueError:
            continue  # a text column this reader does not know
        out[name] = None if math.isnan(number) else number
    return out
