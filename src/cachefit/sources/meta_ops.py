"""What the profiler's dispatch mode needs to know of an op: the arguments it writes in place (its schema), and how to
run it on meta where the meta function refuses what the real kernels take (listed in docs/profiling.md)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from cachefit.core.errors import InputError

__all__ = ["run_on_meta", "written_tensors"]


def written_tensors(func: Any, args: Any, kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The tensors an op writes in place: the arguments its schema marks as written (``Tensor(a!)``)."""
    for position, name in write_arguments(func):
        yield from _tensors(args[position] if position < len(args) else kwargs.get(name))


@functools.cache
def write_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments ``func``'s schema marks written; read once per op (every op asks)."""
    schema = getattr(func, "_schema", None)
    return tuple((position, argument.name) for position, argument in enumerate(schema.arguments if schema else ())
                 if argument.alias_info is not None and argument.alias_info.is_write)


def run_on_meta(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """``func`` run, except where its meta function refuses what the real kernels take: ``_grouped_mm``'s meta
    function admits bfloat16 only (CUDA's rule, torch/_meta_registrations.py), while the CPU kernel takes float32
    and float16 too (transformers' MoE experts call it for every dtype); the real kernel allocates its output
    only, (tokens, out features) for a 2-D input against 3-D expert weights, so that is what is made here."""
    if func is torch.ops.aten._local_scalar_dense.default and args and args[0].device.type == "meta":
        return scalar_on_meta(args[0])
    if func is torch.ops.aten._grouped_mm.default and len(args) >= 2:
        a, b = args[0], args[1]
        if a.device.type == "meta" and a.dtype != torch.bfloat16 and b.dim() == 3 and a.dim() in (2, 3):
            shape = (a.size(0), b.size(-1)) if a.dim() == 2 else (a.size(0), a.size(1), b.size(-1))
            return torch.empty(shape, dtype=kwargs.get("out_dtype") or a.dtype, device="meta")
    return func(*args, **kwargs)


def scalar_on_meta(tensor: torch.Tensor) -> bool:
    """A value a forward reads off its inputs (``Tensor.item()``), which meta tensors do not hold. transformers asks
    yes/no questions of its masks and positions (is the padding mask all ones? are the sequences unpacked?):
    they are answered yes, as for the unpadded, unpacked batch a profile describes. Any other value is refused."""
    if tensor.dtype == torch.bool:
        return True
    raise InputError("the model's forward reads a number off its inputs (Tensor.item()), which profiling on the "
                     "meta device cannot give; pass inputs that make it unnecessary (a Hugging Face model: give "
                     "position_ids, or profile its config.json)")


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    for leaf in tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf
