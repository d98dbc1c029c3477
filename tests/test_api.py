"""The public API stays deliberate, and the planning core stays free of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(("arguments", "message"), [
    ({"batch": 999}, r"batch: a LayerTable has fixed sizes"),
    ({"bogus": 1}, r"bogus: a LayerTable has fixed sizes"),
    ({"objective": "time", "device": "h100", "baseline": "tp=2,pp=1"}, r"it has no baseline"),
    ({"objective": "time", "device": "h100", "strategy": "greedy"}, r"it has no strategy"),
    ({"objective": "time", "device": "h100", "split": "always"}, r"it has no split"),
    ({"capacity": "1GB", "baseline": "tp=2,pp=2", "cards": 3}, r"cards \(3\) is fixed by baseline tp=2,pp=2 to 4"),
    ({"capacity": "1GB", "baseline": "tp=2,pp=1", "split": "never"}, r"baseline splits every layer tp ways itself"),
    ({"capacity": "1GB", "micro_batches": 2}, r"micro_batches applies to objective='time'"),
])
def test_plan_refuses_what_it_would_ignore(arguments: dict[str, object], message: str) -> None:
    table = cachefit.load_model("tiny-llama")
    with pytest.raises(cachefit.InputError, match=message):
        cachefit.plan(table, **arguments)  # type: ignore[arg-type]


def test_every_verb_has_a_function(tmp_path: Path) -> None:
    table = cachefit.profile("tiny-llama")
    plan = cachefit.plan(table, capacity="1MiB")
    assert table == cachefit.load_model("tiny-llama") and plan.found and plan.feasible
    plan.write(tmp_path / "plan.json")
    assert cachefit.export(tmp_path / "plan.json", "accelerate") == cachefit.export(plan, "accelerate")
    assert '"embed": 0' in cachefit.export(plan, "accelerate")
    with pytest.raises(cachefit.InputError, match="nnodes=2"):
        from cachefit.runtime.launch import RunOptions
        cachefit.run(tmp_path / "plan.json", tmp_path, RunOptions(nnodes=2))
