"""The performance model against measurement on this host (issue 6): calibrate, then for several plans run
``cachefit run`` and ``cachefit predict`` with the same micro-batches and prompt passes, and compare per stage
(compute seconds of a rank over the whole run) and end to end (prefill tokens/s, decode TPOT).

    python bench/validate_perf.py          # the table for docs/perf-model.md

Ranks are at most the host's cores (one per core): the model assumes a card per stage.
"""

from __future__ import annotations

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
from _bench_model import SPEC, calibrated_host, relative_error, run, spec_file
from cachefit import api
from cachefit.core.spec import Workload
from cachefit.runtime.launch import RunOptions
from cachefit.runtime.summary import summarise
from cachefit.sources import TorchOptions

PROMPT, NEW = 32, 16
# (name, batch, cards, baseline, micro-batches, prompt chunk)
CASES = [("k=1, M=1", 16, 1, None, 1, 8), ("k=1, M=4", 16, 1, None, 4, 8), ("k=2, M=2", 16, 2, None, 2, 8),
         ("k=2, M=4", 16, 2, None, 4, 8), ("k=2, M=4, one-token prompt passes", 16, 2, None, 4, 1),
         ("k=2, M=4, batch 64", 64, 2, None, 4, 8), ("TP=2, M=4", 16, 0, "tp=2,pp=1", 4, 8)]


def case(folder: Path, devices: Path, name: str, batch: int, cards: int, baseline: str | None, micro: int,
         chunk: int) -> dict[str, Any]:
    options = TorchOptions(measure=True, prefill_chunk=chunk if chunk > 1 else None)
    work = Workload(batch=batch, seq=64, phase="decode", dtype="float32")
    table = cachefit.load_model(spec_file(folder, work), torch_options=options)
    plan = (api.plan(table, capacity=1 << 40, memory_model="pipeline", baseline=baseline) if baseline else
            api.plan(table, capacity=1 << 40, cards=cards, memory_model="pipeline"))
    plan_file, result = run(folder, plan, work, RunOptions(PROMPT, NEW, micro, check=True, timeout=300),
                            "".join(c if c.isalnum() else "-" for c in name))
    measured = summarise(result.ranks, batch, PROMPT, NEW).to_dict()
    predicted, _ = api.predict(plan_file, device="host", devices_file=devices, micro_batches=micro,
                               prompt_len=PROMPT, chunk=chunk)
    prefill_passes, decode_passes = -(-PROMPT // chunk) * micro, (NEW - 1) * micro
    stages = []
    for rank in result.ranks:
        index = next(i for i, s in enumerate(predicted.stages) if s.first == rank["first"])
        expected = (decode_passes * predicted.stages[index].pass_s
                    + prefill_passes * predicted.prefill_stages[index].pass_s)
        stages.append((rank["card"], rank["compute_s"], expected))
    # All-reduces per pass on a rank: two per block of its stage.
    per_pass = [2 * sum(1 for layer in plan.partition_of(r["card"]).layers if layer.startswith("layers."))
                for r in result.ranks]
    allreduce = [r["allreduce_s"] / (n * (prefill_passes + decode_passes))
                 for r, n in zip(result.ranks, per_pass) if r["allreduce_s"]]
    modelled = [s.allreduce_s / n for s, n in zip(predicted.stages, per_pass) if s.allreduce_s]
    return {"name": name, "measured": measured, "predicted": predicted, "stages": stages,
            "allreduce_per_call_s": allreduce, "modelled_per_call_s": modelled,
            "identical": result.checked["tokens_identical"] if result.checked else None}


def main() -> None:
    console = Console(width=160)
    console.print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d')}; {SPEC}; prompt {PROMPT}, new {NEW}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        devices = calibrated_host(folder, console)
        results = [case(folder, devices, *spec) for spec in CASES]
    view = Table(title="predicted vs measured (cachefit predict vs cachefit run, same plan, same passes)")
    for header in ("run", "prefill tok/s meas.", "pred.", "err", "TPOT ms meas.", "pred.", "err",
                   "per-rank compute s: measured / predicted (err)", "tokens ok"):
        view.add_column(header, justify="right")
    for result in results:
        measured, predicted = result["measured"], result["predicted"]
        view.add_row(result["name"], f"{measured['prefill_tokens_per_s']:.0f}",
                     f"{predicted.prefill_tokens_per_s:.0f}",
                     relative_error(predicted.prefill_tokens_per_s, measured["prefill_tokens_per_s"]),
                     f"{measured['tpot_median_ms']:.1f}", f"{predicted.decode_tpot_s * 1e3:.1f}",
                     relative_error(predicted.decode_tpot_s * 1e3, measured["tpot_median_ms"]),
                     "; ".join(f"{m:.2f} / {p:.2f} ({relative_error(p, m)})" for _, m, p in result["stages"]),
                     str(result["identical"]))
    console.print(view)
    for result in results:
        if result["allreduce_per_call_s"]:
            console.print(f"{result['name']}: all-reduce per call in the run "
                          + ", ".join(f"{1e6 * value:.0f} us" for value in result["allreduce_per_call_s"])
                          + " per rank; the model's " + ", ".join(f"{1e6 * value:.0f} us" for value in
                                                                  result["modelled_per_call_s"])
                          + " (calibrated back to back)")


if __name__ == "__main__":
    main()
