"""Exports of a plan: accelerate/transformers device_map, torchtitan stages, vLLM's layer partition."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cachefit.cli import cli
from cachefit.core.layers import Layer, LayerTable, SharedTensor
from cachefit.output.export import device_map, pipelining_split_spec, torchtitan_stages, vllm_partition
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
    assert torchtitan_stages(plan) == [["tok_embeddings", "layers.0"], ["layers.1", "layers.2", "layers.3"],
                                       ["norm", "output"]]
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
    original = _tiny_llama(tied=False)
    config = original.config
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


def _tiny_llama(tied: bool) -> Any:
    """A transformers Llama of 4 layers (hidden 32, 4 heads, 2 KV heads, vocab 64), seeded, in eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def cachefit_table(folder: Path) -> LayerTable:
    from cachefit.sources import load_model

    return load_model(folder, batch=1, seq=16, phase="decode", dtype="float32")


def _torchtitan_accepts(stages: list[list[str]], layers: int) -> bool:
    """torchtitan's documented contract for ``module_fqns_per_model_part`` (pipeline_module_split's docstring,
    torchtitan/distributed/pipeline_parallel.py, commit 02ef790): each name a top-level module of its Llama
    (tok_embeddings, norm, output) or ``layers.N`` of its layer dict; every module in exactly one stage, in order
    (its own example: [["tok_embeddings", "layers.0"], ["layers.1", "layers.2"], ["norm", "output"]])."""
    expected = ["tok_embeddings", *(f"layers.{i}" for i in range(layers)), "norm", "output"]
    return [name for stage in stages for name in stage] == expected and all(stages)


def test_torchtitan_names_for_hugging_face_and_reference_plans() -> None:
    from cachefit import api

    titan = torchtitan_stages(make_plan(HF_LIKE, [150], memory_model="sum"))
    assert _torchtitan_accepts(titan, 4)
    reference = api.plan("tiny-llama", capacity="64MiB", cards=3, split="never")
    assert _torchtitan_accepts(torchtitan_stages(reference), 4)       # cachefit.nn's head: norm and output
    odd = LayerTable("odd", (Layer("encoder", 10, 0, 0, modules=("encoder",)),
                             Layer("decoder", 10, 0, 0, modules=("decoder",))))
    with pytest.raises(ValueError, match="'encoder' has no torchtitan name"):
        torchtitan_stages(make_plan(odd, [10]))


def test_pipelining_split_spec_builds_stages_that_match_the_whole_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from torch.distributed.pipelining import SplitPoint, pipeline

    from cachefit import api

    model = _tiny_llama(tied=True)
    model.config.save_pretrained(tmp_path)
    table = api.load_model(tmp_path, batch=1, seq=8, phase="prefill", dtype="float32")
    plan = api.plan(table, capacity=sum(x.weight_bytes for x in table.layers), cards=3, split="never")
    document = json.loads(api.export(plan, "pipelining"))
    assert document["num_stages"] == 3 and list(document["split_spec"].values()) == ["beginning"] * 2
    ids = torch.randint(0, 64, (1, 8))
    pipe = pipeline(model, mb_args=(ids,), mb_kwargs={"use_cache": False},
                    split_spec={name: SplitPoint.BEGINNING for name in document["split_spec"]})
    assert pipe.num_stages == len(plan.partitions)
    for index, part in enumerate(plan.partitions):       # each stage holds the plan's decoder layers
        held = {".".join(name.split(".")[:3]) for name, _ in pipe.get_stage_module(index).named_parameters()}
        assert {m for m in part.modules if m.startswith("model.layers.")} == {m for m in held if "layers" in m}
    with torch.no_grad():
        assert torch.equal(pipe(ids, use_cache=False)[0], model(ids, use_cache=False).logits)


def test_pipelining_refuses_tensor_groups() -> None:
    from cachefit import api

    grouped = api.plan("tiny-llama", capacity="300KiB", split="always")
    assert any(p.tensor_parallel > 1 for p in grouped.partitions)
    with pytest.raises(ValueError, match="tensor groups"):
        pipelining_split_spec(grouped)


def test_plans_made_for_vllm_export_where_plain_ones_are_refused(tmp_path: Path) -> None:
    # Capacity 151 (sum): the fewest cards hold [embed, l0] = 150 | [l1, l2, l3, norm] = 151 | [head] = 100, and
    # vLLM cannot give the last stage no decoder layer. For vLLM: [embed, l0] = 150 | [l1, l2] = 100 |
    # [l3, norm, head] = 151, still 3 cards.
    table = tmp_path / "table.json"
    HF_LIKE.write(table)
    plain, planned = tmp_path / "plain.json", tmp_path / "vllm.json"
    runner = CliRunner()
    assert runner.invoke(cli, ["plan", str(table), "--capacity", "151", "--memory-model", "sum", "-o",
                               str(plain)]).exit_code == 0
    refused = runner.invoke(cli, ["export", str(plain), "--to", "vllm"])
    assert refused.exit_code == 2 and "plan for it with --for vllm" in refused.stderr
    result = runner.invoke(cli, ["plan", str(table), "--capacity", "151", "--memory-model", "sum", "--for", "vllm",
                                 "-o", str(planned), "--format", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["peer"] == "vllm" and document["cards"] == 3 and document["optimal"]
    exported = runner.invoke(cli, ["export", str(planned), "--to", "vllm"])
    assert exported.exit_code == 0 and exported.stdout == "VLLM_PP_LAYER_PARTITION=1,2,1\n"
    assert "VLLM_PP_LAYER_PARTITION" in exported.stderr or "vLLM" in exported.stderr    # the peer it targets
    too_many = runner.invoke(cli, ["plan", str(table), "--capacity", "151", "--cards", "5", "--for", "vllm"])
    assert too_many.exit_code == 2 and "the 4 units a plan for vllm keeps apart" in too_many.stderr


# A tied head (logits 64 B, workspace 20 B), its weight the embedding's (100 B): bytes by hand below.
TIED = LayerTable("tied", (
    Layer("model.embed_tokens", 100, 10, 0, modules=("model.embed_tokens",)),
    *(Layer(f"model.layers.{i}", 50, 10, 0, modules=(f"model.layers.{i}",)) for i in range(4)),
    Layer("model.norm", 1, 10, 0, modules=("model.norm",)),
    Layer("lm_head", 0, 64, 20, modules=("lm_head",), shared=(SharedTensor("weight", "model.embed_tokens", 100),))),
    input_bytes=1)


def test_plans_for_accelerate_put_a_tied_head_on_its_embeddings_card() -> None:
    from cachefit import api

    # peak: the embedding's card also runs the head: 100 B of weights + max(1 + 10 + 0 (the embedding),
    # 10 + 64 + 20 (the head)) = 194 B. Blocks: 50 B + 20 B transient each; the norm 1 B.
    # Three cards: [embed + head] = 194 | two or three blocks = 120 or 170 | the rest <= 171.
    plan = api.plan(TIED, capacity=1000, cards=3, peer="accelerate")
    assert plan.feasible and plan.peer == "accelerate" and plan.optimal
    assert plan.bottleneck_bytes == 194 and plan.partitions[0].footprint_bytes == 194
    mapping = device_map(plan)
    assert mapping["lm_head"] == mapping["model.embed_tokens"] == 0 and mapping["model.norm"] == 2
    with pytest.raises(ValueError, match="made for accelerate"):
        api.predict(plan, device="h100")


def test_accelerate_runs_a_tied_model_from_a_plan_made_for_it(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    from cachefit import api

    original = _tiny_llama(tied=True)
    original.save_pretrained(tmp_path / "model")
    table = cachefit_table(tmp_path / "model")
    plan = api.plan(table, capacity=sum(x.weight_bytes for x in table.layers), cards=3, peer="accelerate")
    exported = device_map(plan)
    assert exported["lm_head"] == exported["model.embed_tokens"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # "Tied parameters are on different devices" would warn
        accelerate.utils.check_device_map(original, exported)
    # The last card offloaded to disk: with the head there (a plain plan), transformers fails (KeyError
    # 'lm_head.weight'); with the head on the embedding's card the forward matches the whole model.
    last = max(exported.values())
    offloaded = {module: "disk" if card == last else "cpu" for module, card in exported.items()}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=offloaded,
                                                               offload_folder=str(tmp_path / "offload"))
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, original(ids).logits, atol=1e-6)
    plain = device_map(api.plan(table, capacity=sum(x.weight_bytes for x in table.layers), cards=3))
    assert plain["lm_head"] == last != plain["model.embed_tokens"]
    parted = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map={m: "disk" if card == last else "cpu" for m, card in plain.items()},
        offload_folder=str(tmp_path / "offload-plain"))
    with torch.no_grad(), pytest.raises(KeyError, match=r"lm_head\.weight"):
        parted(ids)


def _vllm_pp_indices(partition: str, layers: int, rank: int, stages: int) -> tuple[int, int]:
    """vLLM's documented reading of VLLM_PP_LAYER_PARTITION (vllm/distributed/utils.py, get_pp_indices): comma-
    separated integers, one per pipeline rank, summing to the model's decoder layers; rank r runs layers
    [sum(counts[:r]), sum(counts[:r + 1])). Anything else is a ValueError."""
    counts = [int(part) for part in partition.split(",")]            # "5,5,5," and "5,5,5,a" raise ValueError
    if len(counts) != stages or sum(counts) != layers:
        raise ValueError(f"{partition!r} does not split {layers} layers over {stages} stages")
    return sum(counts[:rank]), sum(counts[:rank + 1])


def test_vllm_reading_matches_its_own_tests() -> None:
    # The cases of vLLM's tests/distributed/test_pipeline_partition.py (test_custom_layer_partition).
    for partition, layers, goldens in (("5,5,5,5", 20, [(0, 5), (5, 10), (10, 15), (15, 20)]),
                                       ("4,6,6,4", 20, [(0, 4), (4, 10), (10, 16), (16, 20)]),
                                       ("5,6,5,6", 22, [(0, 5), (5, 11), (11, 16), (16, 22)])):
        assert [_vllm_pp_indices(partition, layers, r, len(goldens)) for r in range(len(goldens))] == goldens
    for partition, layers in (("5,5,5,5,", 20), ("5,5,5,a", 20), ("5,5,5", 20), ("5,5,5,5", 21)):
        with pytest.raises(ValueError):
            _vllm_pp_indices(partition, layers, 0, 4)


@pytest.mark.parametrize("model", ["hf/llama-3-8b", "llama-3-8b", "hf/mistral-7b"])
@pytest.mark.parametrize("cards", [2, 5, 7])
def test_vllm_exports_reproduce_the_plans_decoder_ranges(model: str, cards: int) -> None:
    import re

    from cachefit import api

    plan = api.plan(model, capacity="40GB", cards=cards, peer="vllm", seq=256)
    text = api.export(plan, "vllm").strip()
    partition = text.removeprefix("VLLM_PP_LAYER_PARTITION=")
    decoders = [sorted(int(found.group(1)) for m in p.modules if (found := re.search(r"layers\.(\d+)$", m)))
                for p in plan.partitions]
    total = sum(len(d) for d in decoders)
    for rank, held in enumerate(decoders):
        assert _vllm_pp_indices(partition, total, rank, cards) == (held[0], held[-1] + 1)
