"""Resident against streamed weights on one GPU (issue 6): does the L2 persisting window keep a stage's weights
on-chip, and what is it worth? Needs CUDA and cuda-python; run it when a GPU is lent (DEVELOPERS, `device`).

    python bench/gpu_residency.py            # a table; full numbers as JSON under $OUT if set

For weight sizes from a quarter of L2 to four times it (fp16):
- GEMV y = W x, timed with CUDA events, with other traffic between calls (a 512 MiB buffer read through, as a
  decode step's KV cache and activations would), so without protection W is evicted;
- the same with W in the persisting access-policy window (cachefit.runtime.residency);
- a decode stage of the reference model (dense blocks sized to the same bytes) with and without the window.
Reports achieved bandwidth (bytes of W / time) and the resident / streamed speed ratio. Medians of 50 timings
after 10 warm-ups; fresh random inputs; the result checked against float32.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from cachefit.runtime.residency import cuda_runtime, flatten_weights, pin_weights_in_l2


def _timed(operation: Any, polluter: torch.Tensor, repeats: int = 50) -> float:
    """Median seconds of ``operation`` with ``polluter`` read through before each call (evicts unprotected lines)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for index in range(repeats + 10):
        polluter.sum()
        start.record()
        operation()
        end.record()
        torch.cuda.synchronize()
        if index >= 10:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _reset_window() -> None:
    """Drop any persisting lines and the window between measurements."""
    cuda_runtime().cudaCtxResetPersistingL2Cache()


def gemv(size: int, polluter: torch.Tensor) -> dict[str, Any]:
    rows = size // (2 * 4096)
    weight = torch.randn(rows, 4096, device="cuda", dtype=torch.float16)
    vector = torch.randn(4096, device="cuda", dtype=torch.float16)
    reference = weight.float() @ vector.float()
    error = float((weight @ vector).float().sub(reference).norm() / reference.norm())
    streamed = _timed(lambda: weight @ vector, polluter)
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(weight, requires_grad=False)
    residency = pin_weights_in_l2(flatten_weights(holder))
    resident = _timed(lambda: holder.weight @ vector, polluter)
    _reset_window()
    return {"bytes": size, "streamed_s": streamed, "resident_s": resident, "residency": residency,
            "relative_error": error}


def decode_stage(size: int, polluter: torch.Tensor) -> dict[str, Any]:
    from cachefit.nn.model import Block, ModelConfig

    hidden = 1024
    per_block = (4 * hidden * hidden + 2 * hidden * 4 * hidden) * 2
    blocks = max(1, size // per_block)
    config = ModelConfig("dense", blocks, hidden, 16, 16, 64, 4 * hidden, 0, False)
    stage = torch.nn.Sequential(*[Block(config) for _ in range(blocks)]).to("cuda", torch.float16).eval()
    x = torch.randn(4, 1, hidden, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        streamed = _timed(lambda: stage(x), polluter)
        residency = pin_weights_in_l2(flatten_weights(stage))
        resident = _timed(lambda: stage(x), polluter)
    _reset_window()
    return {"bytes": blocks * per_block, "streamed_s": streamed, "resident_s": resident, "residency": residency}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (it has not run on a CPU host)")
    properties = torch.cuda.get_device_properties(0)
    l2 = int(getattr(properties, "L2_cache_size", 50 << 20))
    polluter = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    rows = []
    for fraction in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0):
        size = int(l2 * fraction) // 8192 * 8192
        rows.append({"fraction_of_l2": fraction, "gemv": gemv(size, polluter), "stage": decode_stage(size, polluter)})
    print(f"{properties.name}, L2 {l2 / 2**20:.0f} MiB, torch {torch.__version__}")
    print("| weights / L2 | GEMV streamed GB/s | resident GB/s | ratio | window applied | stage streamed ms | "
          "resident ms | ratio |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|")
    for row in rows:
        g, s = row["gemv"], row["stage"]
        print(f"| {row['fraction_of_l2']:.2f} | {g['bytes'] / g['streamed_s'] / 1e9:.0f} | "
              f"{g['bytes'] / g['resident_s'] / 1e9:.0f} | {g['streamed_s'] / g['resident_s']:.2f}x | "
              f"{g['residency']['applied']} | {s['streamed_s'] * 1e3:.3f} | {s['resident_s'] * 1e3:.3f} | "
              f"{s['streamed_s'] / s['resident_s']:.2f}x |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_residency.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
