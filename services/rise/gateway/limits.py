"""Admission control of the gateway: no tenant can hold the thread pool, and the health
check always finds a thread.

The gateway is a synchronous gRPC server: every call in progress holds one thread of its
pool (``Settings.gateway_threads``), a server stream (WatchJob) for as long as it is open.
``Admission`` is a server interceptor that admits each call before its servicer runs:

- a stream (WatchJob, and the unauthenticated health Watch and reflection streams, which
  share one tenant's allowance) counts against ``max_streams_per_tenant``
  (RESOURCE_EXHAUSTED beyond it) and ``max_streams`` over all tenants (UNAVAILABLE, which
  clients retry);
- a unary call counts against ``max_calls_per_tenant`` (RESOURCE_EXHAUSTED) and against
  the threads left over, ``gateway_threads - gateway_reserved_threads - max_streams``
  (UNAVAILABLE);
- grpc.health.v1 Check is never limited.

So admitted calls hold at most ``gateway_threads - gateway_reserved_threads`` threads:
the reserved ones always serve health checks and refusals (each refusal takes
microseconds).  grpc python runs the health servicer on the server's own pool, so this
reserve is what keeps it answering; the interceptor itself runs on the server's polling
thread and only wraps handlers, the counting happens on the call's thread.

Jobs are limited too: ``check_active_jobs`` refuses a tenant's job beyond
``max_active_jobs_per_tenant`` not yet ended (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from rise.errors import BudgetExceeded, InvalidInput, RiseError, Unavailable
from rise.grpcutil import status_of
from rise.jobs import JobStore
from rise.settings import Settings

UNLIMITED = frozenset({"/grpc.health.v1.Health/Check"})
"""Methods admitted without counting: cheap, and what probes call."""
AUTHENTICATED_PREFIX = "/rise.v1."
"""Methods whose caller is a tenant (bearer token); the others (health Watch, reflection)
are anonymous and share one tenant's allowance."""
ANONYMOUS = ""


class Slot:
    """One admitted call; ``release`` (idempotent) gives its place back."""

    def __init__(self, limits: Limits, tenant: str, stream: bool) -> None:
        self.limits, self.tenant, self.stream = limits, tenant, stream
        self.released = False

    def release(self) -> None:
        self.limits.leave(self)


class Limits:
    """Concurrent calls and streams, per tenant and in all (thread-safe counters)."""

    def __init__(self, *, streams: int, streams_per_tenant: int, calls: int,
                 calls_per_tenant: int) -> None:
        if min(streams, streams_per_tenant, calls, calls_per_tenant) < 1:
            raise InvalidInput("gateway limits must be at least 1")
        self.streams, self.streams_per_tenant = streams, streams_per_tenant
        self.calls, self.calls_per_tenant = calls, calls_per_tenant
        self._lock = threading.Lock()
        self._open: dict[bool, Counter[str]] = {True: Counter(), False: Counter()}
        self._total = {True: 0, False: 0}

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        calls = s.gateway_threads - s.gateway_reserved_threads - s.max_streams
        if calls < 1:
            raise InvalidInput(
                f"gateway_threads ({s.gateway_threads}) must exceed gateway_reserved_threads "
                f"({s.gateway_reserved_threads}) + max_streams ({s.max_streams}): unary calls "
                "need threads of their own")
        return cls(streams=s.max_streams, streams_per_tenant=s.max_streams_per_tenant,
                   calls=calls, calls_per_tenant=s.max_calls_per_tenant)

    def enter(self, tenant: str, stream: bool) -> Slot:
        """Admit a call of ``tenant``, or raise: BudgetExceeded over the tenant's limit,
        Unavailable over the gateway's."""
        what = "streams" if stream else "calls in progress"
        mine_max = self.streams_per_tenant if stream else self.calls_per_tenant
        all_max = self.streams if stream else self.calls
        who = f"tenant {tenant!r} already has" if tenant else \
            "unauthenticated callers already have"
        with self._lock:
            mine = self._open[stream][tenant]
            if mine >= mine_max:
                hint = ("wait for a call to finish" if not stream else
                        "close a WatchJob stream or poll GetJob" if tenant else "close a stream")
                raise BudgetExceeded(f"{who} {mine} {what}; the limit is {mine_max} per "
                                     f"tenant ({hint})")
            if self._total[stream] >= all_max:
                raise Unavailable(f"the gateway has {all_max} {what}, its limit; retry later")
            self._open[stream][tenant] = mine + 1
            self._total[stream] += 1
        return Slot(self, tenant, stream)

    def leave(self, slot: Slot) -> None:
        with self._lock:
            if slot.released:
                return
            slot.released = True
            left = self._open[slot.stream][slot.tenant] - 1
            if left > 0:
                self._open[slot.stream][slot.tenant] = left
            else:
                del self._open[slot.stream][slot.tenant]
            self._total[slot.stream] -= 1

    def open(self, tenant: str | None = None, stream: bool = True) -> int:
        """Calls (or streams) admitted and not yet left: of ``tenant``, or of everyone."""
        with self._lock:
            return self._total[stream] if tenant is None else self._open[stream][tenant]


class Admission(grpc.ServerInterceptor):
    """Wraps every handler but ``UNLIMITED`` ones so that its call is admitted by
    ``limits`` first; ``tenant_of(context)`` names the caller of rise.v1 methods (a
    RiseError there, UNAUTHENTICATED say, ends the call with its status)."""

    def __init__(self, limits: Limits, tenant_of: Callable[[grpc.ServicerContext], str],
                 metrics: Any = None, service: str = "gateway") -> None:
        self.limits = limits
        self.tenant_of = tenant_of
        self.metrics = metrics
        self.service = service

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in UNLIMITED:
            return handler
        stream = handler.request_streaming or handler.response_streaming
        authenticated = method.startswith(AUTHENTICATED_PREFIX)
        name = method.rsplit("/", 1)[-1]

        def admit(context: grpc.ServicerContext) -> Slot:
            try:
                tenant = self.tenant_of(context) if authenticated else ANONYMOUS
                return self.limits.enter(tenant, stream)
            except RiseError as e:
                code = status_of(e)
                self._count(name, code)
                context.abort(code, e.message)
                raise  # unreachable: abort raises

        if not stream:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                slot = admit(context)
                try:
                    return inner(request, context)
                finally:
                    slot.release()

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        def streaming(inner: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
                      ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                slot = admit(context)
                # The stream's end (client gone, deadline) frees the place at once, even
                # before the servicer notices; the generator's end frees it otherwise.
                context.add_callback(slot.release)
                try:
                    yield from inner(request, context)
                finally:
                    slot.release()

            return run

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                streaming(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                streaming(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        # A client stream with one answer: none here today; held like a stream.
        inner_cs = handler.stream_unary

        def client_stream(request_iterator: Any, context: grpc.ServicerContext) -> Any:
            slot = admit(context)
            try:
                return inner_cs(request_iterator, context)
            finally:
                slot.release()

        return grpc.stream_unary_rpc_method_handler(
            client_stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is None:
            return
        self.metrics.grpc_requests_total.labels(self.service, method, code.name).inc()
        self.metrics.errors_total.labels(self.service, code.name).inc()


def check_active_jobs(jobs: JobStore, tenant: str, limit: int, job_id: str = "") -> None:
    """BudgetExceeded when ``tenant`` has ``limit`` jobs not yet ended.  With ``job_id`` (a
    job just created), when that job is not among the tenant's ``limit`` oldest active
    ones: checked after creating as well as before, two submits at once cannot both pass."""
    ids = jobs.active_of(tenant)
    if job_id:
        over = job_id in ids and ids.index(job_id) >= limit
        others = len(ids) - (job_id in ids)
    else:
        over, others = len(ids) >= limit, len(ids)
    if over:
        raise BudgetExceeded(f"tenant {tenant!r} has {others} jobs queued or running; the "
                             f"limit is {limit} (wait for one to end, or cancel one)")
