"""The demo (``cachefit demo``, the main job behind ``make demo``): the whole path on a bundled model, measured,
planned, sharded and run with a check; then the seed's case. An app on top of the API: every figure it prints comes
from the catalog, the plans or the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cachefit import api
from cachefit.core.files import atomic_write_text
from cachefit.core.units import format_size
from cachefit.output import report

MODEL, CARDS = "tiny-llama", 3
out = report.console()


def run_demo(folder: Path, plans_only: bool = False) -> None:
    """The whole path on a bundled model, then the seed's case: what fits where, and why not."""
    folder.mkdir(parents=True, exist_ok=True)
    if not plans_only:
        _run_section(folder)
        _hf_section(folder)
    corsair = api.devices()["dmatrix-corsair"]
    eight_b = api.load_model("llama-3-8b")
    _show(f"a model that fits: Llama-3-8B ({eight_b.phase}, batch {eight_b.batch}, {eight_b.seq:,}-token context) on "
          f"{corsair.label} SRAM", "llama-3-8b", folder, device="dmatrix-corsair")
    seed = api.load_model("seed-dense16")
    _show(f"the seed's own network on H100 L2 (batch {seed.batch}, seq {seed.seq:,}): it does not fit", "seed-dense16",
          folder, device="h100")
    table = api.load_model("seed-dense16", batch=1)
    per_layer = table.layers[0].weight_bytes
    h100 = api.devices()["h100"]
    out.print(f"Even one layer's weights ({format_size(per_layer)}) are {per_layer / h100.on_chip_bytes:.1f}x an "
              f"H100's whole L2 ({format_size(h100.on_chip_bytes)}): whole-layer residency cannot work there.")
    _split_finer(out)
    _show(f"where it pays: the seed's network at batch 1 ({table.phase}) on {format_size(corsair.capacity_bytes)} "
          "SRAM cards, one layer per card", "seed-dense16", folder, device="dmatrix-corsair", batch=1)
    out.print(f"\nplans, plots, weights, shards and the run report are in {folder}/")


def _split_finer(console: Any) -> None:
    """The seed split as finely as its shapes allow (attention by heads, the MLP by columns): when it fits."""
    from cachefit.sources import TorchOptions

    finer = TorchOptions(granularity="sublayer")
    short = api.plan("seed-dense16", device="h100", batch=1, seq=1000, torch_options=finer)
    own = api.largest_micro_batch("seed-dense16", device="h100", torch_options=finer)
    seed = api.load_model("seed-dense16")
    heads = seed.spec.spec.heads if seed.spec is not None else "its"
    console.print(f"Split finer (attention by its {heads} heads, the MLP by columns): one sequence of "
                  f"{short.model.seq:,} tokens fits {short.cards} H100 L2s ({format_size(short.bottleneck_bytes)} on "
                  f"the fullest); at the seed's {seed.seq:,} tokens "
                  f"{'no batch fits, not even one sequence' if own is None else f'batch {own[0]} fits'}"
                  " (`cachefit plan seed-dense16 --device h100 --granularity sublayer --micro-batch auto`).")


def _run_section(folder: Path) -> None:
    from cachefit.runtime import init_weights, shard_checkpoint
    from cachefit.runtime.launch import RunOptions, run_plan
    from cachefit.runtime.summary import run_report
    from cachefit.sources import TorchOptions, presets

    out.rule(f"1. {MODEL}: measured on meta (decode + 8-token prompt chunks), planned for cards that need {CARDS}, "
             "sharded, run with --check")
    table = api.load_model(MODEL, torch_options=TorchOptions(measure=True, prefill_chunk=8))
    best = api.plan(table, capacity=1 << 40, cards=CARDS, memory_model="pipeline").bottleneck_bytes
    capacity = -(-best // 65536) * 65536                        # the least 64 KiB multiple that holds 3 cards
    plan = api.plan(table, capacity=capacity, memory_model="pipeline")
    plan_file, weights, shards = folder / "plan.json", folder / f"{MODEL}.safetensors", folder / "shards"
    plan.write(plan_file)
    report.plot_plan(plan, table, folder / "plan.png")
    out.print(report.plan_summary(plan))
    out.print(report.plan_table(plan))
    preset = presets()[MODEL]
    init_weights(preset.spec, preset.workload, weights, seed=0)
    shard_checkpoint(plan, weights, shards)
    options = RunOptions(prompt_len=16, new_tokens=16, micro_batches=2, check=True)
    out.print(f"running {plan.cards} processes (torch.distributed, gloo on loopback) ...")
    result = run_plan(str(plan_file), str(shards), options)
    summary = result.summary
    assert summary is not None
    report.print_run_summary(out, summary, result.checked)
    document = run_report(str(plan_file), options, result.checked, summary, result.prompt, result.tokens)
    atomic_write_text(folder / "run.json", json.dumps(document, indent=1) + "\n")
    out.print(f"plot: {folder / 'plan.png'}; run report: {folder / 'run.json'}")


# transformers' Mistral at small dimensions (random weights): sliding-window attention, GQA.
HF_CONFIG = {"model_type": "mistral", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 16,
             "dtype": "float32"}


def _hf_section(folder: Path) -> None:
    """A Hugging Face checkpoint folder: its profile checked against a real forward, planned, sharded, run on two
    processes and checked token for token against transformers' generate."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as logging_of_transformers

    from cachefit.runtime.launch import RunOptions
    from cachefit.sources import TorchOptions

    out.rule("2. a Hugging Face checkpoint (transformers' Mistral, random weights, save_pretrained): verified, "
             "planned on 2 cards, sharded, run against transformers' generate")
    checkpoint = folder / "hf-mistral"
    torch.manual_seed(0)
    fields = {key: value for key, value in HF_CONFIG.items() if key != "model_type"}
    quiet: Any = logging_of_transformers.disable_progress_bar
    quiet()                                   # save_pretrained's progress bar, on the demo's stderr
    build: Any = AutoModelForCausalLM.from_config
    build(AutoConfig.for_model("mistral", **fields)).save_pretrained(checkpoint)
    checked = api.verify(checkpoint, batch=2, seq=64)
    out.print(report.verification_table(checked))
    table = api.load_model(checkpoint, batch=2, seq=64, torch_options=TorchOptions(prefill_chunk=8))
    best = api.plan(table, capacity=1 << 40, cards=2, memory_model="pipeline").bottleneck_bytes
    plan = api.plan(table, capacity=-(-best // 65536) * 65536, memory_model="pipeline")   # cards that need 2
    plan_file = folder / "hf-plan.json"
    plan.write(plan_file)
    out.print(report.plan_table(plan))
    api.shard(plan, checkpoint, folder / "hf-shards")
    options = RunOptions(prompt_len=16, new_tokens=24, micro_batches=2, check=True)
    result = api.run(plan_file, folder / "hf-shards", options)
    assert result.summary is not None
    report.print_run_summary(out, result.summary, result.checked)


def _show(title: str, model: str, folder: Path, device: str, batch: int | None = None) -> None:
    out.rule(title)
    table = api.load_model(model, batch=batch)
    result = api.plan(table, device=device)
    stem = f"{model}-{device}" + (f"-batch{batch}" if batch else "")
    result.write(folder / f"{stem}.json")
    report.plot_plan(result, table, folder / f"{stem}.png")
    out.print(report.plan_summary(result))
    if result.partitions:
        out.print(report.plan_table(result))
    for line in result.diagnosis:
        out.print(f"- {line}", highlight=False)
