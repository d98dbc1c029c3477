"""cachefit against accelerate's infer_auto_device_map, on bundled Hugging Face configs (issue 3).

    python bench/vs_accelerate.py              # the tables for docs/vs-accelerate.md

For each model and capacity C: the cards accelerate's infer_auto_device_map uses (max_memory = C per card,
no_split_module_classes = the decoder layer), how many of those cards exceed C once the activations, workspace and
KV cache cachefit measures on the same meta model are counted (peak memory model), and cachefit's own plan.
Then the time to profile Llama-3-70B (batch 1, seq 4096, decode) next to accelerate's compute_module_sizes on the
same meta model. accelerate is a bench/test dependency only.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from dataclasses import replace
from typing import Any
from unittest import mock

import torch
from accelerate.utils import compute_module_sizes, infer_auto_device_map
from rich.console import Console
from rich.table import Table

from cachefit.core.layers import LayerTable
from cachefit.core.memory import interval_cost
from cachefit.core.spec import Workload
from cachefit.core.units import format_size, parse_size
from cachefit.planning import make_plan
from cachefit.sources.hf import build_hf_model, hf_presets, hf_table
from cachefit.sources.torch_profile import find_blocks

# Capacities from where the embedding just fits a card up to a few times that.
CASES = [("hf/gpt2", ["128MiB", "256MiB"]), ("hf/phi-3-mini", ["1GiB", "2GiB"]),
         ("hf/mistral-7b", ["1GiB", "4GiB"]), ("hf/llama-3-8b", ["2GiB", "4GiB"]),
         ("hf/qwen2.5-7b", ["2GiB", "4GiB"]), ("hf/mixtral-8x7b", ["4GiB", "16GiB"]),
         ("hf/llama-3-70b", ["4GiB", "16GiB"])]
WORK = Workload(batch=8, seq=4096, phase="decode", dtype="bfloat16")


def accelerate_cards(model: torch.nn.Module, capacity: int, total: int) -> dict[str, Any]:
    blocks = find_blocks(model)
    assert blocks is not None
    cards = total // capacity + 8
    # accelerate drops GPU ordinals this machine lacks (it has none); infer_auto_device_map only plans, so it is
    # shown `cards` GPUs through torch.cuda.device_count and touches no device.
    with warnings.catch_warnings(), mock.patch.object(torch.cuda, "device_count", return_value=cards):
        warnings.simplefilter("ignore")
        return infer_auto_device_map(model, max_memory={card: capacity for card in range(cards)},
                                     no_split_module_classes=[type(blocks[1][0]).__name__])


def over_capacity(table: LayerTable, mapping: dict[str, Any], capacity: int) -> tuple[int, int, float]:
    """(accelerate's cards, how many exceed capacity with everything counted, the worst fill)."""
    def card_of(layer_modules: tuple[str, ...]) -> Any:
        for module in layer_modules:
            for key, card in mapping.items():
                if key in ("", module) or module.startswith(key + ".") or key.startswith(module + "."):
                    return card
        raise KeyError(layer_modules)
    cards = [card_of(layer.modules or (layer.name,)) for layer in table.layers]
    cost = interval_cost(table, "peak")
    over, worst, first = 0, 0.0, 0
    for index in range(1, len(cards) + 1):
        if index == len(cards) or cards[index] != cards[first]:
            fill = cost.footprint(first, index - 1) / capacity
            over, worst, first = over + (fill > 1), max(worst, fill), index
    return len(set(cards)), over, worst


def compare(repeats: int) -> tuple[Table, Table]:
    rows = Table(title=f"accelerate infer_auto_device_map vs cachefit ({WORK.phase}, batch {WORK.batch}, "
                       f"seq {WORK.seq}, {WORK.dtype})")
    for header in ("model", "C", "accelerate cards", "over C (all counted)", "worst fill", "cachefit cards",
                   "cachefit bottleneck"):
        rows.add_column(header, justify="right")
    for name, capacities in CASES:
        config = hf_presets()[name]
        context = config.get("n_positions") or config.get("max_position_embeddings") or WORK.seq
        work = replace(WORK, seq=min(WORK.seq, context))            # GPT-2 reads at most 1024 tokens
        model, _ = build_hf_model(config, work.dtype)
        table = hf_table(config, name, work)
        total = sum(layer.weight_bytes for layer in table.layers)
        for text in capacities:
            capacity = parse_size(text)
            mapping = accelerate_cards(model, capacity, total)
            used, over, worst = over_capacity(table, mapping, capacity)
            offloaded = {card for card in mapping.values() if not isinstance(card, int)}
            plan = make_plan(table, [capacity])
            ours = str(plan.cards) if plan.feasible else "none fits"
            shown = f"{used}" + (f" (+ {', '.join(sorted(offloaded))} offload)" if offloaded else "")
            label = f"{name} (seq {work.seq})" if work.seq != WORK.seq else name
            rows.add_row(label, text, shown, f"{over} of {used}", f"{worst:.0%}", ours,
                         format_size(plan.bottleneck_bytes) if plan.feasible else "-")
    return rows, speed(repeats)


def speed(repeats: int) -> Table:
    work = Workload(batch=1, seq=4096, phase="decode", dtype="bfloat16")
    config = hf_presets()["hf/llama-3-70b"]
    ours = min(_timed(lambda: hf_table(config, "hf/llama-3-70b", work)) for _ in range(repeats))
    model, _ = build_hf_model(config, work.dtype)
    build = min(_timed(lambda: build_hf_model(config, work.dtype)) for _ in range(repeats))
    sizes = min(_timed(lambda: compute_module_sizes(model)) for _ in range(repeats))
    view = Table(title="profiling Llama-3-70B (batch 1, seq 4096, decode, bf16), best of repeats")
    for header in ("what", "seconds", "counts"):
        view.add_column(header)
    view.add_row("cachefit profile (build on meta + measured forward)", f"{ours:.2f}",
                 "weights, activations, workspace, KV cache, FLOPs per layer")
    view.add_row("  of which: building the model on meta (transformers)", f"{build:.2f}", "")
    view.add_row("accelerate compute_module_sizes (model already built)", f"{sizes:.2f}", "weights only")
    return view


def _timed(function: Any) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = Console(width=160)
    console.print(f"{platform.machine()}, CPython {platform.python_version()}, torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d')}")
    for view in compare(args.repeats):
        console.print(view)


if __name__ == "__main__":
    main()
