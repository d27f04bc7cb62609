"""``spkft embed`` and ``spkft verify``: embeddings and scores from recordings."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from spkft.core.embedding import Embedder, cosine_score
from spkft.core.errors import AudioError
from spkft.core.model import VARIANTS

CheckpointOption = Annotated[
    Path,
    typer.Option(
        "--checkpoint", "-c",
        help="Model weights: a released 3D-Speaker .ckpt or an spkft checkpoint.",
        envvar="SPKFT_CHECKPOINT",
    ),
]
VariantOption = Annotated[
    Optional[str],
    typer.Option(
        "--variant",
        help=f"Model variant ({', '.join(VARIANTS)}); read off the checkpoint when omitted.",
    ),
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="Where to run the model: cpu, cuda or cuda:N.")
]


def _embedder(checkpoint: Path, variant: Optional[str], device: str) -> Embedder:
    if variant is not None and variant not in VARIANTS:
        raise typer.BadParameter(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}",
                                 param_hint="--variant")
    return Embedder.from_checkpoint(checkpoint, variant=variant, device=device)


def _compact(vector: np.ndarray) -> list[float]:
    # Eight significant digits keep every bit of a float32 that matters and halve the text.
    return [float(f"{x:.8g}") for x in vector.tolist()]


def embed(
    files: Annotated[list[Path], typer.Argument(help="Audio files (WAV, FLAC, OGG, MP3).", metavar="FILE...", show_default=False)],
    checkpoint: CheckpointOption,
    variant: VariantOption = None,
    device: DeviceOption = "cpu",
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write a float32 [files, dim] array to this .npy file instead of JSON lines."),
    ] = None,
) -> None:
    """Print one JSON object per file: path, L2-normalised embedding and duration.

    A file that cannot be read is reported on stderr and the exit code is 1; with --output,
    nothing is written unless every file was embedded.
    """
    embedder = _embedder(checkpoint, variant, device)
    vectors = []
    failed = 0
    for path in files:
        try:
            result = embedder.embed(path)
        except AudioError as exc:
            typer.echo(f"error: {exc}", err=True)
            failed += 1
            continue
        if output is None:
            record = {"path": str(path), "embedding": _compact(result.vector),
                      "duration_seconds": round(result.duration_seconds, 4)}
            typer.echo(json.dumps(record))
        else:
            vectors.append(result.vector)
    if failed:
        if output is not None:
            typer.echo(f"error: {failed} of {len(files)} file(s) failed; {output} was not written", err=True)
        raise typer.Exit(1)
    if output is not None:
        _save_npy_atomically(output, np.stack(vectors).astype(np.float32))
        typer.echo(f"wrote {len(vectors)} embedding(s) of dimension {vectors[0].shape[0]} to {output}", err=True)


def _save_npy_atomically(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verify(
    file_a: Annotated[Path, typer.Argument(help="First recording.", metavar="FILE_A", show_default=False)],
    file_b: Annotated[Path, typer.Argument(help="Second recording.", metavar="FILE_B", show_default=False)],
    checkpoint: CheckpointOption,
    variant: VariantOption = None,
    device: DeviceOption = "cpu",
    threshold: Annotated[
        Optional[float],
        typer.Option("--threshold", "-t", min=-1.0, max=1.0,
                     help="Accept as the same speaker when the score is at least this."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Cosine score of two recordings (and, with --threshold, the same-speaker decision)."""
    embedder = _embedder(checkpoint, variant, device)
    score = cosine_score(embedder.embed(file_a).vector, embedder.embed(file_b).vector)
    accepted = None if threshold is None else score >= threshold
    if as_json:
        typer.echo(json.dumps({"file_a": str(file_a), "file_b": str(file_b), "score": round(score, 6),
                               "threshold": threshold, "accepted": accepted}))
    elif threshold is None:
        typer.echo(f"score {score:.4f}")
    elif accepted:
        typer.echo(f"score {score:.4f} >= threshold {threshold:.4f}: same speaker")
    else:
        typer.echo(f"score {score:.4f} < threshold {threshold:.4f}: different speakers")


def register(app: typer.Typer) -> None:
    app.command()(embed)
    app.command()(verify)
