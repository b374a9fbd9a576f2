"""What routing series by content adds to a conversion (docs/domain-rules.md#conversion).

Two costs, on a classic (one file per slice) diffusion session of realistic size:

1. the heuristic's ``custom_seqinfo``: HeudiConv calls it per series; for a diffusion-like series it
   reads every file's header (b-value, slice position) with pydicom;
2. curation (``bids/curate.py``) on the staged session after the real HeudiConv + dcm2niix run
   (NIfTI headers, sidecars, b-values; renames), next to the HeudiConv run itself.

Usage::

    .venv/bin/python benchmarks/conversion_routing.py --directions 64 --slices 60 [--json FILE]

Prints one JSON object (``--json FILE`` appends it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom

from neuroflow_dagster.bids import curate
from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.demo import synth
from neuroflow_dagster.heuristics import neuroflow_default
from neuroflow_dagster.tools import heudiconv


def session(folder: Path, directions: int, slices: int) -> synth.SynthSession:
    geometry = {"rows": 16, "columns": 16, "slices": slices}
    dwi = synth.SeriesPlan("ep2d_diff_mddw_AP", ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND"), "dwi",
                           synth.AXIAL, **geometry)
    b0 = synth.SeriesPlan("ep2d_diff_b0_PA", dwi.image_type, "dwi", synth.AXIAL, **geometry, phase_positive=False)
    t1 = synth.SERIES["t1w"]
    return synth.write_protocol(folder, [
        synth.ProtocolSeries("t1w", t1),
        synth.ProtocolSeries("dwi", dwi, n_b0=1, n_directions=directions),
        synth.ProtocolSeries("b0", b0, n_b0=1),
    ], seed=3)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directions", type=int, default=64)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="routing-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        written = session(root / "dicom", args.directions, args.slices)
        write_s = time.perf_counter() - started
        timings = {}
        for key in ("dwi", "b0"):  # a DWI: read up to its first weighted volume; a b=0 series: read whole
            files = [str(f) for f in written.series[key].files]
            wrapper = SimpleNamespace(dcm_data=pydicom.dcmread(files[0], stop_before_pixels=True))
            started = time.perf_counter()
            content = neuroflow_default.custom_seqinfo(wrapper=wrapper, series_files=files)
            timings[key] = (len(files), round(time.perf_counter() - started, 3), dict(content or ()))
        config = NeuroflowConfig.model_validate(
            {"paths": {k: str(root / k) for k in ("dicom_incoming", "bids_root", "derivatives", "work_dir", "log_dir")}}
        )
        staging = root / "stage"
        spec = heudiconv.build_spec(config, dicom_dir=written.folder, participant="1", session="1", staging_dir=staging)
        staging.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        subprocess.run(list(spec.argv), env={**os.environ, **spec.env}, cwd=staging, check=True, capture_output=True)
        heudiconv_s = time.perf_counter() - started
        started = time.perf_counter()
        report = curate.curate_conversion(staging, "1", "1", heudiconv.resolve_heuristic("neuroflow_default"))
        curate_s = time.perf_counter() - started
    result = {
        "custom_seqinfo": {k: {"files": n, "seconds": sec, "content": c} for k, (n, sec, c) in timings.items()},
        "heudiconv_dcm2niix_s": round(heudiconv_s, 2),
        "curation_s": round(curate_s, 3),
        "files": [f.target for f in report.files],
        "write_dicom_s": round(write_s, 2),
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
