"""Tensor groups against layer-wise stages on this machine (issue 5): the same dense model on 4 ranks as PP=4
(whole layers), TP=2 x PP=2 and TP=4, measured in one run, tokens checked against the unpartitioned model.

    python bench/tensor_split.py          # the table for docs/benchmarks.md

4 ranks on a 2-core host are oversubscribed: the ratios say how the layouts compare when ranks share cores, not
what 4 cards would do. The all-reduce share is all-reduce seconds over total seconds, summed over ranks.
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
from cachefit.runtime.launch import RunOptions
from cachefit.runtime.summary import summarise
from cachefit.sources import TorchOptions

PROMPT, NEW, MICRO = 48, 32, 4
LAYOUTS = {4: {"PP=4 (whole layers)": None, "TP=2 x PP=2": "tp=2,pp=2", "TP=4": "tp=4,pp=1"},
           2: {"PP=2 (whole layers)": None, "TP=2": "tp=2,pp=1"}}


def measure(name: str, baseline: str | None, folder: Path, work: Workload, chunk: int, ranks: int
            ) -> dict[str, Any]:
    table = cachefit.load_model(spec_file(folder, work), torch_options=TorchOptions(measure=True,
                                                                                    prefill_chunk=chunk))
    if baseline is None:
        plan = cachefit.plan(table, capacity=1 << 40, cards=ranks, memory_model="pipeline")
    else:
        plan = cachefit.plan(table, capacity=1 << 40, memory_model="pipeline", baseline=baseline)
    tag = name.split()[0].replace("=", "").replace(",", "")
    _, result = run(folder, plan, work, RunOptions(PROMPT, NEW, MICRO, check=True, timeout=300), tag)
    summary = summarise(result.ranks, work.batch, PROMPT, NEW).to_dict()
    summary["allreduce_share"] = (sum(r["allreduce_s"] for r in result.ranks)
                                  / sum(r["total_s"] for r in result.ranks))
    summary["stages"] = [(p.first, p.last, p.tensor_parallel) for p in plan.partitions]
    summary["tokens"], summary["checked"] = result.tokens, result.checked
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=8, help="prompt tokens per sequence per pass")
    parser.add_argument("--ranks", type=int, choices=sorted(LAYOUTS), default=4,
                        help="4: the issue's comparison (oversubscribed here); 2: one rank per core")
    args = parser.parse_args()
    layouts = LAYOUTS[args.ranks]
    work = Workload(batch=args.batch, seq=96, phase="decode", dtype="float32")
    console = Console(width=150)
    console.print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d')}; {SPEC}; batch {work.batch}, prompt {PROMPT} in chunks of "
                  f"{args.prefill_chunk}, new {NEW}, micro-batches {MICRO}, {args.ranks} ranks x 1 thread")
    with tempfile.TemporaryDirectory() as scratch:
        runs = {name: measure(name, baseline, Path(scratch), work, args.prefill_chunk, args.ranks)
                for name, baseline in layouts.items()}
    view = Table(title=f"{args.ranks} ranks: layer-wise stages vs tensor groups (cachefit run, one run)")
    for header in ("layout", "stages (first, last, tp)", "prefill tokens/s", "vs layer-wise", "TPOT median ms",
                   "TPOT p90 ms", "all-reduce share", "tokens = reference", "tokens = layer-wise"):
        view.add_column(header, justify="right")
    base = next(iter(runs.values()))
    for name, summary in runs.items():
        view.add_row(name, str(summary["stages"]), f"{summary['prefill_tokens_per_s']:.0f}",
                     f"{summary['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x",
                     f"{summary['tpot_median_ms']:.2f}", f"{summary['tpot_p90_ms']:.2f}",
                     f"{summary['allreduce_share']:.1%}", str(summary["checked"]["tokens_identical"]),
                     str(bool(torch.equal(summary["tokens"], base["tokens"]))))
    console.print(view)


if __name__ == "__main__":
    main()
