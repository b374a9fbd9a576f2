"""Rows as a table, CSV or JSON (`--format`): one printer for every command."""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from typing import Any

FORMATS = ("table", "csv", "json")


def add_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=list(FORMATS), default="table")


SCALARS = (str, int, float, bool, type(None))


def dumps_indented(data: Any, level: int = 0) -> str:
    """Exactly ``json.dumps(data, indent=2, default=str)``, faster: Python's C encoder is used only
    without `indent`, and `status --format json` prints 20,000 rows (0.25 s in the pure-Python one).
    A flat object (scalar values only) goes through the C encoder with the newline and indent in its
    item separator; containers are laid out here, as the indenting encoder lays them out."""
    pad = "  " * (level + 1)
    if isinstance(data, dict) and data and all(_flat(v) for v in data.values()):
        if all(isinstance(k, str) for k in data):
            flat = _flat_encoder(level).encode(data)
            return "{\n" + pad + flat[1:-1] + "\n" + "  " * level + "}"
    if isinstance(data, dict) and data:
        items = (f"{pad}{json.dumps(k if isinstance(k, str) else _key(k))}: {dumps_indented(v, level + 1)}"
                 for k, v in data.items())  # fmt: skip
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if isinstance(data, (list, tuple)) and data:
        return "[\n" + ",\n".join(pad + dumps_indented(v, level + 1) for v in data) + "\n" + "  " * level + "]"
    return json.dumps(data, indent=2, default=str).replace("\n", "\n" + "  " * level)


def _flat(value: Any) -> bool:
    """Encoded the same with and without `indent`: a scalar, or an empty object or list (`{}`, `[]`; a
    status row's `why` is nearly always empty)."""
    return isinstance(value, SCALARS) or (isinstance(value, (dict, list)) and not value)


@functools.lru_cache(maxsize=16)
def _flat_encoder(level: int) -> json.JSONEncoder:
    return json.JSONEncoder(default=str, separators=(",\n" + "  " * (level + 1), ": "))


def _key(key: Any) -> str:
    """A non-string key as json.dumps writes it (True -> "true", 1 -> "1", None -> "null")."""
    return json.dumps({key: 0})[1:].rsplit(":", 1)[0].strip('"')


def print_json(data: Any) -> None:
    print(dumps_indented(data))


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
    text = str(value)
    if text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text if len(text) <= max_width else text[: max_width - 3] + "..."  # already one clean line
    text = " ".join(text.split())
    return text if len(text) <= max_width else text[: max_width - 3] + "..."
