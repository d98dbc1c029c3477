"""cachefit run on gloo, several processes: identical tokens with 2 and 3 ranks, a killed or failing rank ends
the job naming it, a tampered shard is refused before any process starts."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import cachefit  # noqa: E402
from cachefit.cli import cli  # noqa: E402
from cachefit.runtime import init_weights, shard_checkpoint  # noqa: E402
from cachefit.runtime.launch import RunOptions, run_plan  # noqa: E402
from cachefit.sources import TorchOptions, presets  # noqa: E402

SHORT = RunOptions(prompt_len=6, new_tokens=4, micro_batches=2, timeout=20)


def prepared(folder: Path, model: str, cards: int, chunk: int | None = None) -> tuple[Path, Path]:
    """A measured plan over ``cards`` cards, seeded weights and their shards."""
    preset = presets()[model]
    table = cachefit.load_model(model, torch_options=TorchOptions(measure=True, prefill_chunk=chunk))
    plan = cachefit.plan(table, capacity="8MiB", cards=cards, memory_model="pipeline")
    assert plan.feasible and plan.cards == cards
    plan_file, weights = folder / "plan.json", folder / "weights.safetensors"
    plan.write(plan_file)
    init_weights(preset.spec, preset.workload, weights, seed=2)
    shard_checkpoint(plan, weights, folder / "shards")
    return plan_file, folder / "shards"


TAG = "CACHEFIT_TEST_RUN"


@pytest.fixture
def tag(monkeypatch: pytest.MonkeyPatch) -> str:
    """A mark in the environment of this test's run, inherited by torchrun and every worker (orphans too)."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG, value)
    return value


def running(value: str) -> int:
    """Live ranks of this test's run (their command names the worker module): those carrying its mark, not every
    cachefit process on the host."""
    count = 0
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (entry / "cmdline").read_bytes()
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if state != "Z" and b"cachefit.runtime.worker" in command and f"{TAG}={value}".encode() in environment:
            count += 1
    return count


@pytest.mark.parametrize(("model", "cards", "chunk"), [("tiny-llama", 2, None), ("tiny-dense4", 3, None),
                                                       ("tiny-llama", 3, 4)])
def test_pipeline_matches_the_unpartitioned_model(tmp_path: Path, model: str, cards: int, chunk: int | None) -> None:
    plan_file, shards = prepared(tmp_path, model, cards, chunk)
    result = run_plan(str(plan_file), str(shards), RunOptions(prompt_len=6, new_tokens=4, micro_batches=2,
                                                              check=True, timeout=20))
    assert result.checked is not None and result.checked["tokens_identical"]
    assert result.checked["max_logit_difference"] <= 1e-3
    assert result.tokens.shape == (presets()[model].workload.batch, 4)
    assert [rank["card"] for rank in result.ranks] == list(range(cards))
    assert result.ranks[-1]["prefill_chunk"] == (chunk or 1)
    for rank in result.ranks:
        assert rank["memory"]["weights"] > 0 and rank["memory"]["kv_cache"] > 0 and rank["compute_s"] > 0
        # The plan never under-counts: weights + KV cache + receive buffers + the largest pass's transients.
        assert sum(rank["memory"].values()) <= rank["planned_bytes"], rank


@pytest.mark.parametrize(("fault", "message"), [("1:kill", "rank 1 failed: killed by signal 9"),
                                                 ("1:raise", "rank 1 failed: RuntimeError: injected fault")])
def test_a_failing_rank_ends_the_job_and_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str,
                                                  message: str, tag: str) -> None:
    plan_file, shards = prepared(tmp_path, "tiny-llama", 3)
    monkeypatch.setenv("CACHEFIT_INJECT_FAULT", fault)
    with pytest.raises(cachefit.RunError, match=message):
        run_plan(str(plan_file), str(shards), SHORT)
    assert running(tag) == 0


def test_cli_run_reports_and_refuses_tampered_shards(tmp_path: Path) -> None:
    plan_file, shards = prepared(tmp_path, "tiny-llama", 2)
    report = tmp_path / "run.json"
    result = CliRunner().invoke(cli, ["run", str(plan_file), "--weights", str(shards), "--prompt-len", "6",
                                      "--new-tokens", "4", "--check", "--report", str(report)])
    assert result.exit_code == 0, result.output
    document = json.loads(report.read_text())
    assert document["check"]["tokens_identical"] and document["decode_tokens_per_s"] > 0
    assert len(document["cards"]) == 2 and document["tpot_median_ms"] > 0
    # The per-step trace: 3 decode steps a card (4 new tokens), each split into compute, wait, send, framework;
    # card 0 receives a token per micro-batch (2) of each of the first 3 steps, card 1 a hidden state per pass.
    first, second = document["trace"]
    assert [len(t["decode_steps_ms"]) for t in (first, second)] == [3, 3]
    assert all(len(step) == 4 and min(step) >= 0 for t in (first, second) for step in t["decode_steps_ms"])
    assert len(first["hops_ms"]) == 3 * 2 and len(second["hops_ms"]) >= 4 * 2
    assert 0 <= first["hop_median_ms"] <= 1e3 * document["total_s"] and second["decode_step_median_ms"]["compute"] > 0
    shard = shards / "card-1.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    result = CliRunner().invoke(cli, ["run", str(plan_file), "--weights", str(shards)])
    assert result.exit_code == 2 and "card 1: shard" in result.stderr and "tampered" in result.stderr


@pytest.mark.parametrize(("options", "message"), [
    ({"micro_batches": 3}, r"micro_batches \(3\) must divide the plan's batch \(2\)"),
    ({"prompt_len": 60, "new_tokens": 10}, "exceed the 64 tokens of KV cache"),
])
def test_bad_run_options_are_refused_before_starting(tmp_path: Path, options: dict[str, int], message: str) -> None:
    plan_file, shards = prepared(tmp_path, "tiny-llama", 2)
    with pytest.raises(ValueError, match=message):
        run_plan(str(plan_file), str(shards), RunOptions(**options))


def test_plans_that_would_under_count_are_refused(tmp_path: Path) -> None:
    _, shards = prepared(tmp_path, "tiny-llama", 2)
    closed_form = cachefit.plan("tiny-llama", capacity="8MiB", cards=2, memory_model="pipeline")
    closed_form.write(tmp_path / "closed.json")
    with pytest.raises(ValueError, match="closed-form sizes: re-plan tiny-llama with measure and memory_model="):
        run_plan(str(tmp_path / "closed.json"), str(shards), SHORT)
    peak = cachefit.plan(cachefit.load_model("tiny-llama", torch_options=TorchOptions(measure=True)),
                         capacity="8MiB", cards=2)
    peak.write(tmp_path / "peak.json")
    with pytest.raises(ValueError, match="this plan is 'peak'"):
        run_plan(str(tmp_path / "peak.json"), str(shards), SHORT)


def test_ctrl_c_stops_every_process(tmp_path: Path, tag: str) -> None:
    plan_file, shards = prepared(tmp_path, "tiny-llama", 2)
    env = {**os.environ, "CACHEFIT_INJECT_FAULT": "1:hang"}
    launcher = subprocess.Popen([sys.executable, "-m", "cachefit", "run", str(plan_file), "--weights", str(shards),
                                 "--prompt-len", "4", "--new-tokens", "4", "--timeout", "120"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while running(tag) < 2 and time.monotonic() < deadline:        # its two ranks
        time.sleep(0.2)
    assert running(tag) == 2, "the ranks never started"
    time.sleep(2)                                                    # let rank 1 reach its stall
    launcher.send_signal(signal.SIGINT)
    launcher.communicate(timeout=30)
    assert launcher.returncode != 0
    assert running(tag) == 0


def prepared_groups(folder: Path, model: str, baseline: str) -> tuple[Path, Path]:
    """A measured TP x PP baseline plan (it fits 8 MiB cards at these sizes), weights and their shares."""
    preset = presets()[model]
    table = cachefit.load_model(model, torch_options=TorchOptions(measure=True))
    plan = cachefit.plan(table, capacity="8MiB", memory_model="pipeline", baseline=baseline)
    plan_file, weights = folder / "plan.json", folder / "weights.safetensors"
    plan.write(plan_file)
    init_weights(preset.spec, preset.workload, weights, seed=3)
    shard_checkpoint(plan, weights, folder / "shards")
    return plan_file, folder / "shards"


@pytest.mark.parametrize(("model", "baseline"), [("tiny-dense4", "tp=2,pp=1"), ("tiny-llama", "tp=2,pp=2")])
def test_tensor_groups_match_the_unpartitioned_model(tmp_path: Path, model: str, baseline: str) -> None:
    plan_file, shards = prepared_groups(tmp_path, model, baseline)
    plan = cachefit.Plan.read(plan_file)
    result = run_plan(str(plan_file), str(shards), RunOptions(prompt_len=6, new_tokens=4, micro_batches=2,
                                                              check=True, timeout=20))
    assert result.checked is not None and result.checked["tokens_identical"]
    assert len(result.ranks) == plan.cards == 2 * len(plan.partitions)
    for rank in result.ranks:
        part = plan.partition_of(rank["card"])
        assert rank["tensor_parallel"] == 2 and rank["allreduce_s"] > 0
        assert rank["residency"]["applied"] is False and "CPU run" in rank["residency"]["reason"]
        assert sum(rank["memory"].values()) <= rank["planned_bytes"] == part.footprint_bytes, rank
    # Each card of a group holds half of every block's matrices: the shards of a group differ, and are smaller
    # than the stage's whole tensors.
    manifest = json.loads((shards / "manifest.json").read_text())
    sizes = {card["card"]: card["bytes"] for card in manifest["cards"]}
    # The embedding is vocab-parallel too: each card of the first group holds half of its rows.
    first = load_file(str(shards / "card-0.safetensors"))
    assert first["embed.weight"].shape[0] * 2 == presets()[model].spec.vocab
    assert manifest["cards"][0]["sha256"] != manifest["cards"][1]["sha256"]
    assert abs(sizes[0] - sizes[1]) < 4096


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_the_launchers_death_ends_every_rank(tmp_path: Path, tag: str, sig: signal.Signals) -> None:
    plan_file, shards = prepared(tmp_path, "tiny-llama", 2)
    env = {**os.environ, "CACHEFIT_INJECT_FAULT": "1:hang"}
    launcher = subprocess.Popen([sys.executable, "-m", "cachefit", "run", str(plan_file), "--weights", str(shards),
                                 "--prompt-len", "4", "--new-tokens", "4", "--timeout", "120"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while running(tag) < 2 and time.monotonic() < deadline:        # its two ranks
        time.sleep(0.2)
    assert running(tag) == 2, "the ranks never started"
    launcher.send_signal(sig)                                        # SIGKILL: nothing of the launcher runs
    launcher.wait(timeout=30)
    deadline = time.monotonic() + 30
    while running(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(tag) == 0


@pytest.mark.parametrize("fault", ["1:stop", "1:hang"])
def test_a_stopped_or_hung_rank_is_named_within_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            tag: str, fault: str) -> None:
    # Its peer waits for it (a bystander, marked as waiting); the launcher names the rank that stopped making
    # progress once the timeout has passed, and ends the job.
    plan_file, shards = prepared(tmp_path, "tiny-llama", 2)
    monkeypatch.setenv("CACHEFIT_INJECT_FAULT", fault)
    with pytest.raises(cachefit.RunError, match=r"rank 1 failed: made no progress for \d+ s \(hung or stopped\)"):
        run_plan(str(plan_file), str(shards), RunOptions(prompt_len=6, new_tokens=4, micro_batches=2, timeout=5))
    assert running(tag) == 0


def test_a_single_host_run_listens_on_loopback_only(tmp_path: Path, tag: str) -> None:
    # Every listening TCP socket of the run's ranks is bound to a loopback address (the ranks meet through a file
    # store; gloo binds to lo). Read from /proc while the ranks wait on a stalled peer.
    plan_file, shards = prepared(tmp_path, "tiny-llama", 2)
    env = {**os.environ, "CACHEFIT_INJECT_FAULT": "1:hang"}
    launcher = subprocess.Popen([sys.executable, "-m", "cachefit", "run", str(plan_file), "--weights", str(shards),
                                 "--prompt-len", "4", "--new-tokens", "4", "--timeout", "120"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, addresses = time.monotonic() + 90, []
        while len(addresses) < 2 and time.monotonic() < deadline:     # until both ranks have set up gloo
            time.sleep(0.5)
            addresses = listening_addresses([launcher.pid, *rank_pids(tag)])
        assert len(addresses) >= 2 and all(address.startswith(("127.", "::1", "::ffff:127.")) for address in addresses)
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(timeout=30)
    assert running(tag) == 0


def rank_pids(value: str) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if f"{TAG}={value}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def listening_addresses(pids: list[int]) -> list[str]:
    """The local addresses of the TCP sockets these processes listen on (/proc/net/tcp and tcp6)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    addresses = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:                  # 0A: LISTEN
                addresses.append(_address(fields[1].split(":")[0], width))
    return addresses


def _address(hexadecimal: str, width: int) -> str:
    raw = bytes.fromhex(hexadecimal)
    if width == 8:                                                       # IPv4, little-endian words
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
    return str(ipaddress.IPv6Address(b"".join(words)))


def test_trace_pairs_each_receive_with_its_send() -> None:
    from cachefit.runtime.trace import card_traces
    # Two stages. Card 1 receives two hidden states: the first posted at 1.0 s, its receive begun at 0.5 and
    # done at 1.25 (a hop of 0.25: the receive waited for the send); the second posted at 2.0, begun at 3.0 (the
    # data was there), done at 3.5 (0.5). Card 0 receives one token back: posted 4.0, begun 4.0, done 4.1.
    step = [[1.0, 0.5, 0.25, 0.0]]          # wall, compute, wait, send: framework 0.25
    ranks = [{"card": 0, "first": 0, "trace": {"steps": step, "sent": [1.0, 2.0], "received": [[4.0, 4.1]]}},
             {"card": 1, "first": 3, "trace": {"steps": step, "sent": [4.0], "received": [[0.5, 1.25], [3.0, 3.5]]}}]
    zero, one = card_traces(ranks, decode_steps=1)
    assert one.hops_s == (0.25, 0.5) and zero.hops_s == pytest.approx((0.1,))
    assert zero.steps[0].framework_s == 0.25 and zero.to_dict()["hop_median_ms"] == pytest.approx(100.0)
    ranks[1]["trace"]["received"].pop()                  # unpaired: no hops rather than wrong ones
    assert card_traces(ranks, decode_steps=1)[1].hops_s == ()
    assert card_traces([{**ranks[0], "trace": {"steps": step, "sent": [], "received": []}}], 1)[0].hops_s == ()
