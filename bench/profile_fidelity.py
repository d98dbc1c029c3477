"""Profile fidelity: each architecture's estimate (on meta) against a real forward on this host (issue 11).

    python bench/profile_fidelity.py            # the table for docs/benchmarks.md (about a minute)
    python bench/profile_fidelity.py --quick    # the small architectures only

For each architecture, transformers' own config class at small dimensions (hidden 64, 4 heads, 2 KV heads where the
architecture has GQA, 2 layers, float32; Mixtral in bfloat16), batch 2, 64 tokens, decode and prefill: the ratio
estimate / measured of activation + workspace per layer, worst and best over the layers, and whether weights and
KV cache matched to the byte. Then one block at Llama-3-8B dimensions (bf16, batch 1), decode at context 4096 and a
512-token prefill. Target: every ratio in [1.0, 1.25]. Measured by `cachefit.api.verify` (profile --verify).
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from typing import Any

from rich.console import Console
from rich.table import Table

from cachefit.core.spec import Workload
from cachefit.sources.verify import verify_hf

SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4}
GQA = {"num_key_value_heads": 2}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {**SMALL, **GQA}, "qwen2": {**SMALL, **GQA}, "qwen3": {**SMALL, **GQA, "head_dim": 16},
    "mistral": {**SMALL, **GQA, "sliding_window": 16}, "phi3": {**SMALL, **GQA, "pad_token_id": None},
    "gemma2": {**SMALL, **GQA, "head_dim": 16, "sliding_window": 16},
    "mixtral": {**SMALL, **GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_neox": SMALL, "gpt2": {"vocab_size": 128, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 256},
    "opt": {"vocab_size": 128, "hidden_size": 64, "ffn_dim": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 64, "max_position_embeddings": 256},
    "falcon": {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "multi_query": True, "new_decoder_architecture": False},
}
LLAMA_3_8B_BLOCK = {"vocab_size": 1024, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 1,
                    "num_attention_heads": 32, "num_key_value_heads": 8}


def _row(table: Table, label: str, config: dict[str, Any], work: Workload) -> float:
    started = time.perf_counter()
    checked = verify_hf(config, label, work, 16 << 30)
    ratios = [c.ratio for c in checked.checks if c.measured_bytes]
    exact = all(c.weights_match and c.kv_cache_match for c in checked.checks)
    table.add_row(label, work.phase, str(work.seq), f"{min(ratios):.3f}", f"{max(ratios):.3f}",
                  "exact" if exact else "DIFFER", f"{time.perf_counter() - started:.1f}")
    return max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the Llama-3-8B block")
    options = parser.parse_args()
    warnings.filterwarnings("ignore")
    table = Table(title=f"estimate / measured, activation + workspace per layer ({platform.machine()}, "
                        f"{time.strftime('%Y-%m-%d')})")
    for column in ("model", "phase", "seq", "lowest ratio", "highest ratio", "weights, KV", "seconds"):
        table.add_column(column)
    worst: list[float] = []
    for name, fields in ARCHITECTURES.items():
        dtype = "bfloat16" if name == "mixtral" else "float32"     # meta's grouped mm: see docs/profiling.md
        for phase in ("decode", "prefill"):
            worst.append(_row(table, name, {"model_type": name, **fields},
                              Workload(batch=2, seq=64, phase=phase, dtype=dtype, attention="flash")))
    if not options.quick:
        block = {"model_type": "llama", **LLAMA_3_8B_BLOCK}
        for phase, seq in (("decode", 4096), ("prefill", 512)):
            worst.append(_row(table, "llama-3-8b block", block,
                              Workload(batch=1, seq=seq, phase=phase, dtype="bfloat16", attention="flash")))
    console = Console()
    console.print(table)
    console.print(f"highest ratio {max(worst):.3f}; target: every ratio in [1.0, 1.25]")


if __name__ == "__main__":
    main()
