"""The CLI, in-process: outputs, exit codes (0 / 2 bad input / 3 infeasible), files, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import cachefit
from cachefit.cli import cli
from cachefit.core.layers import LayerTable
from cachefit.core.records import Plan


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_profile_json_round_trips_into_plan(tmp_path: Path) -> None:
    code, stdout, _ = run("profile", "tiny-llama", "--format", "json", "-o", str(tmp_path / "t.json"))
    assert code == 0
    table = LayerTable.from_dict(json.loads(stdout))
    assert LayerTable.read(tmp_path / "t.json") == table
    code, stdout, _ = run("plan", str(tmp_path / "t.json"), "--capacity", "1MiB", "--format", "json")
    assert code == 0 and json.loads(stdout)["model"]["fingerprint"] == table.fingerprint


def test_profile_csv_and_table(tmp_path: Path) -> None:
    code, stdout, _ = run("profile", "seed-dense16", "--batch", "1", "--format", "csv")
    assert code == 0 and stdout.splitlines()[1].startswith("layers.0,1610612736,16384,320000,327680000,")
    (tmp_path / "t.csv").write_text(stdout)
    code, stdout, _ = run("plan", str(tmp_path / "t.csv"), "--input-bytes", "16384", "--capacity", "2GB",
                          "--format", "json")
    assert code == 0 and json.loads(stdout)["cards"] == 16
    code, stdout, _ = run("profile", "tiny-llama")
    assert code == 0 and "layers.0" in stdout and "709.0 KiB" in stdout


def test_plan_table_json_file_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    code, stdout, _ = run("plan", "llama-3-8b", "--device", "dmatrix-corsair", "-o", str(out),
                               "--plot", str(png))
    assert code == 0 and "proven optimal" in stdout and "card" in stdout
    plan = Plan.read(out)
    assert plan.feasible and plan.cards == 9 and plan.device and plan.device.name == "dmatrix-corsair"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_infeasible_plan_exits_3_and_still_prints_json(tmp_path: Path) -> None:
    code, stdout, _ = run("plan", "seed-dense16", "--device", "h100", "--format", "json", "-o",
                          str(tmp_path / "p.json"))
    assert code == 3
    document = json.loads(stdout)                      # stdout holds only the JSON
    assert document["feasible"] is False and document["diagnosis"]
    assert Plan.read(tmp_path / "p.json").feasible is False
    code, stdout, _ = run("plan", "seed-dense16", "--device", "h100")
    assert code == 3 and "No feasible plan" in stdout and "41 cards" in stdout


@pytest.mark.parametrize("args", [
    ("plan", "tiny-llama", "--capacity", "50 parsecs"),
    ("plan", "tiny-llama"),
    ("plan", "tiny-llama", "--capacity", "1MiB", "--device", "h100"),
    ("plan", "tiny-llama", "--device", "h1000"),
    ("plan", "tiny-llama", "--capacity", "1MiB", "--cards", "99"),
    ("plan", "nonexistent.json", "--capacity", "1MiB"),
    ("profile", "no-such-preset"),
    ("profile", "tiny-llama", "--dtype", "float13"),
    ("devices", "--devices-file", "/nonexistent/devices.toml"),
])
def test_bad_input_is_one_line_and_exit_2(args: tuple[str, ...]) -> None:
    code, stdout, stderr = run(*args)
    assert code == 2
    assert "Traceback" not in stderr and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "error" in stderr.lower()


def test_no_half_written_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "plan.json"
    code, _, stderr = run("plan", "tiny-llama", "--capacity", "1MiB", "-o", str(target))
    assert code == 2 and "does not exist" in stderr
    assert not target.parent.exists()
    existing = tmp_path / "plan.json"
    existing.write_text("old")
    code, _, _ = run("plan", "tiny-llama", "--capacity", "nonsense", "-o", str(existing))
    assert code == 2 and existing.read_text() == "old"
    assert list(tmp_path.iterdir()) == [existing]


def test_devices_table_and_json() -> None:
    code, stdout, _ = run("devices")
    assert code == 0 and "h100" in stdout and "groq-lpu" in stdout
    code, stdout, _ = run("devices", "--format", "json")
    document = json.loads(stdout)
    assert document["h100"]["capacity_bytes"] == 39_321_600
    assert document["h100"]["usable_fraction"]["kind"] == "A"


@pytest.mark.parametrize("verb", ["devices", "profile", "plan", "demo"])
def test_help_shows_an_example(verb: str) -> None:
    code, stdout, _ = run(verb, "--help")
    assert code == 0 and "Example" in stdout and f"cachefit {verb}" in stdout


def test_demo_runs_the_whole_path(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    code, stdout, _ = run("demo", "--out-dir", str(tmp_path))
    assert code == 0
    assert "tokens identical to the unpartitioned model" in stdout
    assert "tokens identical to transformers' generate" in stdout        # the Hugging Face checkpoint's run
    assert Plan.read(tmp_path / "hf-plan.json").cards == 2 and (tmp_path / "hf-shards" / "config.json").exists()
    assert Plan.read(tmp_path / "plan.json").cards == 3 and (tmp_path / "shards" / "manifest.json").exists()
    assert json.loads((tmp_path / "run.json").read_text())["check"]["tokens_identical"]
    assert "30.7x an H100's whole L2" in stdout
    written = sorted(path.name for path in tmp_path.iterdir())
    assert "seed-dense16-h100.json" in written and "llama-3-8b-dmatrix-corsair.png" in written
    assert Plan.read(tmp_path / "seed-dense16-dmatrix-corsair-batch1.json").cards == 16


def test_demo_plans_only_needs_no_run(tmp_path: Path) -> None:
    code, stdout, _ = run("demo", "--plans-only", "--out-dir", str(tmp_path))
    assert code == 0 and "tokens identical" not in stdout and (tmp_path / "seed-dense16-h100.json").exists()


def test_profile_torch_sources_from_the_cli() -> None:
    pytest.importorskip("transformers")
    code, stdout, _ = run("profile", "hf/gpt2", "--seq", "128", "--format", "json")
    table = LayerTable.from_dict(json.loads(stdout))
    assert code == 0 and table.layers[0].name == "transformer.wte" and table.layers[-1].shared
    code, stdout, _ = run("profile", "toy_models:two_stream", "--input-shape", "2,5,16", "--input-dtype", "float32",
                          "--format", "json")
    assert code == 0 and json.loads(stdout)["layers"][0]["name"] == "stem"
    code, stdout, _ = run("profile", "tiny-llama", "--measure", "--format", "json")
    assert code == 0 and json.loads(stdout)["layers"][1]["workspace_bytes"] > 0


@pytest.mark.parametrize("args", [
    ("profile", "toy_models:two_stream", "--input-shape", "2,x"),
    ("profile", "toy_models:two_stream_with_inputs", "--prefill-chunk", "4"),
    ("profile", "hf/gpt2", "--phase", "prefill", "--prefill-chunk", "4"),      # a chunk is of a decode profile
    ("profile", "toy_models:two_stream"),
    ("profile", "toy_models:two_stream", "--input-shape", "2,16", "--input-dtype", "float99"),
])
def test_bad_torch_source_options_exit_2(args: tuple[str, ...]) -> None:
    code, _, stderr = run(*args)
    assert code == 2 and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def test_run_across_hosts_points_to_the_torchrun_command(tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    assert run("plan", "tiny-llama", "--capacity", "8MiB", "--cards", "2", "-o", str(plan_file))[0] == 0
    code, _, stderr = run("run", str(plan_file), "--weights", str(tmp_path), "--nnodes", "2")
    assert code == 2 and "--print-torchrun" in stderr


def test_plan_with_tensor_groups_baseline_and_micro_batch(tmp_path: Path) -> None:
    # tiny-llama's blocks (about 0.7 MiB) do not fit 300 KiB whole: auto split makes groups of 4 for them.
    code, stdout, _ = run("plan", "tiny-llama", "--capacity", "300KiB", "--format", "json")
    document = json.loads(stdout)
    assert code == 0 and {p["tensor_parallel"] for p in document["partitions"]} == {1, 4}
    assert all(p["cards"] == list(range(p["card"], p["card"] + p["tensor_parallel"])) for p in document["partitions"])
    assert document["partitions"][0]["layers"] == ["embed", "layers.0"]     # the embedding split by vocabulary too
    code, _, _ = run("plan", "tiny-llama", "--capacity", "300KiB", "--split", "never")
    assert code == 3
    # The baseline is built as asked and written, and says it does not fit on-chip (exit 3: not feasible).
    code, stdout, _ = run("plan", "seed-dense16", "--device", "h100", "--baseline", "tp=8,pp=2", "-o",
                          str(tmp_path / "base.json"))
    assert code == 3 and "does not fit on-chip" in stdout
    assert Plan.read(tmp_path / "base.json").cards == 16
    code, _, stderr = run("plan", "seed-dense16", "--device", "h100", "--baseline", "tp=3,pp=2")
    assert code == 2 and "tp=3 is not a split every layer allows" in stderr
    # Prefill of 512-token sequences on 1 GB cards: the largest batch per pass that plans, found exactly.
    code, stdout, stderr = run("plan", "seed-dense16", "--capacity", "1GB", "--phase", "prefill", "--seq", "512",
                               "--micro-batch", "auto", "--format", "json")
    batch = json.loads(stdout)["model"]["batch"]
    assert code == 0 and f"micro-batch: {batch} sequences" in stderr
    code, _, _ = run("plan", "seed-dense16", "--capacity", "1GB", "--phase", "prefill", "--seq", "512",
                     "--batch", str(batch + 1))
    assert code == 3
    code, stdout, _ = run("plan", "seed-dense16", "--device", "h100", "--micro-batch", "auto")
    assert code == 3 and "no micro-batch fits" in stdout


def test_exports_of_tensor_group_plans(tmp_path: Path) -> None:
    # tiny-llama: embed, 4 blocks, head = 6 layers; 2 stages of 3: embed + 2 blocks, 2 blocks + head.
    run("plan", "tiny-llama", "--capacity", "8MiB", "--baseline", "tp=2,pp=2", "-o", str(tmp_path / "b.json"))
    code, stdout, _ = run("export", str(tmp_path / "b.json"), "--to", "vllm")
    assert code == 0 and stdout == "VLLM_PP_LAYER_PARTITION=2,2\n# and --tensor-parallel-size 2\n"
    code, _, stderr = run("export", str(tmp_path / "b.json"), "--to", "accelerate")
    assert code == 2 and "tensor groups" in stderr


def test_an_internal_failure_is_a_bug_not_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    from cachefit import api

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("boom")
    monkeypatch.setattr(api, "plan", broken)
    code, stdout, stderr = run("plan", "tiny-llama", "--capacity", "1MiB")
    assert code == 1 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("cachefit: error: internal error: KeyError: 'boom'") and "CACHEFIT_DEBUG=1" in stderr
    monkeypatch.setenv("CACHEFIT_DEBUG", "1")                      # the traceback, for a bug report
    result = CliRunner().invoke(cli, ["plan", "tiny-llama", "--capacity", "1MiB"])
    assert isinstance(result.exception, KeyError)


def test_os_errors_are_bad_input_on_the_users_paths_and_bugs_on_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    import cachefit
    from cachefit import api

    package = Path(cachefit.__file__).parent
    for path, expected in (("/srv/mine/plan.json", 2), (str(package / "data" / "hf"), 1)):
        def failing(*args: object, path: str = path, **kwargs: object) -> None:
            raise FileNotFoundError(2, "No such file or directory", path)
        monkeypatch.setattr(api, "plan", failing)
        code, _, stderr = run("plan", "tiny-llama", "--capacity", "1MiB")
        assert code == expected and path in stderr and len(stderr.strip().splitlines()) == 1
        assert ("internal error" in stderr) == (expected == 1)


def test_library_messages_name_parameters_and_the_cli_names_flags() -> None:
    with pytest.raises(ValueError, match=r"objective='time' plans whole layers by predicted time; it has no "
                                         r"baseline: drop baseline"):
        cachefit.plan("tiny-llama", device="h100", objective="time", baseline="tp=2,pp=1")
    code, _, stderr = run("plan", "tiny-llama", "--device", "h100", "--objective", "time", "--baseline", "tp=2,pp=1")
    assert code == 2 and "--objective time plans whole layers by predicted time; it has no --baseline: drop " \
        "--baseline" in stderr


@pytest.mark.parametrize("args", [("--capacity", "300KiB"), ("--capacity", "2GB", "--baseline", "tp=2,pp=2")])
def test_plots_of_tensor_group_plans(tmp_path: Path, args: tuple[str, ...]) -> None:
    # One bar per stage against its cards' capacity (a group's cards share one size).
    code, _, _ = run("plan", "tiny-llama", *args, "--plot", str(tmp_path / "p.png"))
    assert code == 0 and (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
