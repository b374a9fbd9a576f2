"""Operator helpers that answer from Dagster's own records (event log, runs, check executions).

Used by `neuroflow status|failures|reprocess|retry|logs`; no second database:
the only other sources are the project's plain files (ScanID registry,
exclusions, the discovery status report, tool log files).
"""
