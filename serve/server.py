"""The gRPC speaker server: ``create_server(config)``, then ``start``, ``load`` and ``drain``.

Shape of a running server:
- a synchronous ``grpc.server`` whose thread pool (``handler_threads``) runs the RPCs: request
  checks, audio decoding and fbank happen there, in parallel;
- one compiled model (:class:`~spkft.core.onnx_model.OnnxEmbedder`: OpenVINO, in bf16 where the
  CPU has it, or onnxruntime; see :mod:`spkft.core.onnx_model`) that runs at most ``workers``
  inference calls at once, in the request threads themselves, through a
  :class:`~spkft.serve.batching.Batcher` that runs equally long inputs of concurrent requests as
  one batch;
- bounded work: at most ``max_queue`` inputs wait for inference, and at most
  ``handler_threads + max_queue`` speaker-service calls are held at once, running or waiting for
  a handler thread (more is RESOURCE_EXHAUSTED, see :mod:`spkft.serve.admission`);
- ``grpc.health.v1`` (NOT_SERVING until the model is loaded and again while draining, SERVING in
  between) on threads of its own, so probes answer at once however busy the service is;
  reflection, bearer-token auth (:mod:`spkft.serve.auth`) and TLS when configured;
- a request is at most ``max_audio_seconds`` of 48 kHz stereo 16-bit audio (192,000 bytes a
  second) plus 1 MiB; gRPC refuses larger messages with RESOURCE_EXHAUSTED before they are read.
  Audio longer than ``max_audio_seconds``, or holding more samples (frames times channels) than
  that much 48 kHz stereo, is INVALID_ARGUMENT, found from its header before it is decoded.

Enrollments live in a SQLite file owned by this server, or in a PostgreSQL database that replicas
share (:class:`~spkft.core.enrollment.EnrollmentStore`), tied to the served model by the SHA-256
of the file that runs (the int8 twin, when that is what runs). While a PostgreSQL store is unreachable, the service's health
(``spkft.v1.SpeakerService``) is NOT_SERVING and calls that need the database are UNAVAILABLE;
the server's overall health (``""``) stays SERVING, since embedding and search still work.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import ssl
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from prometheus_client import start_http_server
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from spkft.core.enrollment import EnrollmentStore
from spkft.core.errors import SpkftError
from spkft.core.files import sha256_of
from spkft.core.onnx_model import OnnxEmbedder, engine_choice_problems
from spkft.serve.admission import PROBE_THREADS, REFUSAL_THREADS, Admission, CallCounter, add_health_to_server
from spkft.serve.auth import BearerTokenInterceptor
from spkft.serve.batching import BatchedEmbedder, Batcher
from spkft.serve.metrics import CallObserver, Metrics
from spkft.serve.service import (
    DEFAULT_P_TARGET,
    MAX_SAMPLES_PER_SECOND,
    SERVICE_NAME,
    ServedModel,
    SpeakerService,
    add_to_server,
)

log = logging.getLogger(__name__)

# Audio one call may carry in all, in multiples of the limit per recording (unless set).
CALL_SECONDS_PER_AUDIO_SECONDS = 5
BYTES_PER_AUDIO_SECOND = MAX_SAMPLES_PER_SECOND * 2  # 48 kHz, stereo, 16-bit
MESSAGE_OVERHEAD_BYTES = 1 << 20


class ServerError(SpkftError):
    """A server that cannot start as configured (address in use, bad TLS files, bad settings)."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``spkft serve`` can set; see ``spkft serve --help`` for each option."""

    model: Path
    host: str = "127.0.0.1"
    port: int = 50051
    auth_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    enroll_db: str | Path = Path("enrollments.sqlite")  # a SQLite file, or a postgresql:// URL
    max_audio_seconds: float = 60.0
    max_recordings: int = 32  # per EnrollSpeaker call
    max_call_seconds: float | None = None  # audio in one call, all recordings together; 5 x max_audio_seconds
    threshold: float | None = None
    # A calibrated model decides at the Bayes threshold of this prior and these costs.
    p_target: float = DEFAULT_P_TARGET
    c_miss: float = 1.0
    c_fa: float = 1.0
    engine: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    # One inference call at a time on every core: as fast as the in-process engine for a lone
    # request, and concurrent requests still share batches. More workers split the cores.
    workers: int = 1
    max_queue: int = 256
    max_batch: int = 16
    # A free worker takes what is pending at once: batching gives no per-item gain on CPUs (measured
    # in benchmarks/serve_speed.py), so waiting for partners only adds latency. Under load,
    # requests pile up while the workers are busy and still leave together.
    batch_wait_seconds: float = 0.0
    handler_threads: int = 32
    grace_seconds: float = 30.0
    metrics_port: int | None = None  # Prometheus metrics over HTTP on this port (0: a free one); off when None
    access_log: bool = False  # one log record per call (spkft serve --log-format json makes them JSON lines)

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_audio_seconds * BYTES_PER_AUDIO_SECOND) + MESSAGE_OVERHEAD_BYTES

    def check(self) -> None:
        """Raise :class:`ServerError` naming every setting that cannot work."""
        problems = []
        if self.auth_token is not None and not self.auth_token.strip():
            problems.append("the auth token is empty: give a token, or leave --auth-token out to serve without one")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.threshold is not None and not math.isfinite(self.threshold):
            problems.append(f"the threshold must be a finite number, got {self.threshold}")
        if not (math.isfinite(self.p_target) and 0.0 < self.p_target < 1.0):
            problems.append(f"the prior of a same-speaker trial must lie strictly between 0 and 1, got {self.p_target}")
        for name, value in (("miss", self.c_miss), ("false alarm", self.c_fa)):
            if not (math.isfinite(value) and value > 0):
                problems.append(f"the cost of a {name} must be a positive number, got {value}")
        if self.max_audio_seconds <= 0:
            problems.append(f"the audio limit must be positive, got {self.max_audio_seconds} s")
        if self.max_call_seconds is not None and self.max_call_seconds < self.max_audio_seconds:
            problems.append(f"the audio limit per call ({self.max_call_seconds:g} s) must be at least the limit per "
                            f"recording ({self.max_audio_seconds:g} s)")
        for name in ("workers", "max_queue", "max_batch", "handler_threads", "max_recordings"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        problems += engine_choice_problems(self.engine, self.precision)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            problems.append(f"the metrics port must be in 0-65535, got {self.metrics_port}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be at least 1, got {self.threads}")
        if problems:
            raise ServerError("; ".join(problems))


class SpeakerServer:
    """A configured gRPC server; see the module docstring for what it holds."""

    def __init__(self, config: ServerConfig) -> None:
        config.check()
        self.config = config
        self.service = SpeakerService(config.max_audio_seconds, config.max_recordings,
                                      config.max_call_seconds or CALL_SECONDS_PER_AUDIO_SECONDS * config.max_audio_seconds,
                                      max_preparing=max(1, _cores()))
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._handlers = CallCounter(config.handler_threads, thread_name_prefix="spkft-rpc")
        self._probes = ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="spkft-health")
        self._refusals = ThreadPoolExecutor(REFUSAL_THREADS, thread_name_prefix="spkft-refuse")
        interceptors = [Admission((SERVICE_NAME,), self._handlers, config.handler_threads + config.max_queue,
                                  self._refusals)]
        if config.auth_token:  # before admission: a call without the token is refused before it counts
            interceptors.insert(0, BearerTokenInterceptor(config.auth_token, refusals=self._refusals))
        self.metrics = Metrics() if config.metrics_port is not None else None
        if self.metrics is not None or config.access_log:  # first: it sees every call, refusals included
            interceptors.insert(0, CallObserver((SERVICE_NAME,), self.metrics, config.access_log))
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._grpc = grpc.server(
            self._handlers,
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
            ],
        )
        add_to_server(self.service, self._grpc)
        add_health_to_server(self.health, self._grpc, self._probes)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        self.port = self._bind()
        self._batcher: Batcher | None = None
        self._store: EnrollmentStore | None = None
        self._draining = False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def batcher(self) -> Batcher | None:
        return self._batcher

    @property
    def store(self) -> EnrollmentStore | None:
        return self._store

    @property
    def calls_held(self) -> int:
        """Speaker-service and reflection calls running or waiting for a handler thread."""
        return self._handlers.held

    def _bind(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls_cert is None:
                port = self._grpc.add_insecure_port(address)
            else:
                check_tls_files(self.config.tls_cert, self.config.tls_key)
                credentials = grpc.ssl_server_credentials(
                    [(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())]
                )
                port = self._grpc.add_secure_port(address, credentials)
            failed = port == 0
        except RuntimeError:  # how grpc reports a failed bind, with no more detail than this
            failed = True
        if failed:
            raise ServerError(f"cannot listen on {address}: the port is in use or the host is not an address of this machine")
        return port

    def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def _store_reachable(self, reachable: bool) -> None:
        if self._draining:
            return
        serving = health_pb2.HealthCheckResponse.SERVING if reachable else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(SERVICE_NAME, serving)
        if not reachable:
            log.warning("the enrollment store is unreachable: %s reports NOT_SERVING until it is back", SERVICE_NAME)

    def start(self) -> None:
        """Accept calls: health answers at once; the speaker service is UNAVAILABLE until :meth:`load`."""
        if self.metrics is not None:
            self._serve_metrics()
        self._grpc.start()

    def _serve_metrics(self) -> None:
        metrics = self.metrics
        address = f"{self.config.host}:{self.config.metrics_port}"
        try:
            self._metrics_http, _ = start_http_server(self.config.metrics_port, addr=self.config.host,
                                                      registry=metrics.registry)
        except OSError as exc:
            raise ServerError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        self.metrics_port = self._metrics_http.server_port
        metrics.calls_held.set_function(lambda: self._handlers.held)
        metrics.queue_depth.set_function(lambda: self._batcher.pending if self._batcher is not None else 0)
        metrics.speakers.set_function(lambda: len(self._store) if self._store is not None else 0)
        metrics.store_up.set_function(lambda: float(self._store is not None and self._store.reachable))

    def load(self, model: OnnxEmbedder | None = None) -> None:
        """Load the model (from ``config.model`` unless given) and the enrollment store, then report SERVING."""
        config = self.config
        if model is None:
            # The workers share the cores: more intra-op threads than cores only makes them spin.
            threads = config.threads or max(1, _cores() // config.workers)
            model = OnnxEmbedder.from_file(config.model, threads=threads, engine=config.engine,
                                           precision=config.precision, parallel_calls=config.workers)
        # Tied to the file that runs: an int8 twin's embeddings are not the fp32 model's.
        if config.threshold is not None and model.plda is None and not -1.0 <= config.threshold <= 1.0:
            raise ServerError(f"the threshold must be in [-1, 1] for {config.model}'s cosine scores, "
                              f"got {config.threshold}")
        store = EnrollmentStore(config.enroll_db, _fingerprint(model.path), model.embedding_dim, model.plda)
        store.on_reachability(self._store_reachable)
        default_threshold = model.default_threshold if config.threshold is None else config.threshold
        self._batcher = Batcher(
            model.embed_batch if self.metrics is None else self.metrics.timed(model.embed_batch),
            workers=config.workers,
            max_queue=config.max_queue,
            max_batch=config.max_batch,
            max_batch_frames=model.max_whole_frames,  # no more audio per call than the model's own bound
            max_wait_seconds=config.batch_wait_seconds,
        )
        self._store = store
        self.service.serve(ServedModel(BatchedEmbedder(model, self._batcher), store, config.model.stem,
                                       dict(model.metadata), default_threshold, model.engine.name,
                                       model.engine.precision, plda=model.plda, calibration=model.calibration,
                                       explicit_threshold=config.threshold is not None, p_target=config.p_target,
                                       c_miss=config.c_miss, c_fa=config.c_fa))
        if self.metrics is not None:
            self.metrics.model.info({"model": config.model.stem, "engine": model.engine.name,
                                     "precision": model.engine.precision, "enrollment_store": store.kind})
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if not store.reachable:
            self._store_reachable(False)
        log.info("serving %s on %s (%s, %s); %d enrolled speakers in %s (search index %.0f MiB)", config.model,
                 self.address, model.engine.name, model.engine.precision, len(store), store.location,
                 store.index_bytes / 2**20)

    def drain(self, grace_seconds: float | None = None) -> bool:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish (up to the grace period), close.

        Health keeps answering (NOT_SERVING) until the calls in flight are done or the grace period
        is over; then the server stops, cancelling any call still running. Returns whether every
        call finished in time.
        """
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        self._draining = True
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        finished = self.service.drain(grace)
        stopped = self._grpc.stop(0)
        if finished:
            stopped.wait()
        if self._batcher is not None:
            self._batcher.close(wait=finished)  # past the grace period, a running inference is not waited for
        if self._store is not None:
            self._store.close()
        for pool in (self._handlers, self._probes, self._refusals):
            pool.shutdown(wait=False)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        return finished


def check_tls_files(cert: Path, key: Path) -> None:
    """Raise :class:`ServerError` saying what is wrong with a certificate and key that cannot serve TLS.

    grpc reports any such problem as a failed bind; OpenSSL, through :mod:`ssl`, says which it is.
    """
    for what, path in (("certificate", cert), ("key", key)):
        if not path.is_file():
            raise ServerError(f"TLS {what} {path}: no such file")
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert)
    except (ssl.SSLError, OSError):
        raise ServerError(f"TLS: {cert} is not a PEM certificate") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in (exc.reason or str(exc)).upper():
            raise ServerError(f"TLS: the key {key} does not belong to the certificate {cert}") from None
        raise ServerError(f"TLS: {key} is not a PEM private key (or it is protected by a passphrase)") from None


def create_server(config: ServerConfig) -> SpeakerServer:
    """A server bound to its port (``config.port`` 0 picks a free one; see ``.port``), not yet started."""
    return SpeakerServer(config)


def run_until_signalled(config: ServerConfig, on_serving: Callable[[SpeakerServer], None]) -> None:
    """Start, load, serve until SIGTERM or SIGINT, then drain; a second signal stops at once.

    Call it from the main thread: it owns the process. That is also why it gives torch a single
    thread: fbank runs in many request threads at once, and several torch threads each fight over
    the cores (measured: fbank of 3 s of audio takes 3 ms, or 100 ms on a busy two-core machine).
    """
    torch.set_num_threads(1)
    _tame_allocator()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = create_server(config)
    server.start()
    try:
        server.load()
    except BaseException:
        server.drain(0)
        raise
    on_serving(server)
    while not stop.wait(0.5):  # a timed wait, so the signal handler runs promptly
        pass
    for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal ends the process at once
        signal.signal(signum, signal.SIG_DFL)
    log.info("draining: finishing calls in flight for up to %g s", config.grace_seconds)
    if not server.drain():
        # A call still running in a handler thread would hold the interpreter's exit (it joins
        # those threads) for as long as it runs: the grace period is the bound, so end here.
        log.warning("grace period over: exiting with calls still running (their clients see CANCELLED)")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _tame_allocator() -> None:
    """Keep the process near its working set under many request threads (glibc only).

    glibc gives threads that allocate at once arenas of their own (up to 8 per core) and keeps
    what each has freed, and it raises its mmap threshold as large buffers come and go, so later
    ones stay in the arenas too. With dozens of threads decoding minute-long recordings, that
    retained memory, not the work in flight, set the server's size. Two arenas, and buffers from
    1 MiB up mapped and unmapped directly, keep it close to what is in use.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator has its own policy
        return
    m_mmap_threshold, m_arena_max = -3, -8  # malloc.h
    libc.mallopt(m_arena_max, 2)
    libc.mallopt(m_mmap_threshold, 1 << 20)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fingerprint(path: Path) -> str:
    """Identifies the served model's weights, so an enrollment store is only read by the model that made it."""
    return f"sha256:{sha256_of(path)}"
