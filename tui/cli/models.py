"""``spkft models``: released checkpoints by name (3D-Speaker's and the bundled demo base); and fetching a
name given as a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from spkft.core.catalogue import (
    CATALOGUE,
    ReleasedModel,
    availability,
    cache_home,
    cache_record,
    fetch,
    megabytes,
    model_endpoint,
    released,
)
from spkft.core.errors import CheckpointError

app = typer.Typer(help="Released ERes2NetV2 checkpoints: list, download, locate. A name works "
                       "wherever a checkpoint path does (--init, --checkpoint, --baseline, model.init).",
                  no_args_is_help=True)


class DownloadView:
    """A download's progress on stderr: a bar on a terminal, a line per tenth of the file otherwise."""

    def __init__(self, entry: ReleasedModel) -> None:
        self.entry = entry
        self.console = Console(stderr=True, highlight=False)
        self.bar: Progress | None = None
        self.task = None
        self.tenths_said = -1

    def __enter__(self) -> DownloadView:
        return self

    def __call__(self, done: int, total: int | None) -> None:
        if self.tenths_said < 0:  # the first call: the server has answered, so say what is coming
            size = f" ({total / 1e6:.1f} MB)" if total else ""
            self.console.print(f"downloading {self.entry.name}{size} from {self.entry.url()}", markup=False,
                               soft_wrap=True)
            self.tenths_said = 0
            if self.console.is_interactive:
                self.bar = Progress(TextColumn(self.entry.name), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                    TimeRemainingColumn(), console=self.console, transient=True)
                self.task = self.bar.add_task("download", total=total)
                self.bar.start()
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
        elif total:
            tenths = 10 * done // total
            if tenths > self.tenths_said:
                self.tenths_said = tenths
                self.console.print(f"  {tenths * 10}% ({done / 1e6:.1f} of {total / 1e6:.1f} MB)", markup=False)

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def fetch_shown(entry: ReleasedModel) -> Path:
    """The entry's cached file, downloaded first with progress on stderr if it is not cached yet."""
    if availability(entry).ready:  # bundled, cached, or placed by hand (checked, not downloaded)
        return fetch(entry)
    with DownloadView(entry) as view:
        path = fetch(entry, progress=view)
    record = cache_record(entry)
    view.console.print(f"{entry.name}: verified (every tensor loads as {entry.variant}) and cached as {path}"
                       + (f", sha256 {record['sha256']}" if record else ""), markup=False, soft_wrap=True)
    return path


def fetch_released(value: Any) -> Any:
    """Typer callback for checkpoint options: fetch any released-model name now, with progress; pass the value on."""
    for reference in value if isinstance(value, (list, tuple)) else [value]:
        entry = released(reference)
        if entry is not None:
            fetch_shown(entry)
    return value


def _entry(name: str) -> ReleasedModel:
    entry = CATALOGUE.get(name)
    if entry is None:
        raise typer.BadParameter(f"no released model {name!r}; the catalogue has: {', '.join(CATALOGUE)}",
                                 param_hint="NAME")
    return entry


@app.command("list")
def list_models(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """The released models: variant, size, training data, licence, and where each is cached."""
    rows = []
    for entry in CATALOGUE.values():
        where = availability(entry)
        rows.append({
            "name": entry.name, "variant": entry.variant, "parameters": entry.parameters,
            "size_bytes": entry.size_bytes, "training_data": entry.training_data, "licence": entry.licence,
            "language": entry.language, "sample_rate_hertz": entry.sample_rate_hertz, "source": entry.page,
            "model_id": entry.model_id or None, "revision": entry.revision, "file": entry.file,
            "url": None if entry.bundled else entry.url(), "state": where.state, "ready": where.ready,
            "state_text": where.describe(entry), "path": str(where.path),
            "sha256": where.record["sha256"] if where.record else None,
        })
    if as_json:
        typer.echo(json.dumps({"cache": str(cache_home()), "endpoint": model_endpoint(), "models": rows}))
        return
    table = Table(title="Released ERes2NetV2 models (spkft models download NAME)", title_justify="left")
    table.add_column("name", no_wrap=True)
    for column in ("params", "size"):
        table.add_column(column, no_wrap=True)
    table.add_column("licence")
    table.add_column("here", overflow="fold")
    for row in rows:
        table.add_row(row["name"], f"{row['parameters'] / 1e6:.1f} M", f"{megabytes(row['size_bytes'])}",
                      row["licence"], row["state_text"])
    console = Console(highlight=False)
    console.print(table)
    for row in rows:
        console.print(f"{row['name']}: trained on {row['training_data']}; {row['source']}",
                      markup=False, soft_wrap=True)
    console.print(f"source: ModelScope through {model_endpoint()} (SPKFT_MODEL_ENDPOINT); cache: {cache_home()} "
                  "(SPKFT_HOME)", markup=False, soft_wrap=True)


@app.command("download")
def download_models(
    names: Annotated[list[str], typer.Argument(help="Catalogue names (spkft models list).", metavar="NAME...",
                                               show_default=False)],
) -> None:
    """Download released models into the cache, each checked by a strict load; resumes a cut download."""
    entries = [_entry(name) for name in names]
    for entry in entries:
        where = availability(entry)
        if where.state == "cached":
            typer.echo(f"{entry.name}: already cached as {where.path}")
            continue
        if where.state == "bundled":
            typer.echo(f"{entry.name}: bundled with spkft, nothing to download ({where.path})")
            continue
        fetch_shown(entry)


@app.command("path")
def model_path(
    name: Annotated[str, typer.Argument(help="A catalogue name.", metavar="NAME", show_default=False)],
) -> None:
    """Print the cached file of a released model, for scripts; exit 1 if it is not in the cache."""
    entry = _entry(name)
    if not availability(entry).ready:
        raise CheckpointError(f"{entry.name} is not in the cache: run 'spkft models download {entry.name}', or place "
                              f"the file by hand as {entry.cached_path()}")
    typer.echo(str(fetch(entry)))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="models")
