"""Gateway validation over real gRPC, before any queue or store is touched: auth, names,
pools, dataset areas, limits, and the planner refusing a model its pool cannot hold."""

from __future__ import annotations

import json
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
                            gpu_memory="141GiB")})

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
])
def test_create_index_validation(gateway, kw, code, words):
    idx, _ = gateway
    got, msg = call(idx.CreateIndex, create(**kw))
    assert got.name == code and words in msg, (got, msg)


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
