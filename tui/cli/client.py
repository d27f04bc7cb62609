"""``spkft client ...``: the gRPC API of a running ``spkft serve`` from the shell.

An error status from the server ends the command with ``error: <CODE>: <details>`` and exit 1.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import numpy as np
import typer

from spkft.serve.client import DEFAULT_SERVER, ServiceError, SpeakerClient
from spkft.tui.cli.output import compact_floats, score_against

ServerOption = Annotated[
    str, typer.Option("--server", "-s", envvar="SPKFT_SERVER", help="HOST:PORT of the spkft server.")
]
TokenOption = Annotated[
    Optional[str],
    typer.Option("--auth-token", envvar="SPKFT_AUTH_TOKEN", show_default=False, help="Bearer token the server requires."),
]
TlsCaOption = Annotated[
    Optional[Path],
    typer.Option("--tls-ca", dir_okay=False, show_default=False,
                 help="Connect over TLS, trusting this PEM certificate (the server's own, for a self-signed one)."),
]
TlsOption = Annotated[bool, typer.Option("--tls", help="Connect over TLS, trusting the system's certificate authorities.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
FileArgument = Annotated[Path, typer.Argument(help="An audio file (WAV, FLAC, OGG).", metavar="FILE", show_default=False)]

app = typer.Typer(
    name="client",
    help="Call a running spkft server: embed, verify, enroll, identify and manage speakers.",
    no_args_is_help=True,
)


def _connect(server: str, auth_token: Optional[str], tls_ca: Optional[Path], tls: bool) -> SpeakerClient:
    return SpeakerClient(server, auth_token=auth_token or None, tls_ca=tls_ca, tls=tls)


def _json(record) -> None:
    typer.echo(json.dumps(record))


@contextmanager
def _files_named(fields: dict[str, Optional[Path]]) -> Iterator[None]:
    """Server errors about a request field (``test_audio: ...``) name the file that was sent in it."""
    try:
        yield
    except ServiceError as exc:
        field, sep, rest = exc.details.partition(": ")
        path = fields.get(field.removesuffix(".pcm")) if sep else None
        if path is None:
            raise
        raise ServiceError(exc.code, f"{path}: {rest}") from None


@app.command()
def embed(
    files: Annotated[list[Path], typer.Argument(help="Audio files (WAV, FLAC, OGG).", metavar="FILE...", show_default=False)],
    server: ServerOption = DEFAULT_SERVER,
    auth_token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls: TlsOption = False,
    as_json: JsonOption = False,
) -> None:
    """The L2-normalised embedding of each file (with --json, one object per line, as spkft embed)."""
    with _connect(server, auth_token, tls_ca, tls) as client:
        for path in files:
            with _files_named({"audio": path}):
                result = client.embed(path)
            vector = compact_floats(np.asarray(result.embedding, dtype=np.float32))
            if as_json:
                _json({"path": str(path), "embedding": vector, "duration_seconds": round(result.duration_seconds, 4)})
            else:
                head = " ".join(f"{x:+.4f}" for x in vector[:4])
                typer.echo(f"{path}: {result.duration_seconds:.2f} s, {len(vector)} values: {head} ...")


@app.command()
def verify(
    test: FileArgument,
    reference: Annotated[
        Optional[Path],
        typer.Argument(help="A recording of the claimed speaker (or use --speaker).", metavar="[REFERENCE]", show_default=False),
    ] = None,
    speaker: Annotated[
        Optional[str], typer.Option("--speaker", help="Compare with this enrolled speaker instead of a REFERENCE file.")
    ] = None,
    threshold: Annotated[
        Optional[float], typer.Option("--threshold", "-t", show_default=False,
                                      help="Accept at this score or above (in [-1, 1] for cosine scores) "
                                           "[default: the server's decision].")
    ] = None,
    p_target: Annotated[
        Optional[float], typer.Option("--p-target", show_default=False,
                                      help="Calibrated models: the prior of the same speaker for the probability "
                                           "and the decision [default: the server's].")
    ] = None,
    server: ServerOption = DEFAULT_SERVER,
    auth_token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls: TlsOption = False,
    as_json: JsonOption = False,
) -> None:
    """Whether FILE is the same speaker as REFERENCE (or as an enrolled --speaker)."""
    if (reference is None) == (speaker is None):
        raise typer.BadParameter("give either a REFERENCE file or --speaker, not both or neither")
    with _connect(server, auth_token, tls_ca, tls) as client:
        with _files_named({"test_audio": test, "reference_audio": reference}):
            result = client.verify(test, reference=reference, speaker_id=speaker, threshold=threshold,
                                   p_target=p_target)
    decided = result.HasField("accepted")
    calibrated = result.HasField("llr")
    by_llr = result.HasField("llr_threshold")
    if as_json:
        record = {"test": str(test), "reference": str(reference) if reference else None, "speaker_id": speaker,
                  "score": round(result.score, 6),
                  "threshold": round(result.threshold, 6) if result.HasField("threshold") else None,
                  "accepted": result.accepted if decided else None}
        if calibrated:
            record |= {"llr": round(result.llr, 6), "probability": round(result.probability, 6),
                       "llr_threshold": round(result.llr_threshold, 6) if by_llr else None}
        _json(record)
    elif calibrated:
        verdict = ("same speaker" if result.accepted else "different speakers") if decided else "no decision"
        rule = (f"LLR {'>=' if result.accepted else '<'} {result.llr_threshold:.2f} (the server's Bayes threshold)"
                if by_llr else f"score {'>=' if result.accepted else '<'} threshold {result.threshold:.4f}")
        typer.echo(f"score {result.score:.4f}, LLR {result.llr:.2f}, P(same speaker) {result.probability:.3f}; "
                   f"{rule}: {verdict}")
    elif not decided:
        typer.echo(f"score {result.score:.4f} (no threshold: the server has none; give --threshold for a decision)")
    else:
        relation = ">=" if result.accepted else "<"
        verdict = "same speaker" if result.accepted else "different speakers"
        shown, bar = score_against(result.score, result.threshold)
        typer.echo(f"score {shown} {relation} threshold {bar}: {verdict}")


@app.command()
def enroll(
    speaker_id: Annotated[str, typer.Argument(help="The speaker's identifier.", metavar="SPEAKER", show_default=False)],
    files: Annotated[list[Path], typer.Argument(help="Recordings of the speaker.", metavar="FILE...", show_default=False)],
    server: ServerOption = DEFAULT_SERVER,
    auth_token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls: TlsOption = False,
    as_json: JsonOption = False,
) -> None:
    """Add recordings to a speaker (created when new)."""
    with _connect(server, auth_token, tls_ca, tls) as client:
        with _files_named({f"audios[{i}]": path for i, path in enumerate(files)}):
            result = client.enroll(speaker_id, list(files))
    if as_json:
        _json({"speaker_id": result.speaker_id, "utterance_count": result.utterance_count})
    else:
        typer.echo(f"enrolled {result.speaker_id}: {result.utterance_count} recording(s) in all")


@app.command()
def identify(
    file: FileArgument,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, max=1000, help="How many speakers to list.")] = 1,
    server: ServerOption = DEFAULT_SERVER,
    auth_token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls: TlsOption = False,
    as_json: JsonOption = False,
) -> None:
    """The enrolled speakers closest to FILE, best first."""
    with _connect(server, auth_token, tls_ca, tls) as client:
        with _files_named({"audio": file}):
            matches = client.identify(file, top_k=top_k).matches
    if as_json:
        _json({"path": str(file), "matches": [{"speaker_id": m.speaker_id, "score": round(m.score, 6)} for m in matches]})
    elif not matches:
        typer.echo("no speakers are enrolled")
    else:
        for rank, match in enumerate(matches, start=1):
            typer.echo(f"{rank:>3}. {match.speaker_id}  {match.score:.4f}")


@app.command()
def speakers(
    server: ServerOption = DEFAULT_SERVER,
    auth_token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls: TlsOption = False,
    as_json: JsonOption = False,
) -> None:
    """Every enrolled speaker and its number of recordings."""
    with _connect(server, auth_token, tls_ca, tls) as client:
        enrolled = client.speakers().speakers
    if as_json:
        _json([{"speaker_id": s.speaker_id, "utterance_count": s.utterance_count} for s in enrolled])
    elif not enrolled:
        typer.echo("no speakers are enrolled")
    else:
        width = max(len(s.speaker_id) for s in enrolled)
        for s in enrolled:
            typer.echo(f"{s.speaker_id:<{width}}  {s.utterance_count} recording(s)")


@app.command()
def delete(
    speaker_id: Annotated[str, typer.Argument(help="The speaker to remove.", metavar="SPEAKER", show_default=False)],
    server: ServerOption = DEFAULT_SERVER,
    auth_token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls: TlsOption = False,
    as_json: JsonOption = False,
) -> None:
    """Remove an enrolled speaker."""
    with _connect(server, auth_token, tls_ca, tls) as client:
        result = client.delete(speaker_id)
    if as_json:
        _json({"speaker_id": result.speaker_id, "utterance_count": result.utterance_count})
    else:
        typer.echo(f"deleted {result.speaker_id} ({result.utterance_count} recording(s))")


@app.command()
def info(
    server: ServerOption = DEFAULT_SERVER,
    auth_token: TokenOption = None,
    tls_ca: TlsCaOption = None,
    tls: TlsOption = False,
    as_json: JsonOption = False,
) -> None:
    """What model the server serves."""
    with _connect(server, auth_token, tls_ca, tls) as client:
        result = client.info()
    threshold = round(result.default_threshold, 6) if result.HasField("default_threshold") else None
    if as_json:
        _json({"model_name": result.model_name, "embedding_dim": result.embedding_dim,
               "sample_rate_hertz": result.sample_rate_hertz, "default_threshold": threshold,
               "engine": result.engine, "precision": result.precision,
               "metadata": dict(sorted(result.metadata.items()))})
        return
    rows = [
        ("model_name", result.model_name),
        ("embedding_dim", result.embedding_dim),
        ("sample_rate_hertz", result.sample_rate_hertz),
        ("default_threshold", "none" if threshold is None else f"{threshold:.4f}"),
        ("engine", f"{result.engine} ({result.precision})"),
        *((f"metadata.{key}", value) for key, value in sorted(result.metadata.items())),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def register(root: typer.Typer) -> None:
    root.add_typer(app)
