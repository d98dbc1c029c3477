"""The device catalog: on-chip capacity and speeds of accelerators, each figure with its source.

Bundled data: ``data/devices.toml`` (from shared/hardware.md). A user's TOML adds devices or overrides single
figures of bundled ones; a bare number there becomes a figure of kind "user" sourced to that file.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError

from cachefit.core.errors import InputError
from cachefit.core.files import adapter, describe_validation_error, read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["FIGURES", "KIND_NAMES", "Device", "Figure", "get_device", "load_devices"]

FigureKind = Literal["V", "M", "3P", "A", "user"]
KIND_NAMES: dict[str, str] = {"V": "datasheet", "M": "measured", "3P": "third party", "A": "assumed",
                              "user": "a devices file"}
FIGURES = ("on_chip_bytes", "usable_fraction", "on_chip_bandwidth", "off_chip_bytes", "off_chip_bandwidth",
           "fp32_flops", "fp16_flops", "fp8_flops", "link_bandwidth", "link_latency", "collective_latency", "overlap",
           "pass_seconds", "pass_seconds_hf", "layer_seconds_dense", "layer_seconds_llama", "layer_seconds_hf")


@dataclass(frozen=True, slots=True)
class Figure:
    """One number about a device and where it comes from: V datasheet, M measured, 3P third party, A assumed,
    user: a devices file's bare number."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    value: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    kind: FigureKind
    source: Annotated[str, Field(min_length=1)]


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    label: str
    memory: str
    figures: Mapping[str, Figure]

    @property
    def on_chip_bytes(self) -> int:
        return int(self.figures["on_chip_bytes"].value)

    @property
    def usable_fraction(self) -> float:
        return self.figures["usable_fraction"].value

    @property
    def capacity_bytes(self) -> int:
        """The on-chip bytes a plan may fill: floor(on-chip size x usable fraction)."""
        return math.floor(self.on_chip_bytes * self.usable_fraction)

    def figure(self, name: str) -> Figure | None:
        return self.figures.get(name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "memory": self.memory, "capacity_bytes": self.capacity_bytes,
                **{key: {"value": f.value, "kind": f.kind, "source": f.source} for key, f in self.figures.items()}}


def load_devices(user_file: str | Path | None = None) -> dict[str, Device]:
    """The bundled catalog, with ``user_file``'s devices added and figures overridden."""
    if user_file is None:
        return dict(_bundled())
    raw = _bundled_raw()
    source = "bundled devices.toml"
    if user_file is not None:
        source = str(user_file)
        for given, entry in _read_toml(Path(user_file)).items():
            name = given.lower()            # device names are case-insensitive (get_device lowers them too)
            if not isinstance(entry, dict):
                raise InputError(f"{user_file}: [{given}] must be a table of device fields")
            merged = dict(raw.get(name, {}))
            merged.update({key: _as_figure(key, value, source) for key, value in entry.items()})
            raw[name] = merged
    return {name: _device(name, entry, source) for name, entry in raw.items()}


@functools.cache
def _bundled() -> dict[str, Device]:
    """The bundled catalog, parsed once a process (devices are frozen records: callers get a copy of the dict)."""
    return {name: _device(name, entry, "bundled devices.toml") for name, entry in _bundled_raw().items()}


def _bundled_raw() -> dict[str, Any]:
    text = resources.files("cachefit").joinpath("data/devices.toml").read_text(encoding="utf-8")
    raw: dict[str, Any] = tomllib.loads(text)
    return raw


def get_device(name: str, devices: Mapping[str, Device]) -> Device:
    key = name.lower()
    if key not in devices:
        raise InputError(f"device {name!r} is not in the catalog; known: {', '.join(sorted(devices))} "
                         "(add your own with devices_file)", parameters=("devices_file",))
    return devices[key]


def _read_toml(path: Path) -> dict[str, Any]:
    text = read_text(path, "devices file")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{path}: not valid TOML ({error})") from error


def _as_figure(key: str, value: Any, source: str) -> Any:
    if key in FIGURES and isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"value": value, "kind": "user", "source": source}
    return value


_DEFAULT_USABLE = Figure(1.0, "A", "default: all of it")
# A flag, and fixed costs a host may measure as nil; every other figure divides or scales something.
_MAY_BE_ZERO = frozenset({"overlap", "pass_seconds", "pass_seconds_hf", "layer_seconds_dense", "layer_seconds_llama",
                          "layer_seconds_hf"})


def _device(name: str, entry: Mapping[str, Any], source: str) -> Device:
    """A catalog entry: a label, the kind of memory, and figures (``on_chip_bytes`` required)."""
    where = f"{source} [{name}]"
    unknown = sorted(set(entry) - {"label", "memory", *FIGURES})
    if unknown:
        raise InputError(f"{where}: {unknown[0]} is not a known field (figures: {', '.join(FIGURES)})")
    label, memory = entry.get("label"), entry.get("memory", "on-chip")
    if not isinstance(label, str) or not label or not isinstance(memory, str):
        raise InputError(f"{where}: label (and memory, if given) must be non-empty strings, got {label!r}")
    try:
        figures = adapter(dict[str, Figure]).validate_python({key: entry[key] for key in FIGURES if key in entry})
    except ValidationError as error:
        raise InputError(describe_validation_error(error, where)) from error
    if "on_chip_bytes" not in figures:
        raise InputError(f"{where}: on_chip_bytes is required")
    figures.setdefault("usable_fraction", _DEFAULT_USABLE)
    zero = [key for key, figure in figures.items() if figure.value == 0 and key not in _MAY_BE_ZERO]
    if zero:
        raise InputError(f"{where}: {zero[0]} must be greater than 0")
    fraction = figures["usable_fraction"].value
    if not 0 < fraction <= 1:
        raise InputError(f"{where}: usable_fraction must be in (0, 1], got {fraction}")
    ordered = {key: figures[key] for key in FIGURES if key in figures}
    return Device(name=name.lower(), label=label, memory=memory, figures=ordered)
