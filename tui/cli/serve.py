"""``spkft serve``: the gRPC speaker service on an exported ONNX model."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from spkft.core.enrollment import is_database_url
from spkft.serve.metrics import JsonFormatter
from spkft.serve.server import ServerConfig, SpeakerServer, run_until_signalled
from spkft.serve.service import DEFAULT_P_TARGET
from spkft.tui.cli.inference import Engine, EngineOption, Precision, PrecisionOption


class LogFormat(str, Enum):
    text = "text"
    json = "json"


def serve(
    model: Annotated[
        Path,
        typer.Option("--model", "-m", help="The ONNX model to serve (written by spkft export).",
                     envvar="SPKFT_MODEL", dir_okay=False),
    ],
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port to listen on; 0 picks a free one.")] = 50051,
    auth_token: Annotated[
        Optional[str],
        typer.Option("--auth-token", envvar="SPKFT_AUTH_TOKEN", show_default=False,
                     help="Require 'authorization: Bearer <token>' on every call (health checks excepted)."),
    ] = None,
    tls_cert: Annotated[
        Optional[Path], typer.Option("--tls-cert", dir_okay=False, help="PEM certificate chain: serve over TLS.")
    ] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", dir_okay=False, help="PEM private key of --tls-cert.")] = None,
    enroll_db: Annotated[
        str, typer.Option("--enroll-db", envvar="SPKFT_ENROLL_DB",
                          help="Enrolled speakers: a SQLite file (created if missing, owned by this server), or "
                               "postgresql://USER@HOST:PORT/DB, shared by replicas.")
    ] = "enrollments.sqlite",
    max_audio_seconds: Annotated[
        float, typer.Option("--max-audio-seconds", min=0.1, help="Refuse recordings longer than this.")
    ] = 60.0,
    max_recordings: Annotated[
        int, typer.Option("--max-recordings", min=1, help="Refuse an enrollment of more recordings than this in one call.")
    ] = 32,
    max_call_seconds: Annotated[
        Optional[float], typer.Option("--max-call-seconds", min=0.1, show_default=False,
                                      help="Refuse a call whose recordings hold more audio than this in all "
                                           "[default: 5 x --max-audio-seconds].")
    ] = None,
    threshold: Annotated[
        Optional[float],
        typer.Option("--threshold", show_default=False,
                     help="Verify's default score threshold, in [-1, 1] for cosine scores [default: a calibrated "
                          "model's Bayes decision at --p-target, else the model's stored threshold]."),
    ] = None,
    p_target: Annotated[
        float, typer.Option("--p-target", help="Calibrated models: the prior of a same-speaker trial, for Verify's "
                                               "probability and its Bayes decision (a request may give its own).")
    ] = DEFAULT_P_TARGET,
    c_miss: Annotated[
        float, typer.Option("--c-miss", help="Calibrated models: the cost of rejecting the right speaker.")
    ] = 1.0,
    c_fa: Annotated[
        float, typer.Option("--c-fa", help="Calibrated models: the cost of accepting the wrong speaker.")
    ] = 1.0,
    engine: EngineOption = Engine.auto,
    precision: PrecisionOption = Precision.auto,
    threads: Annotated[
        Optional[int], typer.Option("--threads", min=1, show_default=False,
                                    help="Threads per inference call [default: cores / workers].")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Inference calls run at once; they share the cores.")] = 1,
    handler_threads: Annotated[
        int, typer.Option("--handler-threads", min=1,
                          help="Calls handled at once (decoding, features, waiting for inference).")
    ] = 32,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=1, help="Calls that may wait for a handler thread, and inputs that may "
                                                      "wait for inference; more are RESOURCE_EXHAUSTED.")
    ] = 256,
    grace_seconds: Annotated[
        float, typer.Option("--grace-seconds", min=0.0, help="On SIGTERM, how long calls in flight may take to finish.")
    ] = 30.0,
    metrics_port: Annotated[
        Optional[int], typer.Option("--metrics-port", min=0, max=65535, show_default=False,
                                    help="Serve Prometheus metrics over HTTP on this port, on --host [default: off].")
    ] = None,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="text, or json: one JSON object per line, with an access "
                                                     "line for every call (RPC, code, milliseconds, audio seconds, peer).")
    ] = LogFormat.text,
) -> None:
    """Serve speaker embedding, verification, enrollment and identification over gRPC until SIGTERM."""
    _configure_logging(log_format)
    enroll_db = enroll_db if is_database_url(enroll_db) else Path(enroll_db)
    config = ServerConfig(
        model=model, host=host, port=port, auth_token=auth_token, tls_cert=tls_cert, tls_key=tls_key,
        enroll_db=enroll_db, max_audio_seconds=max_audio_seconds, max_recordings=max_recordings,
        max_call_seconds=max_call_seconds, threshold=threshold, p_target=p_target, c_miss=c_miss, c_fa=c_fa,
        engine=engine.value,
        precision=precision.value, threads=threads,
        workers=workers, handler_threads=handler_threads, max_queue=max_queue,
        grace_seconds=grace_seconds, metrics_port=metrics_port, access_log=log_format is LogFormat.json,
    )

    def announce(server: SpeakerServer) -> None:
        security = ", ".join(
            ["TLS" if tls_cert else "plaintext", "bearer token required" if config.auth_token else "no auth"]
        )
        served = server.service.model
        metrics = f"; metrics on http://{host}:{server.metrics_port}/metrics" if server.metrics_port is not None else ""
        typer.echo(f"spkft serve: listening on {server.address} ({security}); model {model} "
                   f"({served.engine}, {served.precision}), enrollments in {server.store.location}{metrics}")

    run_until_signalled(config, announce)
    typer.echo("spkft serve: stopped")


def _configure_logging(log_format: LogFormat) -> None:
    handler = logging.StreamHandler()
    if log_format is LogFormat.json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def register(app: typer.Typer) -> None:
    app.command()(serve)
