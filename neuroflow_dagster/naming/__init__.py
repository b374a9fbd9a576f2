"""Shared spellings, one module each: partition keys, BIDS entities and folders, log files, tags.

Plain Python (no dagster import): the Dagster layer, the operator commands, the
domain packages and the tools all spell these the same way because they import
them from here.
"""
