"""Keep a stage's weights in the GPU's L2 cache: one contiguous weight buffer, a persisting L2 carve-out
(``cudaLimitPersistingL2CacheSize``) and a stream access-policy window over the buffer with ``hitProp =
persisting`` (CUDA C++ Programming Guide, "L2 cache access management", compute capability 8.0 and later).

On CPU, or where the CUDA runtime bindings (``cuda-python``) are missing, nothing is changed and the report says
why. Every CUDA call's status is checked; a refusal is reported, never raised, so a run goes on without it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["cuda_runtime", "flatten_weights", "pin_weights_in_l2"]


def flatten_weights(module: nn.Module) -> torch.Tensor:
    """Move every parameter and buffer of ``module`` into one contiguous buffer (views keep their shapes), so a
    single access-policy window covers them all. Returns the buffer (bytes). All tensors must share a device;
    tensors left on meta (a Hugging Face stage's modules that other cards hold) are not this card's."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.numel() and t.device.type != "meta"]
    if not tensors:
        return torch.empty(0, dtype=torch.uint8)
    alignment = 256                                # keeps each view aligned as CUDA allocations are
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // alignment) * alignment
    buffer = torch.empty(total, dtype=torch.uint8, device=tensors[0].device)
    with torch.no_grad():
        for tensor, offset in zip(tensors, offsets):
            size = tensor.numel() * tensor.element_size()
            view = buffer[offset:offset + size].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor)
            tensor.data = view
    return buffer


def pin_weights_in_l2(buffer: torch.Tensor) -> dict[str, Any]:
    """Ask the GPU to keep ``buffer`` resident in L2 for work on the current stream; what was applied, or why not."""
    if buffer.device.type != "cuda":
        return {"applied": False, "reason": "no CUDA device (a CPU run): L2 residency applies to GPUs only"}
    try:
        runtime = cuda_runtime()
    except ImportError as error:
        return {"applied": False, "reason": f"cuda-python is not installed ({error})"}
    return pin_with(runtime, buffer)


def pin_with(runtime: Any, buffer: torch.Tensor) -> dict[str, Any]:
    """The decisions and calls of :func:`pin_weights_in_l2` through ``runtime`` (cuda-python's, or a stand-in);
    a failed call becomes the report's reason, so a run goes on without residency rather than failing."""
    try:
        return _apply(runtime, buffer)
    except (RuntimeError, AttributeError, TypeError, ValueError) as error:
        return {"applied": False, "reason": f"{type(error).__name__}: {error}"}


def cuda_runtime() -> Any:
    """cuda-python's runtime bindings (ImportError when it is not installed)."""
    try:
        from cuda.bindings import runtime  # type: ignore[import-not-found]
    except ImportError:
        from cuda import cudart as runtime  # type: ignore[import-not-found]  # cuda-python < 12.6
    return runtime


def _call(result: Any) -> Any:
    """cuda-python returns (status, values...); raise on any status but success."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise RuntimeError(f"CUDA status {int(status)} ({status})")
    return values[0] if len(values) == 1 else values


def _apply(runtime: Any, buffer: torch.Tensor) -> dict[str, Any]:
    device = buffer.device.index or 0
    attributes = runtime.cudaDeviceAttr
    most_persisting = int(_call(runtime.cudaDeviceGetAttribute(attributes.cudaDevAttrMaxPersistingL2CacheSize,
                                                               device)))
    largest_window = int(_call(runtime.cudaDeviceGetAttribute(attributes.cudaDevAttrMaxAccessPolicyWindowSize,
                                                              device)))
    size = buffer.numel()
    report = {"weight_bytes": size, "max_persisting_l2_bytes": most_persisting,
              "max_window_bytes": largest_window}
    if most_persisting == 0 or largest_window == 0:
        return {"applied": False, "reason": "this GPU has no persisting L2 (compute capability < 8.0)", **report}
    if size > min(most_persisting, largest_window):
        return {"applied": False, "reason": "the stage's weights exceed the persisting L2 or the largest window",
                **report}
    _call(runtime.cudaDeviceSetLimit(runtime.cudaLimit.cudaLimitPersistingL2CacheSize, size))
    value = runtime.cudaStreamAttrValue()
    window = value.accessPolicyWindow
    window.base_ptr = buffer.data_ptr()
    window.num_bytes = size
    window.hitRatio = 1.0
    window.hitProp = runtime.cudaAccessProperty.cudaAccessPropertyPersisting
    window.missProp = runtime.cudaAccessProperty.cudaAccessPropertyStreaming
    stream = torch.cuda.current_stream(buffer.device).cuda_stream
    identifier = getattr(runtime, "cudaStreamAttrID", None) or runtime.cudaLaunchAttributeID
    key = (getattr(identifier, "cudaStreamAttributeAccessPolicyWindow", None)
           or identifier.cudaLaunchAttributeAccessPolicyWindow)
    _call(runtime.cudaStreamSetAttribute(stream, key, value))
    return {"applied": True, "window_bytes": size, "hit_ratio": 1.0, **report}
