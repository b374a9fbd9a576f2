"""Embedded stand-ins for the container-only stages (see docs/stand-ins.md).

Each is a CLI module run as a subprocess, ``python -m <module> ...``, writing the real
tool's output layout with provenance that names it as a stand-in:

- ``preproc``    for QSIPrep  (subject level): denoise, brain mask, b0 reference
- ``recon``      for QSIRecon (session level): DTI maps, atlas in subject space, QC PNG
- ``parcellate`` for QSIParc  (session level): per-region tables with the parcellate library

Exit codes: 0 ok, 2 ``validation error: ...`` (input data), 3 ``configuration error: ...``
(settings), 1 anything unexpected (with a traceback). Submodules are not imported here so
that importing the package stays cheap for the Dagster process.
"""

STAND_IN_MODULES: dict[str, str] = {
    "qsiprep": "neuroflow_dagster.tools.builtin.preproc",
    "qsirecon": "neuroflow_dagster.tools.builtin.recon",
    "qsiparc": "neuroflow_dagster.tools.builtin.parcellate",
}

__all__ = ["STAND_IN_MODULES"]
