"""The CLI's printers: the fast paths `status` needs at 20,000 rows print exactly what the plain ones did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from neuroflow_dagster.cli.output import _cell, dumps_indented

CASES: list[Any] = [
    {},
    [],
    {"a": {}},
    {"a": []},
    [1, "x", None],
    {"a": 1, "b": 'é\n"', "c": None, "d": True, "e": 1.5, "f": float("nan")},
    {"s": [{"a": "b", "c": 1}, {"d": [1, 2, {"e": {}}]}], "t": {"x": {"y": "z"}}, "p": Path("/x")},
    {1: "a", False: "b", None: "c", 2.5: "d"},
    {"k": {1: 2}},
    "str",
    3,
    None,
    [[]],
    [{}],
    ("t", 1),
    {"a": [{"b": []}]},
    {"o": ValueError("x"), "n": {"p": Path("/y")}},
    {"sessions": [{"subject": "SUBJA", "note": "held: x\ty"}] * 3, "totals": {"qsiprep": {"done": 2}}},
    {"a": 1, "why": {}, "b": [], "c": "x"},  # a status row: empty containers stay on the fast path
    {"a": 1, "why": {"qsirecon": {"cause": "qc", "reason": "r"}}, "b": []},
]


@pytest.mark.parametrize("data", CASES)
def test_json_is_what_json_dumps_indent_2_prints(data: Any) -> None:
    assert dumps_indented(data) == json.dumps(data, indent=2, default=str)


@pytest.mark.parametrize("value", ["a  b", " a", "a ", "a\tb", "a\nb", "x" * 100, "ok text", "é", "\xa0a", "a\u2003b",
                                   "", 5, None])  # fmt: skip
def test_table_cell_is_one_line_cut_at_the_width(value: Any) -> None:
    text = " ".join(str(value).split())
    assert _cell(value, 90) == (text if len(text) <= 90 else text[:87] + "...")
