"""Value at scale in the gateway (rise.gateway.service.ScoringService.Value): the replicas'
streams of values are merged page by page; with values_uri every value goes to a Parquet
file (id, value, rank) in the tenant's area, written a row group (one page) at a time, and
the answer holds its location, the summary and the best few."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import grpc
import pyarrow.parquet as pq
import pytest
from rise.errors import InvalidInput, PermissionDenied, RiseError
from rise.gateway import service as gs
from rise.score import rank_values
from rise.settings import Settings
from rise.store import LocalStore
from rise.v1 import common_pb2, rise_pb2, scorer_pb2

CHUNK = 300


class FakeScorer:
    """A replica's ValueShards: its values best first, CHUNK per message; counts messages
    read so far."""

    def __init__(self, values: list[tuple[str, float]], fail_after: int | None = None) -> None:
        self.values = rank_values(values)
        self.sent = 0
        self.fail_after = fail_after

    def ValueShards(self, request, timeout=None, metadata=None):
        def gen():
            for lo in range(0, max(len(self.values), 1), CHUNK):
                if self.fail_after is not None and self.sent >= self.fail_after:
                    raise Failed()
                self.sent += 1
                yield scorer_pb2.ValueShardsResponse(values=[
                    scorer_pb2.Candidate(id=i, score=v) for i, v in self.values[lo:lo + CHUNK]])
        return gen()


class Failed(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "scorer at 10.1.2.3:50052 went away"


def _service(tmp_path, scorers, live: int) -> gs.ScoringService:
    svc = object.__new__(gs.ScoringService)
    store = LocalStore(tmp_path / "bucket")
    svc.d = SimpleNamespace(settings=Settings(s3_bucket="rise"), scorers=scorers,  # type: ignore[assignment]
                            store=lambda prefix: store, materialize=lambda uri: uri)
    svc.auth = SimpleNamespace(tenant=lambda context: "a")  # type: ignore[assignment]
    index = SimpleNamespace(generation=3, live_count=live)
    svc._prepare = lambda *a: (index, "", "cpu")  # type: ignore[method-assign]
    svc._selector = lambda *a: scorer_pb2.ShardSelector()  # type: ignore[method-assign]
    svc._signed = lambda *a: ()  # type: ignore[method-assign]
    return svc


def _value(svc, **kw) -> rise_pb2.ValueResponse:
    req = rise_pb2.ValueRequest(index="docs", targets=[common_pb2.Record(text="a fox")], **kw)
    return gs.ScoringService.Value.__wrapped__(svc, req, None)  # type: ignore[attr-defined]


def _pool(n: int, replicas: int, seed: int = 0) -> list[list[tuple[str, float]]]:
    rng = random.Random(seed)
    parts: list[list[tuple[str, float]]] = [[] for _ in range(replicas)]
    for i in range(n):
        v = round(rng.uniform(-1, 1), 3)  # rounded: many ties, broken by id
        parts[i % replicas].append((f"ex-{i:06d}", v))
    return parts


def test_values_go_to_parquet_a_page_at_a_time_with_a_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "VALUES_PAGE", 1000)
    parts = _pool(7321, 3)
    scorers = [FakeScorer(p) for p in parts]
    svc = _service(tmp_path, scorers, live=7321)
    resp = _value(svc, values_uri="s3://rise/tenants/a/values/run-1.parquet")
    ranked = rank_values(v for p in parts for v in p)
    assert resp.values_uri == "s3://rise/tenants/a/values/run-1.parquet"
    assert resp.examples == 7321 and resp.generation == 3
    assert [(h.id, h.score) for h in resp.values] == ranked[:gs.INLINE_WITH_FILE]
    vals = [v for _, v in ranked]
    sm = resp.summary
    assert (sm.count, sm.min, sm.max) == (7321, min(vals), max(vals))
    assert sm.mean == pytest.approx(sum(vals) / len(vals), abs=1e-12)
    path = tmp_path / "bucket" / "tenants/a/values/run-1.parquet"
    f = pq.ParquetFile(path)
    assert f.metadata.num_row_groups == math.ceil(7321 / 1000)  # one page per row group
    table = f.read()
    assert table.column_names == ["id", "value", "rank"]
    assert list(zip(table["id"].to_pylist(), table["value"].to_pylist(), strict=True)) == ranked
    assert table["rank"].to_pylist() == list(range(1, 7322))
    # every replica's stream was read to its end, message by message
    assert [s.sent for s in scorers] == [math.ceil(len(p) / CHUNK) for p in parts]


def test_top_and_inline_answers_stay_as_they_were(tmp_path):
    parts = _pool(500, 2, seed=1)
    svc = _service(tmp_path, [FakeScorer(p) for p in parts], live=500)
    ranked = rank_values(v for p in parts for v in p)
    resp = _value(svc)  # a small pool: every value inline, no file
    assert [(h.id, h.score) for h in resp.values] == ranked and resp.values_uri == ""
    assert resp.summary.count == 500 == resp.examples
    svc = _service(tmp_path, [FakeScorer(p) for p in parts], live=500)
    resp = _value(svc, top=7, values_uri="s3://rise/tenants/a/v.parquet")
    assert [(h.id, h.score) for h in resp.values] == ranked[:7]
    assert pq.read_table(tmp_path / "bucket" / "tenants/a/v.parquet").num_rows == 500


@pytest.mark.parametrize("uri,err", [
    ("s3://rise/tenants/b/v.parquet", PermissionDenied),
    ("s3://other/tenants/a/v.parquet", PermissionDenied),
    ("s3://rise/tenants/a/v.jsonl", InvalidInput),
    ("/tmp/v.parquet", InvalidInput),
])
def test_values_uri_outside_the_tenant_or_not_parquet_is_refused(tmp_path, uri, err):
    svc = _service(tmp_path, [FakeScorer([("a", 1.0)])], live=1)

    def no_lookup(*a):
        raise AssertionError("refused only after the index lookup and the sketch")

    svc._prepare = no_lookup  # type: ignore[method-assign]
    with pytest.raises(err, match="values_uri"):
        _value(svc, values_uri=uri)


def test_a_scorer_lost_mid_stream_is_unavailable_and_writes_nothing(tmp_path):
    parts = _pool(2000, 2, seed=2)
    svc = _service(tmp_path, [FakeScorer(parts[0]), FakeScorer(parts[1], fail_after=2)],
                   live=2000)
    with pytest.raises(RiseError, match="scorer unavailable") as e:
        _value(svc, values_uri="s3://rise/tenants/a/v.parquet")
    assert "10.1.2.3" not in str(e.value)
    assert not (tmp_path / "bucket" / "tenants/a/v.parquet").exists()
