"""Small BIDS datasets of the acquisition shapes QSIPrep's own input handling judges (test support).

Real NIfTI files (nibabel), tiny (16 x 16 x 8 voxels): QSIPrep's workflow construction reads image
headers (dimensions, volumes) and sidecars, never the voxels. Each shape is one subject's sessions:

- ``dwi_t1w``: a T1w and a 4D DWI (dir-AP, PhaseEncodingDirection j-) per session;
- ``dwi_only``: the DWI without any T1w;
- ``dwi_3d``: a 1-volume b=0 stored as a 3D file in ``dwi/`` (what a reverse-PE b=0 named as a DWI becomes);
- ``dwi_no_pe``: a DWI whose sidecar lacks PhaseEncodingDirection (only PhaseEncodingAxis, as dcm2niix
  writes for scanners that do not record the polarity);
- ``fmap_epi``: ``dwi_t1w`` plus a reverse-PE b=0 in ``fmap/`` (dir-PA, ``_epi``) whose IntendedFor
  names the DWI (a path relative to the subject folder, which QSIPrep 1.1.1 and 26.x both read), and
  one B0FieldIdentifier on both (a pepolar pair) with the DWI's B0FieldSource naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nb
import numpy as np

SHAPES = ("dwi_t1w", "dwi_only", "dwi_3d", "dwi_no_pe", "fmap_epi")
BVALS = [0, 1000, 1000, 1000, 1000, 1000, 1000, 0]
BVECS = [
    [0, 1, 0, 0, 0.707, 0.707, 0, 0],
    [0, 0, 1, 0, 0.707, 0, 0.707, 0],
    [0, 0, 0, 1, 0, 0.707, 0.707, 0],
]
DWI_SIDECAR = {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.0523, "RepetitionTime": 3.2, "EchoTime": 0.08}


def _image(path: Path, shape: Sequence[int], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random(shape, dtype=np.float32) * 100
    nb.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(path)


def _json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1), encoding="utf-8")


def dataset_description(root: Path) -> None:
    _json(Path(root) / "dataset_description.json", {"Name": "preflight shapes", "BIDSVersion": "1.9.0"})


def write_subject(root: Path, participant: str, sessions: Sequence[str], shape: str) -> Path:
    """Write ``shape`` for every session of ``participant`` under ``root`` (a BIDS dataset); returns root."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    root = Path(root)
    dataset_description(root)
    for ses in sessions:
        base = root / f"sub-{participant}" / f"ses-{ses}"
        stem = f"sub-{participant}_ses-{ses}"
        if shape != "dwi_only":
            _image(base / "anat" / f"{stem}_T1w.nii.gz", (16, 16, 16))
            _json(base / "anat" / f"{stem}_T1w.json", {"RepetitionTime": 2.3})
        dwi = base / "dwi" / f"{stem}_dir-AP_dwi"
        sidecar = dict(DWI_SIDECAR)
        if shape == "dwi_3d":
            _image(dwi.with_name(dwi.name + ".nii.gz"), (16, 16, 8))
            bvals, bvecs = [0], [[0], [0], [0]]
        else:
            _image(dwi.with_name(dwi.name + ".nii.gz"), (16, 16, 8, len(BVALS)))
            bvals, bvecs = BVALS, BVECS
        if shape == "dwi_no_pe":
            del sidecar["PhaseEncodingDirection"]
            sidecar["PhaseEncodingAxis"] = "j"
        if shape == "fmap_epi":  # the DWI's b=0 and the reverse-PE b=0 together estimate the field
            sidecar.update(B0FieldIdentifier=f"pepolar{ses}", B0FieldSource=f"pepolar{ses}")
        _json(dwi.with_name(dwi.name + ".json"), sidecar)
        dwi.with_name(dwi.name + ".bval").write_text(" ".join(map(str, bvals)) + "\n")
        dwi.with_name(dwi.name + ".bvec").write_text("\n".join(" ".join(map(str, row)) for row in bvecs) + "\n")
        if shape == "fmap_epi":
            epi = base / "fmap" / f"{stem}_dir-PA_epi"
            _image(epi.with_name(epi.name + ".nii.gz"), (16, 16, 8, 1), seed=1)
            _json(
                epi.with_name(epi.name + ".json"),
                {
                    "PhaseEncodingDirection": "j",
                    "TotalReadoutTime": 0.0523,
                    "RepetitionTime": 3.2,
                    "IntendedFor": [f"ses-{ses}/dwi/{dwi.name}.nii.gz"],
                    "B0FieldIdentifier": f"pepolar{ses}",
                },
            )
    return root
