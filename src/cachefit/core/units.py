"""Byte sizes: parse the SIZE strings of the CLI and print sizes for people.

SIZE (DESIGN.md): an integer is bytes; ``kB MB GB TB`` are powers of 1000 and ``KiB MiB GiB TiB`` powers of 1024.
Parsing is exact (``decimal``), so ``1.5GB`` is 1500000000 bytes, never a float rounding of it.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from cachefit.core.errors import InputError

__all__ = ["INT64_MAX", "format_size", "parse_size", "parse_sizes"]

INT64_MAX = 2**63 - 1

_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str, field: str = "size") -> int:
    """Return the exact number of bytes of an int or a SIZE string; ``ValueError`` names ``field`` otherwise."""
    if isinstance(value, bool):
        raise InputError(f"{field} must be a size such as 50MiB or 1.5GB, got {value!r}")
    number = value if isinstance(value, int) else _parse_size_text(str(value), field)
    if number <= 0:
        raise InputError(f"{field} must be a positive size such as 50MiB, got {value!r}")
    if number > INT64_MAX:
        raise InputError(f"{field} must be below 2**63 bytes (8 EiB), got {value!r}")
    return number


def _parse_size_text(text: str, field: str) -> int:
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise InputError(
            f"{field} must be a size such as 52428800, 50MiB or 1.5GB (units: kB MB GB TB, KiB MiB GiB TiB), "
            f"got {text!r}"
        )
    try:
        exact = Decimal(match.group(1)) * _UNITS[unit]
    except InvalidOperation as error:  # pragma: no cover - the regex admits only valid decimals
        raise InputError(f"{field}: cannot read {text!r} as a number") from error
    if exact != exact.to_integral_value():
        raise InputError(f"{field} must be a whole number of bytes, got {text!r} = {exact} bytes")
    return int(exact)


def parse_sizes(value: int | str | list[int | str] | tuple[int | str, ...], field: str = "capacity") -> list[int]:
    """Parse one SIZE or a comma-separated / listed sequence of them (one per card)."""
    if isinstance(value, (list, tuple)):
        items: list[int | str] = list(value)
    elif isinstance(value, str) and "," in value:
        items = [part for part in value.split(",")]
    else:
        items = [value]
    if not items:
        raise InputError(f"{field} must name at least one size")
    if len(items) == 1:
        return [parse_size(items[0], field)]
    return [parse_size(item, f"{field}[{index}]") for index, item in enumerate(items)]


def format_size(num_bytes: int | float) -> str:
    """Binary units, one decimal: ``format_size(52428800) == '50.0 MiB'``; under 1 KiB, exact bytes."""
    if abs(num_bytes) < 1024:
        return f"{int(num_bytes)} B"
    size = float(num_bytes)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        size /= 1024
        if abs(size) < 1024 or unit == "PiB":
            break
    return f"{size:.1f} {unit}"
