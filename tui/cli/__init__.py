"""The ``spkft`` command line: a thin Typer app whose commands parse arguments and call core.

Errors raised on purpose by core (:class:`~spkft.core.errors.SpkftError`) and OS errors become
one line on stderr and exit code 1; ``--debug`` lets the traceback through instead.

Each command's module is imported only when that command runs (or shows its own help), so
``spkft --help``, ``--version``, a mistyped command and ``spkft client ...`` never load torch,
torchaudio or OpenVINO.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Annotated, Any, NamedTuple

import typer
from typer.core import TyperGroup

from spkft.core import __version__
from spkft.core.errors import SpkftError


class Command(NamedTuple):
    module: str  # spkft.tui.cli.<module>, whose register(app) adds the command
    help: str  # its one-line help, shown by spkft --help without importing the module


# In the order a user meets them; tests check each line against the command's own help.
COMMANDS = {
    "data": Command("data", "Check data sources and write a small synthetic demo set."),
    "models": Command("models", "Released ERes2NetV2 checkpoints: list, download, locate."),
    "train": Command("train", "Fine-tune ERes2NetV2 on labelled recordings, validating EER every epoch."),
    "eval": Command("evaluate", "Measure a checkpoint as a speaker verifier (EER, minDCF, thresholds) and write "
                                "a report folder."),
    "adapt": Command("adapt", "Fit a backend on recordings, with no retraining, and store it with the model."),
    "calibrate": Command("calibrate", "Fit the map from the model's scores to calibrated log-likelihood ratios and "
                                      "store it with the model."),
    "export": Command("export", "Export a checkpoint and check the result against the PyTorch model before "
                                "writing it."),
    "embed": Command("inference", "Print one JSON object per file: path, L2-normalised embedding and duration."),
    "verify": Command("inference", "Score two recordings (cosine, or PLDA LLR) and, with a threshold or a "
                                   "calibration, decide."),
    "serve": Command("serve", "Serve speaker embedding, verification, enrollment and identification over gRPC "
                              "until SIGTERM."),
    "client": Command("client", "Call a running spkft server: embed, verify, enroll, identify and manage "
                                "speakers."),
    "enroll-db": Command("enroll_db", "Enrollment stores: move one between SQLite and PostgreSQL."),
}


def load_command(name: str) -> Any:
    """Import the module of command ``name`` and build the command as Typer would on the root app."""
    holder = typer.Typer(rich_markup_mode=None, add_completion=False)
    importlib.import_module(f"spkft.tui.cli.{COMMANDS[name].module}").register(holder)
    return typer.main.get_group(holder).commands[name]


@dataclass
class Settings:
    debug: bool = False


class _Group(TyperGroup):
    """Loads commands when they are used, and turns failures inside any command into one readable
    line unless --debug is on."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, name: str) -> Any:
        if name not in self.commands and name in COMMANDS:
            self.commands[name] = load_command(name)
        return self.commands.get(name)

    def format_commands(self, ctx: typer.Context, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, command.help) for name, command in COMMANDS.items()])

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except typer.TyperException as exc:  # a usage error: no such command
            close = get_close_matches(args[0], list(COMMANDS)) if args else []
            if close and isinstance(getattr(exc, "message", None), str) and "Did you mean" not in exc.message:
                exc.message = f"{exc.message.rstrip('.')}. Did you mean {', '.join(map(repr, close))}?"
            raise

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except BrokenPipeError:
            # The reader of a pipe stopped (spkft ... | head): it took all it wanted. Whatever is
            # still buffered goes nowhere, and the exit status is a shell's for a closed pipe.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
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



def main() -> None:
    """Entry point of the ``spkft`` console script."""
    app(prog_name="spkft")
