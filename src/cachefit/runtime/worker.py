"""One rank of ``cachefit run``, started by torch.distributed.run: verify, load, pre-allocate, then pipeline.

Schedule (point-to-point, forward only): prefill sends each micro-batch's hidden state on as soon as it is done,
so stage k works on micro-batch m while stage k+1 works on m-1; decode sends one token per sequence stage to stage,
and the last stage's greedy token returns to the first, with every micro-batch in flight. Receives are posted
ahead into one buffer per micro-batch and sends stay in flight, one per micro-batch (runtime/mailbox.py): a rank
waits only for a message that is really late, and that time is reported as waiting.

A stage on a tensor group (TP x PP): its first card, the leader, receives and sends for the stage and broadcasts
what it received to the group; every card computes its share, and each block all-reduces its attention and MLP
outputs over the group (torch.distributed sub-groups), so every card holds the whole output.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from cachefit.core.records import Partition, Plan
from cachefit.nn.model import TORCH_DTYPES
from cachefit.runtime.idle import idle_transport_threads
from cachefit.runtime.launch import INIT_VARIABLE, PROGRESS_VARIABLE
from cachefit.runtime.mailbox import Inbox, Outbox
from cachefit.runtime.manifest import Manifest, read_card, read_hf_config_copy
from cachefit.runtime.measure import PeakTracker, tensor_bytes
from cachefit.runtime.residency import flatten_weights, pin_weights_in_l2
from cachefit.runtime.stage import Stage
from cachefit.runtime.trace import Recorder
from cachefit.runtime.weights import plan_spec

__all__ = ["main", "prompts"]

RESIDENCY_VARIABLE = "CACHEFIT_L2_RESIDENCY"   # 0: weights stay where they are (to measure what residency buys)
FAULT_VARIABLE = "CACHEFIT_INJECT_FAULT"   # tests only: "RANK:kill|raise|hang|stop" after the prefill


def prompts(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """The prompt token ids every run (and its --check) uses: seeded, the same on every rank."""
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Place:
    """Where a rank sits: its stage, its group (None: a card of its own), and the leaders it talks to."""

    rank: int
    part: Partition
    group: Any
    previous: int | None          # leader of the stage before (None: this is the first stage)
    following: int | None         # leader of the stage after (None: the last stage)
    last_leader: int
    stages: int

    @property
    def leader(self) -> bool:
        return self.rank == self.part.card


def _place(plan: Plan, rank: int) -> Place:
    """Every rank creates every group, in plan order (torch.distributed.new_group is collective)."""
    groups = {p.card: dist.new_group(list(p.cards)) for p in plan.partitions if p.tensor_parallel > 1}
    index = next(i for i, p in enumerate(plan.partitions) if rank in p.cards)
    parts = plan.partitions
    return Place(rank, parts[index], groups.get(parts[index].card), parts[index - 1].card if index else None,
                 parts[index + 1].card if index + 1 < len(parts) else None, parts[-1].card, len(parts))


class Progress:
    """This rank's last state (``r`` running, ``w`` waiting for a peer, ``d`` done) and when it entered it, in a
    16-byte file the launcher watches (launch._progress). Written through an mmap, so a mark costs no system
    call: cheap enough around every receive and all-reduce."""

    def __init__(self, path: Path) -> None:
        with path.open("wb") as stream:
            stream.write(bytes(16))
        self._file = path.open("r+b")
        self._map = mmap.mmap(self._file.fileno(), 16)
        self.mark(b"r")

    def mark(self, state: bytes) -> None:
        self._map[8:16] = struct.pack("<d", time.time())
        self._map[0:1] = state


class GroupReduce:
    """The all-reduce of a tensor group's partial sums, timed (and marked as waiting: a peer may be late)."""

    def __init__(self, group: Any, progress: Progress) -> None:
        self.group, self.seconds, self.progress = group, 0.0, progress

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        self.progress.mark(b"w")
        dist.all_reduce(x, group=self.group)
        self.progress.mark(b"r")
        self.seconds += time.perf_counter() - start
        return x


class GroupGather:
    """The all-gather of a vocab-parallel head's logits (each card's columns, in rank order)."""

    def __init__(self, group: Any, ways: int, progress: Progress) -> None:
        self.group, self.ways, self.progress = group, ways, progress

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pieces = [torch.empty_like(x) for _ in range(self.ways)]
        self.progress.mark(b"w")
        dist.all_gather(pieces, x.contiguous(), group=self.group)
        self.progress.mark(b"r")
        return torch.cat(pieces, dim=-1)


class Clock:
    """Seconds spent computing, waiting for a peer and finishing sends; a wait or send is marked as waiting."""

    def __init__(self, progress: Progress) -> None:
        self.compute = self.wait = self.send = 0.0
        self.progress = progress

    def timed(self, kind: str, function: Any, *args: Any) -> Any:
        start = time.perf_counter()
        if kind != "compute":
            self.progress.mark(b"w")
        result = function(*args)
        if kind != "compute":
            self.progress.mark(b"r")
        setattr(self, kind, getattr(self, kind) + time.perf_counter() - start)
        return result


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cachefit-worker")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-len", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--micro-batches", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def watch_parent(interval: float = 0.5) -> None:
    """End this rank when the process that started it (torchrun) is gone: a rank never outlives its launcher."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)
    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    watch_parent()
    rank = int(os.environ["RANK"])
    progress = Progress(Path(os.environ.get(PROGRESS_VARIABLE, args.out)) / f"progress-rank{rank}")
    try:
        _run(args, rank, int(os.environ["WORLD_SIZE"]), progress)
        progress.mark(b"d")
    except Exception as error:
        Path(args.out, f"error-rank{rank}.txt").write_text(f"{type(error).__name__}: {error}\n")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, rank: int, world: int, progress: Progress) -> None:
    plan = Plan.read(args.plan)
    if world != plan.cards:
        raise ValueError(f"{world} processes for a plan of {plan.cards} cards")
    _, shard = read_card(args.weights, rank, plan)          # before any compute: tampered or foreign shards
    torch.set_num_threads(args.threads)
    _pin(int(os.environ.get("LOCAL_RANK", rank)), int(os.environ.get("LOCAL_WORLD_SIZE", world)), args.threads)
    cuda = torch.cuda.is_available()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    # Started by cachefit run: a file store in the run's folder (no port at all); by torchrun: its rendezvous.
    init = os.environ.get(INIT_VARIABLE)
    progress.mark(b"w")
    backend, wait = ("nccl" if cuda else "gloo"), timedelta(seconds=args.timeout)
    if init:
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=wait)
    else:
        dist.init_process_group(backend, timeout=wait)
    progress.mark(b"r")
    place = _place(plan, rank)
    idle_transport_threads()            # every group's: each process group runs a gloo loop thread of its own
    dtype = TORCH_DTYPES[str(plan.model.dtype)]
    stage = _stage(plan, place, args.weights, device, dtype)
    stage.load_shard(shard, f"card {rank}'s shard")
    # On CUDA: the stage's weights in one buffer, kept in L2 by a persisting access-policy window when they fit.
    residency = (pin_weights_in_l2(flatten_weights(stage) if cuda else torch.empty(0))
                 if os.environ.get(RESIDENCY_VARIABLE, "1") != "0"
                 else {"applied": False, "reason": f"turned off ({RESIDENCY_VARIABLE}=0)"})
    reduce = GroupReduce(place.group, progress)
    if place.group is not None:
        stage.set_collectives(reduce, GroupGather(place.group, place.part.tensor_parallel, progress))
    batch, micro, seq = int(plan.model.batch or 1), args.micro_batches, int(plan.model.seq or 0)
    size = batch // micro
    # A decode plan counts one token per sequence per pass, and, when measured with --prefill-chunk C, a pass of C
    # prompt tokens per sequence too (its larger activations and workspace, causal mask included): prompts go
    # through the pipeline in passes the plan counted, so no pass holds more.
    chunk = plan.model.chunk
    rows = stage.micro_caches(batch, micro, seq, dtype)
    hidden = stage.hidden
    # One receive buffer per micro-batch (runtime/mailbox.py): the first stage receives only tokens (from the
    # last, or its leader's broadcast); the others hidden states, at most a prompt chunk each.
    buffers = ([torch.empty(size, dtype=torch.long, device=device) for _ in range(micro)] if stage.first
               else [torch.empty(size * chunk * hidden, dtype=dtype, device=device) for _ in range(micro)])
    transient = _transient_peak(stage, rows[0], size, chunk, seq, hidden, dtype, device)
    reduce.seconds = 0.0
    memory = {"weights": tensor_bytes(list(stage.held().values())),
              "kv_cache": tensor_bytes(stage.cache_tensors(rows)), "buffers": tensor_bytes(buffers),
              "transient_peak": transient}
    prompt = prompts(stage.vocab, batch, args.prompt_len, args.seed)
    outcome = _pipeline(args, place, stage, rows, buffers, prompt.to(device), size, chunk, Clock(progress))
    emits = stage.last and place.leader
    report = {"rank": rank, "card": rank, "first": place.part.first, "last": place.part.last,
              "tensor_parallel": place.part.tensor_parallel, "emits": emits,
              "planned_bytes": place.part.footprint_bytes, "memory": memory, "allreduce_s": reduce.seconds,
              "residency": residency,
              **outcome["timing"]}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    if emits:
        save_file({"tokens": outcome["tokens"].cpu(), "logits": outcome["logits"].float().cpu(), "prompt": prompt},
                  str(Path(args.out, "outputs.safetensors")))


def _stage(plan: Plan, place: Place, weights: str, device: str, dtype: torch.dtype) -> Any:
    """This card's stage: of a Hugging Face model (its shards' manifest says so) or of the reference model."""
    manifest = Manifest.read(Path(weights))
    if manifest.source == "hf":
        from cachefit.runtime.hf_stage import HFStage

        document = read_hf_config_copy(weights, manifest)
        return HFStage(document, plan, place.part, device, str(plan.model.dtype), place.group).eval()
    return Stage(plan_spec(plan.model), place.part, device, dtype, place.rank - place.part.card).eval()


def _pin(local_rank: int, local_world: int, threads: int) -> None:
    """One rank per core when the host has a core per rank's threads: the OS then does not move ranks around
    (nor stack two on one core while another idles). Oversubscribed hosts are left to the scheduler."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cores and local_world * threads <= len(cores):
        os.sched_setaffinity(0, set(cores[local_rank * threads:(local_rank + 1) * threads]))


def _transient_peak(stage: Any, rows: Any, size: int, chunk: int, seq: int, hidden: int,
                    dtype: torch.dtype, device: str) -> int:
    """Peak bytes the largest pass allocates on this card: a chunk at the end of the context (a local pass; the
    positions it writes lie beyond the run's, or are rewritten by it)."""
    x = (torch.zeros(size, chunk, dtype=torch.long, device=device) if stage.first
         else torch.zeros(size, chunk, hidden, dtype=dtype, device=device))
    with PeakTracker() as tracker:
        stage(x, rows, seq - chunk)
    return tracker.peak


def _passes(prompt_len: int, steps: int, chunk: int) -> list[tuple[int, int]]:
    """(position, tokens) of every pass: the prompt in chunks, then one token per decode step."""
    prefill = [(start, min(chunk, prompt_len - start)) for start in range(0, prompt_len, chunk)]
    return prefill + [(prompt_len + step - 1, 1) for step in range(1, steps)]


def _pipeline(args: argparse.Namespace, place: Place, stage: Any, rows: list[Any], buffers: list[torch.Tensor],
              prompt: torch.Tensor, size: int, chunk: int, clock: Clock) -> dict[str, Any]:
    device, micro, steps = prompt.device, len(rows), args.new_tokens
    passes = _passes(args.prompt_len, steps, chunk)
    prefill_passes = len(passes) - (steps - 1)
    tokens = torch.zeros(micro * size, steps, dtype=torch.long, device=device)
    logits = torch.zeros(0)
    token_times: list[list[float]] = [[] for _ in range(micro)]
    trace = Recorder(lambda: (clock.compute, clock.wait, clock.send))
    inbox = Inbox(buffers, _messages(passes, prefill_passes, micro, size, stage), _source(place), clock.timed, trace)
    outbox = Outbox(micro, 0 if place.following is None else place.following, clock.timed, trace)
    _barrier(clock.progress)
    start = time.perf_counter()
    prefill_done = 0.0
    for index, (position, length) in enumerate(passes):
        step = max(0, index - prefill_passes + 1)           # the token this pass produces (0: from the prompt)
        emits = index >= prefill_passes - 1
        trace.begin()
        for m in range(micro):
            rows_m = slice(m * size, (m + 1) * size)
            received = not (stage.first and step == 0)
            x = _input(clock, place, inbox, tokens[rows_m, step - 1]) if received else \
                prompt[rows_m, position:position + length]
            out = clock.timed("compute", stage, x.unsqueeze(1) if stage.first and received else x, rows[m], position)
            if received:
                # A stage that passed its input on (a DTensor output is a group's own): the buffer is reused next.
                if type(out) is torch.Tensor and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                    out = out.clone()
                inbox.done()
            if not place.leader:
                continue
            if not stage.last:
                outbox.send(m, out)
            elif emits:
                chosen = out.argmax(dim=-1)
                tokens[rows_m, step] = chosen
                token_times[m].append(time.perf_counter() - start)
                if step == steps - 1:
                    logits = out if m == 0 else torch.cat((logits, out))
                elif place.stages > 1:
                    outbox.send(m, chosen)
        trace.end()
        if index == prefill_passes - 1:
            prefill_done = time.perf_counter() - start
            _inject_fault(place.rank)
    outbox.finish()
    _barrier(clock.progress)
    total = time.perf_counter() - start
    return {"tokens": tokens, "logits": logits, "timing": {
        "compute_s": clock.compute, "wait_s": clock.wait, "send_s": clock.send, "total_s": total,
        "prefill_s": prefill_done, "prefill_chunk": chunk, "token_times": token_times, "trace": trace.to_dict()}}


def _barrier(progress: Progress) -> None:
    progress.mark(b"w")
    dist.barrier()
    progress.mark(b"r")


def _messages(passes: list[tuple[int, int]], prefill_passes: int, micro: int, size: int, stage: Any
              ) -> list[tuple[int, ...]]:
    """The shape of every input this rank takes from its inbox, in order: the first stage a token per sequence
    each decode pass after the first token; the others each pass's hidden state."""
    if stage.first:
        return [(size,)] * (micro * (len(passes) - prefill_passes))
    return [(size, length, stage.hidden) for _, length in passes for _ in range(micro)]


def _source(place: Place) -> int | None:
    """Whom this rank receives from point to point: a leader from the stage before (the first stage's leader
    from the last stage); nobody on one stage, or off the leader (its group broadcasts)."""
    if not place.leader or place.stages == 1:
        return None
    return place.last_leader if place.previous is None else place.previous


def _input(clock: Clock, place: Place, inbox: Inbox, local: torch.Tensor) -> torch.Tensor:
    """The stage's next input: received (posted ahead), or on one stage the first stage's own token; then
    broadcast by the leader to its group."""
    buffer = inbox.take()
    if place.leader and place.stages == 1:
        buffer.copy_(local)
    if place.group is not None:
        clock.timed("wait", dist.broadcast, buffer, place.part.card, place.group)
    return buffer


def _inject_fault(rank: int) -> None:
    """Testing hook (CACHEFIT_INJECT_FAULT=RANK:kill|raise|hang): fail or stall this rank after its prefill."""
    target, _, how = os.environ.get(FAULT_VARIABLE, "").partition(":")
    if target == str(rank):
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "hang":
            time.sleep(3600)
        if how == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        raise RuntimeError(f"injected fault on rank {rank}")


if __name__ == "__main__":
    main(sys.argv[1:])
