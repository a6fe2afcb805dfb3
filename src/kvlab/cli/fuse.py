"""`kvlab fuse`: RAG KV fusion, one click group whose commands live in several modules.

Each module below exposes `FUSE_COMMANDS = [...]`; a new fuse command joins one of those lists.
"""

from __future__ import annotations

import click

from kvlab.cli import fuse_eval, fuse_explain, fuse_store


@click.group("fuse")
def fuse() -> None:
    """RAG KV fusion: precompute chunk caches once into a store, then reuse them."""


for module in (fuse_store, fuse_eval, fuse_explain):
    for command in module.FUSE_COMMANDS:
        fuse.add_command(command)

COMMANDS = [fuse]
