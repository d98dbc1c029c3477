"""Edge helpers shared by every file format: one-line validation messages and atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cachefit.core.errors import InputError

__all__ = ["atomic_write_text", "describe_validation_error", "field_path", "read_json_object"]


def field_path(location: tuple[int | str, ...]) -> str:
    """``('layers', 3, 'weight_bytes')`` -> ``layers[3].weight_bytes``."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not text:
            text = part
        else:
            text += f".{part}"
    return text or "<document>"


_EXPECTATIONS = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dataclass_type": "must be an object",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "bool_type": "must be true or false",
    "literal_error": "must be one of the listed values",
}


def describe_validation_error(error: ValidationError, source: str) -> str:
    """The first problem of a pydantic error as one line: ``SOURCE: FIELD must be ..., got VALUE``."""
    first: Any = error.errors(include_url=False)[0]
    where = field_path(tuple(first["loc"]))
    kind = first["type"]
    if kind in ("missing", "missing_argument"):
        return f"{source}: {where} is required"
    if kind == "value_error":       # a record's own check (its __post_init__), already one line
        message = str(first.get("ctx", {}).get("error", first["msg"]))
        return f"{source}: {message}" if where == "<document>" else f"{source}: {where}: {message}"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{source}: {where} is not a known field (check its spelling against DESIGN.md)"
    expectation = _EXPECTATIONS.get(kind)
    if kind == "greater_than_equal" and first.get("ctx", {}).get("ge") == 0:
        expectation = "must be a non-negative integer" if where.endswith("bytes") else "must be >= 0"
    elif kind == "less_than_equal" and first.get("ctx", {}).get("le") == 2**63 - 1:
        expectation = "must be at most 2**63-1 (sizes are exact 64-bit integers)"
    elif kind == "literal_error":
        expectation = f"must be {first['ctx']['expected']}"
    elif expectation is None:
        expectation = first["msg"][0].lower() + first["msg"][1:]
        return f"{source}: {where}: {expectation}, got {first['input']!r}"
    return f"{source}: {where} {expectation}, got {first['input']!r}"


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object from ``path``; ``ValueError`` with a one-line reason when that is not possible."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror or error}") from error
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise InputError(f"{path}: not valid JSON ({error.msg} at {where})") from error
    if not isinstance(document, dict):
        raise InputError(f"{path}: a {what} must be a JSON object, got {type(document).__name__}")
    return document


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (temporary file in the same folder, then rename)."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {target}: folder {folder} does not exist")
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
