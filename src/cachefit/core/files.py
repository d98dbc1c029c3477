"""Edge helpers shared by every file format: one-line validation messages and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError

from cachefit.core.errors import InputError

__all__ = ["MAX_INPUT_BYTES", "atomic_output", "atomic_write_text", "check_output", "decode_text",
           "describe_validation_error", "field_path", "json_text", "read_bytes", "read_json_object", "read_text"]


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


def describe_validation_error(error: ValidationError, source: str, prefix: tuple[int | str, ...] = ()) -> str:
    """The first problem of a pydantic error as one line: ``SOURCE: FIELD must be ..., got VALUE``; ``prefix``:
    where in the document the validated part lies (``("layers", 3)`` for one row)."""
    first: Any = error.errors(include_url=False)[0]
    where = field_path((*prefix, *first["loc"]))
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


MAX_INPUT_BYTES = 1 << 30     # a file a user hands in larger than 1 GiB is not a table, plan or config


def read_text(path: Path, what: str) -> str:
    """A user's text file, read only when it is a regular file of a sane size, decoded as UTF-8; InputError
    naming the file and the problem otherwise (never a hang on a FIFO, nor a MemoryError on /dev/zero)."""
    return decode_text(read_bytes(path, what), path, what)


def read_bytes(path: Path, what: str) -> bytes:
    """A user's file as bytes, read only when it is a regular file of a sane size (read_text's checks)."""
    try:
        status = path.stat()
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror or error}") from error
    if not stat.S_ISREG(status.st_mode):
        raise InputError(f"cannot read {what} {path}: not a regular file")
    if status.st_size > MAX_INPUT_BYTES:
        raise InputError(f"cannot read {what} {path}: {status.st_size} bytes, more than the {MAX_INPUT_BYTES} "
                         "a file here may hold")
    try:
        return path.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror or error}") from error


def decode_text(data: bytes, path: Path, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {error.start}: {error.reason})") from error


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object from ``path``; InputError with a one-line reason when that is not possible."""
    text = read_text(path, what)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise InputError(f"{path}: not valid JSON ({error.msg} at {where})") from error
    except RecursionError as error:
        raise InputError(f"{path}: JSON nested too deeply to be a {what}") from error
    if not isinstance(document, dict):
        raise InputError(f"{path}: a {what} must be a JSON object, got {type(document).__name__}")
    return document


_Kind = TypeVar("_Kind")


def adapter(kind: type[_Kind]) -> TypeAdapter[_Kind]:
    """pydantic's validator of ``kind``, built on first use and kept: building one at import would cost every
    command its few milliseconds for each record type (40 ms in all), used or not."""
    made: TypeAdapter[_Kind] | None = _ADAPTERS.get(kind)
    if made is None:
        made = _ADAPTERS[kind] = TypeAdapter(kind)
    return made


_ADAPTERS: dict[Any, Any] = {}


def json_text(document: Any) -> str:
    """``document`` as indented JSON text ending in a newline. orjson: a million-name plan in 0.2 s where the
    standard library's indenting writer (pure Python) takes 7 s; an integer past 64 bits, which orjson refuses,
    takes the standard writer."""
    try:
        return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE).decode()
    except TypeError:                       # orjson.JSONEncodeError is a TypeError
        return json.dumps(document, indent=2) + "\n"


def check_output(path: str | os.PathLike[str], what: str = "output") -> Path:
    """An output path that can be written: its folder exists and is writable, and it is not a folder, FIFO or
    socket. Called before any long work, so a bad ``-o`` fails first and nothing else is written."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {what} {target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {what} {target}: folder {folder} is not writable")
    if target.exists() and not (target.is_file() or _is_device(target)):
        raise InputError(f"cannot write {what} {target}: it exists and is not a regular file")
    return target


def _is_device(path: Path) -> bool:
    mode = path.stat().st_mode
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the whole output to; on success it replaces ``path`` (a
    link's target, keeping the link; a device such as /dev/null is written through), with the mode the file had,
    or the user's umask for a new one. On failure ``path`` is left exactly as it was."""
    target = check_output(path, what)
    if target.exists() and _is_device(target):
        with tempfile.TemporaryDirectory() as scratch:
            temporary = Path(scratch) / target.name
            yield temporary
            with target.open("wb") as device:
                device.write(temporary.read_bytes())
        return
    final = target.resolve() if target.is_symlink() else target
    mode = final.stat().st_mode & 0o7777 if final.exists() else 0o666 & ~_umask()
    handle, name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, mode)
        os.replace(temporary, final)
    except OSError as error:        # a full disk, a folder made read-only meanwhile: name the file, not the temp
        raise InputError(f"cannot write {what} {final}: {error.strerror or error}") from error
    finally:
        temporary.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (see :func:`atomic_output`)."""
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
