"""A Hugging Face checkpoint run by cachefit on 1 and 2 cards against transformers' own generate (issue 12).

    python bench/hf_pipeline.py                      # both workloads, for docs/benchmarks.md (about 8 minutes)
    python bench/hf_pipeline.py --workload prefill   # the prefill-bound one alone (about 3 minutes)

Checkpoint: transformers' Llama at hidden 384, 8 layers, 6 heads (3 KV), MLP 1024, vocabulary 8192, float32,
random weights (seed 0), saved with save_pretrained: 82 MB. Two workloads on it, each in the same run:
- decode-bound: batch 4, 64-token prompts, 32 new tokens, a 128-token cache (256 prompt tokens in all);
- prefill-bound: batch 32, 256-token prompts, 4 new tokens, a 272-token cache (8,192 prompt tokens).
transformers' generate (greedy, one process, one thread, end-of-text ignored) is timed on the same prompt ids.
cachefit: a pipeline plan (prompts in chunks the plan counts), one thread per rank, ranks on their own cores;
prefill is the prompt tokens over the time to the first token, decode the later tokens over the rest. Each
configuration's tokens are compared with generate's. Two-card plans are balanced by bytes, and (decode-bound) by
this host's predicted decode time (`plan --objective time` on a calibration made at the start of the run); each
plan is predicted on that calibration too (`cachefit predict --model`), beside what it measured.
Targets: 1 card within 1.2x of generate's time; 2 cards >= 1.7x one card's prefill throughput (best schedule
against best schedule); tokens identical.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import cachefit
from _bench_model import calibrated_host, relative_error
from cachefit.runtime import shard_checkpoint
from cachefit.runtime.launch import RunOptions, run_plan
from cachefit.runtime.worker import prompts
from cachefit.sources import TorchOptions

CONFIG = {"vocab_size": 8192, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 8,
          "num_attention_heads": 6, "num_key_value_heads": 3, "max_position_embeddings": 512}


@dataclass(frozen=True, slots=True)
class Workload:
    """A batch of prompts and the schedules it runs: (cards, micro-batches, prompt tokens per sequence per pass,
    objective); the first schedule is the 1-card one generate is compared with."""

    name: str
    batch: int
    prompt: int
    new: int
    seq: int
    schedules: tuple[tuple[int, int, int, str], ...]


# Decode-bound: the whole prompt at once, and the same chunked schedule on 1 and 2 cards (each chunk of each
# micro-batch is a unit the two stages overlap); 2 cards balanced by bytes (the embedding's card and the head's
# hold the same) and by this host's predicted decode time (the head's card does more: a lookup reads 4 rows of the
# embedding, the head reads all of its own).
DECODE = Workload("decode-bound", 4, 64, 32, 128, (
    (1, 1, 64, "memory"), (1, 2, 16, "memory"), (2, 2, 16, "memory"), (2, 2, 64, "memory"), (2, 2, 64, "time"),
    (2, 4, 64, "memory"), (2, 4, 64, "time")))
# Prefill-bound: two sequences a micro-batch (512 prompt tokens a pass, so a pass's weight reads are a small part
# of it), so 2 stages overlap 16 units and idle for one (2 x 16/17 = 1.88x at best); 1 card with the whole batch in
# one pass and with the same micro-batches: whichever is faster is its best.
PREFILL = Workload("prefill-bound", 32, 256, 4, 272, (
    (1, 1, 256, "memory"), (1, 16, 256, "memory"), (2, 16, 256, "memory"), (2, 32, 256, "memory")))
WORKLOADS = {"decode": (DECODE,), "prefill": (PREFILL,), "both": (DECODE, PREFILL)}


def checkpoint(folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **CONFIG), dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def generate(folder: Path, work: Workload, repeats: int) -> dict[str, Any]:
    """transformers' generate on the whole batch, one thread: the least of ``repeats`` wall times."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    prompt = prompts(CONFIG["vocab_size"], work.batch, work.prompt, 0)
    best, tokens = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=work.new,
                                 do_sample=False, pad_token_id=0)
        best = min(best, time.perf_counter() - start)
        tokens = out[:, work.prompt:]
    return {"total_s": best, "tokens": tokens}


def pipeline(folder: Path, scratch: Path, work: Workload, schedule: tuple[int, int, int, str], host: Path,
             repeats: int) -> dict[str, Any]:
    """cachefit run of a ``cards``-card plan, its stages balanced by bytes (``memory``) or by predicted decode time
    on this host (``time``): the best of ``repeats`` runs by total time."""
    cards, micro, chunk, objective = schedule
    table = cachefit.load_model(folder, batch=work.batch, seq=work.seq,
                                torch_options=TorchOptions(prefill_chunk=chunk))
    timed = {"objective": "time", "device": "host", "devices_file": host, "micro_batches": micro}
    plan = cachefit.plan(table, capacity=1 << 40, cards=cards, memory_model="pipeline",
                         **(timed if objective == "time" else {}))
    name = f"{work.batch}-{cards}-{micro}-{chunk}-{objective}"
    plan_file, shards = scratch / f"plan-{name}.json", scratch / f"shards-{name}"
    plan.write(plan_file)
    shard_checkpoint(plan, folder, shards)
    best: dict[str, Any] | None = None
    for _ in range(repeats):
        result = run_plan(str(plan_file), str(shards), RunOptions(work.prompt, work.new, micro, timeout=300))
        assert result.summary is not None
        row = {**result.summary.to_dict(), "tokens": result.tokens}
        if best is None or row["total_s"] < best["total_s"]:
            best = row
    assert best is not None
    predicted, _ = cachefit.predict(plan_file, device="host", devices_file=host, micro_batches=micro,
                                    prompt_len=work.prompt, model=folder)
    return {**best, "predicted_tpot_ms": predicted.decode_tpot_s * 1e3,
            "predicted_prefill_tokens_per_s": predicted.prefill_tokens_per_s}


def label(schedule: tuple[int, int, int, str]) -> str:
    cards, micro, chunk, objective = schedule
    return f"{cards} card{'s' if cards > 1 else ''}, M={micro}, chunk {chunk}" + (", by time" if objective == "time"
                                                                                   else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="both")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.disable_progress_bar()
    console = Console(width=150)
    with tempfile.TemporaryDirectory() as temporary:
        scratch = Path(temporary)
        folder = checkpoint(scratch / "llama")
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        host = calibrated_host(scratch, console)
        for work in WORKLOADS[args.workload]:
            reference = generate(folder, work, args.repeats)
            rows = [(label(schedule), pipeline(folder, scratch, work, schedule, host, args.repeats))
                    for schedule in work.schedules]
            report(console, work, reference, rows, size)


def report(console: Console, work: Workload, reference: dict[str, Any], rows: list[tuple[str, dict[str, Any]]],
           size: int) -> None:
    console.print(f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d')}; checkpoint {size / 1e6:.0f} MB; {work.name}: batch {work.batch}, "
                  f"prompt {work.prompt}, {work.new} new tokens")
    table = Table("configuration", "total s", "vs generate", "prefill tok/s", "predicted", "decode tok/s",
                  "TPOT ms", "predicted", "err", "tokens as generate")
    table.add_row("transformers generate, 1 thread", f"{reference['total_s']:.3f}", "1.00", *[""] * 7)
    one = rows[0][1]
    for name, row in rows:
        table.add_row(name, f"{row['total_s']:.3f}", f"{row['total_s'] / reference['total_s']:.2f}",
                      f"{row['prefill_tokens_per_s']:.0f}", f"{row['predicted_prefill_tokens_per_s']:.0f}",
                      f"{row['decode_tokens_per_s']:.0f}", f"{row['tpot_median_ms']:.2f}",
                      f"{row['predicted_tpot_ms']:.2f}",
                      relative_error(row["predicted_tpot_ms"], row["tpot_median_ms"]),
                      str(bool(torch.equal(row["tokens"], reference["tokens"]))))
    console.print(table)
    prefill = {name: row["prefill_tokens_per_s"] for name, row in rows}
    best_one = max(value for name, value in prefill.items() if name.startswith("1 card,"))
    best_two = max(value for name, value in prefill.items() if name.startswith("2 cards"))
    same = [f"{name.removeprefix('2 cards, ')}: {value / prefill[name.replace('2 cards', '1 card')]:.2f}x"
            for name, value in prefill.items()
            if name.startswith("2 cards") and name.replace("2 cards", "1 card") in prefill]
    console.print(f"1 card / generate: {one['total_s'] / reference['total_s']:.2f}x (target <= 1.2); 2 cards' "
                  f"prefill / 1 card's on the same schedule: {', '.join(same) or 'n/a'}; best against best: "
                  f"{best_two / best_one:.2f}x (target >= 1.7); tokens identical everywhere: "
                  f"{all(torch.equal(row['tokens'], reference['tokens']) for _, row in rows)}")
    decode = {name: row["decode_tokens_per_s"] for name, row in rows}
    two = max(value for name, value in decode.items() if name.startswith("2 cards"))
    console.print(f"decode, best 2 cards / best 1 card: "
                  f"{two / max(value for name, value in decode.items() if name.startswith('1 card,')):.2f}x")


if __name__ == "__main__":
    main()
