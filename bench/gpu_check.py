"""The prepared GPU check (issue 12, item 6): one command, one GPU, under 8 minutes, a table written to a file.

    python bench/gpu_check.py                 # on a machine with one NVIDIA H100/H200; table and JSON under $OUT

1. The device as found: name, L2 size, its largest persisting-L2 carve-out and access-policy window (cuda-python).
2. Resident against streamed weights (bench/gpu_residency.py): a GEMV and a decode stage of the reference model,
   weights in the L2 persisting window against weights streamed from HBM, sizes from a quarter of L2 to 4x.
3. The Hugging Face stage path on CUDA: transformers' Llama (hidden 256, 6 layers, float32, random weights) saved
   with save_pretrained, planned on one card, sharded, and run by `cachefit run` as one process (NCCL with a world
   of one, the stage's weights in the persisting window when they fit), checked against transformers' generate on
   the CPU (tokens identical, logits within 1e-3); its decode speed and TPOT, and the same with the window off.
Each part is timed and guarded: one that fails is reported with its error, and the others still run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# 6.5 M parameters, 26.1 MB in float32: small enough for an H100's persisting L2 carve-out (a part of its 50 MB
# L2, the device says how much), so the window can apply to the whole stage.
CONFIG = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 6,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def guarded(name: str, part: Callable[[], dict[str, Any]], results: dict[str, Any]) -> None:
    start = time.perf_counter()
    try:
        results[name] = {"ok": True, **part()}
    except Exception as error:      # a failing part is reported, the others still run
        results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc(limit=8)}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[{results[name]['seconds']:>6.1f} s] {name}: {'ok' if results[name]['ok'] else results[name]['error']}",
          flush=True)


def device_facts() -> dict[str, Any]:
    from cachefit.runtime.residency import cuda_runtime

    properties = torch.cuda.get_device_properties(0)
    facts: dict[str, Any] = {"name": properties.name, "l2_bytes": getattr(properties, "L2_cache_size", None),
                             "memory_bytes": properties.total_memory, "torch": torch.__version__,
                             "cuda": torch.version.cuda}
    runtime = cuda_runtime()
    facts["cuda_python"] = runtime is not None
    return facts


def residency(out: Path) -> dict[str, Any]:
    import gpu_residency

    os.environ["OUT"] = str(out)
    gpu_residency.main()
    found = sorted(out.glob("*.json"))
    return {"files": [f.name for f in found]}


def hf_stage_on_cuda(work: Path) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    import cachefit
    from cachefit.runtime import shard_checkpoint
    from cachefit.runtime.launch import RunOptions, run_plan
    from cachefit.sources import TorchOptions

    torch.manual_seed(0)
    folder = work / "llama"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **CONFIG), dtype=torch.float32
                                     ).save_pretrained(folder)
    table = cachefit.load_model(folder, batch=4, seq=128, torch_options=TorchOptions(prefill_chunk=64))
    plan = cachefit.plan(table, capacity=1 << 40, cards=1, memory_model="pipeline")
    plan_file = work / "plan.json"
    plan.write(plan_file)
    shard_checkpoint(plan, folder, work / "shards")
    rows = {}
    for label, window in (("weights in the L2 window", "1"), ("window off", "0")):
        os.environ["CACHEFIT_L2_RESIDENCY"] = window
        result = run_plan(str(plan_file), str(work / "shards"), RunOptions(64, 32, 1, check=True, timeout=120))
        assert result.summary is not None
        summary = result.summary.to_dict()
        rows[label] = {"check": result.checked, "prefill_tokens_per_s": summary["prefill_tokens_per_s"],
                       "decode_tokens_per_s": summary["decode_tokens_per_s"],
                       "tpot_median_ms": summary["tpot_median_ms"], "residency": result.ranks[0].get("residency"),
                       "memory": result.ranks[0]["memory"], "planned_bytes": result.ranks[0]["planned_bytes"]}
    os.environ.pop("CACHEFIT_L2_RESIDENCY", None)
    return {"runs": rows}


def table(results: dict[str, Any]) -> str:
    lines = ["| part | ok | seconds | result |", "|---|---|---|---|"]
    for name, result in results.items():
        if not result["ok"]:
            lines.append(f"| {name} | no | {result['seconds']} | {result['error'][:200]} |")
            continue
        shown = {k: v for k, v in result.items() if k not in ("ok", "seconds")}
        lines.append(f"| {name} | yes | {result['seconds']} | {json.dumps(shown, default=str)[:900]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(os.environ.get("OUT", "gpu-check-out"))
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA device: this check is for a machine with one NVIDIA GPU")
        sys.exit(2)
    results: dict[str, Any] = {}
    guarded("device", device_facts, results)
    guarded("resident vs streamed (bench/gpu_residency.py)", lambda: residency(out), results)
    with tempfile.TemporaryDirectory() as temporary:
        guarded("Hugging Face stage on CUDA (cachefit run, NCCL world of one)",
                lambda: hf_stage_on_cuda(Path(temporary)), results)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    text = table(results)
    (out / "gpu_check.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
