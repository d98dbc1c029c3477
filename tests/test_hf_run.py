"""Hugging Face checkpoints sharded per plan and run one process per card: tokens identical to transformers' own
generate. Checkpoints are transformers' own models at small dimensions (random weights, save_pretrained)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load, load_file, save  # noqa: E402

import cachefit  # noqa: E402
from cachefit.cli import cli  # noqa: E402
from cachefit.runtime import shard_checkpoint  # noqa: E402
from cachefit.runtime.hf_checkpoint import RUNNABLE  # noqa: E402
from cachefit.runtime.hf_stage import HFStage  # noqa: E402
from cachefit.runtime.launch import RunOptions, run_plan  # noqa: E402

SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2}
FIELDS: dict[str, dict[str, Any]] = {
    "llama": {}, "qwen2": {}, "qwen3": {"head_dim": 16}, "mistral": {"sliding_window": 8},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2}, "phi3": {"pad_token_id": None},
    "gemma2": {"head_dim": 16, "sliding_window": 8},
    "gpt2": {"n_positions": 128, "bos_token_id": 0, "eos_token_id": 0},
    "opt": {"ffn_dim": 96, "word_embed_proj_dim": 64, "max_position_embeddings": 128},
    "gpt_neox": {}, "falcon": {},
}


def checkpoint(folder: Path, kind: str, max_shard_size: str | None = None, dtype: Any = None) -> Path:
    """transformers' model of ``kind`` with seeded random weights (float32 unless ``dtype``), saved as a model
    folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, **SMALL, **FIELDS[kind])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return folder


def planned(folder: Path, cards: int, chunk: int | None = None) -> cachefit.Plan:
    # Batch 2, 64 tokens of KV cache, float32 (the config's dtype), min-max over ``cards``; ``chunk``: prompts
    # go in passes of that many tokens per sequence, counted too.
    from cachefit.sources import TorchOptions

    table = cachefit.load_model(folder, batch=2, seq=64, torch_options=TorchOptions(prefill_chunk=chunk))
    plan = cachefit.plan(table, capacity="1GiB", cards=cards, memory_model="pipeline")
    assert plan.feasible and plan.cards == cards
    return plan


def grouped(folder: Path, ways: int) -> cachefit.Plan:
    """Every layer on one tensor group of ``ways`` cards (batch 2, 64 tokens of KV cache)."""
    table = cachefit.load_model(folder, batch=2, seq=64)
    return cachefit.plan(table, capacity="1GiB", baseline=f"tp={ways},pp=1", memory_model="pipeline")


def sharded(tmp_path: Path, folder: Path, plan: cachefit.Plan) -> tuple[Path, Path, Any]:
    """The plan written to ``tmp_path/plan.json`` and the folder sharded into ``tmp_path/shards``: the plan
    file, the shard folder and its manifest."""
    plan_file, shards = tmp_path / "plan.json", tmp_path / "shards"
    plan.write(plan_file)
    return plan_file, shards, shard_checkpoint(plan, folder, shards)


def test_the_runnable_architectures_are_those_checked_here() -> None:
    assert set(RUNNABLE) == set(FIELDS) - {"falcon"}


@pytest.mark.parametrize("kind", RUNNABLE)
def test_stages_of_every_runnable_architecture_decode_as_generate_does(tmp_path: Path, kind: str) -> None:
    # In one process: the model cut into one stage per layer (embedding, each block, norm and head each on its
    # own card: stages without blocks too), the stages chained, greedy decoding from an 8-token prompt.
    from transformers import AutoModelForCausalLM

    folder = checkpoint(tmp_path / kind, kind)
    plan = planned(folder, 7)
    document = json.loads((folder / "config.json").read_text())
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    full.generation_config.eos_token_id = None      # the stages decode through end-of-text, as a run does
    state = full.state_dict()
    stages = []
    for part in plan.partitions:
        stage = HFStage(document, plan, part).eval()
        mine = [n for n, t in stage.causal.state_dict(keep_vars=True).items() if t.device.type != "meta"]
        stage.load_shard(save({n: state[n].clone().contiguous() for n in mine}), "test")
        stages.append((stage, stage.micro_caches(2, 1, 64, torch.float32)[0]))
    prompt = torch.randint(128, (2, 8), generator=torch.Generator().manual_seed(0))

    def step(x: torch.Tensor, position: int) -> torch.Tensor:
        for stage, cache in stages:
            x = stage(x, cache, position)
        return x

    logits = step(prompt, 0)
    tokens = [logits.argmax(-1)]
    for index in range(1, 12):                  # past Mistral's and Gemma-2's 8-token windows
        logits = step(tokens[-1].unsqueeze(1), 8 + index - 1)
        tokens.append(logits.argmax(-1))
    reference = full.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(torch.stack(tokens, 1), reference.sequences[:, 8:])
    assert float((reference.logits[-1] - logits).abs().max()) < 1e-4


@pytest.mark.parametrize(("kind", "cards"), [("gpt2", 2), ("mixtral", 3), ("qwen2", 2)])
def test_a_sharded_folder_runs_on_gloo_as_generate(tmp_path: Path, kind: str, cards: int) -> None:
    # GPT-2 ties its head to its embedding (stored once, written to both end cards), Mixtral routes to 2 of 4
    # experts, Qwen2 is stored in bfloat16 (the plan takes the config's dtype; logits within 4 bf16 ulps).
    folder = checkpoint(tmp_path / kind, kind, dtype=torch.bfloat16 if kind == "qwen2" else None)
    # Mixtral: prompts in 2 passes. Qwen2 in bf16: the whole 6-token prompt a pass, as generate sends it (passes
    # of other shapes round differently in 16 bits, and a near-tie of a random model's logits then flips).
    plan_file, shards, manifest = sharded(tmp_path, folder, planned(folder, cards,
                                                                    chunk={"mixtral": 3, "qwen2": 6}.get(kind)))
    assert manifest.source == "hf" and len(manifest.cards) == cards
    if kind == "gpt2":
        assert [(s.tensor, s.cards) for s in manifest.shared] == [("transformer.wte.weight", (0, cards - 1))]
    result = run_plan(str(plan_file), str(shards),
                      RunOptions(prompt_len=6, new_tokens=8, micro_batches=2, check=True, timeout=30))
    assert result.checked is not None and result.checked["tokens_identical"]
    assert result.checked["reference"] == "transformers generate"
    assert result.ranks[-1]["prefill_chunk"] == {"mixtral": 3, "qwen2": 6}.get(kind, 1)
    for rank in result.ranks:                   # the plan never under-counts what a card holds
        assert 0 < sum(rank["memory"].values()) <= rank["planned_bytes"], rank


def test_a_folder_of_several_safetensors_files_shards_as_one_file_does(tmp_path: Path) -> None:
    single = checkpoint(tmp_path / "one", "llama")
    several = checkpoint(tmp_path / "several", "llama", max_shard_size="100KB")
    assert (several / "model.safetensors.index.json").exists() and not (several / "model.safetensors").exists()
    plan = planned(single, 2)
    one = shard_checkpoint(plan, single, tmp_path / "from-one")
    shard_checkpoint(plan, several, tmp_path / "from-several")
    for card in one.cards:
        a = load_file(str(tmp_path / "from-one" / card.file))
        b = load((tmp_path / "from-several" / card.file).read_bytes())
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_a_plan_of_another_model_is_refused_in_one_line(tmp_path: Path) -> None:
    plan = planned(checkpoint(tmp_path / "llama", "llama"), 2)
    plan.write(tmp_path / "plan.json")
    other = checkpoint(tmp_path / "qwen2", "qwen2")
    result = CliRunner().invoke(cli, ["shard", str(tmp_path / "plan.json"), str(other), "--out",
                                      str(tmp_path / "shards")])
    assert result.exit_code == 2 and "the plan was made for another model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "shards").exists()


def test_an_architecture_not_run_yet_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    config = {**SMALL}
    config.pop("intermediate_size")
    folder = tmp_path / "falcon"
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("falcon", **config)).save_pretrained(folder)
    plan = planned(folder, 2)
    with pytest.raises(ValueError, match="'falcon' is not one yet"):
        shard_checkpoint(plan, folder, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


def test_experts_stored_one_by_one_shard_as_transformers_loads_them(tmp_path: Path) -> None:
    # transformers 5 stores Mixtral's experts one by one (w1, w2, w3 of each) and stacks them while loading
    # (gate_up_proj [E, 2f, d], down_proj [E, d, f]); the shards hold what the model holds, converted by
    # transformers' own conversion mapping.
    from transformers import AutoModelForCausalLM

    folder = checkpoint(tmp_path / "mixtral", "mixtral")
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in set(handle.keys())
    plan = planned(folder, 2)
    manifest = shard_checkpoint(plan, folder, tmp_path / "shards")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    for card in manifest.cards:
        held = load_file(str(tmp_path / "shards" / card.file))
        assert all(torch.equal(tensor, loaded[name]) for name, tensor in held.items())
    assert sum(len(card.tensors) for card in manifest.cards) == len(loaded)



def test_cli_shards_and_runs_a_sliding_window_model_and_reports_every_sequence(tmp_path: Path) -> None:
    # Mistral keeps an 8-token window of the 6 + 8 tokens each sequence holds by the end.
    from cachefit.runtime.worker import prompts

    folder = checkpoint(tmp_path / "mistral", "mistral")
    runner = CliRunner()
    plan_file, shards, report = tmp_path / "plan.json", tmp_path / "shards", tmp_path / "run.json"
    made = runner.invoke(cli, ["plan", str(folder), "--batch", "2", "--seq", "64", "--memory-model", "pipeline",
                               "--cards", "2", "--capacity", "1GiB", "-o", str(plan_file)])
    assert made.exit_code == 0, made.output
    cut = runner.invoke(cli, ["shard", str(plan_file), str(folder), "--out", str(shards)])
    assert cut.exit_code == 0 and "card 1: card-1.safetensors" in cut.stdout, cut.output
    ran = runner.invoke(cli, ["run", str(plan_file), "--weights", str(shards), "--prompt-len", "6", "--new-tokens",
                              "8", "--check", "--report", str(report)])
    assert ran.exit_code == 0 and "tokens identical" in ran.stdout, ran.output
    document = json.loads(report.read_text())
    assert document["check"]["tokens_identical"]
    assert [s["prompt"] for s in document["sequences"]] == prompts(128, 2, 6, 0).tolist()
    assert all(len(s["generated"]) == 8 for s in document["sequences"])
    assert all(card["measured_bytes"] <= card["planned_bytes"] for card in document["cards"])


def test_two_torchrun_agents_on_this_host_make_the_tokens_of_one_node(tmp_path: Path) -> None:
    # The command --print-torchrun gives, started twice (--node-rank 0 and 1) with its rendezvous on 127.0.0.1:
    # two nodes of one card each, as on two hosts.
    import os
    import subprocess

    folder = checkpoint(tmp_path / "llama", "llama")
    plan_file, shards, _ = sharded(tmp_path, folder, planned(folder, 2))
    options = RunOptions(prompt_len=6, new_tokens=4, micro_batches=2, timeout=30)
    one_node = run_plan(str(plan_file), str(shards), options)
    out = tmp_path / "out"
    out.mkdir()
    command = [str(out) if part == "OUT_DIR" else part for part in cachefit.torchrun_command(
        plan_file, shards, RunOptions(prompt_len=6, new_tokens=4, micro_batches=2, timeout=30, nnodes=2))]
    at = command.index("--nnodes")
    environment = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    agents = [subprocess.Popen([*command[:at], "--node-rank", str(node), *command[at:]], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for node in (0, 1)]
    try:
        logs = [agent.communicate(timeout=180)[0].decode(errors="replace") for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], logs
    assert torch.equal(load_file(str(out / "outputs.safetensors"))["tokens"], one_node.tokens)


def test_a_tensor_group_of_two_runs_with_the_models_own_tp_plan(tmp_path: Path) -> None:
    # tp=2: Q, K, V, gate and up by output rows, O and down by input columns (DTensor over the group), the
    # embedding and head by vocabulary; each card holds its share (the plan's split records) and no more.
    folder = checkpoint(tmp_path / "llama", "llama")
    plan_file, shards, manifest = sharded(tmp_path, folder, grouped(folder, 2))
    assert manifest.shared == ()                                   # the shares of a group are not shared weights
    q = load_file(str(shards / "card-1.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert tuple(q.shape) == (32, 64)                               # 2 of the 4 heads of 16, all 64 inputs
    result = run_plan(str(plan_file), str(shards),
                      RunOptions(prompt_len=6, new_tokens=4, micro_batches=2, check=True, timeout=60))
    assert result.checked is not None and result.checked["tokens_identical"]
    for rank in result.ranks:
        assert rank["tensor_parallel"] == 2 and sum(rank["memory"].values()) <= rank["planned_bytes"], rank


def test_a_mixture_of_experts_in_a_tensor_group_runs_as_transformers_splits_it(tmp_path: Path) -> None:
    # tp=2 on Mixtral: attention by heads (DTensor), every expert on both cards with half its columns (gate and
    # up halves each, down's inputs), one all-reduce after the experts; the router whole.
    folder = checkpoint(tmp_path / "mixtral", "mixtral")
    plan_file, shards, _ = sharded(tmp_path, folder, grouped(folder, 2))
    held = load_file(str(shards / "card-0.safetensors"))
    assert tuple(held["model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, 96, 64)      # 4 experts, 2 x 48
    assert tuple(held["model.layers.0.mlp.experts.down_proj"].shape) == (4, 64, 48)
    result = run_plan(str(plan_file), str(shards),
                      RunOptions(prompt_len=6, new_tokens=4, micro_batches=2, check=True, timeout=60))
    assert result.checked is not None and result.checked["tokens_identical"]
    assert all(sum(rank["memory"].values()) <= rank["planned_bytes"] for rank in result.ranks)


def test_kv_heads_replicated_past_the_group_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "llama", "llama")            # 2 KV heads: a group of 4 would replicate them
    with pytest.raises(ValueError, match="up to one KV head a card"):
        shard_checkpoint(grouped(folder, 4), folder, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


def test_a_killed_rank_of_a_hugging_face_run_ends_the_job_and_is_named(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = checkpoint(tmp_path / "llama", "llama")
    plan_file, shards, _ = sharded(tmp_path, folder, planned(folder, 2))
    monkeypatch.setenv("CACHEFIT_INJECT_FAULT", "1:kill")
    with pytest.raises(cachefit.RunError, match="rank 1 failed: killed by signal 9"):
        run_plan(str(plan_file), str(shards), RunOptions(prompt_len=6, new_tokens=4, micro_batches=2,
                                                                       timeout=20))


def test_predict_takes_the_hf_folder_a_plan_was_made_from(tmp_path: Path) -> None:
    # A Hugging Face plan keeps no spec: predict re-profiles the folder under the plan's workload, checks the
    # fingerprint, and refuses another model (and a spec plan given a model) with one line.
    folder = checkpoint(tmp_path / "llama", "llama")
    plan = planned(folder, 2)
    plan_file = tmp_path / "plan.json"
    plan.write(plan_file)
    with pytest.raises(cachefit.InputError, match=r"predict --model PATH"):
        cachefit.predict(plan_file, device="h100")
    ours, _ = cachefit.predict(plan_file, device="h100", model=folder)
    assert [(s.first, s.last) for s in ours.stages] == [(p.first, p.last) for p in plan.partitions]
    assert ours.decode_tokens_per_s > 0
    other = checkpoint(tmp_path / "gpt2", "gpt2")
    with pytest.raises(cachefit.InputError, match=r"made for another model than"):
        cachefit.predict(plan_file, device="h100", model=other)
    spec_plan = cachefit.plan("tiny-llama", capacity="1GiB", cards=2)
    with pytest.raises(cachefit.InputError, match=r"drop the model given"):
        cachefit.predict(spec_plan, device="h100", model=folder)
