"""``cachefit run``: start one process per card with PyTorch's launcher, watch it, gather and check the results."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachefit.core.errors import InputError, RunError
from cachefit.core.records import Plan, RunSummary
from cachefit.runtime.hf_checkpoint import check_runnable
from cachefit.runtime.idle import spare_cores
from cachefit.runtime.manifest import Manifest, read_hf_config_copy, verify_card
from cachefit.runtime.summary import summarise

if TYPE_CHECKING:
    import torch

__all__ = ["INIT_VARIABLE", "RunOptions", "RunResult", "run_plan", "torchrun_command", "worker_command"]

INIT_VARIABLE = "CACHEFIT_INIT_METHOD"   # how a rank started here meets its peers (a file store: no port)
PROGRESS_VARIABLE = "CACHEFIT_PROGRESS_DIR"   # where ranks mark their progress (worker.Progress)


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
    prompt: torch.Tensor | None = None       # the prompt token ids every rank used (batch x prompt_len)


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
    plan.check_in_layer_order("run")
    manifest = Manifest.read(Path(weights))
    if plan.model.phase != "decode":
        raise InputError(f"a run generates tokens, which needs the KV cache a decode plan counts; this plan is for "
                         f"{plan.model.phase}: re-plan with phase='decode'", parameters=("phase",))
    if manifest.source == "hf":
        _check_hf_run(plan)
        check_runnable(read_hf_config_copy(weights, manifest))
    else:
        _check_reference_run(plan)
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
    for card in range(plan.cards):
        verify_card(weights, card, plan)


def _check_reference_run(plan: Plan) -> None:
    measured = plan.model.spec is not None and plan.model.spec.measured
    if plan.memory_model != "pipeline" or not measured:
        raise InputError(f"a run holds what a 'pipeline' plan of the measured reference module counts (its "
                         f"receive buffers, its real transients); this plan is '{plan.memory_model}'"
                         f"{'' if measured else ' of closed-form sizes'}: re-plan {plan.model.name} with measure "
                         "and memory_model='pipeline'", parameters=("measure", "memory_model"))
    if plan.model.spec is None or not getattr(plan.model.spec.spec, "vocab", 0):
        raise InputError(f"{plan.model.name} has no vocabulary (embedding and head): a run generates tokens")


def _check_hf_run(plan: Plan) -> None:
    """A Hugging Face profile is measured (on meta, as its kernels run); a run holds what 'pipeline' counts."""
    if plan.memory_model != "pipeline":
        raise InputError(f"a run holds what a 'pipeline' plan counts (its receive buffers); this plan is "
                         f"'{plan.memory_model}': re-plan {plan.model.name} with memory_model='pipeline'",
                         parameters=("memory_model",))


def run_plan(plan_file: str, weights: str, options: RunOptions,
             progress: Callable[[float], None] | None = None) -> RunResult:
    """Run a plan on this host: one process per card, started here and watched (torchrun is for several hosts)."""
    if options.nnodes > 1:
        raise InputError(f"nnodes={options.nnodes}: a run across hosts starts on each host with the command "
                         "print_torchrun gives (torchrun_command); this starts single-host runs",
                         parameters=("nnodes", "print_torchrun"))
    plan = Plan.read(plan_file)
    check_run(plan, weights, options)
    # The ranks start before this process imports torch (1.3-1.7 s here), which it needs only for their outputs:
    # a thread imports it while they run where a core is left to it; otherwise after them (runtime/idle.py).
    importing = threading.Thread(target=importlib.import_module, args=("safetensors.torch",), daemon=True)
    overlap = importing.start if spare_cores(plan.cards, options.threads) > 0 else lambda: None
    with tempfile.TemporaryDirectory(prefix="cachefit-run-") as out, _progress_folder() as marks:
        command = worker_command(str(Path(plan_file).resolve()), str(Path(weights).resolve()), out, options)
        log = _launch(command, Path(out), Path(marks), plan.cards, options, progress, overlap)
        ranks = [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(plan.cards)]
        from safetensors.torch import load_file

        outputs = load_file(str(Path(out, "outputs.safetensors")))
    summary = summarise(ranks, int(plan.model.batch or 1), options.prompt_len, options.new_tokens)
    result = RunResult(ranks, outputs["tokens"], outputs["logits"], log=log, summary=summary,
                       prompt=outputs["prompt"])
    if options.check:
        from cachefit.runtime.check import reference_check

        result.checked = reference_check(plan, weights, options, result)
    return result


def worker_command(plan_file: str, weights: str, out: str, options: RunOptions) -> list[str]:
    """One rank's command line (its rank and the store come in its environment)."""
    return [sys.executable, "-m", "cachefit.runtime.worker", "--plan", plan_file, "--weights", weights,
            "--out", out, "--prompt-len", str(options.prompt_len), "--new-tokens", str(options.new_tokens),
            "--micro-batches", str(options.micro_batches), "--seed", str(options.seed),
            "--timeout", str(options.timeout), "--threads", str(options.threads)]


def _progress_folder() -> tempfile.TemporaryDirectory[str]:
    """Memory-backed where the host has it (/dev/shm): a rank's mark then never waits on a disk's writeback of
    the page it writes (marks on a disk-backed file made decode steps jitter by milliseconds here)."""
    shm = Path("/dev/shm")
    memory = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix="cachefit-progress-", dir=memory)


def _spawn(command: list[str], out: Path, marks: Path, cards: int, options: RunOptions
           ) -> list[subprocess.Popen[bytes]]:
    """Every rank, each in a session of its own, ending with this launcher. The ranks meet through a file store
    in the run's folder and talk over loopback only (gloo bound to ``lo``): nothing listens beyond this host."""
    base = {**os.environ, "OMP_NUM_THREADS": str(options.threads), "GLOO_SOCKET_IFNAME": "lo",
            "WORLD_SIZE": str(cards), "LOCAL_WORLD_SIZE": str(cards), INIT_VARIABLE: f"file://{out / 'store'}",
            PROGRESS_VARIABLE: str(marks)}
    log = (out / "log.txt").open("ab")
    try:
        return [subprocess.Popen(command, env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_end_with_parent)
                for rank in range(cards)]
    finally:
        log.close()


def _launch(command: list[str], out: Path, marks: Path, cards: int, options: RunOptions,
            progress: Callable[[float], None] | None, started_ranks: Callable[[], None] = lambda: None) -> str:
    """Start every rank and watch them: a rank that fails, or makes no progress for the timeout (hung or
    stopped), ends the whole job, and the error names it. ``started_ranks`` is called once they are started."""
    # Ctrl-C (and SIGTERM, SIGHUP: a closed terminal) must stop the run and remove its folder, even where SIGINT
    # came in ignored, as it does for background jobs of non-interactive shells: Python installs no
    # KeyboardInterrupt handler then.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes = _spawn(command, out, marks, cards, options)
        started_ranks()
        started = time.time()
        while any(process.poll() is None for process in processes):
            if progress is not None:
                progress(time.monotonic())
            culprit = _culprit(processes, out, marks, options.timeout, started)
            if culprit is not None:
                _stop(processes)
                raise RunError(culprit)
            time.sleep(0.1)
        culprit = _culprit(processes, out, marks, options.timeout, started)
        if culprit is not None:
            raise RunError(culprit)
    except BaseException:
        _stop(processes)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return (out / "log.txt").read_text(errors="replace")


STARTUP_S = 60.0     # before a rank first reports: the interpreter, torch, its shard (on a loaded host)


def _culprit(processes: list[subprocess.Popen[bytes]], out: Path, marks: Path, timeout: float, started: float
             ) -> str | None:
    """Why the run must end, naming the rank, or None while it goes on: a rank that made no progress for the
    timeout while not waiting for a peer (it hung or was stopped; its peers, waiting for it, are bystanders),
    else the first rank that failed."""
    now, stalled = time.time(), []
    states = {rank: _progress(marks, rank) for rank, process in enumerate(processes) if process.poll() is None}
    # A rank is stuck when it has not moved for the timeout while a peer waits for it (its peers' receives would
    # time out next), or for ten timeouts with nobody waiting (one long pass is not a hang).
    waited_on = any(state == "w" for state, _ in states.values())
    for rank, (state, since) in states.items():
        quiet = now - (since if since is not None else started)
        limit = (timeout if waited_on else 10 * timeout) + (STARTUP_S if since is None else 0.0)
        if state not in ("w", "d") and quiet > limit:
            stalled.append((quiet, rank))
    if stalled:
        quiet, rank = max(stalled)
        return f"rank {rank} failed: made no progress for {quiet:.0f} s (hung or stopped); stopped the run"
    failed = [(rank, code) for rank, process in enumerate(processes) if (code := process.returncode)]
    return None if not failed else _failure(out, *min(failed, key=lambda item: _failure_order(out, *item)))


def _progress(out: Path, rank: int) -> tuple[str | None, float | None]:
    """A rank's last state (worker.Progress: ``r`` running, ``w`` waiting for a peer, ``d`` done) and since when;
    (None, None) before it first reports."""
    try:
        data = (out / f"progress-rank{rank}").read_bytes()
    except OSError:
        return None, None
    if len(data) < 16 or data[0] == 0:
        return None, None
    return chr(data[0]), struct.unpack("<d", data[8:16])[0]


def _failure_order(out: Path, rank: int, code: int) -> tuple[int, float]:
    """Killed ranks first (their peers then fail on a reset connection), then by when each wrote its error."""
    error = out / f"error-rank{rank}.txt"
    return (0 if code < 0 else 1, error.stat().st_mtime if error.exists() else float("inf"))


def _failure(out: Path, rank: int, code: int) -> str:
    """How rank ``rank`` failed: its own error when it wrote one; a killed rank writes nothing."""
    own = out / f"error-rank{rank}.txt"
    if own.exists():
        return f"rank {rank} failed: {own.read_text().strip()}"
    how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return f"rank {rank} failed: {how}"


PR_SET_PDEATHSIG = 1     # linux/prctl.h
# Looked up now: after fork, the child may only call what needs no lock another thread could hold (no imports).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _end_with_parent() -> None:
    """In each rank, before it starts: SIGKILL when this launcher dies, however it dies (SIGKILL included)
    (Linux prctl PR_SET_PDEATHSIG; elsewhere, and for torchrun's ranks, worker.watch_parent ends them)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGCONT and SIGTERM every rank still running (each leads a session of its own), then SIGKILL what is left;
    return only when all are gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            if process.poll() is None:
                for each in (signal.SIGCONT, sig):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, each)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(process.poll() is None for process in processes):
            time.sleep(0.05)
    for process in processes:
        process.wait()
