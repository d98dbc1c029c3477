"""``cachefit deployments``: published SRAM deployments, each planned and predicted by cachefit beside its figures
(docs/deployments.md and a plot).

The deployments and their published figures are data (``data/deployments.toml``, each figure with its kind and
source). For each one and each element type it lists, cachefit plans the model on the chip at the published
context (one sequence: figures per user), at block and at sublayer granularity, keeps the plan with fewer cards,
and predicts its decode speed with the device catalog's figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from cachefit import Prediction, api
from cachefit.core.errors import InputError
from cachefit.core.files import atomic_output, describe_validation_error, read_text
from cachefit.core.records import Plan
from cachefit.core.spec import ExpertSplit, is_decoder_block
from cachefit.sources import Granularity, TorchOptions

__all__ = ["Published", "Reproduced", "plot", "published_deployments", "reproduce", "reproduce_all"]

Kind = Literal["V", "M", "3P", "A"]
_GRANULARITIES: tuple[Granularity, ...] = ("block", "sublayer")


@dataclass(frozen=True, slots=True)
class Published:
    """One public deployment as published: the model and chip, and the figures, each with its kind and source."""

    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    device: Annotated[str, Field(min_length=1)]
    dtypes: Annotated[tuple[str, ...], Field(min_length=1)]
    seq: Annotated[int, Field(ge=1)]
    seq_kind: Kind
    precision: str
    tokens_per_s: Annotated[float, Field(gt=0)]
    tokens_per_s_kind: Kind
    tokens_per_s_source: Annotated[str, Field(min_length=1)]
    chips: Annotated[int, Field(ge=1)] | None = None
    chips_kind: Kind | None = None
    chips_source: str | None = None
    batch: Annotated[int, Field(ge=1)] = 1


_FILE = TypeAdapter(list[Published])


def published_deployments(path: Path | None = None) -> list[Published]:
    """The bundled deployments (``data/deployments.toml``), or those of a file in the same form."""
    source = str(path) if path else "data/deployments.toml"
    text = read_text(path, "deployments file") if path else (
        resources.files("cachefit").joinpath("data/deployments.toml").read_text(encoding="utf-8"))
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{source}: not valid TOML ({error})") from error
    if set(document) != {"deployment"}:
        raise InputError(f"{source}: expected only [[deployment]] tables, got {sorted(document)}")
    try:
        entries = _FILE.validate_python(document["deployment"], strict=False)
    except ValidationError as error:
        raise InputError(describe_validation_error(error, source)) from error
    for entry in entries:
        if entry.chips is not None and not (entry.chips_kind and entry.chips_source):
            raise InputError(f"{source}: {entry.name}: chips needs chips_kind and chips_source")
    return entries


@dataclass(frozen=True, slots=True)
class Reproduced:
    """cachefit's plan and prediction for a published deployment at one element type."""

    published: Published
    dtype: str
    granularity: str
    plan: Plan
    prediction: Prediction
    weight_bytes: int           # the whole model's weights at this element type
    decoder_layers: int
    expert_parallel: Plan | None = None     # mixtures of experts: the same with whole experts a card

    @property
    def capacity(self) -> int:
        return self.plan.capacity_bytes[0]

    @property
    def weight_cards(self) -> int:
        """Cards the weights alone need: every byte on some card, nothing else."""
        return math.ceil(self.weight_bytes / self.capacity)

    @property
    def card_ratio(self) -> float:
        return self.plan.cards / self.weight_cards

    @property
    def published_tpot_s(self) -> float:
        return self.published.batch / self.published.tokens_per_s

    @property
    def speed_ratio(self) -> float:
        """Predicted over published tokens/s per user."""
        return self.prediction.decode_tokens_per_s / self.published.tokens_per_s

    @property
    def unexplained_per_layer_s(self) -> float:
        """The published time per token the prediction leaves unexplained, per decoder layer (were it one fixed
        cost a layer)."""
        return (self.published_tpot_s - self.prediction.decode_tpot_s) / self.decoder_layers


def reproduce(entry: Published, dtype: str) -> Reproduced:
    """The plan with fewer cards of block and sublayer granularity (block on a tie), and its prediction."""
    options: dict[str, Any] = {"seq": entry.seq, "batch": entry.batch, "dtype": dtype, "phase": "decode",
                               "attention": "flash"}
    best = _fewest_cards(entry, options, "tensor")
    if best is None:
        raise InputError(f"{entry.name}: no feasible plan of {entry.model} on {entry.device} at {dtype}")
    table = api.load_model(entry.model, **options)
    prediction = api.predict(best[1])[0]
    spec = table.spec.spec if table.spec is not None else None
    decoders = spec.layers if spec is not None else sum(
        1 for layer in table.layers if any(is_decoder_block(m) for m in layer.modules))
    experts = getattr(spec, "experts", 0)
    whole_experts = _fewest_cards(entry, options, "parallel", feasible_only=False) if experts else None
    return Reproduced(entry, dtype, best[0], best[1], prediction, sum(x.weight_bytes for x in table.layers),
                      decoders, whole_experts[1] if whole_experts else None)


def _fewest_cards(entry: Published, options: dict[str, Any], experts: ExpertSplit, feasible_only: bool = True
                  ) -> tuple[str, Plan] | None:
    """The feasible plan with the fewest cards over the granularities (block on a tie); with ``feasible_only``
    False and none feasible, the block-granularity plan, refused, with its diagnosis."""
    plans = [(g, api.plan(entry.model, device=entry.device, torch_options=TorchOptions(granularity=g, experts=experts),
                          **options)) for g in _GRANULARITIES]
    feasible = [found for found in plans if found[1].feasible]
    if feasible:
        return min(feasible, key=lambda found: found[1].cards)        # min keeps the first (block) on a tie
    return None if feasible_only else plans[0]


def reproduce_all(entries: list[Published], progress: Callable[[str], None] = lambda _: None) -> list[Reproduced]:
    rows = []
    for entry in entries:
        for dtype in entry.dtypes:
            progress(f"{entry.name} at {dtype}")
            rows.append(reproduce(entry, dtype))
    return rows


def plot(rows: list[Reproduced], path: Path) -> None:
    """Two panels: cards (weights alone, cachefit's plan, published) and tokens/s per user (predicted,
    published), one group of bars per deployment and element type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.published.name}\n{r.dtype}" for r in rows]
    positions = range(len(rows))
    figure, (cards, speed) = plt.subplots(1, 2, figsize=(13, 0.7 * len(rows) + 2.5), sharey=True)
    width = 0.27
    series = [("weights alone", [r.weight_cards for r in rows], "#8C8C8C"),
              ("cachefit plan", [r.plan.cards for r in rows], "#4C72B0"),
              ("published", [r.published.chips or 0 for r in rows], "#C44E52")]
    for offset, (name, values, color) in zip((-width, 0.0, width), series):
        cards.barh([p + offset for p in positions], values, height=width, color=color, label=name)
    cards.set_xscale("log")
    cards.set_xlabel("chips (log scale; no red bar: count not published)")
    cards.set_yticks(list(positions), labels, fontsize=8)
    cards.invert_yaxis()
    cards.legend(fontsize=8)
    speed.barh([p - width / 2 for p in positions], [r.prediction.decode_tokens_per_s for r in rows], height=width,
               color="#4C72B0", label="cachefit predict (roofline)")
    speed.barh([p + width / 2 for p in positions], [r.published.tokens_per_s for r in rows], height=width,
               color="#C44E52", label="published")
    speed.set_xscale("log")
    speed.set_xlabel("decode tokens/s per user (log scale)")
    speed.legend(fontsize=8)
    figure.suptitle("Published SRAM deployments beside cachefit's plans and predictions")
    figure.tight_layout()
    with atomic_output(path, "plot") as temporary:
        figure.savefig(str(temporary), dpi=110, format="png")
    plt.close(figure)
