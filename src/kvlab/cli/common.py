"""Helpers the commands share: JSON output, consoles and tables, reading prompts and options."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from kvlab.errors import KvlabError


# Output to a file or a pipe has no width of its own: rich would assume 80 columns and cut a wide
# table's labels short; tables take only the width they need, so a generous one costs nothing.
_PIPE_WIDTH = 200


def console(json_path: str | None = None, *, stderr: bool = False):
    """The terminal console; silent when the JSON goes to stdout (`--json -`), which then holds JSON only."""
    from rich.console import Console

    out = Console(stderr=stderr, quiet=json_path == "-", highlight=False, soft_wrap=True)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = _PIPE_WIDTH
    return out


def make_table(title: str, columns: Sequence[str], *, labels: int = 0, no_wrap: bool = False, **options: Any):
    """A table titled at its left edge: the first `labels` columns left-justified, the figures after them right."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", **options)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < labels else "right", no_wrap=no_wrap)
    return table


def numbers(text: str, option: str, kind: Callable[[str], Any] = float, what: str = "numbers") -> list:
    """The comma-separated numbers of an option; anything else is a usage error naming the option."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of {what}", param_hint=option) from None


def write_json(path: str | None, data: Any) -> None:
    """Write `data` as JSON to `path` atomically (`-` means stdout); nothing when path is None."""
    if path is None:
        return
    text = json.dumps(_finite(data), indent=2, default=_jsonable, allow_nan=False) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    from kvlab.atomic import write_text_atomic

    write_text_atomic(path, text)


def _finite(value: Any) -> Any:
    """The same data with NaN and infinities as None: strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return _finite(value.tolist())
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def read_prompt(prompt: str | None, prompt_file: str | None, required: bool = True) -> str | None:
    """The prompt text from --prompt or --prompt-file (`-` reads stdin); exactly one of them."""
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        if prompt_file == "-":
            return sys.stdin.read()
        path = Path(prompt_file)
        if not path.is_file():
            raise KvlabError(f"prompt file {path} does not exist")
        try:
            return path.read_text()
        except UnicodeDecodeError:
            raise KvlabError(f"prompt file {path} is not UTF-8 text") from None
    if prompt is None and required:
        raise click.UsageError("give --prompt TEXT or --prompt-file FILE")
    return prompt


def with_engine(run_text: str, engine: str | None) -> str:
    """The run spec text with --engine folded in (one clear error when they disagree)."""
    if engine is None:
        return run_text
    given = [item.partition("=")[2].strip() for item in run_text.split(",") if item.strip().startswith("engine=")]
    if given and given[0] != engine:
        raise click.UsageError(f"--engine {engine} and engine={given[0]} in --run disagree")
    return run_text if given else f"engine={engine}" + ("," + run_text if run_text.strip() else "")


def output_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Option callback: an output file is checked when the command line is read, before any work."""
    if value is not None and value != "-":
        from kvlab.outputs import check_output_file

        check_output_file(value, _option_name(param))
    return value


def output_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Option callback: an output folder is checked when the command line is read, before any work."""
    if value is not None:
        from kvlab.outputs import check_output_dir

        check_output_dir(value, _option_name(param))
    return value


def snapshot_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Option callback: a snapshot folder to write, checked before any work (see Snapshot.save)."""
    if value is not None:
        from kvlab.snapshot import check_snapshot_target

        output_dir(ctx, param, value)
        check_snapshot_target(value)
    return value


def _engine_python(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Option callback: hand the path to the engine through its environment variable (child processes see it too)."""
    if value:
        from kvlab.engines.vllm import PYTHON_ENV

        os.environ[PYTHON_ENV] = value


def _option_name(param: click.Parameter) -> str:
    return max(param.opts, key=len) if param.opts else str(param.name)


json_option = click.option("--json", "json_path", metavar="FILE", default=None, callback=output_file,
                           help="Also write the figures as JSON to FILE ('-' for stdout).")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")


def json_and_quiet(command: Callable) -> Callable:
    """--json and --quiet, the pair most commands take."""
    return json_option(quiet_option(command))


model_option = click.option("--model", "-m", "model_spec", default="smollm2", show_default=True,
                            help="Model spec (see `kvlab models`).")
engine_python_option = click.option(
    "--engine-python", default=None, metavar="PYTHON", expose_value=False, callback=_engine_python,
    help="vLLM's Python (default: $KVLAB_VLLM_PYTHON, else .venv-vllm/bin/python in the repository root or the "
         "current directory).")
