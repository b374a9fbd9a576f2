"""The real tools' own input handling, run on a run's exact inputs before the run starts (plain Python).

QSIPrep cannot run here (its binaries live in its container), but its argument parser, its BIDS
grouping and the construction of its whole workflow are Python and refuse, in seconds, what the real
run would refuse after it was queued or submitted: no T1w, a 3D file among the DWIs, a participant
the dataset does not have, a DWI sidecar without PhaseEncodingDirection. ``qsiprep.py`` builds the
request from the run's ToolSpec and judges it in a pinned tools venv (``venvs.py``, locks in
``locks/``) with ``qsiprep_runner.py``; the Dagster layer (defs/assets/qsiprep.py) wires it in.
docs/tools.md ("The QSIPrep preflight") and docs/domain-rules.md#failures say what a verdict means.
"""
