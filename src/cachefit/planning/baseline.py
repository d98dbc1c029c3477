"""The classic layout as a plan: P pipeline stages of equal layer counts, every layer split T ways (TP x PP).
Built as asked, whether or not it fits: ``feasible`` says whether every card holds its share on-chip (if not,
its weights stream from off-chip memory every pass)."""

from __future__ import annotations

from cachefit.core.errors import InputError
from cachefit.core.layers import LayerTable
from cachefit.core.memory import MemoryModel
from cachefit.core.records import DeviceRecord, Plan
from cachefit.core.units import format_size
from cachefit.planning.algorithms.split import split_lower_bound
from cachefit.planning.builder import Settings, Stage, build_plan
from cachefit.planning.groups import split_options

__all__ = ["baseline_stages", "make_baseline_plan", "parse_baseline"]


def parse_baseline(text: str) -> tuple[int, int]:
    """``tp=8,pp=2`` -> (8, 2)."""
    values: dict[str, int] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if (key.strip() not in ("tp", "pp") or not value.strip().isdigit() or int(value) < 1
                or key.strip() in values):
            raise InputError(f"baseline must look like tp=8,pp=2 (positive integers, each once), got {text!r}",
                             parameters=("baseline",))
        values[key.strip()] = int(value)
    return values.get("tp", 1), values.get("pp", 1)


def baseline_stages(layers: int, tensor_parallel: int, pipeline_stages: int) -> list[Stage]:
    """Equal layer counts per stage, the first ones one more when they do not divide."""
    if not 1 <= pipeline_stages <= layers:
        raise InputError(f"pp must be between 1 and the number of layers ({layers}), got {pipeline_stages}",
                         parameters=("baseline",))
    size, extra = divmod(layers, pipeline_stages)
    stages, first = [], 0
    for stage in range(pipeline_stages):
        last = first + size + (1 if stage < extra else 0) - 1
        stages.append(Stage(first, last, tensor_parallel))
        first = last + 1
    return stages


def make_baseline_plan(table: LayerTable, capacity: int, tensor_parallel: int, pipeline_stages: int,
                       memory_model: MemoryModel = "peak", device: DeviceRecord | None = None) -> Plan:
    """``pipeline_stages`` stages of equal layer counts, every layer split ``tensor_parallel`` ways."""
    stages = baseline_stages(len(table.layers), tensor_parallel, pipeline_stages)
    options = {option.ways: option for option in split_options(table, memory_model)}
    option = options.get(tensor_parallel)
    if option is None or not option.allowed.all():
        refused = [x.name for x in table.layers if x.split(tensor_parallel) is None]
        allowed = sorted(w for w, o in options.items() if o.allowed.all())
        raise InputError(f"tp={tensor_parallel} is not a split every layer allows ({', '.join(refused[:3])} do "
                         f"not); widths they all allow: {', '.join(map(str, allowed))}", parameters=("baseline",))
    cards = tensor_parallel * pipeline_stages
    bottleneck = max(option.cost.footprint(stage.first, stage.last) for stage in stages)
    verdict = (f"baseline tp={tensor_parallel} x pp={pipeline_stages} on {cards} cards: the fullest card "
               f"holds {format_size(bottleneck)}, {bottleneck / capacity:.2f}x its {format_size(capacity)} on-chip "
               "capacity: ")
    verdict += ("fits on-chip" if bottleneck <= capacity else
                "does not fit on-chip, so its weights stream from off-chip memory")
    settings = Settings("baseline", "memory", None, memory_model, device)
    return build_plan(table, settings, stages, (capacity,) * cards,
                      lower_bound=split_lower_bound(list(options.values()), cards), optimal=False,
                      notes=(verdict,))
