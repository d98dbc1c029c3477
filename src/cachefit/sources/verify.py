"""``profile --verify``: a profile made on meta (a Hugging Face config, or a ``pkg.module:factory`` that returns its
example inputs) checked against the same model built for real on this host, random weights, the same workload, the
default kernels, measured by the same live-tensor tracker (``torch_profile``, a dispatch mode that sees every
tensor an op makes and when its storage is freed).

What the real forward measures is the truth a plan rests on: where an estimate is below it, a plan of the profile
can overfill a card. The real build needs the model's weights in this host's memory, so it is refused (with the
estimate) above a limit.
"""

from __future__ import annotations

from typing import Any

from cachefit.core.errors import InputError
from cachefit.core.layers import LayerTable
from cachefit.core.records import LayerCheck, Verification
from cachefit.core.spec import Workload
from cachefit.core.units import format_size
from cachefit.sources.hf import hf_table

__all__ = ["verify_factory", "verify_hf"]


def verify_hf(document: dict[str, Any], name: str, work: Workload, limit_bytes: int) -> Verification:
    """Each layer's activation + workspace on meta against a real forward on CPU; refused above ``limit_bytes``
    of estimated memory (weights, KV cache and the largest transient)."""
    estimate = hf_table(document, name, work)
    _check_limit(estimate, name, limit_bytes)
    return _compare(estimate, hf_table(document, name, work, device="cpu"), work.phase)


def verify_factory(target: str, phase: str | None, limit_bytes: int) -> Verification:
    """The same for a factory: called on meta, then on CPU (seeded), with the example inputs it returns."""
    from cachefit.sources.torch_sources import profile_factory

    def profiled(device: str) -> LayerTable:
        try:
            return profile_factory(target, None, "int64", phase, device=device)
        except InputError as error:
            if "returned no example inputs" not in str(error):
                raise
            raise InputError(f"verify runs {target} with the inputs it returns: make it return (module, inputs)",
                             parameters=("verify",)) from error

    estimate = profiled("meta")
    _check_limit(estimate, target, limit_bytes)
    return _compare(estimate, profiled("cpu"), phase or "forward")


def _check_limit(estimate: LayerTable, name: str, limit_bytes: int) -> None:
    need = _host_bytes(estimate)
    if need > limit_bytes:
        raise InputError(f"{name}: a real forward would need about {format_size(need)} of this host's memory "
                         f"(weights, KV cache and the largest transient, estimated), over the limit of "
                         f"{format_size(limit_bytes)}: raise verify_limit, or verify smaller dimensions, batch "
                         "or sequence", parameters=("verify_limit",))


def _compare(estimate: LayerTable, measured: LayerTable, phase: str) -> Verification:
    name = estimate.name
    if [x.name for x in measured.layers] != [x.name for x in estimate.layers]:
        raise AssertionError("the real build's layers differ from the meta build's")     # same code: a bug
    checks = tuple(LayerCheck(e.name, e.activation_bytes + e.workspace_bytes, m.activation_bytes + m.workspace_bytes,
                              e.weight_bytes == m.weight_bytes, e.kv_cache_bytes == m.kv_cache_bytes)
                   for e, m in zip(estimate.layers, measured.layers))
    return Verification(name, phase, checks)


def _host_bytes(table: LayerTable) -> int:
    transient = max(x.activation_bytes + x.workspace_bytes for x in table.layers)
    return sum(x.weight_bytes + x.kv_cache_bytes for x in table.layers) + table.input_bytes + transient
