"""The public API stays deliberate, and the planning core stays free of torch."""

from __future__ import annotations

import subprocess
import sys

import cachefit


def test_public_api_is_deliberate() -> None:
    assert set(cachefit.__all__) == {
        "__version__", "load_model", "plan", "devices", "make_plan", "LayerTable", "Layer", "SharedTensor",
        "Plan", "Partition", "ModelInfo", "Device", "Figure", "Breakdown", "IntervalCost", "interval_cost",
        "parse_size", "format_size", "Split", "Prediction", "predict", "largest_micro_batch",
        "profile", "export", "shard", "run", "torchrun_command", "DeviceRecord", "InputError", "RunError",
    }
    for name in cachefit.__all__:
        assert hasattr(cachefit, name), name


def test_design_example_runs_as_written(tmp_path: object) -> None:
    table = cachefit.load_model("seed-dense16", batch=1, seq=10000, phase="decode")
    plan = cachefit.plan(table, capacity="50MiB", cards=16, memory_model="peak", strategy="balanced")
    assert plan.cards == 16 and plan.feasible is False       # each layer is 1.8 GiB: no 50 MiB card holds one
    plan = cachefit.plan(table, capacity="2GB", cards=16)
    assert plan.feasible and plan.partitions[0].first == 0 and plan.partitions[0].footprint_bytes > 0


def test_planning_core_does_not_import_torch() -> None:
    code = ("import sys, cachefit, cachefit.cli, cachefit.output.report; "
            "cachefit.plan('tiny-llama', capacity='1MiB'); cachefit.plan('tiny-llama', capacity='300KiB'); "
            "cachefit.predict(cachefit.plan('seed-dense16', device='h100', baseline='tp=8,pp=2')); "
            "cachefit.plan('llama-3-8b', device='h100', capacity='2GB', objective='time'); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
