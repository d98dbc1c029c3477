"""What the runtime benchmarks share: their model, its spec file, and measure-plan-shard-run of one plan."""

from __future__ import annotations

from pathlib import Path

from cachefit.core.records import Plan
from cachefit.core.spec import DenseSpec, Workload
from cachefit.runtime import init_weights, shard_checkpoint
from cachefit.runtime.launch import RunOptions, RunResult, run_plan

# Sized so a pass is mostly compute: d = 1024, fp32, 403 MB of weights.
SPEC = DenseSpec("bench-dense8", layers=8, heads=8, head_dim=128, mlp_hidden=4096, vocab=2048)


def spec_file(folder: Path, work: Workload) -> Path:
    """SPEC with ``work`` (batch, seq; fp32 decode) as a .toml spec, for cachefit.load_model."""
    path = folder / f"bench-{work.batch}-{work.seq}.toml"
    path.write_text(f'family = "dense"\nname = "{SPEC.name}"\nlayers = {SPEC.layers}\nheads = {SPEC.heads}\n'
                    f'head_dim = {SPEC.head_dim}\nmlp_hidden = {SPEC.mlp_hidden}\nvocab = {SPEC.vocab}\n'
                    f'[workload]\nbatch = {work.batch}\nseq = {work.seq}\nphase = "decode"\ndtype = "float32"\n')
    return path


def run(folder: Path, plan: Plan, work: Workload, options: RunOptions, tag: str) -> tuple[Path, RunResult]:
    """Write ``plan`` as ``folder/tag.json``, shard SPEC's seeded weights (made once per folder) and run it."""
    plan_file, weights, shards = folder / f"{tag}.json", folder / "weights.safetensors", folder / f"shards-{tag}"
    plan.write(plan_file)
    if not weights.exists():
        init_weights(SPEC, work, weights, seed=0)
    shard_checkpoint(plan, weights, shards)
    return plan_file, run_plan(str(plan_file), str(shards), options)
