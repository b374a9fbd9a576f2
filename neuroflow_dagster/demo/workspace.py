"""The demo workspace behind `make demo`: real and synthetic DICOM, a mapping, a config.

What lands in `incoming/` (each folder is copied in a hidden staging folder
first and renamed into place, as a careful scanner export would do):

Every session that should be preprocessed carries a T1w, as real sessions do: QSIPrep refuses a subject
without one ("No T1w images found for participant").

- 20240115_1430, 20240301_0900 (DEMO_01): synthetic T1w + 12-direction DWI (tensor phantom): all 4 stages.
- 20240212_1015 (75): synthetic T1w + 20-direction DWI: all 4 stages.
- 20240220_1100 (75): REAL Siemens Prisma DWI from heudiconv's test data, with a synthetic T1w of the same
  patient and study (acquired just before it): BIDS and QSIPrep; the reconstruction refuses it with the
  reason (one diffusion direction cannot fit a tensor).
- 20240305_0800 (DEMO_02): only corrupt files: the protocol check fails, nothing is converted.
- 20240320_1000 (DEMO_03): synthetic T1w + 12-direction DWI of poor quality (heavy noise, slice signal
  dropouts in three volumes): converted and preprocessed; its image QC table
  (``*_desc-image_qc.tsv``) has a low neighbouring-DWI correlation and many bad slices, so the image
  QC gate holds its reconstruction and parcellation until `neuroflow qc approve 20240320_1000`
  (docs/stand-ins.md, "Image QC table"; docs/operations.md, "The QC gate").
- 20240325_1500 (DEMO_04): a synthetic 12-direction DWI and no T1w: converted, then its subject's QSIPrep is
  held (no T1w in any session), not failed.
- 20240410_1200: not in the mapping: held as unmapped.

Subject codes follow docs/domain-rules.md#identity: `DEMO_01` -> `DEMO01`, `75` -> `0075`.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from neuroflow_dagster.demo import sources, synth
from neuroflow_dagster.scaffold import init_workspace

MAPPING = {
    "20240115_1430": "DEMO_01",
    "20240301_0900": "DEMO_01",
    "20240212_1015": "75",
    "20240220_1100": "75",
    "20240305_0800": "DEMO_02",
    "20240320_1000": "DEMO_03",  # poor image quality (see synth.POOR_QUALITY)
    "20240325_1500": "DEMO_04",  # DWI only: QSIPrep is held, no T1w
    "20240601_0930": "DEMO_01",  # the late session (see schedule_late_session)
}
LATE_SCAN_ID = "20240601_0930"


def _stage_then_move(incoming: Path, scan_id: str, writer) -> None:  # type: ignore[no-untyped-def]
    """Write into a hidden folder (discovery skips it), then one rename: never a half-copied session."""
    final = incoming / scan_id
    if final.exists():
        return
    staging = incoming / f".staging-{scan_id}"
    shutil.rmtree(staging, ignore_errors=True)
    writer(staging)
    os.rename(staging, final)


def write_demo_sessions(incoming: Path) -> None:
    incoming.mkdir(parents=True, exist_ok=True)

    def synthetic(seed: int, n_directions: int, when: datetime, patient: str):  # type: ignore[no-untyped-def]
        return lambda d: synth.write_session(d, seed=seed, n_directions=n_directions, acquired=when, patient_id=patient)

    _stage_then_move(incoming, "20240115_1430", synthetic(1, 12, datetime(2024, 1, 15, 14, 30), "DEMO01"))
    _stage_then_move(incoming, "20240301_0900", synthetic(2, 12, datetime(2024, 3, 1, 9, 0), "DEMO01"))
    _stage_then_move(incoming, "20240212_1015", synthetic(3, 20, datetime(2024, 2, 12, 10, 15), "0075"))

    def real_prisma(d: Path) -> None:
        # The real diffusion series has 3 files; a synthetic T1w of the same patient and study, acquired
        # just before it, completes the session (and the protocol).
        study = sources.study_of(sources.copy_real_session(d, "b0dwiForFmap")[0])
        synth.write_session(d, seed=4, series=("t1w",), acquired=study.acquired - timedelta(minutes=15),
                            patient_id=study.patient_id, study_uid=study.study_uid)

    _stage_then_move(incoming, "20240220_1100", real_prisma)
    _stage_then_move(incoming, "20240305_0800", lambda d: synth.write_corrupt_files(d, 12))
    _stage_then_move(
        incoming,
        "20240320_1000",
        lambda d: synth.write_session(
            d,
            seed=7,
            n_b0=2,
            n_directions=12,
            acquired=datetime(2024, 3, 20, 10, 0),
            patient_id="DEMO03",
            **synth.POOR_QUALITY,
        ),
    )
    _stage_then_move(
        incoming,
        "20240325_1500",
        lambda d: synth.write_session(
            d, seed=8, n_directions=12, series=("dwi",), acquired=datetime(2024, 3, 25, 15, 0), patient_id="DEMO04"
        ),
    )
    _stage_then_move(incoming, "20240410_1200", synthetic(5, 12, datetime(2024, 4, 10, 12, 0), "UNKNOWN"))


def write_late_session(incoming: Path) -> None:
    _stage_then_move(
        incoming,
        LATE_SCAN_ID,
        lambda d: synth.write_session(
            d, seed=6, n_directions=12, acquired=datetime(2024, 6, 1, 9, 30), patient_id="DEMO01"
        ),
    )


def schedule_late_session(directory: Path, after_seconds: float) -> threading.Thread:
    """Drop the late third session of DEMO_01 after a while, to show the subject-wide re-run."""

    def later() -> None:
        time.sleep(after_seconds)
        write_late_session(directory / "incoming")
        print(f"[demo] dropped late session {LATE_SCAN_ID} (DEMO_01, third session)", flush=True)

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread


def build_demo_workspace(directory: Path, *, reset: bool = False, sessions: bool = True) -> Path:
    """Create (or reuse) the demo workspace; returns its neuroflow.yaml."""
    if reset and directory.exists():
        shutil.rmtree(directory)
    config = directory / "neuroflow.yaml"
    if not config.exists():
        # Seconds, not hours: the demo's folders are written by a rename, never half-copied. The demo's
        # data take a few MB, so a 1 GB disk floor is enough to show the guard without holding a laptop.
        init_workspace(directory, stability_minutes=0.1, interval_seconds=5, min_free_gb=1)
    mapping = directory / "mapping.csv"
    mapping.write_text("ScanID,SubjectCode\n" + "".join(f"{k},{v}\n" for k, v in MAPPING.items()), encoding="utf-8")
    if sessions:
        write_demo_sessions(directory / "incoming")
    return config
