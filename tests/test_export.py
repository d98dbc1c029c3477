"""Exports of a plan: accelerate/transformers device_map, torchtitan stages, vLLM's layer partition."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachefit.cli import cli
from cachefit.core.layers import Layer, LayerTable
from cachefit.output.export import device_map, torchtitan_stages, vllm_partition
from cachefit.planning import make_plan

# embed (100) | 4 decoder layers (50 each) | norm (1) | lm_head (100): bytes, weights only, 401 in all.
HF_LIKE = LayerTable("hf-like", (
    Layer("model.embed_tokens", 100, 0, 0, modules=("model.embed_tokens", "model.rotary_emb")),
    *(Layer(f"model.layers.{i}", 50, 0, 0, modules=(f"model.layers.{i}",)) for i in range(4)),
    Layer("model.norm", 1, 0, 0, modules=("model.norm",)), Layer("lm_head", 100, 0, 0, modules=("lm_head",))))


def test_exports_follow_the_partitions() -> None:
    # Capacity 150: [embed, l0] = 150 | [l1, l2, l3] = 150 | [norm, head] = 101 (two cards would need 201).
    plan = make_plan(HF_LIKE, [150], memory_model="sum")
    assert [(p.first, p.last) for p in plan.partitions] == [(0, 1), (2, 4), (5, 6)]
    mapping = device_map(plan)
    assert mapping["model.rotary_emb"] == 0 and mapping["model.layers.3"] == 1 and mapping["lm_head"] == 2
    assert list(mapping) == [m for layer in HF_LIKE.layers for m in layer.modules]
    assert torchtitan_stages(plan)[1] == ["model.layers.1", "model.layers.2", "model.layers.3"]
    with pytest.raises(ValueError, match=r"cards \[2\] hold no decoder layer"):
        vllm_partition(plan)
    two = make_plan(HF_LIKE, [300], cards=2, memory_model="sum")  # [embed, l0, l1] = 200 | the rest = 201
    assert vllm_partition(two) == "2,2"


def test_export_cli_and_infeasible_plans(tmp_path: Path) -> None:
    plan_file, out = tmp_path / "plan.json", tmp_path / "map.json"
    make_plan(HF_LIKE, [300], cards=2, memory_model="sum").write(plan_file)
    result = CliRunner().invoke(cli, ["export", str(plan_file), "--to", "vllm"])
    assert result.exit_code == 0 and result.stdout == "VLLM_PP_LAYER_PARTITION=2,2\n"
    result = CliRunner().invoke(cli, ["export", str(plan_file), "--to", "accelerate", "-o", str(out)])
    assert result.exit_code == 0 and json.loads(out.read_text())["lm_head"] == 1
    make_plan(HF_LIKE, [10]).write(plan_file)
    result = CliRunner().invoke(cli, ["export", str(plan_file), "--to", "torchtitan"])
    assert result.exit_code == 2 and "no feasible partitions" in result.stderr


def test_device_map_is_accepted_by_transformers_and_accelerate(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(config)
    original.save_pretrained(tmp_path)
    table = cachefit_table(tmp_path)
    plan = make_plan(table, [sum(x.weight_bytes for x in table.layers) // 2], cards=3)
    assert plan.feasible
    exported = device_map(plan)
    assert sorted(set(exported.values())) == [0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # a key naming no module would warn
        accelerate.utils.check_device_map(original, exported)       # ... and a tensor left out raises
    on_cpu = {module: "cpu" for module in exported}                  # this machine has no GPU ordinals
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map=on_cpu)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    dispatched = accelerate.dispatch_model(transformers.LlamaForCausalLM(config), device_map=on_cpu)
    assert dispatched(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 64)


def cachefit_table(folder: Path) -> LayerTable:
    from cachefit.sources import load_model

    return load_model(folder, batch=1, seq=16, phase="decode", dtype="float32")
