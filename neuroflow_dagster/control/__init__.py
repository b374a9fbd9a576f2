"""Control of a running deployment: answers from Dagster's own records (event log, runs, check executions).

Used by the operator commands (`neuroflow status|failures|reprocess|retry|logs`); no second
database: the only other sources are the project's plain files (ScanID registry, exclusions,
the discovery status report, tool log files). Named "control" rather than "ops" because an op
is something else in Dagster. Reads the Dagster instance; never imports the definitions (defs/).
"""
