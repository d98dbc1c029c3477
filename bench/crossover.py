"""Where a second card starts to pay on this host (issue 15, item 4): 1 card against 2 at decode, measured with
``cachefit run`` and predicted with ``cachefit predict`` (fixed costs per pass, per block and per hop from
``cachefit calibrate``, in the same run), for models from tiny-llama (3.3 MiB) to 127 MiB.

    python bench/crossover.py            # the table for docs/benchmarks.md

Each model: 1 card at 1 micro-batch (its best: each micro-batch re-reads the weights) and 2 cards at 2
micro-batches (both cards busy), batch 4, prompt 8 one token a pass, 32 new tokens, one thread per rank, tokens
checked against the unpartitioned model, the best of ``--repeats`` runs (the least disturbed: on a VM that shares
its L3 the same plan's one run moved 1.9x between runs minutes apart). "2 / 1" > 1: the split decodes faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import cachefit
from _bench_model import calibrated_host, relative_error, run, spec_file
from cachefit import api
from cachefit.core.spec import DenseSpec, LlamaSpec, Workload
from cachefit.runtime.launch import RunOptions
from cachefit.runtime.summary import summarise
from cachefit.sources import TorchOptions, presets

BATCH, PROMPT, NEW = 4, 8, 32
WORK = Workload(batch=BATCH, seq=PROMPT + NEW, phase="decode", dtype="float32")
# d = 512, MLP 768: 7.0 MiB of fp32 weights a block (bench/cpu_residency.py).
MODELS: list[LlamaSpec | DenseSpec] = [presets()["tiny-llama"].spec] + [
    DenseSpec(f"dense{layers}", layers=layers, heads=8, head_dim=64, mlp_hidden=768, vocab=256)
    for layers in (2, 6, 18)]


def one(folder: Path, devices: Path, spec: LlamaSpec | DenseSpec, cards: int, micro: int, repeats: int
        ) -> dict[str, Any]:
    options = TorchOptions(measure=True)
    table = (cachefit.load_model(spec_file(folder, WORK, spec), torch_options=options) if isinstance(spec, DenseSpec)
             else cachefit.load_model(spec.name, batch=BATCH, seq=PROMPT + NEW, torch_options=options))
    plan = cachefit.plan(table, capacity=1 << 40, cards=cards, memory_model="pipeline")
    runs = [run(folder, plan, WORK, RunOptions(PROMPT, NEW, micro, check=True, timeout=300),
                f"{spec.name}-k{cards}", spec) for _ in range(repeats)]
    summaries = [summarise(result.ranks, BATCH, PROMPT, NEW) for _, result in runs]
    measured = max(summaries, key=lambda summary: summary.decode_tokens_per_s)
    predicted, _ = api.predict(runs[0][0], device="host", devices_file=devices, micro_batches=micro,
                               prompt_len=PROMPT, chunk=1)
    return {"measured": measured.decode_tokens_per_s, "predicted": predicted.decode_tokens_per_s,
            "tpot": measured.tpot_median_ms, "predicted_tpot": predicted.decode_tpot_s * 1e3,
            "weights": sum(p.weight_bytes for p in plan.partitions),
            "spread": min(s.decode_tokens_per_s for s in summaries) / measured.decode_tokens_per_s,
            "identical": all(result.checked and result.checked["tokens_identical"] for _, result in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each plan; the best is compared")
    repeats = parser.parse_args().repeats
    console = Console(width=200)
    console.print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d')}; batch {BATCH}, prompt {PROMPT}, new {NEW}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        devices = calibrated_host(folder, console)
        rows = [(spec, one(folder, devices, spec, 1, 1, repeats), one(folder, devices, spec, 2, 2, repeats))
                for spec in MODELS]
    # Two measures of the best run: decode tokens/s (every step, the slow ones too) and the median TPOT (the
    # steady state the model predicts; a step the host preempts moves the first, not the second).
    view = Table(title="decode: 1 card (M = 1) vs 2 cards (M = 2), cachefit run vs cachefit predict")
    for header in ("model", "weights MiB", "1 card tok/s", "pred.", "err", "2 cards tok/s", "pred.", "err",
                   "2 / 1 meas.", "2 / 1 pred.", "TPOT ms 1 / 2 meas.", "pred.", "err", "worst / best run 1 / 2",
                   "tokens ok"):
        view.add_column(header, justify="right")
    for spec, alone, split in rows:
        view.add_row(spec.name, f"{alone['weights'] / 2**20:.1f}", f"{alone['measured']:.0f}",
                     f"{alone['predicted']:.0f}", relative_error(alone["predicted"], alone["measured"]),
                     f"{split['measured']:.0f}", f"{split['predicted']:.0f}",
                     relative_error(split["predicted"], split["measured"]),
                     f"{split['measured'] / alone['measured']:.2f}x",
                     f"{split['predicted'] / alone['predicted']:.2f}x", f"{alone['tpot']:.2f} / {split['tpot']:.2f}",
                     f"{alone['predicted_tpot']:.2f} / {split['predicted_tpot']:.2f}",
                     f"{relative_error(alone['predicted_tpot'], alone['tpot'])} / "
                     f"{relative_error(split['predicted_tpot'], split['tpot'])}",
                     f"{alone['spread']:.2f} / {split['spread']:.2f}", str(alone["identical"] and split["identical"]))
    console.print(view)


if __name__ == "__main__":
    main()
