"""Gateway validation over real gRPC, before any queue or store is touched: auth, names,
pools, dataset areas, limits, and the planner refusing a model its pool cannot hold."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import grpc
import pytest
from rise import constants, scorer
from rise.errors import BudgetExceeded, NotFound
from rise.gateway.service import Auth, Deps, IndexService, ScoringService, check_values_fit
from rise.grpcutil import make_server
from rise.settings import Pool, Settings
from rise.v1 import common_pb2, rise_pb2, rise_pb2_grpc
from rise.v1convert import config_from, spec_from

CONFIGS = Path(__file__).resolve().parents[2] / "fixtures" / "configs"


class NoJobs:
    """Every index exists for tenant a; anything that would touch Redis fails the test."""

    def index_entry(self, tenant, index):
        if tenant != "a":
            raise NotFound(f"index {index!r} not found")
        return {"pool": "cpu"}

    def register_index(self, tenant, index, pool):
        return False  # every name is taken: reaching this means validation passed

    def registry_complete(self):
        return True  # the registry copy is whole: a missing name is NOT_FOUND at once

    def __getattr__(self, name):
        raise AssertionError(f"the gateway reached the job store ({name}) for a bad request")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw")
    tokens = tmp / "tokens.json"
    tokens.write_text(json.dumps({"tok-a": "a", "tok-b": "b"}))
    settings = Settings(
        auth_tokens_file=str(tokens), max_queries_per_call=2, s3_bucket="rise",
        pools={"cpu": Pool(model="unused", gpus=0),
               "small-gpus": Pool(model=str(CONFIGS / "olmo-2-32b.json"), gpus=2,
                                  gpu_memory="24GiB"),
               "h200": Pool(model=str(CONFIGS / "olmo-2-32b.json"), gpus=1,
                            gpu_memory="141GiB"),
               "h200-64": Pool(model=str(CONFIGS / "olmo-2-32b.json"), gpus=1,
                               gpu_memory="64GiB"),
               "no-config": Pool(model=str(tmp / "missing-model"), gpus=1)})

    def no(*a, **k):
        raise AssertionError("the gateway reached a queue or store for a bad request")

    deps = Deps(settings=settings, jobs=NoJobs(), send_task=no, store=no, scorers=[],
                materialize=no)
    auth = Auth(settings)
    server = make_server(settings.max_message_bytes)
    rise_pb2_grpc.add_IndexServiceServicer_to_server(IndexService(deps, auth), server)
    rise_pb2_grpc.add_ScoringServiceServicer_to_server(ScoringService(deps, auth), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield rise_pb2_grpc.IndexServiceStub(channel), rise_pb2_grpc.ScoringServiceStub(channel)
    channel.close()
    server.stop(0)


def call(fn, req, token="tok-a"):
    md = [("authorization", f"Bearer {token}")] if token else []
    with pytest.raises(grpc.RpcError) as e:
        fn(req, metadata=md, timeout=30)
    return e.value.code(), e.value.details()


def create(**kw):
    base = dict(index="docs", dataset_uri="s3://rise/tenants/a/d.jsonl", pool="cpu")
    base.update(kw)
    return rise_pb2.CreateIndexRequest(**base)


def test_missing_and_wrong_tokens_are_unauthenticated(gateway):
    idx, _ = gateway
    assert call(idx.CreateIndex, create(), token=None)[0] == grpc.StatusCode.UNAUTHENTICATED
    code, msg = call(idx.CreateIndex, create(), token="nope")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid bearer token" in msg


@pytest.mark.parametrize("kw,code,words", [
    ({"index": "Bad Name"}, "INVALID_ARGUMENT", "index name"),
    ({"pool": "nope"}, "INVALID_ARGUMENT", "unknown pool"),
    ({"pool": ""}, "INVALID_ARGUMENT", "pool is required"),
    ({"dataset_uri": ""}, "INVALID_ARGUMENT", "dataset_uri is required"),
    ({"dataset_uri": "http://x/y.jsonl"}, "INVALID_ARGUMENT", "s3://"),
    ({"dataset_uri": "s3://rise/tenants/b/d.jsonl"}, "PERMISSION_DENIED", "outside this tenant"),
    ({"dataset_uri": "s3://other/d.jsonl"}, "PERMISSION_DENIED", "not allowed"),
    ({"dataset_uri": "/etc/passwd.jsonl"}, "PERMISSION_DENIED", "dataset roots"),
    ({"config": common_pb2.SketchConfig(mode="exact")}, "INVALID_ARGUMENT", "exact mode"),
    ({"config": common_pb2.SketchConfig(temperature=-1)}, "INVALID_ARGUMENT", "temperature"),
    # bad input refused at the door (docs/bad-input.md)
    ({"index": "docs\n"}, "INVALID_ARGUMENT", "index name"),
    ({"config": common_pb2.SketchConfig(temperature=1e-300)}, "INVALID_ARGUMENT",
     "temperature must be in [0.05, 100]"),
    ({"config": common_pb2.SketchConfig(temperature=1e6)}, "INVALID_ARGUMENT",
     "temperature must be in [0.05, 100]"),
    ({"config": common_pb2.SketchConfig(kr=2**32 - 1)}, "INVALID_ARGUMENT",
     "dims must be at most 65536"),
    ({"config": common_pb2.SketchConfig(kr=4096, kh=4096)}, "INVALID_ARGUMENT",
     "values per example"),
    ({"pool": "h200-64", "config": common_pb2.SketchConfig(kr=960, kh=1024, kg=64)},
     "FAILED_PRECONDITION", "does not fit the pool's 1 x 64GiB GPUs"),
    ({"pool": "h200", "config": common_pb2.SketchConfig(topk=50_000)}, "FAILED_PRECONDITION",
     "does not fit"),
    ({"pool": "no-config"}, "FAILED_PRECONDITION", "model of pool 'no-config' cannot be "
     "planned"),
])
def test_create_index_validation(gateway, kw, code, words):
    idx, _ = gateway
    got, msg = call(idx.CreateIndex, create(**kw))
    assert got.name == code and words in msg, (got, msg)
    assert str(CONFIGS) not in msg and "missing-model" not in msg  # no path of the host


def test_a_model_too_large_for_its_pool_is_refused_at_submit_time(gateway):
    idx, _ = gateway
    code, msg = call(idx.CreateIndex, create(pool="small-gpus"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not fit" in msg and "2 x 24GiB" in msg and "32,234,279,936" in msg


def test_a_model_that_fits_passes_the_planner(gateway):
    idx, _ = gateway
    # Past the planner the gateway claims the name, which the fake store says is taken:
    # ALREADY_EXISTS proves the 1 x 141 GiB pool was accepted.
    code, msg = call(idx.CreateIndex, create(pool="h200"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "already exists" in msg
    # The 64 GiB pool holds the default sketch (its wide dims are refused above) ...
    code, _ = call(idx.CreateIndex, create(pool="h200-64"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    # ... and every top-K when the residual is read out dense (K = all).
    code, _ = call(idx.CreateIndex, create(pool="h200", config=common_pb2.SketchConfig(
        topk_all=True)))
    assert code == grpc.StatusCode.ALREADY_EXISTS


def test_queries_per_call_are_limited(gateway):
    _, scoring = gateway
    req = rise_pb2.AttributeRequest(index="docs", queries=[
        common_pb2.Record(text=t) for t in ("a", "b", "c")])
    code, msg = call(scoring.Attribute, req)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 2" in msg


def test_another_tenants_index_is_not_found(gateway):
    _, scoring = gateway
    req = rise_pb2.AttributeRequest(index="docs", queries=[common_pb2.Record(text="x")])
    code, _ = call(scoring.Attribute, req, token="tok-b")
    assert code == grpc.StatusCode.NOT_FOUND


def test_raw_scores_of_both_channels_are_refused(gateway):
    _, scoring = gateway
    req = rise_pb2.AttributeRequest(index="docs", queries=[common_pb2.Record(text="x")],
                                    scoring=common_pb2.Scoring(score="raw", channel="both"))
    code, msg = call(scoring.Attribute, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "different units" in msg


def test_unset_centering_reaches_the_scorer_as_the_default():
    """`optional bool center`: unset = the library default (None), set = forced on or off,
    by the one decoder of Scoring messages, which the gateway and the scorer both use."""
    assert scorer.server.spec_from is spec_from
    assert spec_from(common_pb2.Scoring()).center is None
    assert spec_from(common_pb2.Scoring(center=False)).center is False
    assert spec_from(common_pb2.Scoring(center=True)).center is True
    assert spec_from(None).center is None
    wire = common_pb2.Scoring.FromString(common_pb2.Scoring(center=False).SerializeToString())
    assert wire.HasField("center") and wire.center is False


def test_unset_sketch_settings_take_the_product_defaults():
    cfg = config_from(common_pb2.SketchConfig())
    assert cfg.temperature == constants.DEFAULT_TEMPERATURE
    assert cfg.topk == constants.DEFAULT_TOPK and cfg.dims == constants.DEFAULT_DIMS
    assert config_from(common_pb2.SketchConfig(temperature=1.0)).temperature == 1.0


def test_values_that_cannot_fit_one_response_are_refused_with_advice():
    values = [(f"example-{i:07d}", 0.5 - i * 1e-6) for i in range(40_000)]
    wire = rise_pb2.ValueResponse(values=[rise_pb2.Hit(id=i, score=s) for i, s in values])
    size = wire.ByteSize()
    # the estimate is an upper bound (never lets a too-large response through) ...
    with pytest.raises(BudgetExceeded, match="set top"):
        check_values_fit(values, size + 1024**2 - 1)
    # ... and not a loose one
    check_values_fit(values, size + 1024**2 + size // 4)


# --- bad input refused at the door, before any work (docs/bad-input.md) ------------------


@pytest.mark.parametrize("record,words", [
    (common_pb2.Record(text="x" * (2**20 + 1)), "over the limit of 1,048,576 bytes"),
    (common_pb2.Record(id="7" * 5000, text="x"), "5000 UTF-8 bytes"),
    (common_pb2.Record(text="   "), "empty or whitespace-only"),
])
def test_bad_queries_are_refused_before_any_work(gateway, record, words):
    _, scoring = gateway  # its store and queues fail the test if reached
    code, msg = call(scoring.Attribute, rise_pb2.AttributeRequest(index="docs",
                                                                  queries=[record]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in msg, msg
    code, msg = call(scoring.Value, rise_pb2.ValueRequest(index="docs", targets=[record]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in msg, msg


GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "golden" / "sketch"


class Result:
    def __init__(self, out):
        self.out = out

    def get(self, timeout, propagate):
        assert propagate is False
        return self.out


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    """A ScoringService over the golden index, its query pool and scorer faked: what comes
    back from them must reach the caller with the right code and no host in it."""
    from rise.store import LocalStore
    from rise.v1 import scorer_pb2_grpc

    tmp = tmp_path_factory.mktemp("gw-scoring")
    tokens = tmp / "tokens.json"
    tokens.write_text(json.dumps({"tok-a": "a"}))
    settings = Settings(auth_tokens_file=str(tokens), pools={"cpu": Pool(model="unused")})
    sketch: dict = {}

    def send_task(name, *, args, queue):
        if "raise" in sketch:
            raise sketch["raise"]
        return Result(sketch["out"])

    port = closed_port()
    scorer = grpc.insecure_channel(f"127.0.0.1:{port}")
    deps = Deps(settings=settings, jobs=NoJobs(), send_task=send_task,
                store=lambda prefix: LocalStore(GOLDEN), materialize=lambda uri: uri,
                scorers=[scorer_pb2_grpc.ScorerServiceStub(scorer)])
    server = make_server(settings.max_message_bytes)
    rise_pb2_grpc.add_ScoringServiceServicer_to_server(ScoringService(deps, Auth(settings)),
                                                       server)
    server_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server_port}")
    yield rise_pb2_grpc.ScoringServiceStub(channel), sketch, port
    channel.close()
    scorer.close()
    server.stop(0)


def attribute(text="a"):
    return rise_pb2.AttributeRequest(index="docs", queries=[common_pb2.Record(text=text)])


def test_a_query_the_worker_refuses_is_invalid_argument_not_unavailable(scoring):
    """A one-token query has no supervised position: the worker's sketch task raises
    InvalidInput, which Celery hands back as that exception.  It was answered UNAVAILABLE,
    which clients retry five times for nothing."""
    from rise.errors import InvalidInput

    stub, sketch, _ = scoring
    sketch.clear()
    sketch["out"] = InvalidInput("record id '0': text has 1 token(s), so no position is "
                                 "supervised")
    code, msg = call(stub.Attribute, attribute())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no position is supervised" in msg


def test_a_lost_worker_or_an_unreachable_broker_is_unavailable_without_its_host(scoring):
    import redis
    from billiard.exceptions import WorkerLostError

    stub, sketch, _ = scoring
    sketch.clear()
    sketch["out"] = WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL).")
    code, msg = call(stub.Attribute, attribute("a fox"))
    assert code == grpc.StatusCode.UNAVAILABLE and "WorkerLostError" in msg
    sketch.clear()
    sketch["raise"] = redis.exceptions.ConnectionError(
        "Error 111 connecting to 10.9.8.7:6379. Connection refused.")
    code, msg = call(stub.Attribute, attribute("a fox"))
    assert code == grpc.StatusCode.UNAVAILABLE and "did not answer" in msg
    assert "10.9.8.7" not in msg and "6379" not in msg


def test_an_unreachable_scorer_is_unavailable_without_its_address(scoring):
    stub, sketch, port = scoring
    sketch.clear()
    sketch["out"] = ""  # empty query features: the scorer is never reached anyway
    code, msg = call(stub.Attribute, attribute("a fox"))
    assert code == grpc.StatusCode.UNAVAILABLE and "scorer unavailable" in msg
    assert str(port) not in msg and "127.0.0.1" not in msg


# --- tokens: revocable, hashed, a bad file neither fatal nor named ----------------------


@pytest.fixture
def auth_gateway(tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-a": "a", "tok-gone": "b"}))
    settings = Settings(auth_tokens_file=str(tokens), pools={"cpu": Pool(model="unused")})

    def no(*a, **k):
        raise AssertionError("not reached")

    deps = Deps(settings=settings, jobs=NoJobs(), send_task=no, store=no, scorers=[],
                materialize=no)
    server = make_server(settings.max_message_bytes)
    rise_pb2_grpc.add_IndexServiceServicer_to_server(IndexService(deps, Auth(settings)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield rise_pb2_grpc.IndexServiceStub(channel), tokens
    channel.close()
    server.stop(0)


def authenticated(idx, token) -> bool:
    """Past authentication: the bad name is refused after the token was accepted."""
    code, _ = call(idx.CreateIndex, create(index="Bad Name"), token=token)
    return code != grpc.StatusCode.UNAUTHENTICATED


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_removed_token_stops_working_within_5_seconds(auth_gateway):
    idx, tokens = auth_gateway
    assert authenticated(idx, "tok-gone")
    digest = "sha256:" + hashlib.sha256(b"tok-new").hexdigest()
    replace_file(tokens, json.dumps({"tok-a": "a", digest: "c"}))
    start = time.monotonic()
    while authenticated(idx, "tok-gone"):
        assert time.monotonic() - start < 5, "a removed token still works after 5 s"
        time.sleep(0.1)
    assert authenticated(idx, "tok-new")  # a hashed key works like a token
    assert not authenticated(idx, digest)  # and the hash itself is no token
    assert authenticated(idx, "tok-a")


def test_an_unreadable_token_file_keeps_the_last_good_map_and_is_never_named(auth_gateway):
    idx, tokens = auth_gateway
    assert authenticated(idx, "tok-a")
    replace_file(tokens, '{"tok-a": "a", "tok-gone"')  # a half-written edit
    time.sleep(1.2)
    assert authenticated(idx, "tok-a")
    code, msg = call(idx.CreateIndex, create(), token="nope")
    assert code == grpc.StatusCode.UNAUTHENTICATED and msg == "invalid bearer token"
    assert str(tokens.parent) not in msg
    tokens.unlink()
    time.sleep(1.2)
    assert authenticated(idx, "tok-a")
    code, msg = call(idx.CreateIndex, create(), token="nope")
    assert code == grpc.StatusCode.UNAUTHENTICATED and str(tokens.parent) not in msg


def test_an_unreadable_token_file_at_start_fails_the_start(tmp_path):
    from rise.errors import InvalidInput

    tokens = tmp_path / "tokens.json"
    tokens.write_text("{not json")
    with pytest.raises(InvalidInput, match="auth tokens file .*cannot be loaded"):
        Auth(Settings(auth_tokens_file=str(tokens)))


class _Context:
    def __init__(self, metadata):
        self._md = metadata

    def invocation_metadata(self):
        return self._md


def test_auth_off_maps_every_caller_to_the_default_tenant(tmp_path):
    """RISE_AUTH_MODE=off (the chart's auth.enabled: false): no tokens file needed, every
    caller, with or without a token, is the one documented default tenant."""
    auth = Auth(Settings(auth_mode="off", default_tenant="shared"))
    assert auth.tenant(_Context([])) == "shared"
    assert auth.tenant(_Context([("authorization", "Bearer anything")])) == "shared"
    # With tokens on, the same calls are refused.
    tokens = tmp_path / "t.json"
    tokens.write_text(json.dumps({"tok": "a"}))
    on = Auth(Settings(auth_tokens_file=str(tokens)))
    from rise.errors import Unauthenticated
    with pytest.raises(Unauthenticated):
        on.tenant(_Context([]))
    assert on.tenant(_Context([("authorization", "Bearer tok")])) == "a"


# A key S3 would refuse, or one that reads as a path out of the tenant's area, is the
# caller's error at the door: it once reached the worker (a job failing INTERNAL or never
# ending) or the selection's write after the scoring ran (UNAVAILABLE).
BAD_KEYS = ["tenants/a/../b/d.jsonl", "tenants/a/./d.jsonl", "tenants/a//d.jsonl",
            "tenants/a/d\x00.jsonl", "tenants/a/d\n.jsonl", "tenants/a/..\\b\\d.jsonl",
            "tenants/a/" + "k" * 1100 + ".jsonl"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=["dotdot", "dot", "empty", "nul", "newline",
                                               "backslash", "long"])
def test_a_dataset_or_selection_key_the_store_would_refuse_is_invalid_argument(gateway, key):
    idx, scoring = gateway
    code, msg = call(idx.CreateIndex, create(dataset_uri=f"s3://rise/{key}"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid object key" in msg, msg
    append = rise_pb2.AppendToIndexRequest(index="docs", dataset_uri=f"s3://rise/{key}")
    assert call(idx.AppendToIndex, append)[0] == grpc.StatusCode.INVALID_ARGUMENT
    value = rise_pb2.ValueRequest(index="docs", targets=[common_pb2.Record(text="a fox")],
                                  select_fraction=0.5, selection_uri=f"s3://rise/{key}")
    code, msg = call(scoring.Value, value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid object key" in msg, msg
    assert len(msg.encode()) <= 1024  # a long key is cut from the message


def test_the_planner_reads_an_s3_models_config_json_alone(tmp_path):
    """A pool whose model is an S3 prefix is planned from its config.json, fetched alone
    (checked against the model's manifest, cached), never from its weights."""
    from rise import modelsource

    bucket, cache = tmp_path / "bucket", tmp_path / "cache"
    folder = tmp_path / "olmo-2-32b"
    folder.mkdir()
    (folder / "config.json").write_bytes((CONFIGS / "olmo-2-32b.json").read_bytes())
    (folder / "model.safetensors").write_bytes(b"weights the gateway never fetches")
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-a": "a"}))
    uri = "s3://rise/models/olmo-2-32b/"
    settings = Settings(
        auth_tokens_file=str(tokens), s3_endpoint=f"file://{bucket}", s3_bucket="rise",
        cache_dir=str(cache),
        pools={"small-gpus": Pool(model=uri, gpus=2, gpu_memory="24GiB"),
               "h200": Pool(model=uri, gpus=1, gpu_memory="141GiB"),
               "unpushed": Pool(model="s3://rise/models/unpushed/", gpus=1)})
    modelsource.S3Models(settings).push(folder, modelsource.parse_source(uri))
    modelsource._configs.clear()

    def no(*a, **k):
        raise AssertionError("the gateway reached a queue or store")

    deps = Deps(settings=settings, jobs=NoJobs(), send_task=no, store=no, scorers=[],
                materialize=no)
    server = make_server(settings.max_message_bytes)
    rise_pb2_grpc.add_IndexServiceServicer_to_server(IndexService(deps, Auth(settings)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            idx = rise_pb2_grpc.IndexServiceStub(channel)
            code, msg = call(idx.CreateIndex, create(pool="small-gpus"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "does not fit" in msg and "32,234,279,936" in msg
            assert call(idx.CreateIndex, create(pool="h200"))[0] == grpc.StatusCode.ALREADY_EXISTS
            code, msg = call(idx.CreateIndex, create(pool="unpushed"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "model of pool 'unpushed' cannot be planned" in msg and "s3://" not in msg
    finally:
        server.stop(0)
    fetched = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    sha = hashlib.sha256((CONFIGS / "olmo-2-32b.json").read_bytes()).hexdigest()
    assert fetched == [f"models/configs/{sha}.json"]
