"""`kvlab fuse`: RAG KV fusion, one click group whose commands live in several modules.

Each module named in `_FUSE_MODULES` exposes `FUSE_COMMANDS = [...]`; a new fuse command is one
more name in that tuple.
"""

from __future__ import annotations

import importlib

import click

_FUSE_MODULES = ("kvlab.cli.fuse_store", "kvlab.cli.fuse_eval", "kvlab.cli.fuse_explain")


@click.group("fuse")
def fuse() -> None:
    """RAG KV fusion: precompute chunk caches once into a store, then reuse them."""


def _register() -> None:
    for name in _FUSE_MODULES:
        for command in importlib.import_module(name).FUSE_COMMANDS:
            fuse.add_command(command)


_register()

COMMANDS = [fuse]
