"""``spkft enroll-db``: manage enrollment stores outside a running server."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="enroll-db",
    help="Enrollment stores: move one between SQLite and PostgreSQL.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@app.command()
def migrate(
    source: Annotated[str, typer.Option("--from", help="The store to copy: a SQLite file or a postgresql:// URL.",
                                        show_default=False)],
    destination: Annotated[str, typer.Option("--to", help="An empty (or new) store to copy it into: a SQLite file "
                                                          "or a postgresql:// URL.", show_default=False)],
) -> None:
    """Copy every enrolled speaker into an empty store, then check that counts and sums match exactly."""
    from spkft.core.enrollment import migrate as copy_store

    moved = copy_store(source, destination)
    typer.echo(f"migrated {moved.speakers} speakers, {moved.recordings} recordings from {moved.source} to "
               f"{moved.destination}; verified: the same speakers, counts and sums")


def register(root: typer.Typer) -> None:
    root.add_typer(app)
