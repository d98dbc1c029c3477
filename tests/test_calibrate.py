"""cachefit calibrate: the devices file it writes loads and drives predict; its gloo and linear-layer probes."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from click.testing import CliRunner

from cachefit import api
from cachefit.cli import cli
from cachefit.core.hardware import load_devices
from cachefit.runtime import calibrate

FIGURES = calibrate.HostFigures(linear_flops=8e10, matmul_flops=8.2e10, cache_bandwidth=2e10, memory_bandwidth=1e10,
                                memory_bandwidth_all_cores=7e9, link_latency=8e-5, link_bandwidth=2e9,
                                allreduce_seconds=8e-4, on_chip_bytes=17825792, cores=2, overlap=False,
                                overlap_errors=(0.29, 0.02), pass_seconds=2e-5,
                                layer_seconds=(("dense", 1.4e-4), ("llama", 3.2e-4), ("hf", 5.1e-4)),
                                hf_pass_seconds=9e-5)


def test_written_entry_loads_with_every_figure_measured(tmp_path: Path) -> None:
    (tmp_path / "host.toml").write_text(calibrate.to_toml(FIGURES))
    host = load_devices(tmp_path / "host.toml")["host"]
    assert host.capacity_bytes == 17825792
    assert host.figure("off_chip_bandwidth").value == 7e9 and host.figure("overlap").value == 0
    assert host.figure("collective_latency").value == pytest.approx(4e-4 - 16384 / 2e9)
    assert {host.figure(name).kind for name in ("fp32_flops", "link_latency", "on_chip_bandwidth")} == {"M"}
    assert host.figure("pass_seconds").value == 2e-5 and host.figure("layer_seconds_llama").value == 3.2e-4
    assert host.figure("layer_seconds_dense").value == 1.4e-4
    assert host.figure("pass_seconds_hf").value == 9e-5 and host.figure("layer_seconds_hf").value == 5.1e-4
    assert "transformers' Llama" in host.figure("layer_seconds_hf").source


def test_the_fixed_costs_come_from_two_model_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Made-up pass times t(L) = 20 us + L x block (dense 100 us, llama 300 us): both points give them back, and
    # the pass figure is the two families' mean intercept; transformers' Llama (90 us + L x 500 us) has its own.
    block = {"dense": 1e-4, "llama": 3e-4}
    monkeypatch.setattr(calibrate, "_pass_seconds", lambda family, blocks: 2e-5 + blocks * block[family])
    monkeypatch.setattr(calibrate, "_hf_pass_seconds", lambda blocks: 9e-5 + blocks * 5e-4)
    fixed, blocks, hf_pass = calibrate._fixed_costs()
    assert fixed == pytest.approx(2e-5) and dict(blocks) == pytest.approx({**block, "hf": 5e-4})
    assert hf_pass == pytest.approx(9e-5)


def test_without_transformers_no_hf_figures_are_written(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(blocks: int) -> float:
        raise ImportError("No module named 'transformers'")
    monkeypatch.setattr(calibrate, "_pass_seconds", lambda family, blocks: 2e-5 + blocks * 1e-4)
    monkeypatch.setattr(calibrate, "_hf_pass_seconds", missing)
    _, blocks, hf_pass = calibrate._fixed_costs()
    assert hf_pass is None and [family for family, _ in blocks] == ["dense", "llama"]
    text = calibrate.to_toml(calibrate.HostFigures(**{**{n: getattr(FIGURES, n) for n in FIGURES.__slots__},
                                                      "layer_seconds": blocks, "hf_pass_seconds": None}))
    assert "pass_seconds_hf" not in text and "layer_seconds_hf" not in text and "layer_seconds_llama" in text


def test_the_hf_probe_times_a_real_transformers_pass() -> None:
    pytest.importorskip("transformers")
    assert 0 < calibrate._hf_pass_seconds(1, passes=3) < 5.0


def test_cli_writes_the_file_predict_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibrate, "measure_host", lambda progress=None: FIGURES)
    result = CliRunner().invoke(cli, ["calibrate", "-o", str(tmp_path / "host.toml")])
    assert result.exit_code == 0 and "add up" in result.stdout
    plan = api.plan("tiny-dense4", capacity="8MiB", cards=2)
    ours, _ = api.predict(plan, device="host", devices_file=tmp_path / "host.toml", micro_batches=2)
    # Not overlapped: each pass is compute + memory + its fixed cost (20 us, and 140 us per dense block: 2 blocks
    # a card); the tiny model's stages fit the 17 MiB cache share, so they read at the in-cache bandwidth.
    assert all(s.fixed_s == pytest.approx(2e-5 + 2 * 1.4e-4) for s in ours.stages)
    assert all(s.resident and s.pass_s == pytest.approx(s.compute_s + s.memory_s + s.fixed_s) for s in ours.stages)


def test_the_fit_recovers_bandwidth_and_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    # Timings made up as t = bytes / B + FLOPs / R with B = 20 GB/s, R = 50 GFLOP/s: the least-squares fit must
    # give them back, the additive model must fit exactly and the roofline (max) must not.
    bandwidth, rate, moved = 2e10, 5e10, 64 << 20

    def timed(total_bytes: int, rows: int, repeats: int = 9) -> tuple[float, int, float]:
        flops = 2.0 * rows * moved / 4
        return moved / bandwidth + flops / rate, moved, flops

    monkeypatch.setattr(calibrate, "_linear_seconds", timed)
    fitted_bandwidth, fitted_rate, roofline, serial = calibrate._fit(moved)
    assert fitted_bandwidth == pytest.approx(bandwidth) and fitted_rate == pytest.approx(rate)
    assert serial == pytest.approx(0.0, abs=1e-12) and roofline > 0.05
