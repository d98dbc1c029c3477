"""The analytical families, checked against numbers worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachefit.sources import load_model, presets


def test_seed_network_matches_the_design_example() -> None:
    # d = 16 heads x 512 = 8192, MLP 32768, fp16 (2 bytes), decode, batch 1, context 10000.
    table = load_model("seed-dense16", batch=1, seq=10000, phase="decode")
    layer = table.layers[0]
    assert len(table.layers) == 16
    assert layer.weight_bytes == (4 * 8192 * 8192 + 2 * 8192 * 32768) * 2 == 1_610_612_736
    assert layer.activation_bytes == 1 * 8192 * 2 == 16384 == table.input_bytes
    assert layer.workspace_bytes == 16 * 1 * 10000 * 2 == 320_000       # naive scores: b*h*q*s*p
    assert layer.kv_cache_bytes == 2 * 1 * 10000 * 8192 * 2 == 327_680_000
    assert layer.flops == 2 * 805_306_368 + 4 * 16 * 10000 * 512 == pytest.approx(1.94e9, rel=1e-3)


def test_seed_defaults_are_the_seeds_configuration() -> None:
    table = load_model("seed-dense16")
    assert (table.batch, table.seq, table.phase, table.dtype) == (1024, 10000, "decode", "float16")
    prefill = load_model("seed-dense16", phase="prefill")
    # 1024 x 10000 tokens x 8192 x 2 bytes: the 168 GB per layer the seed's prefill activations need.
    assert prefill.layers[0].activation_bytes == 1024 * 10000 * 8192 * 2 == 167_772_160_000
    assert prefill.layers[0].kv_cache_bytes == 0


def test_llama_3_8b_has_8_03_billion_parameters() -> None:
    table = load_model("llama-3-8b")
    params = sum(layer.weight_bytes for layer in table.layers) // 2
    assert params == 8_030_261_248                     # Meta's published 8.03B
    assert [table.layers[0].name, table.layers[-1].name] == ["embed", "head"]


def test_tiny_llama_layer_by_hand() -> None:
    # hidden 128, 4 heads (e = 32), 2 KV heads, FFN 344, fp32, decode, batch 2, context 64.
    table = load_model("tiny-llama")
    layer = table.layers[1]
    params = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 344 + 2 * 128   # q, k+v, o, SwiGLU, 2 RMSNorms
    assert layer.weight_bytes == params * 4
    assert layer.kv_cache_bytes == 2 * 2 * 64 * 2 * 32 * 4
    assert layer.workspace_bytes == max(2 * 4 * 1 * 64 * 4, 2 * 2 * 344 * 4)   # scores vs gate+up
    head = table.layers[-1]
    assert head.weight_bytes == 128 * 4                                           # tied: only the final norm
    assert head.shared[0].owner == "embed" and head.shared[0].bytes == 512 * 128 * 4


def test_flash_keeps_a_tile_and_prefill_has_no_kv_cache() -> None:
    naive = load_model("llama-3-8b", seq=8192, phase="prefill", attention="naive").layers[1]
    flash = load_model("llama-3-8b", seq=8192, phase="prefill", attention="flash").layers[1]
    assert naive.workspace_bytes == 1 * 32 * 8192 * 8192 * 2
    assert flash.workspace_bytes == max(1 * 32 * 8192 * 128 * 2, 2 * 8192 * 14336 * 2)
    assert naive.kv_cache_bytes == 0


def test_every_preset_loads() -> None:
    assert {"seed-dense16", "tiny-llama", "tiny-dense4", "llama-3-8b", "llama-3-70b"} <= set(presets())
    for name in presets():
        assert len(load_model(name).layers) >= 4


def test_spec_files(tmp_path: Path) -> None:
    spec = tmp_path / "m.toml"
    spec.write_text('family = "dense"\nname = "m"\nlayers = 2\nheads = 2\nhead_dim = 4\nmlp_hidden = 16\n'
                    '[workload]\nbatch = 3\n')
    table = load_model(spec)
    assert table.batch == 3 and len(table.layers) == 2
    assert load_model(spec, batch=5).batch == 5
    spec.write_text('family = "llama"\nname = "m"\nlayers = 2\nhidden = 10\nheads = 3\nkv_heads = 1\n'
                    'ffn_hidden = 8\nvocab = 4\n')
    with pytest.raises(ValueError, match=r"hidden \(10\) must be a multiple of heads \(3\)"):
        load_model(spec)
    spec.write_text('family = "dense"\nname = "m"\nlayers = 0\nheads = 2\nhead_dim = 4\nmlp_hidden = 16\n')
    with pytest.raises(ValueError, match="layers"):
        load_model(spec)
    spec.write_text('family = "conv"\n')
    with pytest.raises(ValueError, match="family must be 'dense' or 'llama'"):
        load_model(spec)


@pytest.mark.parametrize(("model", "options", "message"), [
    ("seed-dense16", {"dtype": "float13"}, "dtype must be one of"),
    ("seed-dense16", {"batch": 0}, "batch must be a positive integer"),
    ("no-such-model", {}, "not a file, nor a preset"),
    ("no_such_package.module:factory", {}, "cannot import no_such_package.module:factory"),
])
def test_bad_model_arguments(model: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_model(model, **options)


def test_options_do_not_apply_to_fixed_tables(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    load_model("tiny-llama").write(path)
    with pytest.raises(ValueError, match=r"batch: layer table .* has fixed sizes"):
        load_model(path, batch=2)


# Meta's and Mistral AI's published parameter counts (config.json dimensions; the model cards' totals).
PUBLISHED_PARAMETERS = {"llama-2-7b": 6_738_415_616, "llama-2-70b": 68_976_648_192, "llama-3.1-8b": 8_030_261_248,
                        "llama-3.1-70b": 70_553_706_496, "mixtral-8x7b": 46_702_792_704}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_deployment_presets_have_their_published_size(name: str) -> None:
    table = load_model(name, dtype="bfloat16")
    assert sum(layer.weight_bytes for layer in table.layers) == 2 * PUBLISHED_PARAMETERS[name]


def _moe_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "moe.toml"
    spec.write_text('family = "llama"\nname = "tiny-moe"\nlayers = 2\nhidden = 64\nheads = 4\nkv_heads = 2\n'
                    'ffn_hidden = 96\nvocab = 100\nexperts = 4\nexperts_per_token = 2\n[workload]\nbatch = 2\n'
                    'seq = 32\nphase = "decode"\ndtype = "float32"\n')
    return spec


def test_mixture_of_experts_block_by_hand(tmp_path: Path) -> None:
    # hidden 64, 4 heads of 16, 2 KV heads; 4 SwiGLU experts of width 96, 2 a token; fp32, decode, batch 2, seq 32.
    table = load_model(_moe_spec(tmp_path), attention="flash")
    block = table.layers[1]
    attention = 64 * 64 + 2 * 32 * 64 + 64 * 64                      # q, k and v (2 KV heads of 16), o
    experts, router, norms = 4 * 3 * 64 * 96, 64 * 4, 2 * 64
    assert block.weight_bytes == (attention + experts + router + norms) * 4
    # 2 tokens x 2 routes: gathered inputs (64) and gate-up outputs (2 x 96) each; flash attention's tile is
    # 2 x 4 heads x 1 x 32 keys x 4 B = 1,024 B, smaller.
    assert block.workspace_bytes == 2 * 2 * (64 + 2 * 96) * 4
    assert block.flops == 2 * 2 * attention + 4 * 2 * 4 * 32 * 16 + 2 * 4 * 3 * 64 * 96 + 2 * 2 * router
    two = block.split(2)
    assert two is not None and two.weight_bytes == (attention // 2 + experts // 2 + router + norms) * 4
    assert two.allreduces == 2 and two.kv_cache_bytes * 2 == block.kv_cache_bytes


def test_mixture_of_experts_is_refused_where_it_cannot_be_built(tmp_path: Path) -> None:
    from cachefit.core.errors import InputError
    from cachefit.sources import TorchOptions

    with pytest.raises(InputError, match=r"reference model .* dense MLPs only"):
        load_model(_moe_spec(tmp_path), torch_options=TorchOptions(measure=True))
    bad = tmp_path / "bad.toml"
    bad.write_text(_moe_spec(tmp_path).read_text().replace("experts = 4\n", ""))
    with pytest.raises(InputError, match=r"experts_per_token .* between 1 and experts"):
        load_model(bad)


def test_expert_parallel_in_the_closed_form_by_hand(tmp_path: Path) -> None:
    from cachefit.sources import TorchOptions

    spec = _moe_spec(tmp_path)
    tensor = load_model(spec, attention="flash")
    parallel = load_model(spec, attention="flash", torch_options=TorchOptions(experts="parallel"))
    block, whole = parallel.layers[1], tensor.layers[1]
    assert block.weight_bytes == whole.weight_bytes and [s.ways for s in block.splits] == [2, 4]   # t | 4 experts
    two = block.split(2)
    assert two is not None and two.experts == 2
    attention, expert, router, norms = 64 * 64 + 2 * 32 * 64 + 64 * 64, 3 * 64 * 96, 64 * 4, 2 * 64
    assert two.weight_bytes == (attention // 2 + 2 * expert + router + norms) * 4       # = the tensor split's
    # Every card's experts see both tokens' 2 routes: gathered inputs and gate-up outputs of the whole width,
    # plus a bool, an int64 and a float32 weight per route.
    assert two.workspace_bytes == 2 * 2 * (64 + 2 * 96) * 4 + 2 * 2 * 13
    assert two.flops == block.flops / 2 + 2 * 2 * router / 2                 # the router runs whole on each card
    # The table remembers the split, so predict rebuilds the same one from a plan.
    assert parallel.spec is not None and parallel.spec.experts == "parallel"
    from cachefit.core.spec import SpecRecord

    assert SpecRecord.read(parallel.spec.to_dict()) == parallel.spec
    sub = load_model(spec, torch_options=TorchOptions(experts="parallel", granularity="sublayer"))
    assert [s.ways for s in sub.layers[2].splits] == [2, 4] and sub.layers[2].name == "layers.0.mlp"


def test_a_pass_reads_only_the_experts_its_tokens_can_take(tmp_path: Path) -> None:
    from cachefit.core.cost import layer_costs, rates_of
    from cachefit.core.hardware import Device, Figure

    table = load_model(_moe_spec(tmp_path), attention="flash")
    block = table.layers[1]
    # Decode, 2 sequences x 2 routes = 4 slots: all 4 experts may be taken, so every weight is read.
    assert block.read_bytes is None
    one = load_model(_moe_spec(tmp_path), attention="flash", batch=1)
    attention, expert, router, norms = 64 * 64 + 2 * 32 * 64 + 64 * 64, 3 * 64 * 96, 64 * 4, 2 * 64
    assert one.layers[1].read_bytes == (attention + 2 * expert + router + norms) * 4     # 2 of the 4 experts
    two = one.layers[1].split(2)
    assert two is not None and two.read_bytes == (attention // 2 + 2 * expert // 2 + router + norms) * 4
    figures = {"on_chip_bytes": 1 << 30, "usable_fraction": 1.0, "on_chip_bandwidth": 1e9, "fp32_flops": 1e12,
               "link_bandwidth": 1e9}
    device = Device("x", "X", "SRAM", {k: Figure(v, "A", "test") for k, v in figures.items()})
    moved = layer_costs(one, rates_of(device, "float32")).moved
    assert moved[1] == one.layers[1].read_bytes + one.layers[1].kv_cache_bytes + 2 * one.layers[1].activation_bytes
