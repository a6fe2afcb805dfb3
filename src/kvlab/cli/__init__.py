"""The `kvlab` command: one subcommand group per capability.

Each command only parses its options, calls one library function and prints. Errors a user
can cause end as a single `error: ...` line on stderr with exit status 2.
"""

from __future__ import annotations

import sys

import click

from kvlab.cli import capture, diff, fuse, models, offload, reconstruct, scales, trace
from kvlab.errors import KvlabError
from kvlab.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kvlab")
def cli() -> None:
    """kvlab: a workbench for the KV cache of transformer language models.

    Capture a model's KV cache under a run spec (dtype, attention kernel, cache policy,
    tensor parallelism), and check every other form of the cache against the exact one.
    Run `kvlab COMMAND --help` for each command.
    """


for module in (models, capture, diff, fuse, offload, reconstruct, trace, scales):
    for command in module.COMMANDS:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning user errors into one line and a non-zero exit."""
    try:
        result = cli.main(args=argv, prog_name="kvlab", standalone_mode=False)
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except click.UsageError as err:
        hint = f" (see: {err.ctx.command_path} --help)" if err.ctx is not None else ""
        click.echo(f"error: {err.format_message()}{hint}", err=True)
        return 2
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}", err=True)
        return err.exit_code
    except KvlabError as err:
        click.echo(f"error: {err}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
