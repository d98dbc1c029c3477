"""Hugging Face configs, offline: bundled presets and local config.json files, built on meta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from cachefit.core.spec import LlamaSpec, Workload
from cachefit.sources import hf_preset_names, load_model
from cachefit.sources.families import llama_table

# Published parameter counts; the tables add buffers (rotary frequencies), which the check below accounts for.
PUBLISHED = {"hf/gpt2": 124_439_808, "hf/llama-3-8b": 8_030_261_248, "hf/llama-3-70b": 70_553_706_496,
             "hf/mistral-7b": 7_241_732_096, "hf/qwen2.5-7b": 7_615_616_512, "hf/mixtral-8x7b": 46_702_792_704,
             "hf/phi-3-mini": 3_821_079_552}


def test_bundled_presets_cover_the_issue() -> None:
    assert set(PUBLISHED) <= set(hf_preset_names())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_their_published_size(name: str) -> None:
    table = load_model(name, seq=256, dtype="bfloat16")
    params = sum(x.weight_bytes for x in table.layers) // 2
    assert params - PUBLISHED[name] <= 65 * len(table.layers) * 8      # at most the rotary / mask buffers
    assert params >= PUBLISHED[name]
    blocks = [x for x in table.layers if x.kv_cache_bytes]
    assert len(blocks) >= 12


def tiny_llama_config(tied: bool) -> dict[str, object]:
    return {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": tied}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_transformers_llama_agrees_with_the_llama_family(tmp_path: Path, tied: bool, phase: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config(tied)))
    table = load_model(tmp_path, batch=2, seq=32, phase=phase, dtype="float32")
    spec = LlamaSpec("tiny", layers=3, hidden=64, heads=4, kv_heads=2, ffn_hidden=96, vocab=100, tie_embeddings=tied)
    formula = llama_table(spec, Workload(batch=2, seq=32, phase=phase, dtype="float32"))  # type: ignore[arg-type]
    # transformers splits the head into the final norm and lm_head; the family keeps them as one layer.
    assert [x.name for x in table.layers] == ["model.embed_tokens", "model.layers.0", "model.layers.1",
                                              "model.layers.2", "model.norm", "lm_head"]
    rotary = 16 * 4                                                  # inv_freq buffer, float32
    assert table.layers[0].weight_bytes == formula.layers[0].weight_bytes + rotary
    for mine, theirs in zip(table.layers[1:4], formula.layers[1:4]):
        assert mine.weight_bytes == theirs.weight_bytes
        assert mine.kv_cache_bytes == theirs.kv_cache_bytes
        # The hidden state crosses, and so do the rotary tables and masks every layer reads.
        assert mine.activation_bytes >= theirs.activation_bytes
    assert table.layers[4].weight_bytes + table.layers[5].weight_bytes == formula.layers[4].weight_bytes
    assert table.layers[-1].activation_bytes == formula.layers[-1].activation_bytes    # last-position logits
    if tied:
        assert table.layers[-1].shared[0].owner == "model.embed_tokens"


@pytest.mark.parametrize(("phase", "extra"), [
    # prefill: RoPE cos and sin (2 x 4096 tokens x 128 x 2 bytes) + position ids (4096 x 8 bytes)
    ("prefill", 2 * 4096 * 128 * 2 + 4096 * 8),
    # decode: cos and sin of one token (2 x 128 x 2) + the boolean mask over 4096 keys + position and cache ids
    ("decode", 2 * 128 * 2 + 4096 + 8 + 8),
])
def test_transformers_activations_are_the_family_plus_what_it_passes_every_layer(phase: str, extra: int) -> None:
    """Weights match exactly; activations are the family's hidden state plus exactly the tensors transformers'
    Llama hands to every decoder layer (not an error of the family: a pipeline stage of it must receive them)."""
    table = load_model("hf/llama-3-8b", batch=2, seq=4096, phase=phase, dtype="bfloat16")
    formula = load_model("llama-3-8b", batch=2, seq=4096, phase=phase, dtype="bfloat16")
    for index in range(1, 33):
        mine, theirs = table.layers[index], formula.layers[index]
        assert mine.weight_bytes == theirs.weight_bytes
        assert mine.kv_cache_bytes == theirs.kv_cache_bytes
        # After the last decoder layer nothing reads the rotary tables or the mask: only the hidden state crosses.
        assert mine.activation_bytes - theirs.activation_bytes == (extra if index < 32 else 0)


def test_bad_configs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-arch", "hidden_size": 8}')
    with pytest.raises(ValueError, match="transformers does not know model_type 'no-such-arch'"):
        load_model(tmp_path)


def test_sliding_window_layers_hold_only_their_window() -> None:
    """Mistral-7B's 4096-token window: at 8192 tokens of context each layer keeps 4096 tokens of keys/values."""
    table = load_model("hf/mistral-7b", batch=2, seq=8192, phase="decode", dtype="bfloat16")
    window = 2 * 2 * 4096 * 8 * 128 * 2                             # K and V, batch 2, 8 KV heads x 128, bf16
    assert [layer.kv_cache_bytes for layer in table.layers[1:33]] == [window] * 32
    assert table.layers[0].kv_cache_bytes == 0 and table.layers[-1].kv_cache_bytes == 0


@pytest.mark.parametrize("tied", [False, True])
def test_tensor_splits_from_the_models_own_tp_plan(tmp_path: Path, tied: bool) -> None:
    # tiny Llama: hidden 64, 4 heads of 16, 2 KV heads, MLP 96, vocab 100, float32. Widths t | 4 heads, t | 96,
    # KV heads 2 | t: 2 and 4. The plan (LlamaConfig.base_model_tp_plan): Q, K, V, gate, up colwise; O, down rowwise.
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config(tied)))
    table = load_model(tmp_path, batch=2, seq=32, dtype="float32")
    embed, block, norm, head = table.layers[0], table.layers[1], table.layers[4], table.layers[5]
    assert [s.ways for s in block.splits] == [2, 4]
    two, four = block.split(2), block.split(4)
    assert two is not None and four is not None
    # t = 2: Q 64x64/2 = 2048, K and V 32x64 at one of their 2 KV heads = 1024 each, O 2048, gate/up/down
    # 96x64/2 = 3072 each, two norms of 64 whole: 15,488 parameters x 4 B. t = 4: Q, O 1024, K, V still one KV head
    # (1024), gate/up/down 1536, norms 128: 8,832 x 4 B.
    assert (two.weight_bytes, four.weight_bytes) == (15488 * 4, 8832 * 4)
    assert two.kv_cache_bytes * 2 == block.kv_cache_bytes == four.kv_cache_bytes * 2     # one KV head a card
    assert two.allreduces == 2 and two.allreduce_bytes == 2 * block.activation_bytes         # O and down
    # The embedding and the head by vocabulary (100 = 2 x 50 = 4 x 25); the final norm whole.
    table_bytes = 100 * 64 * 4
    assert embed.split(2).weight_bytes == embed.weight_bytes - table_bytes // 2 and embed.split(2).allreduces == 1
    assert head.split(4).allgathers == 1 and head.split(4).weight_bytes == (0 if tied else table_bytes // 4)
    assert norm.split(2).weight_bytes == norm.weight_bytes


def test_hugging_face_profiles_plan_on_sram_chips_near_their_closed_forms() -> None:
    # Llama-3-8B from its public config.json and from the llama family, decode at 8k context on Groq LPUs: both
    # plan with tensor groups, on the same number of LPUs (84 when written). The profile counts attention as the
    # fused kernel runs it (its default); with the decomposition meta would otherwise run (attention 'naive') its
    # transients are larger, so it needs more cards, never fewer.
    from cachefit import api

    hf_plan = api.plan(load_model("hf/llama-3-8b", seq=8192), device="groq-lpu")
    closed = api.plan("llama-3-8b", device="groq-lpu", seq=8192, batch=1, dtype="bfloat16", attention="flash")
    assert hf_plan.feasible and closed.feasible and hf_plan.layout == "groups"
    assert hf_plan.cards == closed.cards
    decomposed = api.plan(load_model("hf/llama-3-8b", seq=8192, attention="naive"), device="groq-lpu")
    assert decomposed.cards > hf_plan.cards


def _tiny_mixtral(tmp_path: Path) -> Path:
    # hidden 64, 4 heads of 16, 2 KV heads; 4 experts of width 96, 2 a token; vocab 100.
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "vocab_size": 100}))
    return tmp_path


def test_mixtral_in_float32_profiles_on_meta_as_its_family(tmp_path: Path) -> None:
    # The grouped-mm experts' meta function admits bf16 only; the CPU kernel takes float32 (a crash before).
    table = load_model(_tiny_mixtral(tmp_path), batch=2, seq=32, dtype="float32")
    spec = LlamaSpec("tiny", layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=96, vocab=100, experts=4,
                     experts_per_token=2)
    family = llama_table(spec, Workload(batch=2, seq=32, phase="decode", dtype="float32", attention="flash"))
    assert [x.weight_bytes for x in table.layers[1:3]] == [x.weight_bytes for x in family.layers[1:3]]
    assert [x.kv_cache_bytes for x in table.layers] == [x.kv_cache_bytes for x in family.layers[:3]] + [0, 0]


def test_expert_parallel_splits_from_the_models_own_ep_plan(tmp_path: Path) -> None:
    from cachefit.sources import TorchOptions

    folder = _tiny_mixtral(tmp_path)
    tensor = load_model(folder, batch=2, seq=32, dtype="float32").layers[1]
    parallel = load_model(folder, batch=2, seq=32, dtype="float32",
                          torch_options=TorchOptions(experts="parallel")).layers[1]
    # Widths: the tensor split's (t | 4 heads, t | 96, 2 KV heads | t: 2, 4) that also divide the 4 experts.
    assert [s.ways for s in parallel.splits] == [2, 4]
    two, four = parallel.split(2), parallel.split(4)
    assert two is not None and four is not None and (two.experts, four.experts) == (2, 1)
    # t = 2: q 64x64/2, k and v one KV head (16x64) each, o 64x64/2; 2 of the 4 experts whole (3 x 64 x 96 each);
    # the router (4 x 64) and the two norms whole: 43,392 parameters x 4 B -- what the tensor split holds too.
    assert two.weight_bytes == (2048 + 1024 + 1024 + 2048 + 2 * 3 * 64 * 96 + 256 + 128) * 4
    assert two.weight_bytes == tensor.split(2).weight_bytes  # type: ignore[union-attr]
    # Every card runs its experts over the whole batch (AllReduceEP): the block's transients whole, plus per
    # token and route a bool, an int64 and a float32 weight (2 tokens x 2 routes x 13 B).
    assert two.workspace_bytes == four.workspace_bytes == parallel.workspace_bytes + 2 * 2 * 13
    assert two.allreduces == 2 and two.kv_cache_bytes * 2 == parallel.kv_cache_bytes
    assert tensor.split(2).experts == 0  # type: ignore[union-attr]


def test_expert_parallel_plans_round_trip(tmp_path: Path) -> None:
    from cachefit import api
    from cachefit.core.layers import LayerTable
    from cachefit.sources import TorchOptions

    table = load_model(_tiny_mixtral(tmp_path), batch=2, seq=32, dtype="float32",
                       torch_options=TorchOptions(experts="parallel"))
    path = tmp_path / "table.json"
    table.write(path)
    again = LayerTable.read(path)
    assert again == table and again.layers[1].split(4).experts == 1  # type: ignore[union-attr]
    block = table.layers[1].split(4)
    assert block is not None
    plan = api.plan(again, capacity=block.weight_bytes + block.workspace_bytes + block.kv_cache_bytes + 4096,
                    split="always")
    assert plan.feasible and max(p.tensor_parallel for p in plan.partitions) == 4


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_verify_measures_a_real_forward_beside_the_estimate(tmp_path: Path, phase: str) -> None:
    from cachefit import api

    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config(False)))
    checked = api.verify(tmp_path, batch=2, seq=32, phase=phase, dtype="float32")
    names = [check.name for check in checked.checks]
    assert names == [x.name for x in load_model(tmp_path, batch=2, seq=32, phase=phase, dtype="float32").layers]
    assert all(c.weights_match and c.kv_cache_match for c in checked.checks)     # exact, as on meta
    # Llama's estimate is never below what its real forward holds (with fused attention: equal to it).
    assert checked.trusted and all(c.ratio >= 1.0 for c in checked.checks)
    blocks = [c for c in checked.checks if c.name.startswith("model.layers.")]
    assert all(c.measured_bytes > 0 for c in blocks)


def test_verify_exits_1_when_an_estimate_is_under_the_real_forward(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from cachefit import api
    from cachefit.cli import cli
    from cachefit.core.records import LayerCheck, Verification

    under = Verification("m", "decode", (LayerCheck("a", 10, 10, True, True), LayerCheck("b", 5, 9, True, True)))
    monkeypatch.setattr(api, "verify", lambda *args, **kwargs: under)
    result = CliRunner().invoke(cli, ["profile", "hf/gpt2", "--verify"])
    assert result.exit_code == 1 and "below the real forward at b" in result.stderr
    assert "0.56x" in result.stdout


# transformers' own config classes at small dimensions (the matrix of issue 11; bench/profile_fidelity.py adds a
# block at Llama-3-8B dimensions). Mixtral in bf16 as its checkpoints are (its meta float32 path is tested above).
_SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4}
_MATRIX = [
    ("llama", {"num_key_value_heads": 2}), ("qwen2", {"num_key_value_heads": 2}),
    ("qwen3", {"num_key_value_heads": 2, "head_dim": 16}),
    ("mistral", {"num_key_value_heads": 2, "sliding_window": 16}),
    ("phi3", {"num_key_value_heads": 2, "pad_token_id": None}),
    ("gemma2", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 16}),
    ("mixtral", {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}),
    ("gpt_neox", {}), ("falcon", {"multi_query": True, "new_decoder_architecture": False}),
    ("opt", {"ffn_dim": 96, "word_embed_proj_dim": 64, "max_position_embeddings": 256}),
    ("gpt2", {"pad_token_id": 0, "n_positions": 256}),            # a pad id: a .item() check on meta before
    ("bert", {"is_decoder": True}),                               # an encoder's blocks, as a causal LM head
]


@pytest.mark.parametrize("phase", ["decode", "prefill"])
@pytest.mark.parametrize(("architecture", "fields"), _MATRIX, ids=[name for name, _ in _MATRIX])
def test_profiles_match_a_real_forward_on_every_common_decoder(tmp_path: Path, architecture: str,
                                                               fields: dict[str, object], phase: str) -> None:
    from cachefit import api

    config = {"model_type": architecture, **_SMALL, **fields}
    if architecture == "falcon":
        config.pop("intermediate_size")
    dtype = "bfloat16" if architecture == "mixtral" else "float32"
    (tmp_path / "config.json").write_text(json.dumps(config))
    checked = api.verify(tmp_path, batch=2, seq=64, phase=phase, dtype=dtype)
    assert all(c.weights_match and c.kv_cache_match for c in checked.checks)       # exact, per layer
    assert all(1.0 <= c.ratio <= 1.25 for c in checked.checks if c.measured_bytes), [
        (c.name, c.estimate_bytes, c.measured_bytes) for c in checked.checks]



def test_the_element_type_comes_from_the_config_unless_given(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**tiny_llama_config(False), "dtype": "float32"}))
    assert load_model(tmp_path, seq=16).dtype == "float32"
    assert load_model(tmp_path, seq=16, dtype="bfloat16").dtype == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({**tiny_llama_config(False), "torch_dtype": "float16"}))
    assert load_model(tmp_path, seq=16).dtype == "float16"                  # the name before transformers 5
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config(False)))
    assert load_model(tmp_path, seq=16).dtype == "bfloat16"                 # none stored: bfloat16


def test_eager_attention_is_the_models_own_code_measured_as_it_runs(tmp_path: Path) -> None:
    # eager holds the b x h x q x s scores (decode: 2 x 4 x 1 x 64 x 4 B = 2,048 B a layer, among its other
    # tensors) where the fused kernel holds none; both match a real forward of the same code.
    from cachefit import api

    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config(False)))
    eager = api.verify(tmp_path, batch=2, seq=64, dtype="float32", attention="eager")
    fused = api.verify(tmp_path, batch=2, seq=64, dtype="float32", attention="flash")
    assert eager.trusted and all(c.ratio == 1.0 for c in eager.checks if c.measured_bytes)
    blocks = [(e.estimate_bytes, f.estimate_bytes) for e, f in zip(eager.checks, fused.checks)
              if e.name.startswith("model.layers.")]
    assert all(e >= f + 2 * 4 * 1 * 64 * 4 for e, f in blocks)


def test_an_encoder_asked_to_decode_is_refused_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cachefit.cli import cli

    config = {"model_type": "bert", **_SMALL}            # no is_decoder: bidirectional attention, no KV cache
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["profile", str(tmp_path), "--seq", "32"])
    assert result.exit_code == 2 and "is an encoder" in result.stderr and "--phase prefill" in result.stderr
    assert "Traceback" not in result.output
    assert load_model(tmp_path, seq=32, phase="prefill").layers                     # prefill is what it does
