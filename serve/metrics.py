"""What a running server reports about its calls: Prometheus metrics and JSON access logs.

:class:`CallObserver`, the first of the server's interceptors, wraps every speaker-service call,
refusals included, and at its end counts it by RPC and status code, records its latency and the
seconds of audio it carried, and (with access logs on) logs one line for it. The service tells
it the audio seconds through :func:`note_audio`, which adds to the current call's record (a
context variable: each call runs in a context of its own).

:class:`Metrics` holds the metrics in a registry of the server's own, served over HTTP by
``prometheus-client`` on ``--metrics-port``:
- ``spkft_requests_total{rpc,code}``, ``spkft_request_duration_seconds{rpc}`` (histogram),
  ``spkft_request_audio_seconds_total{rpc}``;
- ``spkft_queue_depth`` (inputs waiting for inference), ``spkft_calls_held`` (calls running or
  waiting for a handler thread), ``spkft_batch_rows`` and ``spkft_inference_seconds``
  (histograms, one observation per inference call);
- ``spkft_enrolled_speakers``, ``spkft_enrollment_store_up`` (0 while a PostgreSQL store is
  unreachable);
- ``spkft_model_info{model,engine,precision,enrollment_store}``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Callable

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from spkft.serve.admission import service_and_rpc

access_log = logging.getLogger("spkft.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

_call_audio: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("spkft_call_audio", default=None)


def note_audio(seconds: float) -> None:
    """Add ``seconds`` of audio to the current call's record (nothing outside an observed call)."""
    record = _call_audio.get()
    if record is not None:
        record[0] += seconds


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("spkft_requests", "Speaker-service calls by RPC and status code.", ["rpc", "code"], registry=r)
        self.latency = Histogram("spkft_request_duration_seconds", "Latency of speaker-service calls, by RPC.", ["rpc"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.audio = Counter("spkft_request_audio_seconds", "Seconds of audio received, by RPC.", ["rpc"], registry=r)
        self.queue_depth = Gauge("spkft_queue_depth", "Inputs waiting for inference.", registry=r)
        self.calls_held = Gauge("spkft_calls_held", "Calls running or waiting for a handler thread.", registry=r)
        self.batch_rows = Histogram("spkft_batch_rows", "Inputs per inference call.", buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("spkft_inference_seconds", "Seconds per inference call.", buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.speakers = Gauge("spkft_enrolled_speakers", "Speakers in the enrollment store.", registry=r)
        self.store_up = Gauge("spkft_enrollment_store_up", "1 while the enrollment store can be written.", registry=r)
        self.model = Info("spkft_model", "The model served and what runs it.", registry=r)

    def timed(self, embed_batch: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        """``embed_batch``, observing each call's rows and seconds."""

        def observed(features: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            rows = embed_batch(features)
            self.inference.observe(time.perf_counter() - start)
            self.batch_rows.observe(len(features))
            return rows

        return observed


class CallObserver(grpc.ServerInterceptor):
    """Observes every unary call to ``services``: metrics when given, an access log line when ``log_access``."""

    def __init__(self, services: tuple[str, ...], metrics: Metrics | None, log_access: bool) -> None:
        self._services = frozenset(services)
        self._metrics = metrics
        self._log_access = log_access

    def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        service, rpc = service_and_rpc(handler_call_details)
        if handler is None or service not in self._services or handler.request_streaming or handler.response_streaming:
            return handler
        behavior = handler.unary_unary

        def observed(request, context: grpc.ServicerContext):
            audio = [0.0]
            _call_audio.set(audio)
            start = time.perf_counter()
            try:
                return behavior(request, context)
            finally:
                self._record(rpc, context, time.perf_counter() - start, audio[0])

        pool = getattr(behavior, "experimental_thread_pool", None)  # keep the call in its lane
        if pool is not None:
            observed.experimental_thread_pool = pool
        return handler._replace(unary_unary=observed)

    def _record(self, rpc: str, context: grpc.ServicerContext, seconds: float, audio_seconds: float) -> None:
        code = (context.code() or grpc.StatusCode.OK).name
        if self._metrics is not None:
            self._metrics.requests.labels(rpc, code).inc()
            self._metrics.latency.labels(rpc).observe(seconds)
            if audio_seconds:
                self._metrics.audio.labels(rpc).inc(audio_seconds)
        if self._log_access:
            access_log.info("%s %s", rpc, code, extra={"access": {
                "rpc": rpc, "code": code, "milliseconds": round(seconds * 1000, 3),
                "audio_seconds": round(audio_seconds, 3), "peer": context.peer(),
            }})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and an access record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "access", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


JsonFormatter.converter = time.gmtime
