"""The Python API: what the CLI calls, with arguments as users write them (SIZE strings, device names)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cachefit.hardware import Device, get_device, load_devices
from cachefit.layers import LayerTable
from cachefit.memory import MemoryModel
from cachefit.plan import Plan, Strategy, make_plan
from cachefit.sources import load_model
from cachefit.units import parse_sizes

__all__ = ["devices", "load_model", "plan"]

Capacity = int | str | Sequence[int | str]


def devices(devices_file: str | Path | None = None) -> dict[str, Device]:
    """The device catalog (bundled, plus ``devices_file``'s additions and overrides)."""
    return load_devices(devices_file)


def plan(model: LayerTable | str | Path, capacity: Capacity | None = None, *, device: str | None = None,
         cards: int | None = None, memory_model: MemoryModel = "peak", strategy: Strategy = "balanced",
         devices_file: str | Path | None = None, **model_options: Any) -> Plan:
    """Plan ``model`` (a LayerTable or any MODEL the CLI takes) onto cards of ``capacity`` (bytes, a SIZE string,
    or one per card) or of a catalog ``device``'s usable on-chip capacity."""
    table = model if isinstance(model, LayerTable) else load_model(model, **model_options)
    catalog = load_devices(devices_file)
    if (capacity is None) == (device is None):
        raise ValueError("give exactly one of capacity (e.g. '50MiB' or a list, one per card) and device")
    device_record = None
    if device is not None:
        chosen = get_device(device, catalog)
        capacities = [chosen.capacity_bytes]
        device_record = {"name": chosen.name, "label": chosen.label, "memory": chosen.memory,
                         "on_chip_bytes": chosen.on_chip_bytes, "usable_fraction": chosen.usable_fraction,
                         "capacity_bytes": chosen.capacity_bytes}
    else:
        assert capacity is not None
        capacities = parse_sizes(capacity if not isinstance(capacity, Sequence) or isinstance(capacity, str)
                                 else list(capacity), "capacity")
    larger = sorted(((d.name, d.capacity_bytes) for d in catalog.values()), key=lambda item: item[1])
    return make_plan(table, capacities, cards, memory_model, strategy, device_record, larger)
