"""Pipeline speed on this machine (issue 4): cachefit run with k = 1, 2, 4 ranks (one thread each) against the
unpartitioned model in one process with 1 and k threads, measured in one run, same prompts, same schedule.

    python bench/pipeline.py            # the table for docs/benchmarks.md

Model: a dense network sized so a pass is mostly compute (below). Schedule: every pass carries one token per
sequence (the decode plan's unit): the prompt, then the generated tokens; micro-batches keep every rank busy.
Target: k = 2 on the 2 cores reaches >= 1.7x one rank's prefill throughput, tokens identical.
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
from _bench_model import SPEC, run, spec_file
from cachefit.core.spec import Workload
from cachefit.nn import KVCache, build_model
from cachefit.runtime.launch import RunOptions
from cachefit.runtime.summary import summarise
from cachefit.runtime.worker import prompts
from cachefit.sources import TorchOptions

PROMPT, NEW, MICRO = 48, 32, 4


def pipeline(cards: int, folder: Path, work: Workload, chunk: int) -> dict[str, Any]:
    options = TorchOptions(measure=True, prefill_chunk=chunk if chunk > 1 else None)
    table = cachefit.load_model(spec_file(folder, work), torch_options=options)
    plan = cachefit.plan(table, capacity=1 << 40, cards=cards, memory_model="pipeline")
    _, result = run(folder, plan, work, RunOptions(PROMPT, NEW, MICRO, check=True, timeout=120), f"plan{cards}")
    summary = summarise(result.ranks, work.batch, PROMPT, NEW).to_dict()
    passes = -(-PROMPT // chunk) + NEW - 1
    summary["comm_ms_per_pass"] = [1e3 * (r["wait_s"] + r["send_s"]) / (passes * MICRO) for r in result.ranks]
    summary["tokens"] = result.tokens
    return summary


@torch.no_grad()
def unpartitioned(threads: int, work: Workload, chunk: int) -> dict[str, Any]:
    """The whole model in this process, the same passes (prompt chunks, then one token per sequence), micro-batch
    by micro-batch."""
    torch.set_num_threads(threads)
    model = build_model(SPEC, seed=0)
    size = work.batch // MICRO
    prompt = prompts(SPEC.vocab, work.batch, PROMPT, 0)
    caches = [[KVCache(size, SPEC.heads, work.seq, SPEC.head_dim, torch.float32) for _ in range(SPEC.layers)]
              for _ in range(MICRO)]
    tokens = torch.zeros(work.batch, NEW, dtype=torch.long)
    start = time.perf_counter()
    for position in range(0, PROMPT, chunk):
        for m in range(MICRO):
            out = model(prompt[m * size:(m + 1) * size, position:position + chunk], caches[m], position)
            if position + chunk >= PROMPT:
                tokens[m * size:(m + 1) * size, 0] = out.argmax(-1)
    prefill = time.perf_counter() - start
    steps = []
    for step in range(1, NEW):
        began = time.perf_counter()
        for m in range(MICRO):
            rows = slice(m * size, (m + 1) * size)
            tokens[rows, step] = model(tokens[rows, step - 1:step], caches[m], PROMPT + step - 1).argmax(-1)
        steps.append(time.perf_counter() - began)
    steps.sort()
    return {"prefill_tokens_per_s": work.batch * PROMPT / prefill, "tpot_median_ms": 1e3 * steps[len(steps) // 2],
            "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="16,64", help="batch sizes, one table each (4 micro-batches)")
    parser.add_argument("--prefill-chunk", type=int, default=1, help="prompt tokens per sequence per pass")
    args = parser.parse_args()
    for batch in (int(text) for text in args.batches.split(",")):
        table(Workload(batch=batch, seq=96, phase="decode", dtype="float32"), args.prefill_chunk)


def table(work: Workload, chunk: int) -> None:
    console = Console(width=150)
    console.print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d')}; {SPEC}; batch {work.batch}, prompt {PROMPT} in chunks of {chunk}, "
                  f"new {NEW}, micro-batches {MICRO}")
    view = Table(title="prefill throughput and decode TPOT: cachefit run (k ranks x 1 thread) vs one process")
    for header in ("setup", "prefill tokens/s", "vs 1 rank", "decode TPOT median ms", "decode TPOT p90 ms",
                   "comm ms per pass (per rank)", "tokens identical"):
        view.add_column(header, justify="right")
    with tempfile.TemporaryDirectory() as scratch:
        runs = {cards: pipeline(cards, Path(scratch), work, chunk) for cards in (1, 2, 4)}
    for cards, summary in runs.items():
        console.print(f"k = {cards}: compute / wait / send seconds per rank: " + "; ".join(
            f"{card['compute_s']:.2f} / {card['wait_s']:.2f} / {card['send_s']:.2f}" for card in summary["cards"]))
    base = runs[1]["prefill_tokens_per_s"]
    reference = unpartitioned(1, work, chunk)
    for cards, summary in runs.items():
        view.add_row(f"cachefit run, k = {cards}{' (oversubscribed)' if cards > 2 else ''}",
                     f"{summary['prefill_tokens_per_s']:.0f}", f"{summary['prefill_tokens_per_s'] / base:.2f}x",
                     f"{summary['tpot_median_ms']:.2f}", f"{summary['tpot_p90_ms']:.2f}",
                     ", ".join(f"{value:.3f}" for value in summary["comm_ms_per_pass"]),
                     str(bool(torch.equal(summary["tokens"], reference["tokens"]))))
    for threads in (1, 2, 4):
        single = reference if threads == 1 else unpartitioned(threads, work, chunk)
        view.add_row(f"one process, {threads} thread{'s' if threads > 1 else ''}",
                     f"{single['prefill_tokens_per_s']:.0f}", f"{single['prefill_tokens_per_s'] / base:.2f}x",
                     f"{single['tpot_median_ms']:.2f}", "", "", str(bool(torch.equal(single["tokens"],
                                                                                      reference["tokens"]))))
    console.print(view)


if __name__ == "__main__":
    main()
