"""The ``spkft`` command line: a thin Typer app whose commands parse arguments and call core.

Errors raised on purpose by core (:class:`~spkft.core.errors.SpkftError`) and OS errors become
one line on stderr and exit code 1; ``--debug`` lets the traceback through instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer
from typer.core import TyperGroup

from spkft.core import __version__
from spkft.core.errors import SpkftError
from spkft.tui.cli import adapt, client, data, evaluate, export, inference, models, serve, train


@dataclass
class Settings:
    debug: bool = False


class _Group(TyperGroup):
    """Turns failures inside any command into one readable line unless --debug is on."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as exc:  # every other failure ends in one line, never a traceback
            if isinstance(ctx.obj, Settings) and ctx.obj.debug:
                raise
            if isinstance(exc, (SpkftError, OSError)):
                message = str(exc)
            else:
                message = f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    name="spkft",
    help="Fine-tune, evaluate, export and serve ERes2NetV2 speaker-embedding models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"spkft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version and exit."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", envvar="SPKFT_DEBUG", help="Show full tracebacks on errors.")
    ] = False,
) -> None:
    ctx.obj = Settings(debug=debug)


data.register(app)
models.register(app)
inference.register(app)
evaluate.register(app)
adapt.register(app)
export.register(app)
train.register(app)
serve.register(app)
client.register(app)


def main() -> None:
    """Entry point of the ``spkft`` console script."""
    app(prog_name="spkft")
