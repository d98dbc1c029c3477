"""L2 residency (CUDA): the weights gathered into one buffer, and the decisions around the persisting window.
The CUDA calls themselves need a GPU; here a stand-in runtime records them, and CPU runs say why nothing applied."""

from __future__ import annotations

import types
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from cachefit.nn import build_model  # noqa: E402
from cachefit.runtime import residency  # noqa: E402
from cachefit.sources import presets  # noqa: E402


def test_flattened_weights_share_one_buffer_and_compute_the_same() -> None:
    model = build_model(presets()["tiny-llama"].spec, seed=1)
    tokens = torch.randint(0, 512, (2, 5))
    with torch.no_grad():
        before = model(tokens)
        buffer = residency.flatten_weights(model)
        after = model(tokens)
    assert torch.equal(before, after)
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for parameter in model.parameters():
        assert start <= parameter.data_ptr() < end and (parameter.data_ptr() - start) % 256 == 0
    assert buffer.numel() >= sum(p.numel() * p.element_size() for p in model.parameters())


def test_cpu_runs_report_residency_not_applied() -> None:
    report = residency.pin_weights_in_l2(torch.empty(10, dtype=torch.uint8))
    assert report == {"applied": False, "reason": "no CUDA device (a CPU run): L2 residency applies to GPUs only"}


class FakeRuntime:
    """The few cuda-python runtime calls residency makes, recorded; statuses and limits chosen by the test."""

    def __init__(self, persisting: int, window: int, status: int = 0) -> None:
        self.limits = {"MaxPersisting": persisting, "MaxWindow": window}
        self.status, self.calls = status, []
        self.cudaDeviceAttr = types.SimpleNamespace(cudaDevAttrMaxPersistingL2CacheSize="MaxPersisting",
                                                    cudaDevAttrMaxAccessPolicyWindowSize="MaxWindow")
        self.cudaLimit = types.SimpleNamespace(cudaLimitPersistingL2CacheSize="PersistingLimit")
        self.cudaAccessProperty = types.SimpleNamespace(cudaAccessPropertyPersisting="persisting",
                                                        cudaAccessPropertyStreaming="streaming")
        self.cudaStreamAttrID = types.SimpleNamespace(cudaStreamAttributeAccessPolicyWindow="window")

    def cudaDeviceGetAttribute(self, attribute: str, device: int) -> tuple[int, int]:
        return 0, self.limits[attribute]

    def cudaDeviceSetLimit(self, limit: str, value: int) -> tuple[int]:
        self.calls.append(("limit", limit, value))
        return (self.status,)

    def cudaStreamAttrValue(self) -> Any:
        return types.SimpleNamespace(accessPolicyWindow=types.SimpleNamespace())

    def cudaStreamSetAttribute(self, stream: int, key: str, value: Any) -> tuple[int]:
        self.calls.append(("window", key, vars(value.accessPolicyWindow)))
        return (0,)


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=7))


def test_a_window_over_the_whole_buffer_when_it_fits(stream: None) -> None:
    buffer = torch.empty(1000, dtype=torch.uint8)
    runtime = FakeRuntime(persisting=4096, window=2048)
    report = residency.pin_with(runtime, buffer)
    assert report["applied"] and report["window_bytes"] == 1000
    assert runtime.calls[0] == ("limit", "PersistingLimit", 1000)
    _, key, window = runtime.calls[1]
    assert key == "window" and window == {"base_ptr": buffer.data_ptr(), "num_bytes": 1000, "hitRatio": 1.0,
                                          "hitProp": "persisting", "missProp": "streaming"}


@pytest.mark.parametrize(("persisting", "window", "status", "reason"), [
    (512, 2048, 0, "exceed the persisting L2"), (4096, 512, 0, "largest window"),
    (0, 0, 0, "no persisting L2"), (4096, 4096, 1, "RuntimeError: CUDA status 1")])
def test_residency_is_refused_with_the_reason(stream: None, persisting: int, window: int, status: int,
                                              reason: str) -> None:
    buffer = torch.empty(1000, dtype=torch.uint8)
    runtime = FakeRuntime(persisting, window, status)
    report = residency.pin_with(runtime, buffer)        # a failed CUDA call becomes the reason, not an error
    assert not report["applied"] and reason in report["reason"]
    assert runtime.calls == ([("limit", "PersistingLimit", 1000)] if status else [])
