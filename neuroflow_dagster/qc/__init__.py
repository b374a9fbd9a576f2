"""The image QC gate after preprocessing: thresholds on QSIPrep's image QC table, and operator approvals.

Plain Python (no Dagster): ``gate`` judges one session from its QC table(s) and the
``qc`` section of neuroflow.yaml; ``approvals`` keeps the operator's decisions to let a
failing session through (append-only, in ``paths.state``). The Dagster layer turns
the verdict into the blocking ``image_qc`` check (defs/assets/image_qc.py).
"""
