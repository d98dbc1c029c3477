from __future__ import annotations

import pytest

from cachefit.core.units import format_size, parse_size, parse_sizes


@pytest.mark.parametrize(("text", "expected"), [
    ("52428800", 52428800), ("50MiB", 50 * 2**20), ("50 MiB", 50 * 2**20), ("1.5GB", 1_500_000_000),
    ("1.5GiB", 3 * 2**29), ("230MB", 230_000_000), ("2kB", 2000), ("1KiB", 1024), ("7b", 7), (4096, 4096),
])
def test_sizes_parse_exactly(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("50 parsecs", "must be a size such as"), ("-5MB", "must be a size such as"), ("0", "positive"),
    ("1.0001kB", "whole number of bytes"), ("10EiB", "must be a size such as"), (str(2**63), "below 2\\*\\*63"),
    (True, "must be a size"),
])
def test_bad_sizes_name_the_problem(text: str | bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text, "capacity")  # type: ignore[arg-type]


def test_lists_of_sizes_name_the_bad_entry() -> None:
    assert parse_sizes("40MiB,40MiB,96MiB") == [40 * 2**20, 40 * 2**20, 96 * 2**20]
    assert parse_sizes(["1kB", 5]) == [1000, 5]
    with pytest.raises(ValueError, match=r"capacity\[1\] must be a size"):
        parse_sizes("1kB,oops")


def test_format_size_reads_naturally() -> None:
    assert format_size(52428800) == "50.0 MiB"
    assert format_size(1000) == "1000 B"
    assert format_size(1610612736) == "1.5 GiB"
