"""Checkpoints of the reference model and per-card shards: contents, the tied weight, the manifest, tampering."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import cachefit  # noqa: E402
from cachefit.cli import cli  # noqa: E402
from cachefit.core.records import Plan  # noqa: E402
from cachefit.nn import build_model  # noqa: E402
from cachefit.runtime import Manifest, init_weights, shard_checkpoint, verify_card  # noqa: E402
from cachefit.sources import presets  # noqa: E402


def checkpoint(folder: Path, name: str = "tiny-llama", seed: int = 0) -> Path:
    preset = presets()[name]
    path = folder / f"{name}-{seed}.safetensors"
    init_weights(preset.spec, preset.workload, path, seed=seed)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_are_deterministic_and_load_back(tmp_path: Path) -> None:
    (tmp_path / "again").mkdir()
    first, again, other = checkpoint(tmp_path), checkpoint(tmp_path / "again"), checkpoint(tmp_path, seed=1)
    assert digest(first) == digest(again) and digest(first) != digest(other)      # byte for byte
    stored = load_file(first)
    assert "head.proj.weight" not in stored or "embed.weight" not in stored   # the tied weight is stored once
    model = build_model(presets()["tiny-llama"].spec, seed=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(stored.get(name, stored.get("embed.weight")), tensor), name


def test_each_card_holds_exactly_its_tensors_and_the_tied_weight_twice(tmp_path: Path) -> None:
    plan = cachefit.plan("tiny-llama", capacity="1MiB")               # 6 cards: embed | 4 blocks | head
    manifest = shard_checkpoint(plan, checkpoint(tmp_path), tmp_path / "shards")
    full = build_model(presets()["tiny-llama"].spec, seed=0).state_dict()
    assert sorted(n for card in manifest.cards for n in card.tensors) == sorted(full)
    for part, card in zip(plan.partitions, manifest.cards):
        stored = load_file(tmp_path / "shards" / card.file)
        assert set(stored) == set(card.tensors)
        assert all(name.split(".")[0] in {m.split(".")[0] for m in part.modules} for name in stored)
        for name, tensor in stored.items():
            assert torch.equal(tensor, full[name]), name
    assert [(s.tensor, s.cards) for s in manifest.shared] == [("embed.weight", (0, 5))]
    assert Manifest.read(tmp_path / "shards") == manifest


def test_tampered_or_foreign_shards_are_refused(tmp_path: Path) -> None:
    plan = cachefit.plan("tiny-llama", capacity="2MiB")
    shard_checkpoint(plan, checkpoint(tmp_path), tmp_path / "shards")
    assert verify_card(tmp_path / "shards", 1, plan).card == 1
    shard = tmp_path / "shards" / "card-1.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"card 1: shard .* does not match its manifest .* tampered"):
        verify_card(tmp_path / "shards", 1, plan)
    other = cachefit.plan("tiny-llama", capacity="1MiB")
    with pytest.raises(ValueError, match="made for another plan"):
        verify_card(tmp_path / "shards", 0, other)
    with pytest.raises(ValueError, match="no shard for card 7"):
        verify_card(tmp_path / "shards", 7, plan)


def test_mismatched_inputs_are_refused(tmp_path: Path) -> None:
    tiny = checkpoint(tmp_path)
    with pytest.raises(ValueError, match="other dimensions"):
        shard_checkpoint(cachefit.plan("tiny-dense4", capacity="2MiB"), tiny, tmp_path / "a")
    with pytest.raises(ValueError, match="counted float16 weights but the checkpoint holds float32"):
        shard_checkpoint(cachefit.plan("tiny-llama", capacity="2MiB", dtype="float16"), tiny, tmp_path / "b")
    with pytest.raises(ValueError, match="not feasible"):
        shard_checkpoint(cachefit.plan("tiny-llama", capacity="100kB"), tiny, tmp_path / "c")
    table = cachefit.load_model("tiny-llama")
    from dataclasses import replace
    with pytest.raises(ValueError, match="no dense/llama spec"):
        shard_checkpoint(cachefit.plan(replace(table, spec=None), capacity="2MiB"), tiny, tmp_path / "d")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        shard_checkpoint(cachefit.plan("tiny-llama", capacity="2MiB"), tmp_path / "junk.safetensors", tmp_path / "e")


def test_cli_init_weights_and_shard(tmp_path: Path) -> None:
    runner = CliRunner()
    plan_file, weights, folder = tmp_path / "plan.json", tmp_path / "w.safetensors", tmp_path / "shards"
    assert runner.invoke(cli, ["plan", "tiny-dense4", "--capacity", "2MiB", "-o", str(plan_file)]).exit_code == 0
    result = runner.invoke(cli, ["init-weights", "tiny-dense4", "--out", str(weights), "--seed", "3"])
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(cli, ["shard", str(plan_file), str(weights), "--out", str(folder)])
    assert result.exit_code == 0 and "manifest" in result.stdout
    assert Manifest.read(folder).plan_fingerprint.startswith("sha256:")
    assert Plan.read(plan_file).cards == len(Manifest.read(folder).cards)
    result = runner.invoke(cli, ["init-weights", "no-such-model", "--out", str(weights)])
    assert result.exit_code == 2 and "expected a preset" in result.stderr


def test_one_card_holding_both_ends_of_a_tied_weight(tmp_path: Path) -> None:
    # tiny-llama ties its head to its embedding; on one card the shard holds it under both names, as two tensors
    # (safetensors writes no aliases), equal to the checkpoint's one.
    plan = cachefit.plan("tiny-llama", capacity="1GB")
    assert plan.cards == 1
    manifest = shard_checkpoint(plan, checkpoint(tmp_path), tmp_path / "shards")
    card = load_file(tmp_path / "shards" / manifest.cards[0].file)
    assert torch.equal(card["embed.weight"], card["head.proj.weight"]) and manifest.shared == ()
    verify_card(tmp_path / "shards", 0, plan)


def _sharded(tmp_path: Path) -> tuple[Plan, Path]:
    plan = cachefit.plan("tiny-llama", capacity="2MiB")
    shard_checkpoint(plan, checkpoint(tmp_path), tmp_path / "shards")
    return plan, tmp_path / "shards"


@pytest.mark.parametrize("name", ["../elsewhere.safetensors", "/etc/passwd", "card-0.safetensors/../x"])
def test_manifests_are_confined_to_their_folder(tmp_path: Path, name: str) -> None:
    plan, shards = _sharded(tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["cards"][0]["file"] = name
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(cachefit.InputError, match=r"must be a card-N\.safetensors in the folder itself"):
        verify_card(shards, 0, plan)


def test_a_link_to_a_same_content_file_elsewhere_is_refused(tmp_path: Path) -> None:
    plan, shards = _sharded(tmp_path)
    outside = tmp_path / "outside.safetensors"
    (shards / "card-0.safetensors").rename(outside)
    (shards / "card-0.safetensors").symlink_to(outside)               # same bytes, same hash: still refused
    with pytest.raises(cachefit.InputError, match="or a link"):
        verify_card(shards, 0, plan)


def test_a_shard_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    plan, shards = _sharded(tmp_path)
    before = {path.name: path.read_bytes() for path in shards.iterdir()}
    wrong = checkpoint(tmp_path, "tiny-dense4")                          # another model: refused before writing
    with pytest.raises(cachefit.InputError, match="other dimensions"):
        shard_checkpoint(plan, wrong, shards)
    assert {path.name: path.read_bytes() for path in shards.iterdir()} == before
    fewer = cachefit.plan("tiny-llama", capacity="8MiB")                 # an earlier shard folder: replaced whole
    shard_checkpoint(fewer, checkpoint(tmp_path), shards)
    assert sorted(path.name for path in shards.iterdir()) == ["card-0.safetensors", "manifest.json"]
    (shards / "notes.txt").write_text("mine")                            # the user's own file: never swapped away
    with pytest.raises(cachefit.InputError, match="holds other files than shards"):
        shard_checkpoint(fewer, checkpoint(tmp_path), shards)
    assert (shards / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shards")] == []   # no staging left


def test_a_checkpoint_tensor_of_the_wrong_shape_is_refused_when_sharding(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = checkpoint(tmp_path)
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name] = tensors[name][:-1].clone()
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(cachefit.InputError, match=f"{name} has shape"):
        shard_checkpoint(cachefit.plan("tiny-llama", capacity="2MiB"), path, tmp_path / "shards")
