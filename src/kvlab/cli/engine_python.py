"""`--engine-python PATH`: the Python an engine in its own virtual environment runs with (vLLM)."""

from __future__ import annotations

import os

import click


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Hand the path to the engine through its environment variable (child processes see it too)."""
    if value:
        from kvlab.engines.vllm import PYTHON_ENV

        os.environ[PYTHON_ENV] = value


engine_python_option = click.option(
    "--engine-python", default=None, metavar="PYTHON", expose_value=False, callback=_remember,
    help="vLLM's Python (default: $KVLAB_VLLM_PYTHON, else .venv-vllm/bin/python in the repository root or the "
         "current directory).")
