"""The Python API: what the CLI calls, with arguments as users write them (SIZE strings, device names)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from cachefit.core.errors import InputError
from cachefit.core.hardware import Device, get_device, load_devices
from cachefit.core.layers import LayerTable
from cachefit.core.memory import MemoryModel
from cachefit.core.units import parse_sizes
from cachefit.perf.predict import Prediction, layer_costs, predict_plan, rates_of
from cachefit.planning.groups import make_baseline_plan, make_split_plan, parse_baseline
from cachefit.planning.plan import Plan, Strategy, make_plan
from cachefit.planning.timed import make_time_plan
from cachefit.sources import load_model, rebuild_table

__all__ = ["SPLITS", "Objective", "SplitMode", "devices", "largest_micro_batch", "load_model", "plan", "predict"]

Capacity = int | str | Sequence[int | str]
SplitMode = Literal["auto", "never", "always"]
SPLITS: tuple[SplitMode, ...] = ("auto", "never", "always")
Objective = Literal["memory", "time"]


def devices(devices_file: str | Path | None = None) -> dict[str, Device]:
    """The device catalog (bundled, plus ``devices_file``'s additions and overrides)."""
    return load_devices(devices_file)


def plan(model: LayerTable | str | Path, capacity: Capacity | None = None, *, device: str | None = None,
         cards: int | None = None, memory_model: MemoryModel = "peak", strategy: Strategy = "balanced",
         split: SplitMode = "auto", baseline: str | tuple[int, int] | None = None, objective: Objective = "memory",
         micro_batches: int = 1, devices_file: str | Path | None = None, **model_options: Any) -> Plan:
    """Plan ``model`` (a LayerTable or any MODEL the CLI takes) onto cards of ``capacity`` (bytes, a SIZE string,
    or one per card) or of a catalog ``device``'s usable on-chip capacity.

    ``split``: whether stages may be tensor groups (several cards sharing each layer): ``never``; ``auto`` only
    when whole layers cannot fit; ``always`` (the fewest cards over every width). ``baseline`` ("tp=8,pp=2"):
    the classic layout instead, built whether or not it fits. ``objective="time"``: the least slowest predicted
    stage (per pass of 1/``micro_batches`` of the batch) on ``device``'s figures, every card within ``capacity``
    (default: the device's)."""
    table = model if isinstance(model, LayerTable) else load_model(model, **model_options)
    catalog = load_devices(devices_file)
    if objective == "time":
        return _time_plan(table, capacity, device, cards, memory_model, micro_batches, catalog)
    if objective != "memory":
        raise InputError(f"objective must be 'memory' or 'time', got {objective!r}")
    capacities, device_record = _capacities(capacity, device, catalog)
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if baseline is not None or split == "always":
        _check_single_capacity(capacities, strategy, "--baseline" if baseline is not None else "--split always")
    if baseline is not None:
        return make_baseline_plan(table, capacities[0], *_baseline_shape(baseline), memory_model, device_record)
    if split == "always":
        return make_split_plan(table, capacities[0], cards, memory_model, device_record)
    larger = sorted(((d.name, d.capacity_bytes) for d in catalog.values()), key=lambda item: item[1])
    whole = make_plan(table, capacities, cards, memory_model, strategy, device_record, larger)
    if (whole.feasible or split == "never" or table.split_ways == (1,) or len(capacities) > 1
            or strategy != "balanced"):
        return whole
    grouped = make_split_plan(table, capacities[0], cards, memory_model, device_record)
    if grouped.feasible:
        return replace(grouped, diagnosis=("whole layers do not fit, so some stages are tensor groups",
                                           *grouped.diagnosis))
    return replace(grouped, diagnosis=(*whole.diagnosis, "with tensor groups (layers split across cards):",
                                       *grouped.diagnosis))


def _time_plan(table: LayerTable, capacity: Capacity | None, device: str | None, cards: int | None,
               memory_model: MemoryModel, micro_batches: int, catalog: dict[str, Device]) -> Plan:
    if device is None:
        raise InputError("--objective time predicts stage times from a device's figures: give --device (and "
                         "--capacity to plan for another capacity than the device's)")
    chosen = get_device(device, catalog)
    limits = [chosen.capacity_bytes] if capacity is None else _parse_capacity(capacity)
    if len(limits) != 1:
        raise InputError("--objective time plans same-size cards: give one capacity")
    rates = rates_of(chosen, table.dtype, chosen.capacity_bytes)
    return make_time_plan(table, limits[0], layer_costs(table, rates, micro_batches), cards, memory_model,
                          _device_record(chosen))


def largest_micro_batch(model: str | Path, capacity: Capacity | None = None, **arguments: Any
                        ) -> tuple[int, Plan] | None:
    """The largest batch (sequences per pass, at most the model's) at which :func:`plan` finds a feasible plan,
    and that plan; None when even one sequence does not fit. Footprints grow with the batch, so bisection is
    exact. ``arguments``: those of :func:`plan`, model options included."""
    if isinstance(model, LayerTable):
        raise InputError("--micro-batch auto re-sizes the model, so it needs a preset, spec, HF config or module, "
                         "not a layer table")
    batch = arguments.pop("batch", None) or load_model(model, **_model_only(arguments)).batch or 1
    found: tuple[int, Plan] | None = None
    low, high = 0, batch                     # low fits (0: none known), everything above high is unknown
    while low < high:
        middle = (low + high + 1) // 2
        attempt = plan(model, capacity, batch=middle, **arguments)
        if attempt.feasible:
            low, found = middle, (middle, attempt)
        else:
            high = middle - 1
    return found


def _model_only(arguments: dict[str, Any]) -> dict[str, Any]:
    keys = ("seq", "phase", "dtype", "attention", "input_bytes", "torch_options")
    return {key: arguments[key] for key in keys if key in arguments}


def _capacities(capacity: Capacity | None, device: str | None, catalog: dict[str, Device]
                ) -> tuple[list[int], dict[str, Any] | None]:
    if (capacity is None) == (device is None):
        raise InputError("give exactly one of capacity (e.g. '50MiB' or a list, one per card) and device")
    if device is not None:
        chosen = get_device(device, catalog)
        return [chosen.capacity_bytes], _device_record(chosen)
    assert capacity is not None
    return _parse_capacity(capacity), None


def _parse_capacity(capacity: Capacity) -> list[int]:
    return parse_sizes(capacity if not isinstance(capacity, Sequence) or isinstance(capacity, str)
                       else list(capacity), "capacity")


def _device_record(chosen: Device) -> dict[str, Any]:
    """What a plan keeps of the device it was made for."""
    return {"name": chosen.name, "label": chosen.label, "memory": chosen.memory,
            "on_chip_bytes": chosen.on_chip_bytes, "usable_fraction": chosen.usable_fraction,
            "capacity_bytes": chosen.capacity_bytes}


def _baseline_shape(baseline: str | tuple[int, int]) -> tuple[int, int]:
    """(tensor parallel, pipeline stages) of ``tp=T,pp=P`` or of a pair."""
    return parse_baseline(baseline) if isinstance(baseline, str) else baseline


def _check_single_capacity(capacities: list[int], strategy: str, what: str) -> None:
    if len(capacities) > 1:
        raise InputError(f"{what} plans tensor groups of same-size cards: give one capacity, not {len(capacities)}")
    if strategy != "balanced":
        raise InputError(f"{what} has no greedy strategy: drop --strategy {strategy}")


def predict(plan_or_file: Plan | str | Path, *, device: str | None = None, micro_batches: int = 1,
            prompt_len: int | None = None, chunk: int | None = None, baseline: str | tuple[int, int] | None = None,
            devices_file: str | Path | None = None) -> tuple[Prediction, Prediction | None]:
    """Predicted speed of a plan (and of the ``baseline`` tp=T,pp=P layout of the same model on the same cards)
    on ``device`` (default: the device the plan was made for)."""
    plan = plan_or_file if isinstance(plan_or_file, Plan) else Plan.read(plan_or_file)
    name = device or (plan.device or {}).get("name")
    if name is None:
        raise InputError("this plan names no device (it was planned with --capacity): give --device NAME, e.g. "
                         "a calibrated host (cachefit calibrate)")
    chosen = get_device(name, load_devices(devices_file))
    table = rebuild_table(_model_record(plan))
    chunk = chunk or int((plan.model.spec or {}).get("prefill_chunk", 1))
    # On another device than the plan's, residency is judged against that device's capacity.
    capacity = chosen.capacity_bytes if device is not None else plan.capacity_bytes[0]
    rates = rates_of(chosen, plan.model.dtype, capacity)
    ours = predict_plan(plan, table, rates, micro_batches, prompt_len, chunk)
    if baseline is None:
        return ours, None
    classic = make_baseline_plan(table, capacity, *_baseline_shape(baseline), plan.memory_model)
    return ours, predict_plan(classic, table, rates, micro_batches, prompt_len, chunk)


def _model_record(plan: Plan) -> dict[str, Any]:
    return {key: getattr(plan.model, key) for key in ("spec", "batch", "seq", "phase", "dtype")}
