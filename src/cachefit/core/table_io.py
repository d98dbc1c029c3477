"""Reading a layer table's rows into columns, fast and as strictly as DESIGN.md asks (issue 15, item 2).

Parsers: the standard library's ``json`` (exact integers of any size, so a 2**70 is refused by name, not rounded to
a float as orjson does past 64 bits; its C parser reads a million rows in ~0.9 s against orjson's ~0.7 s) and, for
CSV, pyarrow's reader (C++, every cell as a string into column buffers: no Python object per cell) with its
vectorised pattern checks and casts; a plain file under 1 MiB, a column at a time in Python (importing pyarrow
would cost more than the parse: 1e4 rows in 16-18 ms against 44-55 ms row by row). A file that is not plain (quoted
cells, blanks or spaces around values, a bad value anywhere) takes the row-by-row path, which names the first
problem by line; both column paths accept exactly what that path accepts, with the same values. Tables are
written with orjson (30x the standard library's indented writer at 1e6 rows).
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

__all__ = ["CSV_COLUMNS", "FAST_PATH_BYTES", "columns_from_csv", "columns_from_rows"]

CSV_COLUMNS = ("name", *BYTE_COLUMNS, "flops")
# Below this size a column-at-a-time parse in Python is quicker than importing pyarrow (0.12 s with its compute
# module, measured here; the Python column path reads 1e4 rows of ~40 bytes in 16-18 ms).
FAST_PATH_BYTES = 1 << 20
_REQUIRED = frozenset(CSV_COLUMNS[:4])
_ALL = frozenset(CSV_COLUMNS)
# The cells the column paths take as they are, read to the row path's values: digits only for byte counts (the row
# path's rule), plain decimals for FLOPs (float() and Arrow's cast, whose vendored fast_float rounds correctly as
# Python does, agree on them); anything else (signs, underscores, inf, nan) takes the row path, which decides.
_INTEGER_CELL = r"[0-9]+"
_DECIMAL_CELL = r"([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"
_INTEGER = re.compile(_INTEGER_CELL)                 # row path (str cells)
_DIGITS, _DECIMAL_BYTES = re.compile(_INTEGER_CELL.encode()), re.compile(_DECIMAL_CELL.encode())   # small path
_DECIMAL = f"^{_DECIMAL_CELL}$"                      # Arrow path (pyarrow.compute regex)


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Millions of fresh dicts, lists and strings, none cyclic: the cyclic collector would rescan them again and
    again while they are made (splitting a 1e6-row CSV into strings took 2.5 s with it, 0.3 s without)."""
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


def columns_from_csv(text: str | bytes, source: str, make_layer: Callable[..., Any]) -> LayerColumns:
    """A CSV table's rows as columns: plain files a column at a time (Arrow's reader for large ones), else row by
    row (exact line numbers). Bytes are ASCII (a file read as it is, no decoded copy: see LayerTable.read)."""
    data = text if isinstance(text, bytes) else text.encode("ascii") if text.isascii() else None
    plain = None if data is None else _plain(data, source)
    if data is not None and plain is not None:
        read = _fast_csv if len(data) >= FAST_PATH_BYTES else _small_csv
        columns = read(*plain)
        if columns is not None:
            return columns
    rows = text.decode("ascii") if isinstance(text, bytes) else text
    return LayerColumns.of(_csv_rows(rows, source, make_layer))


def _plain(data: bytes, source: str) -> tuple[list[str], bytes] | None:
    """The header's columns and the rows after it, when ``data`` (ASCII) is plain: no quotes, NULs, stray carriage
    returns or whitespace, a header and at least one row; None otherwise (the row path then reads it, or names
    what is wrong). A bad header is refused here, as the row path would."""
    head = data[:data.find(b"\n")] if b"\n" in data else data
    if not head.strip() or b'"' in head:
        return None
    header = [column.strip() for column in head.decode("ascii").split(",")]
    check_csv_header(header, source)
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    body_characters = len(data) - data.find(b"\n") - data.count(b"\n")      # past the header, newlines aside
    if b"\n" not in data or body_characters <= 0:
        return None
    # Quotes, NULs and stray carriage returns are the csv module's to read; whitespace (around a value, inside a
    # name) the row path's to strip or refuse.
    if any(mark in data for mark in (b'"', b"\0", b"\r", b" ", b"\t", b"\v", b"\f")):
        return None
    return header, data[data.find(b"\n") + 1:]


def _small_csv(header: list[str], body: bytes) -> LayerColumns | None:
    """A plain table under FAST_PATH_BYTES a column at a time in Python (no record per row; importing pyarrow
    would cost more than the parse): each column checked against the row path's rules and converted by int() and
    float(), as the row path does; None when any cell is not plain (the row path names it)."""
    rows = [line.split(b",") for line in body.split(b"\n") if line]
    if not rows or any(len(row) != len(header) for row in rows):
        return None
    columns = dict(zip(header, zip(*rows)))
    names = columns["name"]
    limit = csv.field_size_limit()      # (the csv module refuses a cell past its limit: so does this path)
    if not all(names) or (len(body) > limit and any(len(cell) > limit for row in rows for cell in row)):
        return None
    sizes = np.zeros((len(names), 4), dtype=np.int64)
    for index, name in enumerate(BYTE_COLUMNS):
        cells = columns.get(name)
        if cells is not None:
            if not all(_DIGITS.fullmatch(cell) for cell in cells):
                return None
            try:
                sizes[:, index] = [int(cell) for cell in cells]
            except OverflowError:       # past int64
                return None
    cells = columns.get("flops")
    if cells is not None and not all(_DECIMAL_BYTES.fullmatch(cell) for cell in cells):
        return None
    flops = np.zeros(len(names)) if cells is None else np.array([float(cell) for cell in cells])
    if not np.isfinite(flops).all():
        return None
    return LayerColumns(tuple(name.decode("ascii") for name in names), sizes, flops, {})


def _fast_csv(header: list[str], data: bytes) -> LayerColumns | None:
    """The rows parsed by Arrow's CSV reader as strings, straight from ``data`` (ASCII, plain: see _plain),
    checked a column at a time (the row path's rules, as patterns) and converted by Arrow's casts; None when
    anything is not plain (the row path then names it). One thread (two parse in about the same time here, with
    50 MB more held)."""
    # 0.08 s and 70 MB to import: only for the tables that need it.
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    try:
        table = pa_csv.read_csv(pa.py_buffer(data),
                                read_options=pa_csv.ReadOptions(column_names=header, use_threads=False),
                                parse_options=pa_csv.ParseOptions(quote_char=False, ignore_empty_lines=True),
                                convert_options=pa_csv.ConvertOptions(
                                    column_types=dict.fromkeys(header, pa.string()), strings_can_be_null=False))
    except pa.ArrowInvalid:         # a row of another width, say
        return None
    columns = {name: table.column(name) for name in header}
    del table                       # each column's buffers go as soon as it is converted
    try:
        return _checked_columns(columns)
    finally:
        columns.clear()
        pa.default_memory_pool().release_unused()   # Arrow's pages back to the system for what comes next


def _checked_columns(columns: dict[str, Any]) -> LayerColumns | None:
    """Arrow string columns as LayerColumns when every cell passes the row path's rules, else None."""
    import pyarrow as pa
    import pyarrow.compute as pc
    limit = csv.field_size_limit()  # (the csv module refuses a cell past its limit: so does this path)
    if any(pc.max(pc.binary_length(column)).as_py() > limit for column in columns.values()):
        return None
    names = columns.pop("name")     # (no whitespace anywhere: _fast_csv saw to that)
    if pc.min(pc.binary_length(names)).as_py() == 0:
        return None
    sizes = np.zeros((len(names), 4), dtype=np.int64)
    for index, name in enumerate(BYTE_COLUMNS):
        if name in columns:
            column = columns.pop(name)
            converted = _cast_if(pc.ascii_is_decimal(column), column, pa.int64())
            if converted is None:
                return None
            sizes[:, index] = converted
    flops: np.ndarray | None = np.zeros(len(names))
    if "flops" in columns:
        column = columns.pop("flops")
        flops = _cast_if(pc.match_substring_regex(column, _DECIMAL), column, pa.float64())
    if flops is None or not np.isfinite(flops).all():
        return None
    with _no_cyclic_gc():
        return LayerColumns(tuple(names.to_pylist()), sizes, flops, {})


def _cast_if(matches: Any, column: Any, kind: Any) -> np.ndarray | None:
    """``column`` (Arrow strings) cast to ``kind`` as numpy when every cell ``matches`` and the cast fits."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if not pc.all(matches).as_py():
        return None
    try:
        return np.asarray(pc.cast(column, kind).to_numpy())
    except pa.ArrowInvalid:         # past int64
        return None


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


def _csv_layer(row: dict[str, str], width: int, expected: int, line: int, source: str,
               make_layer: Callable[..., Any]) -> Any:
    where = f"{source} line {line}"
    if width != expected:
        raise InputError(f"{where}: has {width} cells, the header has {expected}")

    def integer(column: str) -> int:
        text = row.get(column, "0").strip() or "0"
        if not _INTEGER.fullmatch(text):
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

