"""Small real BIDS files for tests that build a dataset by hand (not through the conversion)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def write_t1w(bids: Path, participant: str, session: str, suffix: str = "T1w") -> Path:
    """``sub-X/ses-Y/anat/sub-X_ses-Y_T1w.nii.gz``: a tiny real NIfTI. Real sessions carry a T1w, and the
    QSIPrep stand-in refuses a subject without the configured anatomical image as QSIPrep does; its
    content is never read (the stand-in does no anatomical processing)."""
    folder = Path(bids) / f"sub-{participant}" / f"ses-{session}" / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"sub-{participant}_ses-{session}_{suffix}.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.int16), np.diag([1.0, 1.0, 1.0, 1.0])), path)
    return path
