"""What a model is made of, as the closed forms, the reference transformer and the runtime all read it: element
types, the workload a table is sized for, the two families' dimensions, the record a table keeps of them, and the
module-name conventions (``embed``, ``layers.N``, ``head``) that tie a layer to its checkpoint tensors.

Declared once and validated directly (pydantic ``TypeAdapter`` over these dataclasses): a spec file, a table's
``spec`` record and a checkpoint's metadata are all read through :func:`parse_spec_fields` / :meth:`SpecRecord.read`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError

from cachefit.core.errors import InputError
from cachefit.core.files import adapter, describe_validation_error

__all__ = [
    "DTYPE_BYTES", "EMBED", "HEAD", "TOKEN_ID_BYTES", "Attention", "DenseSpec", "LlamaSpec", "ModelSpec", "Phase",
    "SpecRecord", "Workload", "block_index", "block_name", "block_tensor", "dtype_bytes", "is_decoder_block",
    "parse_spec_fields",
]

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp8": "float8_e4m3fn"}
TOKEN_ID_BYTES = 8   # token ids enter the embedding as int64
Phase = Literal["prefill", "decode"]
Attention = Literal["naive", "flash", "eager"]   # eager: a Hugging Face model's own attention code
ExpertSplit = Literal["tensor", "parallel"]     # a mixture of experts in a tensor group: split, or whole experts
# Bounded so that a typo (layers = 99999999999999999999) is refused, not planned for hours.
_Positive = Annotated[int, Field(ge=1, le=2**31, strict=True)]
_Dim = Annotated[int, Field(ge=0, le=2**31, strict=True)]
_Layers = Annotated[int, Field(ge=1, le=1_000_000, strict=True)]
_Flag = Annotated[bool, Field(strict=True)]

# Module names of the reference model (cachefit.nn), which the closed-form tables and the shards use.
EMBED, HEAD, BLOCKS = "embed", "head", "layers"
_BLOCK = re.compile(rf"^{BLOCKS}\.(\d+)(?:\.|$)")
# A decoder block in the models peers load (Hugging Face: model.layers.N, transformer.h.N, ...), for exports.
_DECODER_BLOCK = re.compile(r"(^|\.)(layers|h|blocks|decoder\.layers)\.\d+$")


def dtype_bytes(dtype: str) -> tuple[str, int]:
    """Canonical name and bytes per element of ``dtype`` (``fp16`` -> ``('float16', 2)``)."""
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPE_BYTES:
        raise InputError(f"dtype must be one of {', '.join(DTYPE_BYTES)} (or fp32, fp16, bf16, fp8), got {dtype!r}",
                         parameters=("dtype",))
    return name, DTYPE_BYTES[name]


def block_name(index: int) -> str:
    return f"{BLOCKS}.{index}"


def block_index(name: str) -> int | None:
    """N of a layer or tensor named ``layers.N[...]``; None for the embedding, the head and anything else."""
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


def block_tensor(name: str) -> str | None:
    """``attn.q_proj.weight`` of ``layers.3.attn.q_proj.weight``: a block tensor's name inside its block."""
    return name.split(".", 2)[2] if block_index(name) is not None and name.count(".") >= 2 else None


def is_decoder_block(module: str) -> bool:
    """Whether a module FQN names one decoder block (ours or a Hugging Face model's)."""
    return bool(_DECODER_BLOCK.search(module))


@dataclass(frozen=True, slots=True)
class Workload:
    """What a table is sized for: sequences per pass, context length, phase, element type, attention kind."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    batch: _Positive = 1
    seq: _Positive = 2048
    phase: Phase = "decode"
    dtype: str = "float16"
    attention: Attention = "naive"

    def __post_init__(self) -> None:
        for name in ("batch", "seq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}", parameters=(name,))
        if self.phase not in ("prefill", "decode"):
            raise InputError(f"phase must be 'prefill' or 'decode', got {self.phase!r}", parameters=("phase",))
        if self.attention not in ("naive", "flash", "eager"):
            raise InputError(f"attention must be 'naive', 'flash' or 'eager', got {self.attention!r}",
                             parameters=("attention",))
        dtype_bytes(self.dtype)

    @property
    def new_tokens(self) -> int:
        """q: tokens per sequence this pass computes."""
        return self.seq if self.phase == "prefill" else 1

    @property
    def tokens(self) -> int:
        return self.batch * self.new_tokens


@dataclass(frozen=True, slots=True)
class DenseSpec:
    """The seed's dense network: attention (fused QKV, output) and a 2-matrix MLP, no norms or biases; with
    ``vocab`` > 0, an embedding layer first and a head last."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1)]
    layers: _Layers
    heads: _Positive
    head_dim: _Positive
    mlp_hidden: _Positive
    hidden: _Dim = 0            # 0: heads * head_dim
    vocab: _Dim = 0
    tie_embeddings: bool = False

    @property
    def model_dim(self) -> int:
        return self.hidden or self.heads * self.head_dim


@dataclass(frozen=True, slots=True)
class LlamaSpec:
    """Llama-style decoder: GQA attention, SwiGLU MLP, RMSNorm, embedding and head (tied or not). With ``experts``
    > 0 the MLP is a mixture of that many SwiGLU experts of width ``ffn_hidden`` behind a linear router, each token
    taking ``experts_per_token`` of them (Mixtral: Jiang et al. 2024, sec. 2.1)."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1)]
    layers: _Layers
    hidden: _Positive
    heads: _Positive
    kv_heads: _Positive
    ffn_hidden: _Positive
    vocab: _Positive
    head_dim: _Dim = 0          # 0: hidden // heads
    tie_embeddings: bool = False
    experts: _Dim = 0           # 0: a dense MLP
    experts_per_token: _Dim = 0

    def __post_init__(self) -> None:
        """Attention's shapes must divide (checked wherever a spec is made: a file, a record, a checkpoint)."""
        if isinstance(self.experts, int) and isinstance(self.experts_per_token, int) and (
                not 1 <= self.experts_per_token <= self.experts if self.experts else self.experts_per_token):
            raise InputError(f"{self.name}: experts_per_token ({self.experts_per_token}) must be between 1 and "
                             f"experts ({self.experts}), and 0 without experts")
        if isinstance(self.heads, int) and isinstance(self.kv_heads, int) and self.kv_heads and (
                self.heads % self.kv_heads):
            raise InputError(f"{self.name}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if isinstance(self.hidden, int) and isinstance(self.heads, int) and self.heads and not self.head_dim and (
                self.hidden % self.heads):
            raise InputError(f"{self.name}: hidden ({self.hidden}) must be a multiple of heads ({self.heads}), or "
                             "give head_dim")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads


ModelSpec = DenseSpec | LlamaSpec
_FAMILIES: dict[str, type[DenseSpec] | type[LlamaSpec]] = {"dense": DenseSpec, "llama": LlamaSpec}


def family_of(spec: ModelSpec) -> str:
    return "dense" if isinstance(spec, DenseSpec) else "llama"


def parse_spec_fields(family: Any, document: dict[str, Any], source: str) -> ModelSpec:
    """A family's spec from its fields (a spec file's, a table's record's), validated; InputError otherwise."""
    if family not in _FAMILIES:
        raise InputError(f"{source}: family must be 'dense' or 'llama', got {family!r}")
    try:
        return adapter(_FAMILIES[family]).validate_python(document)
    except ValidationError as error:
        raise InputError(describe_validation_error(error, source)) from error


@dataclass(frozen=True, slots=True)
class SpecRecord:
    """What a layer table (and so a plan) keeps of the model it was made from, so that the performance model can
    rebuild the table and the runtime the model. Stored flat: ``{"family", <the spec's fields>, "attention",
    ["sublayers"], ["measured"], ["prefill_chunk"]}``."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    spec: ModelSpec
    attention: Attention = "naive"
    sublayers: _Flag = False         # attention and MLP as separate layers (granularity "sublayer")
    measured: _Flag = False         # profiled on the reference module (so the runtime holds what it counts)
    prefill_chunk: _Positive | None = None    # prompt tokens per pass the table also counts
    experts: ExpertSplit = "tensor"     # how its experts split in a tensor group ("parallel": whole, E/t a card)

    @property
    def family(self) -> str:
        return family_of(self.spec)

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self.spec)
        for later in ("experts", "experts_per_token"):      # left out at 0: older tables keep their fingerprints
            if not fields.get(later, 1):
                fields.pop(later)
        document: dict[str, Any] = {"family": self.family, **fields, "attention": self.attention}
        if self.sublayers:
            document["sublayers"] = True
        if self.measured:
            document["measured"] = True
        if self.prefill_chunk is not None:
            document["prefill_chunk"] = self.prefill_chunk
        if self.experts != "tensor":
            document["experts_split"] = self.experts
        return document

    @classmethod
    def read(cls, document: Any, source: str = "spec") -> SpecRecord:
        if not isinstance(document, dict):
            raise InputError(f"{source} must be an object with a family and its dimensions")
        rest = dict(document)
        family = rest.pop("family", None)
        extras = {key: rest.pop(key) for key in ("attention", "sublayers", "measured", "prefill_chunk")
                  if key in rest}
        if "experts_split" in rest:
            extras["experts"] = rest.pop("experts_split")
        spec = parse_spec_fields(family, rest, source)
        try:
            return adapter(SpecRecord).validate_python({"spec": spec, **extras})
        except ValidationError as error:
            raise InputError(describe_validation_error(error, source)) from error


