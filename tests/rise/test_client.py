"""rise.client over a real in-process gRPC server: status codes become rise.errors classes
with the server's message, the bearer token travels as metadata, requests and answers
are translated both ways, and ``rise remote`` prints one error line with the right code."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from concurrent import futures

import grpc
import pytest
from rise import errors
from rise.client import (
    CODE_TO_ERROR,
    DEFAULT_TIMEOUT,
    RETRY_POLICY,
    SERVICE_CONFIG,
    RiseClient,
    state_name,
)
from rise.settings import Settings
from rise.v1 import rise_pb2, rise_pb2_grpc

CASES = [(code, cls) for code, cls in CODE_TO_ERROR.items()] + [
    (grpc.StatusCode.INTERNAL, errors.RiseError),
    (grpc.StatusCode.UNIMPLEMENTED, errors.RiseError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.RiseError),
]
SEEN: list[tuple[str, object]] = []
ATTEMPTS: Counter[str] = Counter()  # request id -> calls that reached the server


def _status(context: grpc.ServicerContext, name: str) -> None:
    """Abort with the status code named by the index name, e.g. 'not-found'."""
    code = grpc.StatusCode[name.upper().replace("-", "_")]
    context.abort(code, f"server says {code.name} for {name}")


class FakeIndex(rise_pb2_grpc.IndexServiceServicer):
    def GetIndex(self, req, context):
        SEEN.append(("auth", dict(context.invocation_metadata()).get("authorization")))
        if req.index == "ok":
            return rise_pb2.Index(name="ok", pool="p", generation=3, live_count=12)
        _status(context, req.index)

    def CreateIndex(self, req, context):
        SEEN.append(("create", req))
        return rise_pb2.Job(id="j1", state=rise_pb2.JOB_STATE_QUEUED, index=req.index)

    def ListIndexes(self, req, context):
        """Three indexes in pages of page_size (default: all); the token is the last name."""
        SEEN.append(("list", req))
        names = [n for n in ("a", "b", "c") if n > req.page_token]
        size = req.page_size or len(names)
        page = names[:size]
        token = page[-1] if len(names) > size else ""
        return rise_pb2.ListIndexesResponse(indexes=[rise_pb2.Index(name=n) for n in page],
                                            next_page_token=token)

    def AppendToIndex(self, req, context):
        """Index 'flaky-N': UNAVAILABLE for the first N attempts of each request id."""
        SEEN.append(("append", req))
        ATTEMPTS[req.request_id] += 1
        if req.index.startswith("flaky-") and ATTEMPTS[req.request_id] <= int(req.index[6:]):
            context.abort(grpc.StatusCode.UNAVAILABLE, "gateway restarting")
        return rise_pb2.Job(id=f"job-of-{req.request_id}", index=req.index)

    def DeleteExamples(self, req, context):
        SEEN.append(("delete", req))
        return rise_pb2.Index(name=req.index, generation=2)

    def CompactIndex(self, req, context):
        SEEN.append(("compact", req))
        return rise_pb2.Job(id="j2", index=req.index)


class FakeJobs(rise_pb2_grpc.JobServiceServicer):
    def WatchJob(self, req, context):
        if req.id == "bad":
            _status(context, "not-found")
        for done in range(3):
            yield rise_pb2.Job(id=req.id, state=rise_pb2.JOB_STATE_RUNNING, shards_total=3,
                               shards_done=done)
        yield rise_pb2.Job(id=req.id, state=rise_pb2.JOB_STATE_SUCCEEDED, shards_total=3,
                           shards_done=3)


class FakeScoring(rise_pb2_grpc.ScoringServiceServicer):
    def Attribute(self, req, context):
        SEEN.append(("attribute", req))
        return rise_pb2.AttributeResponse(results=[
            rise_pb2.QueryResult(query_id=q.id or str(i), hits=[
                rise_pb2.Hit(id="d1", score=0.5, record_json='{"id": "d1", "text": "x"}'),
                rise_pb2.Hit(id="d0", score=0.25)]) for i, q in enumerate(req.queries)])

    def Value(self, req, context):
        SEEN.append(("value", req))
        return rise_pb2.ValueResponse(values=[rise_pb2.Hit(id="d1", score=2.0)], examples=1,
                                      selected=1)


@pytest.fixture(scope="module")
def address():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rise_pb2_grpc.add_IndexServiceServicer_to_server(FakeIndex(), server)
    rise_pb2_grpc.add_JobServiceServicer_to_server(FakeJobs(), server)
    rise_pb2_grpc.add_ScoringServiceServicer_to_server(FakeScoring(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def fast_backoff(monkeypatch):
    """The client's retry policy with millisecond backoffs (the tests retry a lot)."""
    monkeypatch.setitem(RETRY_POLICY, "initialBackoff", "0.01s")
    monkeypatch.setitem(RETRY_POLICY, "maxBackoff", "0.05s")


@pytest.fixture
def client(address, fast_backoff):
    SEEN.clear()
    with RiseClient(address, "tok-1", timeout=10) as c:
        yield c


@pytest.mark.parametrize("code,cls", CASES, ids=[c.name for c, _ in CASES])
def test_status_codes_become_rise_errors(client, code, cls):
    name = code.name.lower().replace("_", "-")
    with pytest.raises(errors.RiseError) as info:
        client.get_index(name)
    assert type(info.value) is cls
    assert str(info.value) == f"server says {code.name} for {name}"
    assert info.value.code == code
    if cls is errors.RiseError:  # unmapped codes keep their name for the CLI and logs
        assert info.value.grpc_code == code.name


def test_bearer_token_is_sent(client, address):
    assert client.get_index("ok").live_count == 12
    assert SEEN[-1] == ("auth", "Bearer tok-1")
    with RiseClient(address, "") as anonymous:
        anonymous.get_index("ok")
    assert SEEN[-1] == ("auth", None)


def test_listing_follows_page_tokens(client):
    assert [i.name for i in client.list_indexes()] == ["a", "b", "c"]
    SEEN.clear()
    assert [i.name for i in client.iter_indexes(page_size=2)] == ["a", "b", "c"]
    assert [(r.page_size, r.page_token) for _, r in SEEN] == [(2, ""), (2, "b")]


def test_unreachable_gateway_is_unavailable(fast_backoff):
    # Five attempts with backoff, then UNAVAILABLE.
    with RiseClient("127.0.0.1:1", "t", timeout=30) as c, pytest.raises(errors.Unavailable):
        c.list_indexes()


def test_every_call_is_retried_on_unavailable_with_exponential_backoff():
    assert RETRY_POLICY == {"maxAttempts": 5, "initialBackoff": "0.5s", "maxBackoff": "10s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    (config,) = SERVICE_CONFIG["methodConfig"]
    assert config["retryPolicy"] is RETRY_POLICY
    services = {n["service"] for n in config["name"]}
    assert services == {f"rise.v1.{s.name}" for s in rise_pb2.DESCRIPTOR.services_by_name.values()}


def test_unavailable_is_retried_with_the_same_request_id(client):
    job = client.append("flaky-2", "s3://rise/tenants/a/d.jsonl")
    rid = SEEN[-1][1].request_id
    assert ATTEMPTS[rid] == 3 and job.id == f"job-of-{rid}"
    assert [r.request_id for op, r in SEEN if op == "append"] == [rid] * 3
    with pytest.raises(errors.Unavailable, match="gateway restarting"):
        client.append("flaky-9", "s3://rise/tenants/a/d.jsonl")  # gives up after 5 attempts
    assert ATTEMPTS[SEEN[-1][1].request_id] == 5


def test_changing_calls_send_a_fresh_request_id_or_the_given_one(client):
    client.create_index("docs", "s3://rise/tenants/a/d.jsonl", "pool")
    client.append("docs", "s3://rise/tenants/a/d.jsonl")
    client.append("docs", "s3://rise/tenants/a/d.jsonl")
    client.delete_examples("docs", ["d1"])
    client.compact("docs")
    ids = [req.request_id for _, req in SEEN]
    assert len(set(ids)) == 5 and all(uuid.UUID(i).version == 4 for i in ids)
    assert client.append("docs", "x", request_id="retry-1").id == "job-of-retry-1"
    client.create_index("docs", "x", "pool", request_id="retry-2")
    client.delete_examples("docs", ["d1"], request_id="retry-3")
    client.compact("docs", request_id="retry-4")
    assert [req.request_id for _, req in SEEN[-4:]] == [f"retry-{i}" for i in range(1, 5)]


def test_the_default_deadline_outlasts_the_gateways_own():
    gateway = Settings().query_timeout_seconds
    assert DEFAULT_TIMEOUT >= gateway + 30
    with RiseClient("127.0.0.1:1", "t") as c:
        assert c.timeout == DEFAULT_TIMEOUT


def test_watch_and_wait(client):
    seen = [j.shards_done for j in client.watch_job("j", interval=0.05)]
    assert seen == [0, 1, 2, 3]
    final = client.wait("j", timeout=10)
    assert state_name(final) == "SUCCEEDED" and final.shards_done == 3
    with pytest.raises(errors.NotFound, match="server says NOT_FOUND"):
        list(client.watch_job("bad"))


def test_requests_are_built_from_python_values(client):
    from rise.data import FieldMap

    job = client.create_index("docs", "s3://rise/tenants/a/d.jsonl", "pool", shard_size=4,
                              fields=FieldMap(prompt_field="p", response_field="r"),
                              config={"topk": 16, "seed": 3})
    assert job.id == "j1" and state_name(job) == "QUEUED"
    req = SEEN[-1][1]
    assert (req.fields.prompt_field, req.fields.response_field) == ("p", "r")
    assert (req.config.topk, req.config.seed, req.shard_size) == (16, 3, 4)

    out = client.attribute("docs", ["plain", {"id": "q1", "text": "t"}], top=2, lam=0.25,
                           return_texts=True)
    assert out == [("0", [("d1", 0.5, {"id": "d1", "text": "x"}), ("d0", 0.25, None)]),
                   ("q1", [("d1", 0.5, {"id": "d1", "text": "x"}), ("d0", 0.25, None)])]
    req = SEEN[-1][1]
    assert req.scoring.HasField("lambda") and getattr(req.scoring, "lambda") == 0.25
    assert not req.fields.prompt_field

    client.attribute("docs", [{"prompt": "p", "response": "r"}], chat_template=True)
    req = SEEN[-1][1]
    assert (req.fields.prompt_field, req.fields.response_field) == ("prompt", "response")
    assert req.fields.chat_template and not req.scoring.HasField("lambda")
    with pytest.raises(errors.InvalidInput, match="mix"):
        client.attribute("docs", ["a", {"prompt": "p", "response": "r"}])

    values, selected = client.value("docs", ["t"], select_fraction=0.5,
                                    selection_uri="s3://rise/tenants/a/s.jsonl")
    assert values == [("d1", 2.0)] and selected == 1
    assert SEEN[-1][1].select_fraction == 0.5


def test_remote_cli_errors_are_one_line_with_the_class_exit_code(address, capsys, tmp_path):
    from rise.cli import main

    capsys.readouterr()
    assert main(["remote", "--gateway", address, "--token", "t", "show", "not-found"]) == 3
    out, err = capsys.readouterr()
    assert err.strip() == "rise: error: server says NOT_FOUND for not-found" and not out
    assert main(["remote", "show", "permission-denied", "--gateway", address,
                 "--token", "t"]) == 11
    assert main(["remote", "--gateway", address, "--token", "t", "show", "ok", "--json"]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out)["live_count"] == 12

    queries = tmp_path / "q.jsonl"
    queries.write_text('{"qid": "a", "body": "hello"}\n')
    out_path = tmp_path / "out.jsonl"
    assert main(["remote", "--gateway", address, "--token", "t", "attribute", "docs",
                 "--queries", str(queries), "--output", str(out_path), "--id-field", "qid",
                 "--text-field", "body", "--top", "2"]) == 0
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert rows == [{"query_id": "a", "results": [{"id": "d1", "score": 0.5},
                                                   {"id": "d0", "score": 0.25}]}]
    assert main(["remote", "--gateway", address, "--token", "", "list"]) == 10

    for verb, extra in (("append", ["--data", "s3://rise/tenants/a/d.jsonl"]),
                        ("delete", ["--id", "d1"]), ("compact", [])):
        SEEN.clear()
        assert main(["remote", "--gateway", address, "--token", "t", verb, "docs", *extra,
                     "--request-id", f"script-{verb}"]) == 0
        assert SEEN[-1][1].request_id == f"script-{verb}"
        assert main(["remote", "--gateway", address, "--token", "t", verb, "docs",
                     *extra]) == 0
        assert uuid.UUID(SEEN[-1][1].request_id).version == 4


REMOTE_VERBS = ["index", "append", "delete", "compact", "drop", "list", "show", "jobs", "job",
                "watch", "cancel", "attribute", "value"]


def test_remote_help(capsys):
    from rise.cli import main

    for verb in REMOTE_VERBS:
        with pytest.raises(SystemExit) as info:
            main(["remote", verb, "--help"])
        out = capsys.readouterr().out
        assert info.value.code == 0
        assert f"rise remote {verb}" in out and "--json" in out and "--gateway" in out
    with pytest.raises(SystemExit) as info:
        main(["remote", "attribute", "c"])  # missing --queries/--output: one line, code 2
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "see rise remote attribute --help" in err


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1, and its key (openssl CLI)."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def tls_address(tls_files):
    """The fake gateway bound with TLS the way the gateway binds it (grpcutil.add_port),
    and a plaintext health-only port beside it (grpcutil.health_server)."""
    from rise.grpcutil import add_health_and_reflection, add_port, health_server

    cert, key = tls_files
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rise_pb2_grpc.add_IndexServiceServicer_to_server(FakeIndex(), server)
    rise_pb2_grpc.add_ScoringServiceServicer_to_server(FakeScoring(), server)
    health = add_health_and_reflection(server, ["rise.v1.IndexService"])
    port = add_port(server, "127.0.0.1:0", str(cert), str(key))
    probes, health_port = health_server(health, "127.0.0.1:0")
    assert port and health_port
    server.start()
    probes.start()
    yield f"127.0.0.1:{port}", health_port
    probes.stop(grace=None)
    server.stop(grace=None)


def test_tls_round_trip(tls_address, tls_files, fast_backoff):
    address, _ = tls_address
    cert, _ = tls_files
    SEEN.clear()
    for roots in (cert, str(cert), cert.read_bytes()):  # a path, or PEM bytes
        with RiseClient(address, "tok-tls", secure=True, root_certificates=roots,
                        timeout=10) as c:
            assert c.get_index("ok").live_count == 12
    assert SEEN[-1] == ("auth", "Bearer tok-tls")
    # The certificate names localhost too; another name is refused unless overridden.
    port = address.rsplit(":", 1)[1]
    with RiseClient(f"localhost:{port}", "t", secure=True, root_certificates=cert,
                    timeout=10) as c:
        assert c.get_index("ok").name == "ok"
    with RiseClient(address, "t", secure=True, root_certificates=cert,
                    server_name="localhost", timeout=10) as c:
        assert c.get_index("ok").name == "ok"


def test_tls_refuses_plaintext_and_untrusted_certificates(tls_address, tls_files, fast_backoff):
    address, _ = tls_address
    cert, _ = tls_files
    SEEN.clear()
    with RiseClient(address, "t", timeout=3) as plain, pytest.raises(errors.Unavailable):
        plain.get_index("ok")
    # the system's roots do not trust a self-signed certificate
    with RiseClient(address, "t", secure=True, timeout=3) as c, \
            pytest.raises(errors.Unavailable):
        c.get_index("ok")
    with RiseClient(address, "t", secure=True, root_certificates=cert,
                    server_name="gateway.example", timeout=3) as c, \
            pytest.raises(errors.Unavailable):
        c.get_index("ok")
    assert SEEN == []  # no call reached the servicer, so no token was sent in the clear
    with pytest.raises(errors.InvalidInput, match="secure=True"):
        RiseClient(address, "t", root_certificates=cert)


def test_health_port_answers_health_only_in_plaintext(tls_address):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, health_port = tls_address
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                     timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            rise_pb2_grpc.IndexServiceStub(ch).GetIndex(rise_pb2.GetIndexRequest(index="ok"),
                                                       timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_add_port_needs_both_files(tls_files):
    from rise.grpcutil import add_port

    cert, key = tls_files
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(ValueError, match="both"):
        add_port(server, "127.0.0.1:0", str(cert), "")
    with pytest.raises(OSError):
        add_port(server, "127.0.0.1:0", str(cert), str(key.with_name("missing.pem")))


def test_remote_cli_speaks_tls(tls_address, tls_files, capsys, fast_backoff):
    from rise.cli import main

    address, _ = tls_address
    cert, _ = tls_files
    capsys.readouterr()
    assert main(["remote", "--gateway", address, "--token", "t", "--ca", str(cert),
                 "show", "ok", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["live_count"] == 12
    assert main(["remote", "show", "ok", "--gateway", address, "--token", "t", "--tls",
                 "--ca", str(cert), "--timeout", "5"]) == 0
    capsys.readouterr()
    # plaintext to a TLS port, and TLS without the certificate: UNAVAILABLE (exit code 8)
    code_plain = main(["remote", "--gateway", address, "--token", "t", "--timeout", "3",
                       "show", "ok"])
    code_untrusted = main(["remote", "--gateway", address, "--token", "t", "--tls",
                           "--timeout", "3", "show", "ok"])
    assert code_plain == code_untrusted != 0
    assert "rise: error:" in capsys.readouterr().err
