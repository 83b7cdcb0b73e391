"""gRPC plumbing shared by the gateway and the scorer: one error translation, metrics,
health and reflection, ports with or without TLS.

Domain errors (rise.errors) carry their status code; ``translate`` is the one place they
become gRPC statuses.  Anything else is INTERNAL with a generic message (and logged with
its traceback), never UNKNOWN with a stack trace on the wire.

Two things grpc would otherwise get wrong for the caller: request bytes that do not parse
(invalid UTF-8 in a string field, a truncated field) are INVALID_ARGUMENT, not grpc's own
INTERNAL "Exception deserializing request!" (``make_server`` decodes requests itself); and
a status message is cut to ``MAX_STATUS_MESSAGE_BYTES``, since one that echoes a long
input would pass the client's metadata limit and reach it as RESOURCE_EXHAUSTED instead
of its own code.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rise.errors import RiseError

log = logging.getLogger("rise.grpc")

MAX_STATUS_MESSAGE_BYTES = 1024
"""The longest status message sent, in UTF-8 bytes.  It travels as the grpc-message
header, percent-encoded (up to 3 characters a byte), and a client refuses the status of a
call whose headers pass its metadata limit (8 KiB soft, 16 KiB hard by default)."""


def short_message(msg: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """``msg`` cut to at most ``limit`` UTF-8 bytes (on a character boundary), saying how
    long it was when cut."""
    raw = msg.encode("utf-8", "replace")
    if len(raw) <= limit:
        return msg
    tail = f"... ({len(raw)} bytes, cut)"
    return raw[: limit - len(tail)].decode("utf-8", "ignore") + tail


def status_of(err: RiseError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.grpc_code, grpc.StatusCode.INTERNAL)


def rpc(service: str) -> Callable:
    """Decorate a servicer method: translate errors, count and time the call.

    Metrics come from the servicer's ``metrics`` attribute (a rise.metrics.Metrics, or
    None).  Works for unary and server-streaming methods (generators).
    """

    def wrap(fn: Callable) -> Callable:
        method = fn.__name__

        def observe(self: Any, code: grpc.StatusCode, start: float) -> None:
            metrics = getattr(self, "metrics", None)
            if metrics is None:
                return
            metrics.grpc_requests_total.labels(service, method, code.name).inc()
            metrics.grpc_request_duration_seconds.labels(service, method).observe(
                time.perf_counter() - start)
            if code != grpc.StatusCode.OK:
                metrics.errors_total.labels(service, code.name).inc()

        def fail(self: Any, context: grpc.ServicerContext, e: BaseException,
                 start: float) -> None:
            if isinstance(e, RiseError):
                code, msg = status_of(e), e.message
            else:
                log.exception("internal error in %s", method)
                code, msg = grpc.StatusCode.INTERNAL, f"internal error in {method}"
            observe(self, code, start)
            context.abort(code, short_message(msg))

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterable:
                start = time.perf_counter()
                try:
                    yield from fn(self, request, context)
                except Exception as e:  # noqa: BLE001 - translated, never leaked
                    if _is_abort(e):
                        raise
                    fail(self, context, e, start)
                observe(self, grpc.StatusCode.OK, start)

            return stream

        @functools.wraps(fn)
        def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                out = fn(self, request, context)
            except Exception as e:  # noqa: BLE001 - translated, never leaked
                if _is_abort(e):
                    code = context.code() if hasattr(context, "code") else None
                    observe(self, code or grpc.StatusCode.UNKNOWN, start)
                    raise
                fail(self, context, e, start)
            observe(self, grpc.StatusCode.OK, start)
            return out

        return unary

    return wrap


def _is_abort(e: BaseException) -> bool:
    # context.abort raises a bare Exception subclass internal to grpc.
    return type(e).__name__ == "_AbortedError" or (
        type(e) is Exception and not e.args)


def touch_rpc_metrics(metrics: Any, service: str, servicers: Iterable[Any]) -> None:
    """Create the label sets of every RPC of ``servicers`` at zero, so each metric name is
    exported (and rate() works) before the first call."""
    for servicer in servicers:
        for name in dir(servicer):
            fn = getattr(servicer, name)
            if name[:1].isupper() and callable(fn):
                metrics.grpc_requests_total.labels(service, name, "OK")
                metrics.grpc_request_duration_seconds.labels(service, name)
    for code in grpc.StatusCode:
        if code != grpc.StatusCode.OK:
            metrics.errors_total.labels(service, code.name)


class _Undecodable:
    """What a request that does not parse becomes (see ``DecodeRequests``)."""

    def __init__(self, error: str) -> None:
        self.error = error


class DecodeRequests(grpc.ServerInterceptor):
    """Request bytes that do not parse are INVALID_ARGUMENT.

    grpc runs a handler's request deserializer before any handler code, and answers its
    exception INTERNAL.  This replaces the deserializer of unary-request handlers by one
    that never raises (a bad message becomes an ``_Undecodable``) and has the handler
    abort with INVALID_ARGUMENT when it gets one.  ``make_server`` puts it innermost, so
    interceptors before it (authentication, admission) still run first.
    """

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = handler_call_details.method

        def decode(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - DecodeError, or any parser's error
                return _Undecodable(type(e).__name__)

        def guard(behavior: Callable[[Any, grpc.ServicerContext], Any]
                  ) -> Callable[[Any, grpc.ServicerContext], Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"the request to {method} does not parse as its message "
                                  f"({request.error}): invalid UTF-8 in a string, or a "
                                  "truncated or malformed field")
                return behavior(request, context)

            return run

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                guard(handler.unary_stream), request_deserializer=decode,
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            guard(handler.unary_unary), request_deserializer=decode,
            response_serializer=handler.response_serializer)


def make_server(max_message_bytes: int, threads: int = 16,
                interceptors: Iterable[grpc.ServerInterceptor] = ()) -> grpc.Server:
    """A threaded server with the message size limits and ``interceptors``, then
    ``DecodeRequests`` (innermost: undecodable requests are INVALID_ARGUMENT)."""
    opts = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]
    return grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=opts,
                       interceptors=[*interceptors, DecodeRequests()])


def add_port(server: grpc.Server, address: str, cert_file: str = "", key_file: str = "") -> int:
    """Bind ``address``: TLS with the PEM certificate chain and key when both files are
    given, else plaintext.  Returns the bound port (0 when the address could not be bound);
    OSError when a file cannot be read, ValueError when only one is given."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("TLS needs both a certificate file and a key file")
    if not cert_file:
        return server.add_insecure_port(address)
    with open(key_file, "rb") as f:
        key = f.read()
    with open(cert_file, "rb") as f:
        chain = f.read()
    return server.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))


def health_server(health: Any, address: str) -> tuple[grpc.Server, int]:
    """A plaintext server answering only grpc.health.v1 from ``health`` (the servicer the
    main server's ``add_health_and_reflection`` returned), for probes that cannot speak
    TLS; not started.  Returns it and its bound port (0: not bound)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return server, server.add_insecure_port(address)


def add_health_and_reflection(server: grpc.Server, service_names: Iterable[str]) -> Any:
    """Standard grpc.health.v1 (every service SERVING) and server reflection."""
    names = list(service_names)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    for n in ["", *names]:
        hs.set(n, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return hs
