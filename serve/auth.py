"""Bearer-token authentication as a server interceptor.

A call must carry one ``authorization: Bearer <token>`` metadata entry (the scheme's name in any
case, as RFC 6750 allows), else it ends with UNAUTHENTICATED before reaching the service; a call
with two ``authorization`` entries is refused whatever they hold. ``grpc.health.v1.Health`` stays open, so load balancers and
orchestrators can probe a server without holding its token; reflection is behind the token like
the service itself.
"""

from __future__ import annotations

import hmac
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health

from spkft.serve.admission import in_lane, service_and_rpc

OPEN_SERVICES = (health.SERVICE_NAME,)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (except to :data:`OPEN_SERVICES`)."""

    def __init__(self, token: str, refusals: ThreadPoolExecutor | None = None) -> None:
        """``refusals``: the pool refusals run in (the server's handler threads when None)."""
        if not token:
            raise ValueError("the token must not be empty")
        self._expected = token.encode()
        self._refusals = refusals

    def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        service, _ = service_and_rpc(handler_call_details)
        if service in OPEN_SERVICES:
            return continuation(handler_call_details)
        given = [value for key, value in handler_call_details.invocation_metadata or () if key == "authorization"]
        if len(given) == 1 and self._accepts(given[0]):
            return continuation(handler_call_details)
        if len(given) > 1:
            message = "more than one authorization entry; send exactly one"
        elif given:
            message = "wrong bearer token"
        else:
            message = "missing bearer token (metadata authorization: Bearer <token>)"
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method: refused too, so it reveals nothing without the token
            return _refusal(False, False, message, self._refusals)
        return _refusal(handler.request_streaming, handler.response_streaming, message, self._refusals)

    def _accepts(self, value: str | bytes) -> bool:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, credentials = text.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._expected)


def _refusal(request_streaming: bool, response_streaming: bool, message: str,
             pool: ThreadPoolExecutor | None) -> grpc.RpcMethodHandler:
    """A handler of the method's own kind that ends the call with UNAUTHENTICATED (in ``pool`` when given)."""

    def refuse(request_or_iterator, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if pool is not None:
        in_lane(refuse, pool)

    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
