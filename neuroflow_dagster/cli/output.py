"""Rows as a table, CSV or JSON (`--format`): one printer for every command."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

FORMATS = ("table", "csv", "json")


def add_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=list(FORMATS), default="table")


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def print_rows(rows: list[dict[str, Any]], fmt: str, columns: list[str], *, max_width: int | None = None) -> None:
    """``fmt`` json, csv or table. ``max_width`` (the operator tables): upper-case headers, each
    cell on one line and cut at that width; without it cells are printed as they are."""
    if fmt == "json":
        print_json(rows)
        return
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return
    cells = [{c: str(row.get(c, "")) if max_width is None else _cell(row.get(c, ""), max_width) for c in columns}
             for row in rows]  # fmt: skip
    widths = {c: max([len(c)] + [len(r[c]) for r in cells]) for c in columns}
    header = [c.upper() if max_width is not None else c for c in columns]
    lines = ["  ".join(h.ljust(widths[c]) for h, c in zip(header, columns, strict=True))]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in cells]
    for line in lines:
        print(line.rstrip() if max_width is not None else line)


def _cell(value: Any, max_width: int) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= max_width else text[: max_width - 3] + "..."
