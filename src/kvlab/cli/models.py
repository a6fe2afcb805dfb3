"""`kvlab models`: the model specs `--model` accepts."""

from __future__ import annotations

import click

from kvlab.cli.common import console, json_option, write_json


@click.command("models")
@json_option
def models_command(json_path: str | None) -> None:
    """List the model specs: the embedded default, the tiny test models, and local folders.

    `--model` also takes any local Hugging Face model folder. Nothing is ever downloaded.
    """
    from rich.table import Table

    from kvlab.models import list_models

    specs = list_models()
    table = Table(title="kvlab models", title_justify="left")
    for column in ("name", "kind", "what it is", "status"):
        table.add_column(column)
    for spec in specs:
        name = f"{spec.name} (default)" if spec.kind == "embedded" else spec.name
        table.add_row(name, spec.kind, spec.summary, spec.status)
    table.add_row("PATH", "local", "a local Hugging Face model folder (config.json + weights)", "")
    if json_path != "-":
        console().print(table)
    write_json(json_path, {"models": [spec.to_dict() for spec in specs]})


COMMANDS = [models_command]
