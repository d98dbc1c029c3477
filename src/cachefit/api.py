"""The Python API: one function per verb, with arguments as users write them (SIZE strings, device names). The CLI
is a thin layer over it. Each function refuses a combination it would otherwise ignore (InputError naming it).

    profile(model, **model options) -> LayerTable       plan(model, capacity | device, ...) -> Plan
    predict(plan, device=...) -> (Prediction, baseline)  export(plan, target) -> str
    shard(plan, checkpoint, out) -> Manifest             run(plan_file, weights, RunOptions) -> RunResult
    verify(model, **workload) -> Verification            (a Hugging Face profile against a real forward)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cachefit.core.cost import Rates, layer_costs, rates_of
from cachefit.core.errors import InputError
from cachefit.core.hardware import Device, get_device, load_devices
from cachefit.core.layers import LayerTable
from cachefit.core.memory import MemoryModel
from cachefit.core.records import DeviceRecord, Objective, Plan, Strategy, Verification
from cachefit.core.spec import family_of
from cachefit.core.units import parse_size, parse_sizes
from cachefit.output.export import Target, export_plan
from cachefit.perf.predict import Prediction, predict_plan
from cachefit.planning import (
    NOTES,
    Peer,
    Settings,
    for_peer,
    make_baseline_plan,
    make_plan,
    make_split_plan,
    make_time_plan,
    on_original_layers,
    parse_baseline,
)
from cachefit.sources import is_hf_model, load_model, plan_table, verify_model

if TYPE_CHECKING:
    from cachefit.runtime.launch import RunOptions, RunResult
    from cachefit.runtime.manifest import Manifest

__all__ = ["SPLITS", "Objective", "SplitMode", "devices", "export", "largest_micro_batch", "load_model",
           "one_card", "parse_baseline", "plan", "predict", "profile", "run", "shard", "torchrun_command", "verify"]

Capacity = int | str | Sequence[int | str]
SplitMode = Literal["auto", "never", "always"]
SPLITS: tuple[SplitMode, ...] = ("auto", "never", "always")
Baseline = str | tuple[int, int]


def devices(devices_file: str | Path | None = None) -> dict[str, Device]:
    """The device catalog (bundled, plus ``devices_file``'s additions and overrides)."""
    return load_devices(devices_file)


def profile(model: str | Path, **model_options: Any) -> LayerTable:
    """Any MODEL the CLI takes, as a layer table (``model_options``: batch, seq, phase, dtype, attention,
    input_bytes, torch_options)."""
    return load_model(model, **model_options)


def plan(model: LayerTable | str | Path, capacity: Capacity | None = None, *, device: str | None = None,
         cards: int | None = None, memory_model: MemoryModel = "peak", strategy: Strategy = "balanced",
         split: SplitMode = "auto", baseline: Baseline | None = None, objective: Objective = "memory",
         micro_batches: int = 1, devices_file: str | Path | None = None, peer: Peer | None = None,
         **model_options: Any) -> Plan:
    """Plan ``model`` (a LayerTable or any MODEL the CLI takes) onto cards of ``capacity`` (bytes, a SIZE string,
    or one per card) or of a catalog ``device``'s usable on-chip capacity.

    ``split``: whether stages may be tensor groups (several cards sharing each layer): ``never``; ``auto`` only
    when whole layers cannot fit; ``always`` (the fewest cards over every width). ``baseline`` ("tp=8,pp=2"):
    the classic layout instead, built whether or not it fits. ``objective="time"``: the least slowest predicted
    stage (per pass of 1/``micro_batches`` of the batch) on ``device``'s figures, every card within ``capacity``
    (default: the device's). ``peer="vllm"``: every stage holds a decoder layer, as vLLM needs (the plan is
    optimal under that constraint)."""
    _check_plan_options(split, baseline, objective, strategy, cards, micro_batches)
    table = _table(model, model_options)
    if peer is not None:
        if baseline is not None:
            raise InputError("baseline fixes the stages itself; drop peer (or the baseline)",
                             parameters=("baseline", "peer"))
        units = for_peer(table, peer, memory_model)
        if cards is not None and cards > len(units.members):
            raise InputError(f"cards ({cards}) must not exceed the {len(units.members)} units a plan for {peer} "
                             "keeps apart (vllm: the decoder layers)", parameters=("cards", "peer"))
        made = plan(units.table, capacity, device=device, cards=cards, memory_model=memory_model, strategy=strategy,
                    split=split, objective=objective, micro_batches=micro_batches, devices_file=devices_file)
        settings = Settings(made.layout, made.objective, made.strategy, made.memory_model, made.device)
        return replace(on_original_layers(made, units, table, settings, NOTES[peer]), peer=peer)
    catalog = load_devices(devices_file)
    if objective == "time":
        return _time_plan(table, capacity, device, cards, memory_model, micro_batches, catalog, _family(table, model))
    capacities, record = _capacities(capacity, device, catalog)
    if baseline is not None or split == "always":
        _check_single_capacity(capacities, strategy, "baseline" if baseline is not None else "split='always'")
    if baseline is not None:
        ways, stages = _baseline_shape(baseline)
        if cards is not None and cards != ways * stages:
            raise InputError(f"cards ({cards}) is fixed by baseline tp={ways},pp={stages} to {ways * stages}: leave "
                             "cards out", parameters=("cards", "baseline"))
        return make_baseline_plan(table, capacities[0], ways, stages, memory_model, record)
    if split == "always":
        return make_split_plan(table, capacities[0], cards, memory_model, record)
    larger = sorted(((d.name, d.capacity_bytes) for d in catalog.values()), key=lambda item: item[1])
    whole = make_plan(table, capacities, cards, memory_model, strategy, record, larger)
    if (whole.feasible or split == "never" or table.split_ways == (1,) or len(capacities) > 1
            or strategy != "balanced"):
        return _one_card_note(whole, get_device(device, catalog) if device else None, devices_file)
    grouped = make_split_plan(table, capacities[0], cards, memory_model, record)
    if grouped.feasible:
        return replace(grouped, diagnosis=("whole layers do not fit, so some stages are tensor groups",
                                           *grouped.diagnosis))
    return replace(grouped, diagnosis=(*whole.diagnosis, "with tensor groups (layers split across cards):",
                                       *grouped.diagnosis))


def verify(model: str | Path, verify_limit: int | str = "4GiB", **workload: Any) -> Verification:
    """MODEL's profile (a Hugging Face config) checked against a real forward on this host: per layer, the
    estimated activation + workspace beside the measured one (``workload``: batch, seq, phase, dtype)."""
    try:
        limit = parse_size(verify_limit, "verify_limit")
    except InputError as error:
        raise InputError(str(error), parameters=("verify_limit",)) from error
    return verify_model(model, limit, **workload)


def _table(model: LayerTable | str | Path, model_options: dict[str, Any]) -> LayerTable:
    if not isinstance(model, LayerTable):
        return load_model(model, **model_options)
    if model_options:
        raise InputError(f"{', '.join(sorted(model_options))}: a LayerTable has fixed sizes; these model options "
                         "apply to presets, specs and models (pass the MODEL itself)",
                         parameters=tuple(model_options))
    return model


def _check_plan_options(split: str, baseline: Baseline | None, objective: str, strategy: str, cards: int | None,
                        micro_batches: int) -> None:
    """The combinations a planner would ignore, refused by name."""
    if objective not in ("memory", "time"):
        raise InputError(f"objective must be 'memory' or 'time', got {objective!r}", parameters=("objective",))
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}", parameters=("split",))
    if objective == "time":
        ignored = [name for name, given in (("baseline", baseline is not None), ("strategy", strategy != "balanced"),
                                            ("split", split != "auto")) if given]
        if ignored:
            raise InputError(f"objective='time' plans whole layers by predicted time; it has no {', '.join(ignored)}"
                             f": drop {' and '.join(ignored)}", parameters=("objective", *ignored))
    elif micro_batches != 1:
        raise InputError("micro_batches applies to objective='time' (the passes it predicts); plan a smaller batch "
                         "instead", parameters=("micro_batches", "objective", "batch"))
    if baseline is not None and split != "auto":
        raise InputError(f"baseline splits every layer tp ways itself; drop split={split!r}",
                         parameters=("baseline", "split"))


def _time_plan(table: LayerTable, capacity: Capacity | None, device: str | None, cards: int | None,
               memory_model: MemoryModel, micro_batches: int, catalog: dict[str, Device], family: str | None
               ) -> Plan:
    if device is None:
        raise InputError("objective='time' predicts stage times from a device's figures: give device (and "
                         "capacity to plan for another capacity than the device's)",
                         parameters=("objective", "device", "capacity"))
    chosen = get_device(device, catalog)
    limits = [chosen.capacity_bytes] if capacity is None else _parse_capacity(capacity)
    if len(limits) != 1:
        raise InputError("objective='time' plans same-size cards: give one capacity",
                         parameters=("objective", "capacity"))
    if micro_batches < 1:
        raise InputError(f"micro_batches must be at least 1, got {micro_batches}", parameters=("micro_batches",))
    rates = rates_of(chosen, table.dtype, chosen.capacity_bytes, family)
    return make_time_plan(table, limits[0], layer_costs(table, rates, 1.0 / micro_batches), cards, memory_model,
                          DeviceRecord.of(chosen))


def largest_micro_batch(model: str | Path, capacity: Capacity | None = None, **arguments: Any
                        ) -> tuple[int, Plan] | None:
    """The largest batch (sequences per pass, at most the model's) at which :func:`plan` finds a feasible plan,
    and that plan; None when even one sequence does not fit. Footprints grow with the batch, so bisection is
    exact. ``arguments``: those of :func:`plan`, model options included."""
    if isinstance(model, LayerTable):
        raise InputError("micro_batch='auto' re-sizes the model, so it needs a preset, spec, HF config or module, "
                         "not a layer table", parameters=("micro_batch",))
    if arguments.get("baseline") is not None:
        raise InputError("micro_batch='auto' searches for a plan; a baseline is built as given: give batch",
                         parameters=("micro_batch", "baseline", "batch"))
    batch = arguments.pop("batch", None) or load_model(model, **_model_only(arguments)).batch or 1
    found: tuple[int, Plan] | None = None
    low, high = 0, batch                     # low fits (0: none known), everything above high is unknown
    while low < high:
        middle = (low + high + 1) // 2
        attempt = plan(model, capacity, batch=middle, **arguments)
        if attempt.feasible:
            low, found = middle, (middle, attempt)
        else:
            high = middle - 1
    return found


def _model_only(arguments: dict[str, Any]) -> dict[str, Any]:
    keys = ("seq", "phase", "dtype", "attention", "input_bytes", "torch_options")
    return {key: arguments[key] for key in keys if key in arguments}


def _capacities(capacity: Capacity | None, device: str | None, catalog: dict[str, Device]
                ) -> tuple[list[int], DeviceRecord | None]:
    if (capacity is None) == (device is None):
        raise InputError("give exactly one of capacity (e.g. '50MiB' or a list, one per card) and device",
                         parameters=("capacity", "device"))
    if device is not None:
        chosen = get_device(device, catalog)
        return [chosen.capacity_bytes], DeviceRecord.of(chosen)
    assert capacity is not None
    return _parse_capacity(capacity), None


def _parse_capacity(capacity: Capacity) -> list[int]:
    return parse_sizes(capacity if not isinstance(capacity, Sequence) or isinstance(capacity, str)
                       else list(capacity), "capacity")


def _baseline_shape(baseline: Baseline) -> tuple[int, int]:
    """(tensor parallel, pipeline stages) of ``tp=T,pp=P`` or of a pair."""
    return parse_baseline(baseline) if isinstance(baseline, str) else baseline


def _check_single_capacity(capacities: list[int], strategy: str, what: str) -> None:
    if len(capacities) > 1:
        raise InputError(f"{what} plans tensor groups of same-size cards: give one capacity, not {len(capacities)}",
                         parameters=("capacity", "baseline", "split"))
    if strategy != "balanced":
        raise InputError(f"{what} has no greedy strategy: drop strategy={strategy!r}",
                         parameters=("strategy", "baseline", "split"))


def predict(plan_or_file: Plan | str | Path, *, device: str | None = None, micro_batches: int = 1,
            prompt_len: int | None = None, chunk: int | None = None, baseline: Baseline | None = None,
            devices_file: str | Path | None = None, model: str | Path | None = None
            ) -> tuple[Prediction, Prediction | None]:
    """Predicted speed of a plan (and of the ``baseline`` tp=T,pp=P layout of the same model on the same cards)
    on ``device`` (default: the device the plan was made for). ``model``: for a plan made from a Hugging Face
    folder or config or a layer table file, that model (checked against the plan's fingerprint); a plan made from
    a preset or spec rebuilds its table from the spec it keeps."""
    plan = plan_or_file if isinstance(plan_or_file, Plan) else Plan.read(plan_or_file)
    table, rates, chunk = _prediction_inputs(plan, device, chunk, devices_file, model)
    ours = predict_plan(plan, table, rates, micro_batches, prompt_len, chunk)
    if baseline is None:
        return ours, None
    classic = make_baseline_plan(table, rates.capacity_bytes, *_baseline_shape(baseline), plan.memory_model)
    return ours, predict_plan(classic, table, rates, micro_batches, prompt_len, chunk)


def _prediction_inputs(plan: Plan, device: str | None, chunk: int | None, devices_file: str | Path | None,
                       model: str | Path | None = None) -> tuple[LayerTable, Rates, int]:
    """What predicting ``plan`` reads: its model's table, the device's rates, the prompt chunk."""
    plan.check_in_layer_order("predict")
    name = device or (plan.device.name if plan.device else None)
    if name is None:
        raise InputError("this plan names no device (it was planned with a capacity): give device, e.g. a "
                         "calibrated host (cachefit calibrate)", parameters=("device",))
    chosen = get_device(name, load_devices(devices_file))
    # On another device than the plan's, residency is judged against that device's capacity.
    capacity = chosen.capacity_bytes if device is not None else plan.capacity_bytes[0]
    table = plan_table(plan.model, model)
    rates = rates_of(chosen, plan.model.dtype, capacity, _family(table, model))
    return table, rates, chunk or plan.model.chunk


def one_card(plan_or_file: Plan | str | Path, *, device: str | None = None, prompt_len: int | None = None,
             chunk: int | None = None, devices_file: str | Path | None = None, model: str | Path | None = None
             ) -> Prediction | None:
    """The plan's model on one card of the same device, at its best decode over the micro-batch counts that
    divide the batch (each one re-reads the weights, so usually one): what a split must beat. Where per-pass and
    per-hop fixed costs outweigh what each card saves (small models), it is faster than any split. None where one
    card cannot run the model: it does not fit on-chip and the device has no off-chip memory to stream from."""
    plan = plan_or_file if isinstance(plan_or_file, Plan) else Plan.read(plan_or_file)
    return _one_card(plan, *_prediction_inputs(plan, device, chunk, devices_file, model), prompt_len)


def _one_card(plan: Plan, table: LayerTable, rates: Rates, chunk: int, prompt_len: int | None) -> Prediction | None:
    # Planned on an unbounded card to get its one stage; the rates judge it resident or streaming on the real one.
    whole = make_plan(table, [1 << 62], cards=1, memory_model=plan.memory_model)
    if rates.off_chip_bandwidth is None and whole.bottleneck_bytes > rates.capacity_bytes:
        return None
    alone = replace(whole, model=plan.model, device=plan.device, capacity_bytes=(rates.capacity_bytes,),
                    feasible=whole.bottleneck_bytes <= rates.capacity_bytes)
    return _best_decode(alone, table, rates, prompt_len, chunk)


def _best_decode(plan: Plan, table: LayerTable, rates: Rates, prompt_len: int | None, chunk: int) -> Prediction:
    batch = int(plan.model.batch or 1)
    speeds = [predict_plan(plan, table, rates, m, prompt_len, chunk) for m in range(1, batch + 1) if batch % m == 0]
    return max(speeds, key=lambda p: p.decode_tokens_per_s)


def _one_card_note(made: Plan, device: Device | None, devices_file: str | Path | None) -> Plan:
    """On a device whose fixed costs are measured (a calibrated host), a split that decodes slower than one card
    at its best says so: below that model size, one card is faster."""
    if (device is None or device.figure("pass_seconds") is None or not made.feasible or made.cards < 2
            or made.model.spec is None or made.layout != "whole"):
        return made
    table, rates, chunk = _prediction_inputs(made, None, None, devices_file)
    alone = _one_card(made, table, rates, chunk, None)
    split = _best_decode(made, table, rates, None, chunk)
    if alone is None or split.decode_tokens_per_s >= alone.decode_tokens_per_s:
        return made
    note = (f"one card is faster here: predicted {alone.decode_tokens_per_s:,.0f} decode tokens/s on one "
            f"{device.name} against {split.decode_tokens_per_s:,.0f} on these {made.cards} (at their best "
            "micro-batch counts): each card's saving is less than the fixed costs of its passes and hops")
    return replace(made, diagnosis=(*made.diagnosis, note))


def _family(table: LayerTable, model: LayerTable | str | Path | None) -> str | None:
    """The family whose blocks' fixed cost a calibrated host lists: a reference spec's (dense, llama), or ``hf``
    for a model profiled from a Hugging Face config (transformers' own modules run it); None for the rest."""
    if table.spec is not None:
        return family_of(table.spec.spec)
    return "hf" if model is not None and not isinstance(model, LayerTable) and is_hf_model(model) else None


def export(plan_or_file: Plan | str | Path, target: Target) -> str:
    """The plan in a peer's format: accelerate's device_map, torchtitan's module FQNs per stage, vLLM's layers."""
    plan = plan_or_file if isinstance(plan_or_file, Plan) else Plan.read(plan_or_file)
    return export_plan(plan, target)


def shard(plan_or_file: Plan | str | Path, checkpoint: str | Path, out: str | Path,
          progress: Callable[[int, int], None] | None = None) -> Manifest:
    """One safetensors file per card of the plan, holding only that card's tensors, and the manifest.
    ``checkpoint``: a cachefit checkpoint (init-weights) or a Hugging Face folder the plan was made from;
    ``progress(done, total)``: tensors read so far (Hugging Face folders)."""
    from cachefit.runtime.shard import shard_checkpoint

    plan = plan_or_file if isinstance(plan_or_file, Plan) else Plan.read(plan_or_file)
    return shard_checkpoint(plan, checkpoint, out, progress)


def run(plan_file: str | Path, weights: str | Path, options: RunOptions | None = None,
        progress: Callable[[float], None] | None = None) -> RunResult:
    """Run a plan: one process per card (torch.distributed), checked against the unpartitioned model when
    ``options.check``; raises RunError naming the rank when one fails."""
    from cachefit.runtime.launch import RunOptions, run_plan

    return run_plan(str(plan_file), str(weights), options or RunOptions(), progress)


def torchrun_command(plan_file: str | Path, weights: str | Path, options: RunOptions) -> list[str]:
    """The torchrun command to start on each host of a multi-host run (with --node-rank N)."""
    from cachefit.runtime.launch import check_run
    from cachefit.runtime.launch import torchrun_command as command

    plan = Plan.read(plan_file)
    check_run(plan, weights, options)
    return command(str(plan_file), str(weights), "OUT_DIR", options, plan.cards)
