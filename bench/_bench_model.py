"""What the runtime benchmarks share: their model, its spec file, and measure-plan-shard-run of one plan."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from cachefit.core.records import Plan
from cachefit.core.spec import DenseSpec, LlamaSpec, Workload, family_of
from cachefit.runtime import init_weights, shard_checkpoint
from cachefit.runtime.calibrate import measure_host, to_toml
from cachefit.runtime.launch import RunOptions, RunResult, run_plan

# Sized so a pass is mostly compute: d = 1024, fp32, 403 MB of weights.
SPEC = DenseSpec("bench-dense8", layers=8, heads=8, head_dim=128, mlp_hidden=4096, vocab=2048)


def spec_file(folder: Path, work: Workload, spec: DenseSpec | LlamaSpec = SPEC) -> Path:
    """``spec`` (either family, every field) with ``work`` (batch, seq; fp32 decode) as a .toml spec, for
    cachefit.load_model. JSON's scalars (quoted strings, integers, true/false) are TOML's."""
    path = folder / f"{spec.name}-{work.batch}-{work.seq}.toml"
    fields = "".join(f"{key} = {json.dumps(value)}\n" for key, value in asdict(spec).items())
    path.write_text(f'family = "{family_of(spec)}"\n{fields}'
                    f'[workload]\nbatch = {work.batch}\nseq = {work.seq}\nphase = "decode"\ndtype = "float32"\n')
    return path


def run(folder: Path, plan: Plan, work: Workload, options: RunOptions, tag: str, spec: DenseSpec | LlamaSpec = SPEC
        ) -> tuple[Path, RunResult]:
    """Write ``plan`` as ``folder/tag.json``, shard ``spec``'s seeded weights (made once per folder) and run it."""
    plan_file, weights, shards = folder / f"{tag}.json", folder / f"{spec.name}.safetensors", folder / f"shards-{tag}"
    plan.write(plan_file)
    if not weights.exists():
        init_weights(spec, work, weights, seed=0)
    shard_checkpoint(plan, weights, shards)
    return plan_file, run_plan(str(plan_file), str(shards), options)


def calibrated_host(folder: Path, console: Console) -> Path:
    """This host as ``cachefit calibrate`` measures it, written to ``folder/host.toml`` (predict's device "host")
    and shown: each benchmark predicts with a calibration of the same run."""
    devices = folder / "host.toml"
    devices.write_text(to_toml(measure_host()))
    console.print(devices.read_text())
    return devices


def relative_error(predicted: float, measured: float) -> str:
    return f"{(predicted - measured) / measured:+.0%}"
