"""Which thread runs a call, and how many speaker-service calls the server takes on at once.

gRPC's own limit (``maximum_concurrent_rpcs``) counts every call, health checks included, and
every call waits for the same handler threads, so under load a probe would wait behind inference
or be refused with it. Here calls run in three lanes instead:

- **handlers** (``handler_threads``): the speaker service and reflection. A :class:`CallCounter`
  pool counts the calls it holds, running or waiting for a thread;
- **probes** (a few threads): ``grpc.health.v1.Health``, served by handlers of our own
  (:func:`add_health_to_server`), so a probe never waits behind a speaker-service call;
- **refusals** (a few threads): the calls :class:`Admission` turns away, so a refusal is
  immediate instead of queued behind the work it is refusing.

:class:`Admission` admits a speaker-service call only while fewer than ``limit`` are held
(``handler_threads + max_queue`` in the server), and answers the rest RESOURCE_EXHAUSTED. Its
decision and grpc's hand-off to the pool happen in grpc's one serving thread, one call after the
other, so the count it reads is exact. The lanes rely on grpc's ``experimental_thread_pool``:
a handler function carrying that attribute runs in that pool instead of the server's.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2

PROBE_THREADS = 2
REFUSAL_THREADS = 2


class CallCounter(ThreadPoolExecutor):
    """A thread pool that knows how many calls it holds, running or queued."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._held = 0
        self._count_lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._count_lock:
            return self._held

    def submit(self, fn, /, *args, **kwargs) -> Future:
        with self._count_lock:
            self._held += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        return future

    def _release(self) -> None:
        with self._count_lock:
            self._held -= 1


def service_and_rpc(handler_call_details: grpc.HandlerCallDetails) -> tuple[str, str]:
    """The service and method names of a call, from its ``/package.Service/Method`` path."""
    service, _, rpc = handler_call_details.method.lstrip("/").partition("/")
    return service, rpc


def in_lane(behavior, pool: ThreadPoolExecutor):
    """``behavior`` (a handler function), set to run in ``pool`` instead of the server's handler threads."""
    behavior.experimental_thread_pool = pool
    return behavior


class Admission(grpc.ServerInterceptor):
    """Refuses calls to ``services`` with RESOURCE_EXHAUSTED while ``limit`` calls are held by ``handlers``."""

    def __init__(self, services: tuple[str, ...], handlers: CallCounter, limit: int, refusals: ThreadPoolExecutor) -> None:
        self._services = frozenset(services)
        self._handlers = handlers
        self._limit = limit
        self._refusals = refusals

    def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        service, _ = service_and_rpc(handler_call_details)
        if handler is None or service not in self._services or handler.request_streaming or handler.response_streaming:
            return handler
        if self._handlers.held < self._limit:
            return handler
        message = (f"the server is busy: {self._limit} calls are in progress or waiting, the most it takes on; "
                   "retry with backoff or on another replica")

        def refuse(request, context: grpc.ServicerContext):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

        return grpc.unary_unary_rpc_method_handler(in_lane(refuse, self._refusals))


def add_health_to_server(servicer: health.HealthServicer, server: grpc.Server, probes: ThreadPoolExecutor) -> None:
    """Serve ``servicer``'s Check and Watch on ``probes``' threads."""

    def check(request, context):
        return servicer.Check(request, context)

    def watch(request, context, send_response_callback=None):
        return servicer.Watch(request, context, send_response_callback)

    watch.experimental_non_blocking = True  # Watch returns at once and sends on status changes
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            in_lane(check, probes),
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            in_lane(watch, probes),
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(health.SERVICE_NAME, handlers),))
