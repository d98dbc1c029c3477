"""Bad input, as a careless or hostile user gives it: every case is one line on stderr naming the problem, exit 2,
no traceback, and an earlier output file left exactly as it was. In-process (click's runner), before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachefit.cli import cli

OLD = b"an earlier output, to keep\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hostile and broken inputs, made once."""
    folder = tmp_path_factory.mktemp("bad")
    os.mkfifo(folder / "fifo.json")
    os.mkfifo(folder / "fifo.toml")
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "latin1.csv").write_bytes("name,weight_bytes,activation_bytes,workspace_bytes\ncaf\xe9,1,1,1\n"
                                        .encode("latin-1"))
    header = "name,weight_bytes,activation_bytes,workspace_bytes\n"
    (folder / "wide.csv").write_text(header + "x" * 200_000 + ",1,1,1\n")
    (folder / "list.json").write_text("[1, 2]")
    (folder / "table.json").write_text(json.dumps({"schema": "cachefit.layers/v1", "name": "t", "layers": [
        {"name": "a", "weight_bytes": 10, "activation_bytes": 1, "workspace_bytes": 0, "flops": "1e9"}]}))
    (folder / "huge.toml").write_text('family = "dense"\nname = "h"\nlayers = 99999999999999999999\nheads = 2\n'
                                      'head_dim = 4\nmlp_hidden = 8\n')
    (folder / "gqa.toml").write_text('family = "llama"\nname = "g"\nlayers = 2\nhidden = 64\nheads = 4\n'
                                     'kv_heads = 3\nffn_hidden = 128\nvocab = 100\n')
    (folder / "devices.toml").write_text('[MyCard]\nlabel = "Mine"\non_chip_bytes = 1000000\n')
    (folder / "bad-devices.toml").write_text('[x]\nlabel = "X"\non_chip_bytes = -1\n')
    (folder / "hf-heads.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 66,
                                                      "num_attention_heads": 4, "num_hidden_layers": 2,
                                                      "intermediate_size": 128, "vocab_size": 100}))
    (folder / "hf-text.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "64",
                                                     "num_attention_heads": 4, "num_hidden_layers": 2,
                                                     "intermediate_size": 128, "vocab_size": 100}))
    (folder / "factories.py").write_text("import sys\n\ndef raises():\n    raise RuntimeError('no')\n\n"
                                         "def needs(x):\n    return x\n\ndef exits():\n    sys.exit(3)\n\n"
                                         "not_callable = 7\n")
    (folder / "syntax_error.py").write_text("def broken(:\n")
    (folder / "deployment-no-seq.toml").write_text('[[deployment]]\nname = "x"\nmodel = "llama-2-7b"\n'
                                                   'device = "groq-lpu"\ndtypes = ["int8"]\n')
    _corrupt_files(folder)
    return folder


def _corrupt_files(folder: Path) -> None:
    """Plans, tables and specs broken one way each (``plan-*.json``, ``table-*.json``, ``spec-*.toml``)."""
    from cachefit import plan as make

    good = make("tiny-llama", capacity="8MiB", cards=2).to_dict()
    for name, change in PLAN_DAMAGE.items():
        document = json.loads(json.dumps(good))
        change(document)
        (folder / f"plan-{name}.json").write_text(json.dumps(document))
    layer = {"name": "a", "weight_bytes": 10, "activation_bytes": 1, "workspace_bytes": 0}
    for name, layers in TABLE_DAMAGE.items():
        (folder / f"table-{name}.json").write_text(json.dumps({"schema": "cachefit.layers/v1", "name": "t",
                                                               "layers": [{**layer, **x} for x in layers]}))
    base = 'name = "s"\nlayers = 2\nhidden = 64\nheads = 4\nkv_heads = 2\nffn_hidden = 128\nvocab = 100\n'
    for name, damage in SPEC_DAMAGE.items():
        (folder / f"spec-{name}.toml").write_text(damage(base))


PLAN_DAMAGE = {
    "schema": lambda d: d.update(schema="cachefit.plan/v0"),
    "extra-spec-key": lambda d: d["model"]["spec"].update(bogus=1),
    "no-layers": lambda d: d["partitions"][0].update(layers=[]),
    "cards": lambda d: d["partitions"][1].update(cards=[7]),
    "sum": lambda d: d["partitions"][0].update(footprint_bytes=1),
    "gap": lambda d: d["partitions"][1].update(first=5),
    "negative": lambda d: d["partitions"][0].update(weight_bytes=-1),
    "string": lambda d: d.update(cards="2"),
    "feasible-empty": lambda d: d.update(partitions=[]),
    "layout": lambda d: d.update(layout="diagonal"),
}
TABLE_DAMAGE = {
    "negative": [{"weight_bytes": -1}],
    "noname": [{"name": ""}],
    "duplicate": [{}, {}],
    "extra": [{"colour": "red"}],
    "float": [{"weight_bytes": 1.5}],
    "splits": [{"splits": [{"ways": 1, "weight_bytes": 1, "workspace_bytes": 0}]}],
}
SPEC_DAMAGE = {
    "family": lambda base: f'family = "mamba"\n{base}',
    "extra": lambda base: f'family = "llama"\ncolour = "red"\n{base}',
    "heads": lambda base: f'family = "llama"\n{base}'.replace("\nheads = 4", "\nheads = 0"),
    "workload": lambda base: f'family = "llama"\n{base}[workload]\nbatch = 0\n',
    "toml": lambda base: f'family = "llama\n{base}',
    "type": lambda base: f'family = "llama"\n{base}'.replace("hidden = 64", 'hidden = "64"'),
}


SIZES = ["0", "-5", "abc", "1.5B", "50 MiBs", "1e9", "0x10", "9" * 30, "1,,2", ",", "50MiB,", "1.2345B", "1/2"]
PLAN = [
    (("plan", "tiny-llama"), "give exactly one of --device"),
    (("plan", "tiny-llama", "--device", "h100", "--capacity", "1GB"), "give exactly one of"),
    (("plan", "tiny-llama", "--device", "no-such-card"), "is not in the catalog"),
    (("plan", "no-such-model", "--capacity", "1GB"), "is not a file, nor a preset"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--cards", "99"), "must not exceed the number of layers"),
    (("plan", "tiny-llama", "--capacity", "1GB,2GB", "--cards", "3"), "must match the 2 capacities"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--baseline", "tp=2,pp=2", "--cards", "3"), "is fixed by"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--baseline", "tp=3,pp=2"), "tp=3 is not a split"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--baseline", "tp=2,pp=99"), "pp must be between 1"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--baseline", "tp=x"), "--baseline must look like"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--baseline", "tp=2,pp=2", "--split", "never"),
     "--baseline splits every layer tp ways itself; drop --split never"),
    (("plan", "tiny-llama", "--capacity", "1GB,2GB", "--split", "always"), "same-size cards"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--split", "always", "--strategy", "greedy"), "no greedy"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--objective", "time"), "give --device"),
    (("plan", "tiny-llama", "--device", "h100", "--objective", "time", "--strategy", "greedy"), "no --strategy"),
    (("plan", "tiny-llama", "--device", "h100", "--objective", "time", "--split", "always"), "no --split"),
    (("plan", "tiny-llama", "--device", "h100", "--objective", "time", "--capacity", "1GB,2GB"), "same-size"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--micro-batch", "auto", "--baseline", "tp=2,pp=1"),
     "a --baseline is built as given"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--dtype", "float99"), "dtype must be one of"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--prefill-chunk", "4"), "use it with --measure"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--input-bytes", "4"), "--input-bytes applies to CSV"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--granularity", "leaf"), None),
    (("plan", "tiny-llama", "--capacity", "100,20MB"), None),             # a card too small: left out, not a crash
    (("plan", "tiny-llama", "--capacity", "1MB,2MB,3MB,4MB,5MB,6MB"), None),
    (("plan", "tiny-llama", "--capacity", "1GB", "--measure", "--granularity", "sublayer"), "with --measure use"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--measure", "--attention", "flash"), "drop --attention"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--measure", "--prefill-chunk", "9999"),
     "--prefill-chunk needs --phase decode"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--devices-file", "{files}/nothing.toml"), "cannot read devices"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--devices-file", "{files}/fifo.toml"), "not a regular file"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--devices-file", "{files}/bad-devices.toml"), "on_chip_bytes"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--plot", "{files}/nodir/p.png"), "does not exist"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--plot", "{files}"), "is a directory"),
    (("plan", "tiny-llama", "--capacity", "1GB", "--plot", "{files}/fifo.json"), "not a regular file"),
    (("plan", "{files}/fifo.json", "--capacity", "1GB"), "not a regular file"),
    (("plan", "{files}/deep.json", "--capacity", "1GB"), "nested too deeply"),
    (("plan", "{files}/list.json", "--capacity", "1GB"), "must be a JSON object"),
    (("plan", "{files}/table.json", "--capacity", "1GB"), "flops must be a number"),
    (("plan", "{files}/latin1.csv", "--capacity", "1GB"), "is not UTF-8"),
    (("plan", "{files}/wide.csv", "--capacity", "1GB"), "not a readable CSV"),
    (("plan", "{files}/huge.toml", "--capacity", "1GB"), "layers"),
    (("plan", "{files}/gqa.toml", "--capacity", "1GB"), "must be a multiple of kv_heads"),
    (("plan", "{files}/hf-heads.json", "--capacity", "1GB"), "not a multiple of the number of attention heads"),
    (("plan", "{files}/hf-text.json", "--capacity", "1GB"), "hidden_size"),
] + [(("plan", "tiny-llama", "--capacity", size), "capacity") for size in SIZES]
PROFILE = [
    (("profile", "factories:raises"), "raised RuntimeError: no"),
    (("profile", "factories:needs"), "raised TypeError"),
    (("profile", "factories:exits"), "raised SystemExit"),
    (("profile", "factories:not_callable"), "is not callable"),
    (("profile", "factories:missing"), "cannot import"),
    (("profile", "syntax_error:broken"), "cannot import syntax_error:broken: SyntaxError"),
    (("profile", "no_such_module:f"), "cannot import"),
    (("profile", "toy_models:two_stream", "--input-shape", "-2,8"), "positive integers"),
    (("profile", "toy_models:two_stream", "--input-shape", "0"), "positive integers"),
    (("profile", "tiny-llama", "--batch", "0"), "0"),
    (("profile", "tiny-llama", "--seq", "-1"), "-1"),
    (("profile", "tiny-llama", "--phase", "train"), "train"),
    (("profile", "tiny-llama", "-o", "{files}/nodir/t.json"), "does not exist"),
    (("profile", "{files}/table.json", "--batch", "2"), "has fixed sizes"),
    (("profile", "hf/llama-3-8b", "--verify"), "would need about"),
    (("profile", "hf/gpt2", "--verify", "--verify-limit", "lots"), "--verify-limit must be a size"),
    (("profile", "tiny-llama", "--verify"), "verify builds a model for real"),
    (("profile", "hf/gpt2", "--verify", "-o", "{files}/t.json"), "--verify prints a comparison"),
]
OTHER = [
    (("predict", "{files}/nothing.json"), "cannot read plan"),
    (("predict", "{files}/list.json"), "must be a JSON object"),
    (("predict", "{files}/deep.json"), "nested too deeply"),
    (("predict", "{files}/fifo.json"), "not a regular file"),
    (("export", "{files}/nothing.json", "--to", "vllm"), "cannot read plan"),
    (("export", "{files}/table.json", "--to", "vllm"), "schema must be"),
    (("export", "{files}/nothing.json", "--to", "deepspeed"), "deepspeed"),
    (("devices", "--devices-file", "{files}/fifo.toml"), "not a regular file"),
    (("devices", "--devices-file", "{files}/bad-devices.toml"), "on_chip_bytes"),
    (("init-weights", "tiny-llama", "--out", "{files}/w.safetensors", "--dtype", "int8"), "store float weights"),
    (("init-weights", "{files}/gqa.toml", "--out", "{files}/w.safetensors"), "must be a multiple of kv_heads"),
    (("init-weights", "tiny-llama", "--out", "{files}/nodir/w.safetensors"), "does not exist"),
    (("init-weights", "hf/gpt2", "--out", "{files}/w.safetensors"), "expected a preset"),
    (("init-weights", "mixtral-8x7b", "--out", "{files}/w.safetensors"), "dense MLPs only"),
    (("plan", "tiny-llama", "--capacity", "1MiB", "--experts", "parallel"), "no mixture-of-experts to place"),
    (("plan", "{files}/table.json", "--capacity", "1MiB", "--experts", "parallel"), "this model is not one"),
    (("plan", "hf/llama-3-8b", "--device", "groq-lpu", "--experts", "parallel"), "no mixture-of-experts model"),
    (("deployments", "-o", "{files}/nodir/d.md"), "does not exist"),
    (("deployments", "-o", "{files}/d.md", "--deployments-file", "{files}/fifo.toml"), "not a regular file"),
    (("deployments", "-o", "{files}/d.md", "--deployments-file", "{files}/devices.toml"), "[[deployment]]"),
    (("deployments", "-o", "{files}/d.md", "--deployments-file", "{files}/deployment-no-seq.toml"), "seq"),
    (("calibrate", "-o", "{files}/nodir/host.toml"), "does not exist"),
    (("calibrate", "-o", "{files}/host.toml", "--name", 'x"]\n[y'), "--name must be a plain device name"),
    (("shard", "{files}/nothing.json", "{files}/w.safetensors", "--out", "{files}/s"), "cannot read plan"),
    (("run", "{files}/nothing.json", "--weights", "{files}"), "cannot read plan"),
    (("run", "{files}/nothing.json", "--weights", "{files}", "--timeout", "0"), "timeout"),
    (("run", "{files}/nothing.json", "--weights", "{files}", "--timeout", "nan"), "timeout"),
    (("run", "{files}/nothing.json", "--weights", "{files}", "--timeout", "inf"), "timeout"),
    (("run", "{files}/nothing.json", "--weights", "{files}", "--timeout", "-5"), "timeout"),
    (("run", "{files}/nothing.json", "--weights", "{files}", "--threads", "100000"), "threads"),
    (("run", "{files}/nothing.json", "--weights", "{files}", "--seed", str(2**70)), "seed"),
    (("run", "{files}/nothing.json", "--weights", "{files}", "--report", "{files}/nodir/r.json"),
     "does not exist"),
    (("run", "{files}/nothing.json", "--weights", "{files}", "--print-torchrun", "--rdzv-endpoint", "garbage"),
     "rdzv-endpoint must be HOST:PORT"),
    (("run", "{files}/nothing.json", "--weights", "{files}", "--print-torchrun", "--rdzv-endpoint", "h:99999"),
     "rdzv-endpoint must be HOST:PORT"),
]
PLAN_FILES = [((verb, "{files}/plan-" + name + ".json", *extra), None) for name in PLAN_DAMAGE
              for verb, *extra in (("predict", "--device", "h100"), ("export", "--to", "accelerate"),
                                   ("shard", "{files}/w.safetensors", "--out", "{files}/s"),
                                   ("run", "--weights", "{files}"))]
TABLE_FILES = [((verb, "{files}/table-" + name + ".json", *extra), None) for name in TABLE_DAMAGE
               for verb, *extra in (("plan", "--capacity", "1GB"), ("profile",))]
SPEC_FILES = [((verb, "{files}/spec-" + name + ".toml", *extra), None) for name in SPEC_DAMAGE
              for verb, *extra in (("plan", "--capacity", "1GB"), ("profile",),
                                   ("init-weights", "--out", "{files}/w.safetensors"))]
CASES = PLAN + PROFILE + OTHER + PLAN_FILES + TABLE_FILES + SPEC_FILES


def _invoke(files: Path, args: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    monkeypatch.chdir(files)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    result = CliRunner().invoke(cli, [arg.format(files=files) for arg in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(args)[:60] for args, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(files: Path, args: tuple[str, ...], message: str | None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, stderr = _invoke(files, args, monkeypatch)
    if message is None and "{files}/" not in " ".join(args[1:2]):     # valid after all: it must work
        assert code == 0
        return
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    # A broken file is named in the one line; otherwise the line says what is wrong.
    expected = message if message is not None else args[1].format(files=files)
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("args", [
    ("plan", "tiny-llama", "--capacity", "1GB", "--dtype", "float99", "-o", "{out}"),
    ("plan", "tiny-llama", "--capacity", "1GB", "-o", "{out}", "--plot", "{files}/nodir/p.png"),
    ("profile", "{files}/table.json", "-o", "{out}"),
    ("predict", "{files}/nothing.json", "-o", "{out}"),
])
def test_a_failing_command_leaves_the_earlier_output(files: Path, tmp_path: Path, args: tuple[str, ...],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "earlier.json"
    out.write_bytes(OLD)
    code, _, _ = _invoke(files, tuple(arg.replace("{out}", str(out)) for arg in args), monkeypatch)
    assert code == 2 and out.read_bytes() == OLD


def test_outputs_keep_the_umask_and_write_through_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    previous = os.umask(0o027)
    try:
        assert CliRunner().invoke(cli, ["plan", "tiny-llama", "--capacity", "1GB", "-o", "p.json"]).exit_code == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o640
    (tmp_path / "p.json").chmod(0o604)                                  # a file's own mode survives a rewrite
    assert CliRunner().invoke(cli, ["plan", "tiny-llama", "--capacity", "2GB", "-o", "p.json"]).exit_code == 0
    assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o604
    result = CliRunner().invoke(cli, ["profile", "tiny-llama", "-o", "/dev/null"])
    assert result.exit_code == 0 and Path("/dev/null").is_char_device()
    (tmp_path / "link.json").symlink_to(tmp_path / "p.json")
    assert CliRunner().invoke(cli, ["plan", "tiny-llama", "--capacity", "1GB", "-o", "link.json"]).exit_code == 0
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "p.json").read_text())["cards"] == 1


def test_device_names_in_a_devices_file_are_case_insensitive(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("mycard", "MyCard", "MYCARD"):
        code, stdout, _ = _invoke(files, ("plan", "tiny-llama", "--device", name, "--devices-file",
                                          "{files}/devices.toml", "--format", "json"), monkeypatch)
        assert code in (0, 3) and json.loads(stdout)["device"]["name"] == "mycard"
