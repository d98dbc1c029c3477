"""``run --check``: the unpartitioned model in the launcher's process, on the same prompts and micro-batch shapes as
the run: the reference transformer rebuilt from the union of the shards, or a Hugging Face model run by
transformers' own ``generate``. Tokens must be identical, logits within tolerance."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load

from cachefit.core.errors import RunError
from cachefit.core.records import Plan
from cachefit.runtime.hf_tensor_parallel import module_styles, unshare
from cachefit.runtime.manifest import Manifest, read_card, read_hf_config_copy
from cachefit.runtime.weights import plan_spec

if TYPE_CHECKING:
    from cachefit.runtime.launch import RunOptions, RunResult

__all__ = ["full_state", "reference_check"]


def full_state(plan: Plan, weights: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's tensors from the cards' shards (a tensor group's shares put back together)."""
    from cachefit.nn.model import ModelConfig, tensor_unshare

    config = ModelConfig.of(plan_spec(plan.model))
    state: dict[str, torch.Tensor] = {}
    for part in plan.partitions:        # each shard verified against its manifest as it is read, as a rank does
        shares = [load(read_card(weights, card, plan)[1]) for card in part.cards]
        state.update({name: tensor_unshare(name, [share[name] for share in shares], config) for name in shares[0]})
    return state


def reference_check(plan: Plan, weights: str | Path, options: RunOptions, result: RunResult) -> dict[str, Any]:
    """The unpartitioned model, in this process, on the same prompts and micro-batch shapes: identical tokens,
    logits within tolerance, or an error."""
    from cachefit.nn import build_model
    from cachefit.nn.model import TORCH_DTYPES
    from cachefit.runtime.worker import prompts

    manifest = Manifest.read(Path(weights))
    if manifest.source == "hf":
        return _hf_reference_check(plan, weights, manifest, options, result)
    spec, dtype = plan_spec(plan.model), TORCH_DTYPES[str(plan.model.dtype)]
    model = build_model(spec, dtype=dtype, seed=None)
    model.load_state_dict(full_state(plan, weights))
    batch, seq = int(plan.model.batch or 1), int(plan.model.seq or 0)
    size = batch // options.micro_batches
    prompt = prompts(spec.vocab, batch, options.prompt_len, options.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        tokens, logits = _generate(model, prompt, size, seq, options.new_tokens, dtype)
    finally:
        torch.set_num_threads(threads)
    same = bool(torch.equal(tokens, result.tokens))
    difference = float((logits.float() - result.logits).abs().max())
    if not same or difference > 1e-3:
        raise RunError(f"--check failed: tokens {'match' if same else 'differ'}, largest logit difference "
                           f"{difference:.3g} against the unpartitioned model")
    return {"tokens_identical": same, "max_logit_difference": difference}


def _hf_reference_check(plan: Plan, weights: str | Path, manifest: Manifest, options: RunOptions,
                        result: RunResult) -> dict[str, Any]:
    """transformers' own ``generate`` (greedy) on the unpartitioned model, loaded from the cards' shards, on the
    same prompt ids and micro-batch shapes: identical tokens, logits of the last step within tolerance."""
    from cachefit.runtime.worker import prompts
    from cachefit.sources.hf import build_hf_model

    document = read_hf_config_copy(weights, manifest)
    built, config = build_hf_model(document, str(plan.model.dtype), "cpu")
    model: Any = built
    state: dict[str, torch.Tensor] = {}
    for part in plan.partitions:        # a tensor group's shares put back together
        shares = [load(read_card(weights, card, plan)[1]) for card in part.cards]
        styles = module_styles(model, config, part) if part.tensor_parallel > 1 else {}
        state.update({name: unshare(name, [s[name] for s in shares], styles) for name in shares[0]})
    model.load_state_dict(state, strict=False)
    model.generation_config.eos_token_id = None      # a run decodes every token asked for, through end-of-text
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    batch, size = int(plan.model.batch or 1), int(plan.model.batch or 1) // options.micro_batches
    prompt = prompts(int(text.vocab_size), batch, options.prompt_len, options.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    tokens, logits = [], []
    try:
        for start in range(0, batch, size):
            ids = prompt[start:start + size]
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=options.new_tokens,
                                     do_sample=False, output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=0)
            tokens.append(out.sequences[:, options.prompt_len:])
            logits.append(out.logits[-1])
    finally:
        torch.set_num_threads(threads)
    same = bool(torch.equal(torch.cat(tokens), result.tokens))
    reference = torch.cat(logits).float()
    difference = float((reference - result.logits).abs().max())
    if not same or difference > logit_tolerance(reference, model.dtype):
        raise RunError(f"--check failed: tokens {'match' if same else 'differ'}, largest logit difference "
                       f"{difference:.3g} against transformers' generate on the unpartitioned model")
    return {"tokens_identical": same, "max_logit_difference": difference, "reference": "transformers generate"}


def logit_tolerance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """How far a run's logits may be from generate's: 1e-3 in float32; in 16-bit types 4 units in the last place of
    the largest logit (a prompt sent in chunks multiplies matrices of other shapes than generate's one pass, and
    rounds differently there)."""
    if torch.finfo(dtype).bits > 16:
        return 1e-3
    return max(1e-3, 4 * torch.finfo(dtype).eps * float(reference.abs().max()))


@torch.no_grad()
def _generate(model: Any, prompt: torch.Tensor, size: int, seq: int, steps: int, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    from cachefit.nn import KVCache

    config = model.config
    tokens, logits = [], []
    for start in range(0, prompt.shape[0], size):
        caches = [KVCache(size, config.kv_heads, seq, config.head_dim, dtype) for _ in range(config.layers)]
        out = model(prompt[start:start + size], caches, 0)
        chosen = [out.argmax(dim=-1)]
        for step in range(1, steps):
            out = model(chosen[-1].unsqueeze(1), caches, prompt.shape[1] + step - 1)
            chosen.append(out.argmax(dim=-1))
        tokens.append(torch.stack(chosen, dim=1))
        logits.append(out)
    return torch.cat(tokens), torch.cat(logits)
