"""cachefit: plan (and run) deployments of neural networks whose partitions live in on-chip memory.

    import cachefit
    table = cachefit.load_model("seed-dense16", batch=1, seq=10000, phase="decode")
    plan = cachefit.plan(table, capacity="50MiB", cards=16)
    plan.feasible, plan.cards, plan.bottleneck_bytes, plan.partitions[0].footprint_bytes
    prediction, baseline = cachefit.predict(cachefit.plan(table, device="dmatrix-corsair"), device="h100",
                                            baseline="tp=8,pp=2")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cachefit.core.lazy import lazy_names

if TYPE_CHECKING:
    from cachefit.api import (
        devices,
        export,
        largest_micro_batch,
        load_model,
        plan,
        predict,
        profile,
        run,
        shard,
        torchrun_command,
    )
    from cachefit.core.errors import InputError, RunError
    from cachefit.core.hardware import Device, Figure
    from cachefit.core.layers import Layer, LayerTable, SharedTensor, Split
    from cachefit.core.memory import Breakdown, IntervalCost, interval_cost
    from cachefit.core.records import DeviceRecord, ModelInfo, Partition, Plan
    from cachefit.core.units import format_size, parse_size
    from cachefit.perf.predict import Prediction
    from cachefit.planning import make_plan

# Each public name and the module that defines it, imported on first use (PEP 562): ``import cachefit.core.layers``
# (or the ``cachefit`` command's start) then costs only what that module needs, not the whole library (0.22 s).
_HOMES = {
    **dict.fromkeys(("devices", "export", "largest_micro_batch", "load_model", "plan", "predict", "profile", "run",
                     "shard", "torchrun_command"), "cachefit.api"),
    **dict.fromkeys(("InputError", "RunError"), "cachefit.core.errors"),
    **dict.fromkeys(("Device", "Figure"), "cachefit.core.hardware"),
    **dict.fromkeys(("Layer", "LayerTable", "SharedTensor", "Split"), "cachefit.core.layers"),
    **dict.fromkeys(("Breakdown", "IntervalCost", "interval_cost"), "cachefit.core.memory"),
    **dict.fromkeys(("DeviceRecord", "ModelInfo", "Partition", "Plan"), "cachefit.core.records"),
    **dict.fromkeys(("format_size", "parse_size"), "cachefit.core.units"),
    "Prediction": "cachefit.perf.predict",
    "make_plan": "cachefit.planning",
}

__version__ = "0.1.0"

__all__ = [
    "Breakdown",
    "Device",
    "DeviceRecord",
    "Figure",
    "InputError",
    "IntervalCost",
    "Layer",
    "LayerTable",
    "ModelInfo",
    "Partition",
    "Plan",
    "Prediction",
    "RunError",
    "SharedTensor",
    "Split",
    "__version__",
    "devices",
    "export",
    "format_size",
    "interval_cost",
    "largest_micro_batch",
    "load_model",
    "make_plan",
    "parse_size",
    "plan",
    "predict",
    "profile",
    "run",
    "shard",
    "torchrun_command",
]

__getattr__, __dir__ = lazy_names(__name__, _HOMES, __all__)
