"""Reading a layer table's rows into columns, fast and as strictly as DESIGN.md asks (issue 15, item 2).

Parsers: the standard library's ``json`` (exact integers of any size, so a 2**70 is refused by name, not rounded to
a float as orjson does past 64 bits; its C parser reads a million rows in ~0.9 s against orjson's ~0.7 s) and, for
CSV, ``str.split`` over the whole text with numpy converting each column at once. A file that is not plain (quoted
cells, blanks or spaces around values, a bad value anywhere) takes the row-by-row path, which names the first
problem by line; the fast path accepts exactly what that path accepts. Tables are written with orjson (30x the
standard library's indented writer at 1e6 rows).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from pydantic import ValidationError

from cachefit.core.columns import BYTE_COLUMNS, LayerColumns
from cachefit.core.errors import InputError
from cachefit.core.files import describe_validation_error
from cachefit.core.units import INT64_MAX

__all__ = ["CSV_COLUMNS", "columns_from_csv", "columns_from_rows"]

CSV_COLUMNS = ("name", *BYTE_COLUMNS, "flops")
_REQUIRED = frozenset(CSV_COLUMNS[:4])
_ALL = frozenset(CSV_COLUMNS)
_SPACE = re.compile(r"\s")


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Millions of fresh lists and strings, none cyclic: the cyclic collector would rescan them again and again
    (a 1e6-row CSV splits in 2.5 s with it, 0.3 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def columns_from_rows(rows: Any, source: str, validate_layer: Callable[[Any], Any]) -> LayerColumns:
    """A JSON table's ``layers`` list as columns. Rows with exactly the CSV columns go through numpy at once; the
    others (modules, shared tensors, splits) through ``validate_layer`` (pydantic, one row each)."""
    if not isinstance(rows, list):
        raise InputError(f"{source}: layers must be a list, got {rows!r:.60}")
    if not rows:
        raise InputError(f"{source}: layers must list at least one layer")
    with _no_cyclic_gc():
        plain = [type(row) is dict and row.keys() == _ALL for row in rows]
        extras = {i: _validated(validate_layer, row, i, source) for i, row in enumerate(rows) if not plain[i]}
        picked = [row for row, keep in zip(rows, plain) if keep] if extras else rows
        names = [row["name"] for row in picked]
        columns = [[row[key] for row in picked] for key in BYTE_COLUMNS]
        flops = [row["flops"] for row in picked]
    sizes, flop_array = _plain_arrays(names, columns, flops)
    if sizes is None or flop_array is None:       # some plain row is bad: the first one, named by pydantic
        for index, row in enumerate(rows):
            if plain[index]:
                _validated(validate_layer, row, index, source)
        raise AssertionError("a row failed the fast check but passed pydantic; this is a bug")
    return _merge(rows, plain, names, sizes, flop_array, extras)


def _validated(validate_layer: Callable[[Any], Any], row: Any, index: int, source: str) -> Any:
    try:
        return validate_layer(row)
    except ValidationError as error:
        raise InputError(describe_validation_error(error, source, prefix=("layers", index))) from error


def _plain_arrays(names: list[Any], columns: list[list[Any]], flops: list[Any]
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The columns as arrays when every value is what strict validation accepts, else (None, None)."""
    if not all(type(name) is str and name for name in names):
        return None, None
    if not all(type(value) is int for column in columns for value in column):
        return None, None
    if not all(type(value) is float or type(value) is int for value in flops):
        return None, None
    try:
        sizes = np.array(columns, dtype=np.int64).T if names else np.zeros((0, 4), dtype=np.int64)
    except OverflowError:
        return None, None
    flop_array = np.array(flops, dtype=np.float64)
    if (sizes < 0).any() or not np.isfinite(flop_array).all() or (flop_array < 0).any():
        return None, None
    return sizes, flop_array


def _merge(rows: list[Any], plain: list[bool], names: list[str], sizes: np.ndarray, flops: np.ndarray,
           extras: dict[int, Any]) -> LayerColumns:
    """Plain rows' columns with the validated records of the others put back in their places."""
    if not extras:
        return LayerColumns(tuple(names), sizes, flops, {})
    where = np.flatnonzero(np.asarray(plain, dtype=bool))
    all_sizes = np.zeros((len(rows), 4), dtype=np.int64)
    all_flops = np.zeros(len(rows), dtype=np.float64)
    all_names: list[str] = [""] * len(rows)
    all_sizes[where], all_flops[where] = sizes, flops
    for position, name in zip(where.tolist(), names):
        all_names[position] = name
    for index, layer in extras.items():
        all_sizes[index] = (layer.weight_bytes, layer.activation_bytes, layer.workspace_bytes, layer.kv_cache_bytes)
        all_flops[index], all_names[index] = layer.flops, layer.name
    return LayerColumns(tuple(all_names), all_sizes, all_flops, extras)


def columns_from_csv(text: str, source: str, make_layer: Callable[..., Any]) -> LayerColumns:
    """A CSV table's rows as columns: the fast path for plain files, else row by row (exact line numbers)."""
    head, _, body = text.partition("\n")
    if head.strip() and '"' not in head:
        header = [column.strip() for column in head.split(",")]
        check_csv_header(header, source)
        fast = _fast_csv(body, header)
        if fast is not None:
            return fast
    return LayerColumns.of(_csv_rows(text, source, make_layer))


def _fast_csv(body: str, header: list[str]) -> LayerColumns | None:
    """Every row split at its commas, converted a column at a time; None when anything is not plain (the row
    path then names the problem)."""
    if "\r" in body:
        body = body.replace("\r\n", "\n")
    body = body.rstrip("\n")
    if not body or not body.isascii() or any(mark in body for mark in ('"', "\0", "\r", "\n\n")):
        return None
    if not _rows_have_width(body, len(header)):
        return None
    with _no_cyclic_gc():
        cells = body.replace("\n", ",").split(",")
        columns = {name: cells[index::len(header)] for index, name in enumerate(header)}
    names = columns["name"]
    if "" in names or _SPACE.search("".join(names)) or max(map(len, names)) > csv.field_size_limit():
        return None                 # (the csv module refuses a cell past its limit: so does this path)
    sizes = np.zeros((len(names), 4), dtype=np.int64)
    for index, name in enumerate(BYTE_COLUMNS):
        values = columns.get(name)
        converted = None if values is None else _digits(values)
        if values is not None and converted is None:
            return None
        if converted is not None:
            sizes[:, index] = converted
    flops = _numbers(columns["flops"]) if "flops" in columns else np.zeros(len(names))
    if flops is None:
        return None
    return LayerColumns(tuple(names), sizes, flops, {})


def _rows_have_width(body: str, width: int) -> bool:
    """Every line holds exactly ``width`` cells: the separators, in order, are width - 1 commas then a newline."""
    data = np.frombuffer(body.encode("ascii"), dtype=np.uint8)
    separators = data[(data == ord(",")) | (data == ord("\n"))]
    if (len(separators) + 1) % width:
        return False
    kinds = np.append(separators, ord("\n")).reshape(-1, width)
    return bool((kinds[:, :-1] == ord(",")).all() and (kinds[:, -1] == ord("\n")).all())


def _digits(values: list[str]) -> np.ndarray | None:
    if values.count("0") == len(values):            # an unused column (workspace, KV cache): common
        return np.zeros(len(values), dtype=np.int64)
    if "" in values or not "".join(values).isdigit():
        return None
    integers = list(map(int, values))
    if max(integers) > INT64_MAX:
        return None
    return np.array(integers, dtype=np.int64)


def _numbers(values: list[str]) -> np.ndarray | None:
    if values.count("0") == len(values):
        return np.zeros(len(values), dtype=np.float64)
    try:
        array = np.array(list(map(float, values)), dtype=np.float64)
    except ValueError:
        return None
    if "" in values or not np.isfinite(array).all() or (array < 0).any():
        return None
    return array


def check_csv_header(header: list[str], source: str) -> None:
    missing = [column for column in _REQUIRED if column not in header]
    unknown = [column for column in header if column not in _ALL]
    if missing or unknown or len(set(header)) != len(header):
        raise InputError(f"{source}: header must be {','.join(CSV_COLUMNS)} (kv_cache_bytes and flops optional); "
                         f"got {','.join(header)}")


def _csv_rows(text: str, source: str, make_layer: Callable[..., Any]) -> list[Any]:
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as error:                       # a field over the csv module's limit, a NUL byte
        raise InputError(f"{source}: not a readable CSV table ({error})") from error
    if not rows:
        raise InputError(f"{source}: empty file; expected the header {','.join(CSV_COLUMNS)}")
    header = [column.strip() for column in rows[0]]
    check_csv_header(header, source)
    layers = [_csv_layer(dict(zip(header, row)), len(row), len(header), line, source, make_layer)
              for line, row in enumerate(rows[1:], start=2) if any(cell.strip() for cell in row)]
    if not layers:
        raise InputError(f"{source}: layers must list at least one layer")
    return layers


_INTEGER = re.compile(r"^[0-9]+$")


def _csv_layer(row: dict[str, str], width: int, expected: int, line: int, source: str,
               make_layer: Callable[..., Any]) -> Any:
    where = f"{source} line {line}"
    if width != expected:
        raise InputError(f"{where}: has {width} cells, the header has {expected}")

    def integer(column: str) -> int:
        text = row.get(column, "0").strip() or "0"
        if not _INTEGER.match(text):
            raise InputError(f"{where}: {column} must be a non-negative integer, got {text!r}")
        value = int(text)
        if value > INT64_MAX:
            raise InputError(f"{where}: {column} must be at most 2**63-1 bytes, got {text}")
        return value

    flops_text = row.get("flops", "0").strip() or "0"
    try:
        flops = float(flops_text)
    except ValueError:
        flops = -1.0
    if not (flops >= 0 and math.isfinite(flops)):
        raise InputError(f"{where}: flops must be a non-negative number, got {flops_text!r}")
    name = row["name"].strip()
    if not name:
        raise InputError(f"{where}: name must not be empty")
    return make_layer(name=name, weight_bytes=integer("weight_bytes"), activation_bytes=integer("activation_bytes"),
                      workspace_bytes=integer("workspace_bytes"), kv_cache_bytes=integer("kv_cache_bytes"),
                      flops=flops)

