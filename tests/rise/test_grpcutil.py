"""The gRPC plumbing of the gateway and the scorer (rise.grpcutil): a server built by
``make_server`` with a servicer decorated by ``rpc``, called over a real channel.

Two findings of the fuzz run (``tests/fuzz/``, report ``tests/benchmarks/reports/fuzz.md``)
are kept here:

- F1: request bytes that do not parse (invalid UTF-8 in a string field, a truncated field)
  are answered INTERNAL ("Exception deserializing request!") by grpc itself, before the
  servicer and its error translation run; ``docs/bad-input.md`` says invalid UTF-8 is
  INVALID_ARGUMENT.
- F5: an error whose message echoes a long input (a 100 KB job id here; DeleteExamples'
  NOT_FOUND quotes up to three ids) is more than the 16 KiB of status details a gRPC client
  accepts: the caller gets RESOURCE_EXHAUSTED ("received metadata size exceeds hard
  limit") instead of the error's code.  Messages are now cut to 1 KiB.
"""

from __future__ import annotations

import grpc
import pytest
from rise.errors import NotFound
from rise.grpcutil import make_server, rpc, short_message
from rise.v1 import rise_pb2, rise_pb2_grpc


class Jobs(rise_pb2_grpc.JobServiceServicer):
    metrics = None

    @rpc("gateway")
    def GetJob(self, req: rise_pb2.GetJobRequest, context) -> rise_pb2.Job:
        raise NotFound(f"job {req.id!r} not found")


@pytest.fixture(scope="module")
def channel():
    server = make_server(64 * 1024**2, threads=2)
    rise_pb2_grpc.add_JobServiceServicer_to_server(Jobs(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        server.stop(0)


def raw_get_job(channel: grpc.Channel, body: bytes) -> grpc.StatusCode:
    call = channel.unary_unary("/rise.v1.JobService/GetJob")  # bytes in, bytes out
    try:
        call(body, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_a_domain_error_keeps_its_code(channel):
    body = rise_pb2.GetJobRequest(id="nope").SerializeToString()
    assert raw_get_job(channel, body) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("body", [b"\x0a\x01\xff",  # field 1 (id): invalid UTF-8
                                  b"\x0a\x02\xc3\x28",
                                  b"\x08\xff\xff",  # a varint that never ends
                                  b"\x0a\xde\x06abc"],  # a length past the end
                         ids=["utf8-ff", "utf8-c328", "truncated", "overlong"])
def test_undecodable_request_bytes_are_invalid_argument(channel, body):
    assert raw_get_job(channel, body) == grpc.StatusCode.INVALID_ARGUMENT


def test_an_error_echoing_a_long_input_keeps_its_code(channel):
    stub = rise_pb2_grpc.JobServiceStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetJob(rise_pb2.GetJobRequest(id="x" * 100_000), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
    assert len(e.value.details().encode()) <= 1024


def test_a_long_message_is_cut_on_a_character_boundary():
    msg = short_message("é" * 2000)
    assert len(msg.encode()) <= 1024 and msg.endswith("(4000 bytes, cut)")
    assert short_message("short") == "short"


def test_an_undecodable_request_is_refused_after_the_interceptors_before_it():
    seen = []

    class Outer(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            handler = continuation(details)

            def unary(request, context):
                seen.append(type(request).__name__)
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

    server = make_server(1024**2, threads=2, interceptors=[Outer()])
    rise_pb2_grpc.add_JobServiceServicer_to_server(Jobs(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert raw_get_job(ch, b"\x0a\x01\xff") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)
    assert seen == ["_Undecodable"]  # the interceptor ran, on the stand-in of the request
