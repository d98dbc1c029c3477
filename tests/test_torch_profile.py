"""Profiling real modules: the reference transformer against the closed-form families, the workspace tracker
against torch.profiler on a real CPU forward, factories, granularity, and no weight memory for big models."""

from __future__ import annotations

import json
import resource
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from cachefit.core.layers import LayerTable  # noqa: E402
from cachefit.core.spec import DenseSpec, LlamaSpec, Workload  # noqa: E402
from cachefit.sources import TorchOptions, load_model, presets  # noqa: E402
from cachefit.sources.families import dense_table, llama_table  # noqa: E402
from cachefit.sources.torch_profile import profile_module  # noqa: E402
from cachefit.sources.torch_sources import measure_spec  # noqa: E402

SPECS = [
    LlamaSpec("llama-tied", layers=3, hidden=64, heads=4, kv_heads=2, ffn_hidden=96, vocab=100, tie_embeddings=True),
    LlamaSpec("llama-untied", layers=2, hidden=64, heads=8, kv_heads=8, ffn_hidden=128, vocab=50),
    DenseSpec("dense-vocab", layers=2, heads=4, head_dim=16, mlp_hidden=256, vocab=70),
    DenseSpec("dense-hidden", layers=3, heads=2, head_dim=32, mlp_hidden=128),
]
WORKLOADS = [Workload(batch=2, seq=24, phase="decode", dtype="float32"),
             Workload(batch=3, seq=16, phase="prefill", dtype="bfloat16")]


def closed_form(spec: DenseSpec | LlamaSpec, work: Workload) -> LayerTable:
    return dense_table(spec, work) if isinstance(spec, DenseSpec) else llama_table(spec, work)


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
@pytest.mark.parametrize("work", WORKLOADS, ids=lambda work: work.phase)
def test_reference_module_agrees_with_its_family(spec: DenseSpec | LlamaSpec, work: Workload) -> None:
    measured, formula = measure_spec(spec, work), closed_form(spec, work)
    assert [x.name for x in measured.layers] == [x.name for x in formula.layers]
    assert measured.input_bytes == formula.input_bytes
    for mine, theirs in zip(measured.layers, formula.layers):
        assert mine.weight_bytes == theirs.weight_bytes, mine.name
        assert mine.activation_bytes == pytest.approx(theirs.activation_bytes, rel=0.01), mine.name
        assert mine.kv_cache_bytes == theirs.kv_cache_bytes, mine.name
        assert mine.flops == pytest.approx(theirs.flops, rel=0.01), mine.name
        assert [s.owner for s in mine.shared] == [s.owner for s in theirs.shared]
        assert mine.read_bytes == theirs.read_bytes, mine.name       # a lookup reads only its rows


def test_an_embedding_reads_the_rows_it_looks_up() -> None:
    # llama-untied at decode, batch 2, float32: the table holds 50 x 64 x 4 = 12,800 bytes, a pass looks up one
    # row per sequence, 2 x 64 x 4 = 512 bytes; every block reads all its weights (read_bytes None).
    spec, work = SPECS[1], WORKLOADS[0]
    for table in (measure_spec(spec, work), closed_form(spec, work)):
        embedding = table.layers[0]
        assert (embedding.weight_bytes, embedding.read_bytes, embedding.split(1).bytes_read) == (12_800, 512, 512)
        assert all(layer.read_bytes is None for layer in table.layers[1:])


def test_weights_are_the_unique_tensor_bytes() -> None:
    from cachefit.nn import build_model

    spec = SPECS[0]
    model = build_model(spec, device="meta")
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    table = measure_spec(spec, WORKLOADS[0])
    assert sum(x.weight_bytes for x in table.layers) == sum(t.numel() * t.element_size() for t in unique.values())
    assert table.layers[-1].shared[0].bytes == 100 * 64 * 4       # the tied embedding, needed by the head too


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-dense4"])
def test_workspace_tracker_matches_a_real_cpu_forward(name: str) -> None:
    """torch.profiler's allocator events on a real CPU forward give the same peak as the tracker on meta."""
    from torch.profiler import ProfilerActivity, profile

    from cachefit.nn import build_model

    spec = presets()[name].spec
    block = build_model(spec, device="cpu").layers[0]
    x = torch.randn(2, 16, block.attn.q_proj.in_features)
    with torch.no_grad():
        block(x)                                                     # warm-up: lazy initialisation
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as trace:
            block(x)
    live = peak = 0
    for event in sorted((e for e in trace.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    meta_block = build_model(spec, device="meta").layers[0]
    layer = profile_module(torch.nn.Sequential(meta_block), (x.to("meta"),), name="block").layers[0]
    assert layer.activation_bytes + layer.workspace_bytes == peak


def test_factory_with_two_streams_counts_both(tmp_path: object) -> None:
    table = load_model("toy_models:two_stream", torch_options=TorchOptions(input_shape=(2, 5, 16),
                                                                           input_dtype="float32"))
    names = [x.name for x in table.layers]
    assert names == ["stem", "blocks.0", "blocks.1", "blocks.2", "out"]
    hidden = 2 * 5 * 16 * 4
    # After a block both hidden state and residual cross to the next one.
    assert table.layers[1].activation_bytes == 2 * hidden
    assert table.input_bytes == hidden
    assert table.layers[1].weight_bytes == (16 * 16 + 16) * 4
    same = load_model("toy_models:two_stream_with_inputs")
    assert same.layers == table.layers


def test_leaf_granularity_and_factory_errors() -> None:
    leaf = load_model("toy_models:two_stream", torch_options=TorchOptions(granularity="leaf", input_shape=(1, 16),
                                                                          input_dtype="float32"))
    assert [x.name for x in leaf.layers] == ["stem", "blocks.0.linear", "blocks.1.linear", "blocks.2.linear", "out"]
    with pytest.raises(ValueError, match="give input_shape"):
        load_model("toy_models:two_stream")
    with pytest.raises(ValueError, match="cannot import"):
        load_model("toy_models:missing")


def test_profiling_70b_allocates_no_weight_memory() -> None:
    pytest.importorskip("transformers")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    table = load_model("hf/llama-3-70b", seq=4096)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert sum(x.weight_bytes for x in table.layers) > 140e9       # 70.6B parameters in bf16
    assert grown_mib < 1024                                          # the weights alone would be 131 GiB


def test_a_prefill_chunk_is_counted_on_top_of_decode() -> None:
    work = Workload(batch=2, seq=32, phase="decode", dtype="float32")
    decode, chunked = measure_spec(SPECS[0], work), measure_spec(SPECS[0], work, prefill_chunk=8)
    assert chunked.spec is not None and chunked.spec.prefill_chunk == 8
    for plain, both in zip(decode.layers, chunked.layers):
        assert both.weight_bytes == plain.weight_bytes and both.kv_cache_bytes == plain.kv_cache_bytes
        assert both.activation_bytes >= plain.activation_bytes and both.workspace_bytes >= plain.workspace_bytes
    block = chunked.layers[1]
    assert block.activation_bytes == 2 * 8 * 64 * 4                 # 8 prompt tokens x 2 sequences x d=64, fp32
    with pytest.raises(ValueError, match="prefill_chunk needs phase='decode'"):
        measure_spec(SPECS[0], Workload(batch=2, seq=32, phase="prefill"), prefill_chunk=4)


def test_every_parameter_and_buffer_is_counted_once_wherever_it_sits() -> None:
    # 32 x 16 embedding + 3 blocks of 16 x 16 + 16 + the unused 16 x 2 + 2, the root's 16-scale and 16-buffer, the
    # 16 x 8 output + 8: float32.
    from cachefit.sources import load_model

    table = load_model("toy_models:dict_blocks")
    total = (32 * 16 + 3 * (16 * 16 + 16) + (16 * 2 + 2) + 16 + 16 + (16 * 8 + 8)) * 4
    assert sum(x.weight_bytes for x in table.layers) == total
    assert [x.name for x in table.layers][1:4] == ["layers.0", "layers.1", "layers.2"]     # the dict's blocks
    modules = [m for x in table.layers for m in x.modules]
    assert "unused" in modules and modules.count("unused") == 1      # placed with a neighbour, and named
    assert {"scale", "freqs"} <= set(modules)                        # the root's own tensors, by name
    accelerate = pytest.importorskip("accelerate")
    from cachefit import api
    from cachefit.output.export import device_map
    from toy_models import DictBlocks

    # accelerate maps modules only (the root's own tensors need the whole model on one device, key ""): without
    # them, the map of a plan of this layout covers every tensor once.
    plain = load_model("toy_models:dict_blocks_without_root_tensors")
    plan = api.plan(plain, capacity=sum(x.weight_bytes for x in plain.layers), cards=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accelerate.utils.check_device_map(DictBlocks(root=False), device_map(plan))


@pytest.mark.parametrize("factory", ["llama_with_a_mask", "llama_without_cache"])
def test_factories_of_transformers_models_with_masks_or_without_a_cache(tmp_path: Path, factory: str) -> None:
    # The tiny Llama the factories build, profiled from its config instead (a prefill of 16 tokens, batch 2,
    # float32): transformers' yes/no checks of masks and positions answered as for an unpadded, unpacked batch,
    # the factory's profile holds the same weights, layer by layer, and no less activation and workspace.
    pytest.importorskip("transformers")
    from cachefit.sources import load_model

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    from_config = load_model(tmp_path, batch=2, seq=16, phase="prefill", dtype="float32")
    table = load_model(f"toy_models:{factory}")
    assert [x.name for x in table.layers] == [x.name for x in from_config.layers]
    assert [x.weight_bytes for x in table.layers] == [x.weight_bytes for x in from_config.layers]
    blocks = [(x.activation_bytes, x.workspace_bytes) for x in table.layers[1:3]]
    expected = [(x.activation_bytes, x.workspace_bytes) for x in from_config.layers[1:3]]
    if factory == "llama_with_a_mask":          # the same forward: a cache filled by the prompt, as profiled
        assert blocks == expected
    else:                                       # no cache: each block holds no K and V of 16 tokens, batch 2,
        kv = 2 * 2 * 2 * 16 * 16 * 4            # 2 KV heads of 16, float32 = 8,192 B less
        assert blocks == [(a, w - kv) for a, w in expected]


@pytest.mark.parametrize(("factory", "tokens", "channels"), [("gpt2_decoding", 32, 64),
                                                             ("mistral_decoding", 8, 32)])
def test_a_factorys_kv_cache_is_what_its_layers_write(factory: str, tokens: int, channels: int) -> None:
    # Keys and values of batch 2 in float32: GPT-2 (fused QKV) all 32 cached tokens of 4 heads x 16; Mistral its
    # sliding window of 8 tokens of 2 KV heads x 16. The cache's fill counter (one int64) is not KV.
    pytest.importorskip("transformers")
    from cachefit.sources import load_model

    table = load_model(f"toy_models:{factory}", phase="decode")
    blocks = ("transformer.h.0", "transformer.h.1") if factory == "gpt2_decoding" else (
        "model.layers.0", "model.layers.1")
    assert {x.name: x.kv_cache_bytes for x in table.layers if x.kv_cache_bytes} == dict.fromkeys(
        blocks, 2 * 2 * tokens * channels * 4)


def test_leaf_granularity_keeps_the_kv_cache_and_attention_with_the_leaf_before_attention() -> None:
    # hf/llama-3-8b at context 4096, bf16: 8 KV heads x 128 x 2 (K and V) x 2 B x 4096 = 16 MiB a layer, held by
    # v_proj, the last leaf to run before attention (which runs in no leaf of its own); its FLOPs go with it.
    pytest.importorskip("transformers")
    from cachefit.sources import load_model

    leaf = load_model("hf/llama-3-8b", seq=4096, torch_options=TorchOptions(granularity="leaf"))
    block = load_model("hf/llama-3-8b", seq=4096)
    held = {x.name: x.kv_cache_bytes for x in leaf.layers if x.kv_cache_bytes}
    assert held == {f"model.layers.{i}.self_attn.v_proj": 8 * 128 * 2 * 2 * 4096 for i in range(32)}
    assert sum(held.values()) == sum(x.kv_cache_bytes for x in block.layers)
    v_proj = next(x for x in leaf.layers if x.name == "model.layers.0.self_attn.v_proj")
    assert v_proj.workspace_bytes > 0 and v_proj.flops > 2 * 4096 * 1024     # SDPA reads 4,096 keys


def test_a_cnn_profiled_on_meta_matches_its_real_forward() -> None:
    # A small ResNet (3 basic blocks of 16 channels, batch 2 of 3x32x32, float32): each block holds its input and
    # output maps (2 x 16 x 32 x 32 x 4 B = 128 KiB each) and one more in flight. The meta batch norm also makes
    # its saved mean and inverse deviation (2 x 16 x 4 B), which CPU's inference kernel leaves empty: over by 128 B.
    from cachefit import api

    checked = api.verify("toy_models:small_resnet")
    assert [c.name for c in checked.checks] == ["stem", "blocks.0", "blocks.1", "blocks.2", "fc"]
    assert all(c.weights_match and c.kv_cache_match for c in checked.checks)
    assert all(1.0 <= c.ratio <= 1.25 for c in checked.checks), checked.checks
    assert checked.checks[1].measured_bytes == 3 * 2 * 16 * 32 * 32 * 4
    with pytest.raises(ValueError, match="make it return \\(module, inputs\\)"):
        api.verify("toy_models:two_stream")
