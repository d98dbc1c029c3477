"""Layer tables: JSON and CSV round trips, and validation that names every bad field."""

from __future__ import annotations

import contextlib
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefit.core import table_io
from cachefit.core.errors import InputError
from cachefit.core.layers import Layer, LayerTable, SharedTensor

from strategies import tables


def document(**layer_fields: object) -> dict[str, object]:
    layer = {"name": "a", "weight_bytes": 1, "activation_bytes": 2, "workspace_bytes": 3, **layer_fields}
    return {"schema": "cachefit.layers/v1", "name": "m", "layers": [layer]}


@given(tables())
def test_json_round_trip(table: LayerTable) -> None:
    again = LayerTable.from_dict(json.loads(table.to_json()))
    assert again == table and again.fingerprint == table.fingerprint


@given(tables(shared=False))
def test_csv_round_trip(table: LayerTable) -> None:
    again = LayerTable.from_csv(table.to_csv(), name=table.name, input_bytes=table.input_bytes)
    assert again == table


def test_files_round_trip(tmp_path: Path) -> None:
    table = LayerTable("t", (Layer("a", 1, 2, 3, 4, 5.5), Layer("b", 6, 7, 8, 0, 1e12)), input_bytes=9,
                       dtype="float16", batch=2, seq=3, phase="decode")
    table.write(tmp_path / "t.json")
    table.write(tmp_path / "t.csv")
    assert LayerTable.read(tmp_path / "t.json") == table
    from_csv = LayerTable.read(tmp_path / "t.csv", input_bytes=9)
    assert from_csv.layers == table.layers and from_csv.input_bytes == 9
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == (
        "name,weight_bytes,activation_bytes,workspace_bytes,kv_cache_bytes,flops")


@pytest.mark.parametrize(("bad", "message"), [
    (document(weight_bytes=-5), r"layers\[0\]\.weight_bytes must be a non-negative integer, got -5"),
    (document(weight_bytes=1.5), r"layers\[0\]\.weight_bytes must be an integer, got 1\.5"),
    (document(weight_bytes="7"), r"layers\[0\]\.weight_bytes must be an integer, got '7'"),
    (document(weight_bytes=2**63), r"layers\[0\]\.weight_bytes must be at most 2\*\*63-1"),
    (document(flops=-1), r"layers\[0\]\.flops must be >= 0"),
    (document(colour="red"), r"layers\[0\]\.colour is not a known field"),
    ({**document(), "schema": "cachefit.layers/v9"}, r"schema must be 'cachefit\.layers/v1'"),
    ({**document(), "layers": []}, r"layers"),
    ({"schema": "cachefit.layers/v1", "name": "m"}, r"layers is required"),
])
def test_bad_json_names_the_field(bad: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LayerTable.from_dict(bad, "model.json")


def test_fourth_layer_error_names_its_index() -> None:
    bad = document()
    layers = bad["layers"] * 4  # type: ignore[operator]
    layers = [dict(layer, name=f"l{i}") for i, layer in enumerate(layers)]
    layers[3]["weight_bytes"] = -5
    with pytest.raises(ValueError, match=r"^model\.json: layers\[3\]\.weight_bytes must be a non-negative integer"):
        LayerTable.from_dict({**bad, "layers": layers}, "model.json")


def test_sizes_beyond_int64_in_total_are_refused() -> None:
    huge = [Layer(f"l{i}", 2**62, 0, 0) for i in range(2)]
    with pytest.raises(ValueError, match="beyond int64"):
        LayerTable("huge", tuple(huge))


def test_duplicate_names_and_bad_owners_are_refused() -> None:
    with pytest.raises(ValueError, match=r"layers\[1\]\.name 'a' repeats layers\[0\]"):
        LayerTable("dup", (Layer("a", 1, 1, 1), Layer("a", 1, 1, 1)))
    with pytest.raises(ValueError, match="owner 'b' must be an earlier layer"):
        LayerTable("own", (Layer("a", 1, 1, 1, shared=(SharedTensor("w", "b", 1),)), Layer("b", 1, 1, 1)))
    with pytest.raises(ValueError, match="the owner must count them"):
        LayerTable("own", (Layer("a", 1, 1, 1), Layer("b", 1, 1, 1, shared=(SharedTensor("w", "a", 5),))))


@pytest.mark.parametrize(("text", "message"), [
    ("name,weight_bytes\na,1\n", "header must be"),
    ("name,weight_bytes,activation_bytes,workspace_bytes\na,1,2\n", "line 2: has 3 cells"),
    ("name,weight_bytes,activation_bytes,workspace_bytes\na,-5,2,3\n", "line 2: weight_bytes must be a non-neg"),
    ("name,weight_bytes,activation_bytes,workspace_bytes\na,1.5,2,3\n", "weight_bytes must be a non-negative int"),
    (f"name,weight_bytes,activation_bytes,workspace_bytes\na,{2**63},2,3\n", "at most 2\\*\\*63-1"),
    ("name,weight_bytes,activation_bytes,workspace_bytes,kv_cache_bytes,flops\na,1,2,3,4,nan\n", "flops must be"),
    ("", "empty file"),
])
def test_bad_csv_names_line_and_column(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LayerTable.from_csv(text, "m", source="layers.csv")


def test_csv_cannot_hold_shared_tensors() -> None:
    table = LayerTable("t", (Layer("a", 4, 1, 1), Layer("b", 1, 1, 1, shared=(SharedTensor("w", "a", 4),))))
    with pytest.raises(ValueError, match="write it as JSON"):
        table.to_csv()


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read layer table"):
        LayerTable.read(tmp_path / "missing.csv")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LayerTable.read(broken)


@given(tables())
def test_fingerprints_tell_tables_apart_and_plans_of_either_version_match(table: LayerTable) -> None:
    from dataclasses import replace

    assert table.fingerprint.startswith("columns-sha256:") and table.legacy_fingerprint.startswith("sha256:")
    assert table.has_fingerprint(table.fingerprint) and table.has_fingerprint(table.legacy_fingerprint)
    last = table.layers[-1]                     # no layer names it as the owner of a shared tensor
    for changed in (replace(last, workspace_bytes=last.workspace_bytes + 1), replace(last, name=last.name + "x"),
                    replace(last, flops=last.flops + 1.0), replace(last, modules=(*last.modules, "extra"))):
        other = replace(table, layers=(*table.layers[:-1], changed))
        assert not other.has_fingerprint(table.fingerprint) and not other.has_fingerprint(table.legacy_fingerprint)
    assert not replace(table, input_bytes=table.input_bytes + 1).has_fingerprint(table.fingerprint)


def test_the_fingerprint_is_the_same_on_every_platform() -> None:
    # Plans carry it: a change to how it is computed would make every earlier plan another model's. The bytes
    # hashed are little-endian int64 and float64 columns, names and canonical JSON, whatever the host.
    table = LayerTable("m", (Layer("a", 1, 2, 3, 4, 5.0), Layer("b", 6, 7, 8, modules=("b.x",))), input_bytes=9)
    assert table.fingerprint == "columns-sha256:ed0ce48f40501d25212e72fb1c25b8923fe463259a9bb7f5996f458f091c9b50"


@contextlib.contextmanager
def fast_path_for_any_size() -> Iterator[None]:
    """Small tables take the row path (quicker than importing pyarrow); these tests need the fast one."""
    with mock.patch.object(table_io, "FAST_PATH_BYTES", 0):
        yield


@contextlib.contextmanager
def spying(path: str) -> Iterator[list[object]]:
    """What each call of table_io's column path ``path`` (_fast_csv, _small_csv) returned, in order."""
    original, results = getattr(table_io, path), []

    def spy(header: list[str], data: bytes) -> object:
        results.append(original(header, data))
        return results[-1]
    with mock.patch.object(table_io, path, spy):
        yield results


def test_only_large_csv_files_take_the_fast_path() -> None:
    row = "layers.{},1000,20,0,3.5\n"
    small = _HEADER + "\n" + "".join(row.format(i) for i in range(100))
    large = _HEADER + "\n" + "".join(row.format(i) for i in range(table_io.FAST_PATH_BYTES // len(row) + 1))
    with spying("_fast_csv") as results:
        assert len(LayerTable.from_csv(small, "m").layers) == 100 and not results
        table = LayerTable.from_csv(large, "m")
    assert len(results) == 1 and results[0] is not None      # read by Arrow, not handed to the row path
    assert table.layers[-1].weight_bytes == 1000 and table.layers[-1].flops == 3.5


def test_fast_csv_path_reads_what_the_row_path_reads() -> None:
    # Plain rows take the column path; a quoted cell sends the same rows down the csv-module path.
    rows = ["a,10,2,0,0,4", "b,4611686018427387904,0,0,0,1.5e3", "c,0,7,3,1,0"]
    plain = "name,weight_bytes,activation_bytes,workspace_bytes,kv_cache_bytes,flops\n" + "\n".join(rows) + "\n"
    quoted = plain.replace("c,0,7", '"c",0,7')
    with fast_path_for_any_size():
        fast, slow = LayerTable.from_csv(plain, "m"), LayerTable.from_csv(quoted, "m")
    assert fast.layers == slow.layers and fast.fingerprint == slow.fingerprint
    assert fast.layers[1].weight_bytes == 2**62 and fast.layers[1].flops == 1500.0


@pytest.mark.parametrize(("body", "message"), [
    ("a,1,1\nb,1,1,1,1\n", "line 2: has 3 cells"),          # widths that add up but differ per row
    ("a,1,1,1\nb,9223372036854775808,1,1\n", "line 3: weight_bytes must be at most 2**63-1"),
    ("a,1,1,1\nb,1,-1,1\n", "line 3: activation_bytes must be a non-negative integer"),
    ("a,1,1,1\na,1,1,1\n", "repeats layers[0]"),
])
@pytest.mark.parametrize("arrow", [True, False])
def test_fast_csv_path_refuses_what_the_row_path_refuses(body: str, message: str, arrow: bool) -> None:
    text = "name,weight_bytes,activation_bytes,workspace_bytes\n" + body
    with fast_path_for_any_size() if arrow else contextlib.nullcontext(), \
            pytest.raises(InputError, match=re.escape(message)):
        LayerTable.from_csv(text, "m", source="t.csv")


def test_small_plain_csv_files_are_read_a_column_at_a_time() -> None:
    # A plain 100-row table: read by the small path (no Arrow, no record per row), the same layers as the csv
    # module's path (its header quoted); a cell past the csv module's size limit is refused as that path does.
    row = "layers.{},1000,20,0,3.5\n"
    plain = _HEADER + "\n" + "".join(row.format(i) for i in range(100))
    with spying("_small_csv") as results:
        table = LayerTable.from_csv(plain, "m")
    assert len(results) == 1 and results[0] is not None
    assert table.layers == LayerTable.from_csv(plain.replace("name,", '"name",', 1), "m").layers
    previous = csv.field_size_limit(8)
    try:
        with pytest.raises(InputError, match="not a readable CSV table"):
            LayerTable.from_csv(_HEADER + "\nlayers.123456,1,1,0,1\n", "m")
    finally:
        csv.field_size_limit(previous)


_HEADER = "name,weight_bytes,activation_bytes,workspace_bytes,flops"
# Cells near the edges of what the row path accepts: signs, spaces, exponents, underscores, int64's edge, floats
# that round, infinities; "x" and "" make bad names and empty cells.
_CELLS = st.sampled_from(["0", "7", "007", "+7", "-0", " 7", "7 ", "1_0", "9223372036854775807",
                          "9223372036854775808", "99999999999999999999", "1.5", ".5", "5.", "1e3", "1E-3", "2.5e+2",
                          "0.1", "9007199254740993", "2.2250738585072014e-308", "1e999", "inf", "nan", "e3", "", "x"])


def _read(text: str) -> object:
    try:
        table = LayerTable.from_csv(text, "m", source="t.csv")
    except InputError as error:
        return str(error)
    return table.layers, [layer.flops for layer in table.layers]


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", " e", "f g"]), _CELLS, _CELLS, _CELLS, _CELLS),
                min_size=1, max_size=4))
def test_the_fast_csv_path_accepts_and_reads_what_the_row_path_does(rows: list[tuple[str, ...]]) -> None:
    # The same rows, once plain (the Arrow path where it applies) and once with the header quoted (the csv-module
    # path always): the same layers and values, or a refusal (the fast path hands those to the row path).
    # Small plain tables take the column-at-a-time Python path: the same again.
    body = "".join(",".join(row) + "\n" for row in rows)
    with fast_path_for_any_size():
        fast = _read(_HEADER + "\n" + body)
    rows_path = _read('"name",' + _HEADER.partition(",")[2] + "\n" + body)
    assert fast == rows_path == _read(_HEADER + "\n" + body)


def test_plain_rows_take_the_fast_path_with_pythons_values() -> None:
    # Decimals that round (0.1, a subnormal, 2**53 + 1), forms Python reads (".5", "5.", "1E5", "007"), a 30-digit
    # integer: Arrow's casts give float()'s value for each, so such tables never need the row path.
    values = ["0.1", ".5", "5.", "1E5", "007", "2.2250738585072014e-308", "4.9e-324", "9007199254740993",
              "1.7976931348623157e308", "123456789012345678901234567890", "2.5e+2"]
    body = "".join(f"n{i},{i},2,0,{value}\n" for i, value in enumerate(values))
    plain = table_io._plain((_HEADER + "\n" + body).encode(), "t.csv")
    assert plain is not None
    for read in (table_io._fast_csv, table_io._small_csv):          # Arrow's casts, and int() and float()
        columns = read(*plain)
        assert columns is not None
        assert columns.flops.tolist() == [float(value) for value in values]
        assert columns.weight_bytes.tolist() == list(range(len(values)))


def test_json_rows_with_and_without_extras_keep_their_places() -> None:
    # Row 1 carries modules (validated by pydantic, kept whole); rows 0 and 2 go through the columns.
    layers = (Layer("a", 5, 1, 0), Layer("b", 6, 2, 0, modules=("b.x", "b.y")), Layer("c", 7, 3, 1))
    table = LayerTable("m", layers)
    again = LayerTable.from_dict(json.loads(table.to_json()))
    assert again.layers == table.layers and again.layers[1].modules == ("b.x", "b.y")
    assert list(again.columns.weight_bytes) == [5, 6, 7] and again.fingerprint == table.fingerprint


def test_a_name_range_is_the_tuple_of_its_names() -> None:
    from cachefit.core.columns import NameRange
    names = ("a", "b", "c", "d")
    middle = NameRange(names, 1, 3)
    assert middle == ("b", "c") and ("b", "c") == middle and middle == ["b", "c"] and middle != ("b",)  # noqa: SIM300
    assert hash(middle) == hash(("b", "c")) and list(middle) == ["b", "c"] and len(middle) == 2
    assert middle[0] == "b" and middle[-1] == "c" and middle[::-1] == ("c", "b") and "c" in middle
    assert NameRange(("x", "b", "c"), 1, 3) == middle and not NameRange(names, 2, 2)
    with pytest.raises(IndexError):
        middle[2]
    with pytest.raises(ValueError, match="bug"):
        NameRange(names, 3, 5)


def test_plans_hold_layer_ranges_that_read_back_as_tuples(tmp_path: Path) -> None:
    import cachefit
    from cachefit.core.columns import NameRange
    from cachefit.core.records import Plan
    table = LayerTable("m", tuple(Layer(f"l{i}", 10 + i, 1, 0) for i in range(9)))
    plan = cachefit.plan(table, capacity=100, cards=3)
    assert all(isinstance(part.layers, NameRange) for part in plan.partitions)
    plan.write(tmp_path / "p.json")
    again = Plan.read(tmp_path / "p.json")
    assert again == plan and all(type(part.layers) is tuple for part in again.partitions)
    assert [list(p.layers) for p in again.partitions] == [list(p.layers) for p in plan.partitions]
