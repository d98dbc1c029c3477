"""``cachefit run``: start one process per card with PyTorch's launcher, watch it, gather and check the results."""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file

from cachefit.core.errors import InputError, RunError
from cachefit.core.records import Plan, RunSummary
from cachefit.runtime.shard import Manifest, read_card, verify_card
from cachefit.runtime.summary import summarise
from cachefit.runtime.weights import plan_spec

__all__ = ["RunOptions", "RunResult", "run_plan", "torchrun_command"]


@dataclass(frozen=True, slots=True)
class RunOptions:
    prompt_len: int = 16
    new_tokens: int = 8
    micro_batches: int = 2
    seed: int = 0
    threads: int = 1
    timeout: float = 30.0
    check: bool = False
    nnodes: int = 1
    rdzv_endpoint: str | None = None

    def __post_init__(self) -> None:
        """Refused here, before any process starts."""
        counts = {"prompt_len": self.prompt_len, "new_tokens": self.new_tokens, "micro_batches": self.micro_batches,
                  "nnodes": self.nnodes, "threads": self.threads}
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}", parameters=(name,))
        if self.threads > MAX_THREADS:
            raise InputError(f"threads ({self.threads}) must be at most {MAX_THREADS} per rank",
                             parameters=("threads",))
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout)
                and 0 < self.timeout <= MAX_TIMEOUT):
            raise InputError(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT}], got {self.timeout!r}",
                             parameters=("timeout",))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be an integer in [0, 2**63), got {self.seed!r}", parameters=("seed",))
        endpoint = _ENDPOINT.match(self.rdzv_endpoint or "")
        if self.rdzv_endpoint is not None and (endpoint is None or int(endpoint.group(2)) > 65535):
            raise InputError(f"rdzv_endpoint must be HOST:PORT (a port 1-65535), got {self.rdzv_endpoint!r}",
                             parameters=("rdzv_endpoint",))


MAX_THREADS, MAX_TIMEOUT = 1024, 86400.0
_ENDPOINT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):([1-9][0-9]{0,4})$")


@dataclass
class RunResult:
    ranks: list[dict[str, Any]]
    tokens: torch.Tensor
    logits: torch.Tensor
    checked: dict[str, Any] | None = None
    log: str = ""
    summary: RunSummary | None = None        # the measurements, from every rank's report


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def torchrun_command(plan_file: str, weights: str, out: str, options: RunOptions, cards: int) -> list[str]:
    """The torch.distributed.run command line; across hosts, run it on each with --node-rank set."""
    endpoint = options.rdzv_endpoint or f"127.0.0.1:{_free_port()}"
    per_node = cards // options.nnodes
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(options.nnodes),
            "--nproc-per-node", str(per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--max-restarts", "0", "--monitor-interval", "0.2", "-m", "cachefit.runtime.worker",
            "--plan", plan_file, "--weights", weights, "--out", out, "--prompt-len", str(options.prompt_len),
            "--new-tokens", str(options.new_tokens), "--micro-batches", str(options.micro_batches),
            "--seed", str(options.seed), "--timeout", str(options.timeout), "--threads", str(options.threads)]


def check_run(plan: Plan, weights: str | Path, options: RunOptions) -> None:
    """Everything that can be refused before a process starts: the plan, the sizes, every shard."""
    if not plan.partitions:
        raise InputError("the plan is not feasible: nothing to run")
    spec = plan_spec(plan.model)
    if plan.model.phase != "decode":
        raise InputError(f"a run generates tokens, which needs the KV cache a decode plan counts; this plan is for "
                         f"{plan.model.phase}: re-plan with phase='decode'", parameters=("phase",))
    measured = plan.model.spec is not None and plan.model.spec.measured
    if plan.memory_model != "pipeline" or not measured:
        raise InputError(f"a run holds what a 'pipeline' plan of the measured reference module counts (its "
                         f"receive buffers, its real transients); this plan is '{plan.memory_model}'"
                         f"{'' if measured else ' of closed-form sizes'}: re-plan {plan.model.name} with measure "
                         "and memory_model='pipeline'", parameters=("measure", "memory_model"))
    vocab = getattr(spec, "vocab", 0)
    if not vocab:
        raise InputError(f"{plan.model.name} has no vocabulary (embedding and head): a run generates tokens")
    batch, seq = int(plan.model.batch or 1), int(plan.model.seq or 0)
    if options.prompt_len + options.new_tokens > seq + 1:
        raise InputError(f"prompt ({options.prompt_len}) + new tokens ({options.new_tokens}) exceed the {seq} tokens "
                         "of KV cache the plan counted; plan with a larger seq or generate fewer",
                         parameters=("seq", "prompt_len", "new_tokens"))
    if options.micro_batches < 1 or batch % options.micro_batches:
        raise InputError(f"micro_batches ({options.micro_batches}) must divide the plan's batch ({batch})",
                         parameters=("micro_batches",))
    if options.nnodes < 1 or plan.cards % options.nnodes:
        raise InputError(f"nnodes ({options.nnodes}) must divide the plan's {plan.cards} cards",
                         parameters=("nnodes",))
    Manifest.read(Path(weights))
    for card in range(plan.cards):
        verify_card(weights, card, plan)


def run_plan(plan_file: str, weights: str, options: RunOptions,
             progress: Callable[[float], None] | None = None) -> RunResult:
    plan = Plan.read(plan_file)
    check_run(plan, weights, options)
    with tempfile.TemporaryDirectory(prefix="cachefit-run-") as out:
        command = torchrun_command(str(Path(plan_file).resolve()), str(Path(weights).resolve()), out, options,
                                   plan.cards)
        env = {**os.environ, "OMP_NUM_THREADS": str(options.threads), "GLOO_SOCKET_IFNAME": "lo"}
        log = _launch(command, env, plan, options, progress)
        ranks = [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(plan.cards)]
        outputs = load_file(str(Path(out, "outputs.safetensors")))
    summary = summarise(ranks, int(plan.model.batch or 1), options.prompt_len, options.new_tokens)
    result = RunResult(ranks, outputs["tokens"], outputs["logits"], log=log, summary=summary)
    if options.check:
        result.checked = reference_check(plan, weights, options, result)
    return result


def _launch(command: list[str], env: dict[str, str], plan: Plan, options: RunOptions,
            progress: Callable[[float], None] | None) -> str:
    """Run torchrun in its own process group; any failure ends the whole job, naming the rank and its error."""
    out = Path(command[command.index("--out") + 1])
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, preexec_fn=_end_with_parent)
    limit = time.monotonic() + options.timeout * 4 + 60
    # Ctrl-C (and SIGTERM) must stop the run even where SIGINT came in ignored, as it does for background jobs
    # of non-interactive shells: Python installs no KeyboardInterrupt handler then.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while process.poll() is None:
            if progress is not None:
                progress(time.monotonic())
            if time.monotonic() > limit:
                _stop(process)
                raise RunError(f"the run did not finish within {options.timeout * 4 + 60:.0f} s; stopped it")
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(process)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        _stop(process)                 # torchrun stopped its workers; make sure none is left before reporting
        raise RunError(_failure(out, log, process.returncode))
    return log


PR_SET_PDEATHSIG = 1     # linux/prctl.h
# Looked up now: after fork, the child may only call what needs no lock another thread could hold (no imports).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _end_with_parent() -> None:
    """In torchrun's process, before it starts: SIGTERM when this launcher dies, however it dies (SIGKILL
    included), so torchrun stops its workers (Linux prctl PR_SET_PDEATHSIG; elsewhere the workers' own watch of
    their parent, worker.watch_parent, still ends them)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM torchrun and its workers, then SIGKILL what is left, and return only when all are gone. torchrun
    starts each worker in a session of its own, so they are found as its children (before it dies and they are
    re-parented) and signalled one by one."""
    processes = [process.pid, *_children(process.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            process.poll()
            if not [pid for pid in processes if _alive(pid, process)]:
                return
            time.sleep(0.05)
    process.wait()


def _children(parent: int) -> list[int]:
    """Process ids whose parent is ``parent`` (Linux /proc; none elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(entry.parent.name))
    return found


def _alive(pid: int, launched: subprocess.Popen[str]) -> bool:
    if pid == launched.pid:
        return launched.returncode is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().rsplit(")", 1)[1].split()[0] == "Z")   # a zombie is gone


def _failure(out: Path, log: str, code: int) -> str:
    """Which rank failed first and how: torchrun's root cause (the first observed failure), with that rank's
    own error when it wrote one; a killed rank writes nothing, and its peers only see a reset connection."""
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", log, re.S)
    if root:
        rank, exit_code = root.group(1), int(root.group(2))
        own = out / f"error-rank{rank}.txt"
        if own.exists():
            return f"rank {rank} failed: {own.read_text().strip()}"
        how = f"killed by signal {-exit_code}" if exit_code < 0 else f"exited with code {exit_code}"
        return f"rank {rank} failed: {how}"
    errors = sorted(out.glob("error-rank*.txt"))
    if errors:
        return f"{errors[0].stem.replace('error-rank', 'rank ')} failed: {errors[0].read_text().strip()}"
    tail = "\n".join(log.strip().splitlines()[-5:])
    return f"the run failed (launcher exit code {code}):\n{tail}"


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
