"""What every verb shares: model options, output (table / JSON / -o FILE), and errors as exit codes.

Exit codes (DESIGN.md): 0 done; 2 bad input or usage (one line on stderr); 3 no feasible plan; 1 a bug.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from cachefit.core.errors import EXIT_BUG, EXIT_INFEASIBLE, EXIT_USAGE, InputError, RunError
from cachefit.core.files import json_text

__all__ = ["EXIT_INFEASIBLE", "emit_json", "err", "fail", "handle_errors", "model_arguments", "model_options", "out"]
from cachefit.output.report import console
from cachefit.sources import TorchOptions

out, err = console(), console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


DEBUG_VARIABLE = "CACHEFIT_DEBUG"   # set (to anything) for the traceback of an internal error
_PACKAGE = Path(__file__).resolve().parents[1]


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One clear line on stderr, then exit."""
    click.echo(f"cachefit: error: {message}", err=True)
    sys.exit(code)


_FLAGS = {"peer": "for"}     # parameters whose flag is not their name


def flag_text(error: InputError) -> str:
    """The message with the parameters it names written as flags: ``prefill_chunk`` -> ``--prefill-chunk``,
    ``objective='time'`` -> ``--objective time``."""
    text = str(error)
    for name in error.parameters:
        flag = "--" + _FLAGS.get(name, name.replace("_", "-"))
        text = re.sub(rf"(?<![\w-]){re.escape(name)}='([^']*)'", rf"{flag} \1", text)
        text = re.sub(rf"(?<![\w-]){re.escape(name)}=(?=\w)", f"{flag} ", text)
        text = re.sub(rf"(?<![\w=-]){re.escape(name)}(?![\w-])", flag, text)
    return text


def handle_errors(function: F) -> F:
    """Bad input (InputError, OS errors on the user's own paths) -> one line and exit 2; a failed run -> one line
    and exit 1; anything else is a bug: one line saying so and how to see the traceback, exit 1."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except InputError as error:
            fail(flag_text(error), error.exit_code)
        except RunError as error:
            fail(str(error), error.exit_code)
        except OSError as error:
            if error.filename is None or _inside_package(str(error.filename)):
                _internal(error)
            fail(f"{error.filename}: {error.strerror or error}")
        except Exception as error:
            _internal(error)
    return wrapper  # type: ignore[return-value]


def _inside_package(path: str) -> bool:
    """A file of cachefit's own (its bundled data): missing there is a broken install, not the user's input."""
    return Path(path).resolve().is_relative_to(_PACKAGE)


def _internal(error: BaseException) -> NoReturn:
    if os.environ.get(DEBUG_VARIABLE):
        raise error
    first = (str(error).strip().splitlines() or [""])[0]
    fail(f"internal error: {type(error).__name__}: {first} (this is a bug in cachefit; rerun with "
         f"{DEBUG_VARIABLE}=1 for the traceback)", EXIT_BUG)


def model_options(function: F) -> F:
    """--batch --seq --phase --dtype --attention --input-bytes: the workload a model is sized for."""
    options = [
        click.option("--batch", type=click.IntRange(min=1), help="Sequences per pass (default: the model's)."),
        click.option("--seq", type=click.IntRange(min=1), help="Sequence (context) length in tokens."),
        click.option("--phase", type=click.Choice(["prefill", "decode"]), help="Prompt pass or one-token steps."),
        click.option("--dtype", help="float32, float16, bfloat16, float8_e4m3fn, int8 (aliases fp16, bf16...)."),
        click.option("--attention", type=click.Choice(["naive", "flash", "eager"]),
                     help="naive keeps the score matrix as workspace (Hugging Face models: meta's SDPA "
                          "decomposition); flash only a 128-key tile (Hugging Face: the fused kernel, their "
                          "default); eager: a Hugging Face model's own attention code."),
        click.option("--input-bytes", type=click.IntRange(min=0),
                     help="For CSV layer tables: bytes of the activation entering layer 0."),
        click.option("--measure", is_flag=True,
                     help="Presets/specs: profile the reference torch module on meta instead of the closed form."),
        click.option("--granularity", type=click.Choice(["block", "sublayer", "leaf"]), default="block",
                     show_default=True, help="One layer per repeated block; sublayer (presets/specs): attention and "
                     "MLP apart, so each splits as finely as its shapes allow; leaf (torch/HF): per leaf module."),
        click.option("--prefill-chunk", type=click.IntRange(min=1),
                     help="With --measure (decode): also count a pass of this many prompt tokens per sequence, "
                          "so cachefit run sends prompts in such chunks."),
        click.option("--input-shape", help="package.module:factory without example inputs: e.g. 1,128."),
        click.option("--input-dtype", default="int64", show_default=True, help="dtype of --input-shape's tensor."),
        click.option("--experts", type=click.Choice(["tensor", "parallel"]), default="tensor", show_default=True,
                     help="Hugging Face mixture-of-experts models in tensor groups: every expert split across the "
                          "group's cards (tensor), or whole experts, E/t a card (parallel: the model's ep_plan)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def model_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the model options out of a verb's keyword arguments, as ``load_model`` takes them."""
    arguments = {key: kwargs.pop(key) for key in ("batch", "seq", "phase", "dtype", "attention", "input_bytes")}
    shape_text = kwargs.pop("input_shape")
    try:
        shape = tuple(int(part) for part in shape_text.split(",")) if shape_text else None
    except ValueError:
        shape = ()
    if shape is not None and (not shape or min(shape) < 1):
        raise InputError(f"--input-shape must be positive integers joined by commas, e.g. 1,128; got {shape_text!r}")
    arguments["torch_options"] = TorchOptions(granularity=kwargs.pop("granularity"), input_shape=shape,
                                              input_dtype=kwargs.pop("input_dtype"), measure=kwargs.pop("measure"),
                                              prefill_chunk=kwargs.pop("prefill_chunk"),
                                              experts=kwargs.pop("experts"))
    return arguments


def emit_json(document: dict[str, Any]) -> None:
    click.echo(json_text(document), nl=False)
