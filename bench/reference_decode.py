"""Issue 15's decode target on its reference model: do 2 cards decode >= 1.7x the best 1-card decode?

    python bench/reference_decode.py              # the table for docs/benchmarks.md (about 2 minutes)
    python bench/reference_decode.py --repeats 1  # one run of each setting

The issue names a Llama of 8 layers, hidden 512, 93 MB; rebuilt here as 8 blocks, hidden 512 (8 heads, 8 KV
heads), MLP 1024, vocabulary 2048, fp32 (92.3 MB). Batch 4, prompt 64 in chunks of 8 (profiled with that chunk),
32 new tokens; 1 card and 2 cards (planned by bytes) at 1, 2 and 4 micro-batches, `cachefit run` with one thread a
rank, the best of ``--repeats`` runs by decode tokens/s, tokens checked against the unpartitioned model on the
first run of each, each plan predicted on a calibration of the same run. Target: the best 2-card decode >= 1.7x
the best 1-card decode.
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
from cachefit.core.spec import LlamaSpec, Workload
from cachefit.runtime.launch import RunOptions
from cachefit.runtime.summary import summarise
from cachefit.sources import TorchOptions

SPEC = LlamaSpec("reference-llama8", layers=8, hidden=512, heads=8, kv_heads=8, ffn_hidden=1024, vocab=2048)
BATCH, PROMPT, NEW, CHUNK = 4, 64, 32, 8
WORK = Workload(batch=BATCH, seq=PROMPT + NEW, phase="decode", dtype="float32")


def setting(folder: Path, devices: Path, cards: int, micro: int, repeats: int) -> dict[str, Any]:
    options = TorchOptions(measure=True, prefill_chunk=CHUNK)
    table = cachefit.load_model(spec_file(folder, WORK, SPEC), torch_options=options)
    plan = cachefit.plan(table, capacity=1 << 40, cards=cards, memory_model="pipeline")
    runs = [run(folder, plan, WORK, RunOptions(PROMPT, NEW, micro, check=repeat == 0, timeout=300),
                f"k{cards}-m{micro}", SPEC) for repeat in range(repeats)]
    best = max((summarise(result.ranks, BATCH, PROMPT, NEW) for _, result in runs),
               key=lambda summary: summary.decode_tokens_per_s)
    predicted, _ = api.predict(runs[0][0], device="host", devices_file=devices, micro_batches=micro,
                               prompt_len=PROMPT, chunk=CHUNK)
    checked = runs[0][1].checked
    return {"cards": cards, "micro": micro, "weights": [p.weight_bytes for p in plan.partitions], "best": best,
            "predicted_tpot": predicted.decode_tpot_s * 1e3,
            "identical": bool(checked and checked["tokens_identical"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting; the best is kept")
    repeats = parser.parse_args().repeats
    console = Console(width=160)
    console.print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d')}; {SPEC.name}, batch {BATCH}, prompt {PROMPT} in chunks of {CHUNK}, "
                  f"{NEW} new tokens")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        devices = calibrated_host(folder, console)
        rows = [setting(folder, devices, cards, micro, repeats) for cards in (1, 2) for micro in (1, 2, 4)]
    speed = {(row["cards"], row["micro"]): row["best"].decode_tokens_per_s for row in rows}
    view = Table(title=f"decode, best of {repeats}: 1 card against 2 (cachefit run, cachefit predict)")
    for header in ("cards", "M", "weights MB", "decode tok/s", "TPOT ms", "predicted", "err", "prefill tok/s",
                   "2 / 1 at this M", "tokens ok"):
        view.add_column(header, justify="right")
    for row in rows:
        best = row["best"]
        same = f"{speed[(2, row['micro'])] / speed[(1, row['micro'])]:.2f}x" if row["cards"] == 2 else ""
        view.add_row(str(row["cards"]), str(row["micro"]), " + ".join(f"{w / 1e6:.1f}" for w in row["weights"]),
                     f"{best.decode_tokens_per_s:.0f}", f"{best.tpot_median_ms:.2f}", f"{row['predicted_tpot']:.2f}",
                     relative_error(row["predicted_tpot"], best.tpot_median_ms), f"{best.prefill_tokens_per_s:.0f}",
                     same, str(row["identical"]))
    console.print(view)
    best_two = max(v for (cards, _), v in speed.items() if cards == 2)
    best_one = max(v for (cards, _), v in speed.items() if cards == 1)
    console.print(f"best 2 cards / best 1 card: {best_two / best_one:.2f}x (target >= 1.7x)")


if __name__ == "__main__":
    main()
