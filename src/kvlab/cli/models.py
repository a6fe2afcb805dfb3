"""`kvlab models`: the model specs `--model` accepts."""

from __future__ import annotations

import click

from kvlab.cli.common import console, json_option, make_table, write_json


@click.command("models")
@json_option
def models_command(json_path: str | None) -> None:
    """List the model specs: the embedded default, the tiny test models, and local folders.

    `--model` also takes any local Hugging Face model folder. Nothing is ever downloaded.
    """
    from kvlab.models import list_models

    specs = list_models()
    table = make_table("kvlab models", ("name", "kind", "what it is", "status"), labels=4)
    for spec in specs:
        name = f"{spec.name} (default)" if spec.kind == "embedded" else spec.name
        table.add_row(name, spec.kind, spec.summary, spec.status)
    table.add_row("PATH", "local", "a local Hugging Face model folder (config.json + weights)", "")
    console(json_path).print(table)
    write_json(json_path, {"models": [spec.to_dict() for spec in specs]})


COMMANDS = [models_command]
