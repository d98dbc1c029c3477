"""Published SRAM deployments, planned and predicted (``cachefit deployments``, issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cachefit.apps.deployments import Reproduced, published_deployments, reproduce_all
from cachefit.cli import cli


@pytest.fixture(scope="module")
def rows() -> list[Reproduced]:
    return reproduce_all(published_deployments())


def test_the_issues_deployments_are_all_there() -> None:
    entries = {(e.model, e.device) for e in published_deployments()}
    assert {("llama-3.1-8b", "cerebras-wse3"), ("llama-3.1-70b", "cerebras-wse3"), ("llama-2-7b", "groq-lpu"),
            ("llama-2-70b", "groq-lpu"), ("mixtral-8x7b", "groq-lpu")} <= entries


def test_every_deployment_plans_within_1_2x_the_cards_its_weights_need(rows: list[Reproduced]) -> None:
    for row in rows:
        assert row.plan.feasible, row.published.name
        assert row.plan.cards * row.capacity >= row.weight_bytes            # a plan holds every weight
        assert row.card_ratio <= 1.2, (row.published.name, row.dtype, row.plan.cards, row.weight_cards)


def test_wafer_counts_match_cerebras_published_ones(rows: list[Reproduced]) -> None:
    # 16-bit Llama-3.1-8B (16 GB) on one 44 GB wafer; 70B (141 GB of weights, 2.7 GB of KV at 8k) on four.
    cerebras = {r.published.model: r.plan.cards for r in rows if r.published.device == "cerebras-wse3"}
    assert cerebras == {"llama-3.1-8b": 1, "llama-3.1-70b": 4}


def test_each_published_figure_has_a_prediction_beside_it(rows: list[Reproduced]) -> None:
    for row in rows:
        assert row.prediction.decode_tokens_per_s > 0
        assert row.speed_ratio == pytest.approx(row.prediction.decode_tokens_per_s / row.published.tokens_per_s)
    # 576 LPUs hold 132.9 GB: fewer than Llama-2-70B's 137.95 GB of 16-bit weights, more than its 8-bit ones.
    seventy = {r.dtype: r for r in rows if r.published.model == "llama-2-70b"}
    assert seventy["bfloat16"].plan.cards > 576 > seventy["int8"].plan.cards


def test_the_report_and_plot_are_written(tmp_path: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text('[[deployment]]\nname = "Mine"\nmodel = "llama-2-7b"\ndevice = "groq-lpu"\ndtypes = ["int8"]\n'
                    'seq = 2048\nseq_kind = "A"\nprecision = "int8"\ntokens_per_s = 700\ntokens_per_s_kind = "M"\n'
                    'tokens_per_s_source = "our own measurement, https://example.org/run-7"\nchips = 40\n'
                    'chips_kind = "M"\nchips_source = "our rack"\n')
    result = CliRunner().invoke(cli, ["deployments", "--deployments-file", str(mine), "-o", str(tmp_path / "d.md")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "d.md").read_text()
    assert "| Mine | int8" in text and "https://example.org/run-7" in text and "(deployments.png)" in text
    assert (tmp_path / "deployments.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_published_chip_count_needs_its_source(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[deployment]]\nname = "X"\nmodel = "llama-2-7b"\ndevice = "groq-lpu"\ndtypes = ["int8"]\n'
                   'seq = 2048\nseq_kind = "A"\nprecision = "?"\ntokens_per_s = 700\ntokens_per_s_kind = "M"\n'
                   'tokens_per_s_source = "s"\nchips = 40\n')
    result = CliRunner().invoke(cli, ["deployments", "--deployments-file", str(bad), "-o", str(tmp_path / "d.md")])
    assert result.exit_code == 2 and "chips needs chips_kind and chips_source" in result.stderr
    assert not (tmp_path / "d.md").exists()
