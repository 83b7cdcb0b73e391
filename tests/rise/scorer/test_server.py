"""The scorer service over real gRPC: ``python -m rise.scorer`` as a subprocess on a local
file store (``RISE_S3_ENDPOINT=file:///...``), against the embedded API as ground truth.

Merged answers of 1, 2 and 3 replicas must equal ``attribute_sketched`` /
``value_sketched`` exactly (ids and float scores), for every channel, raw and cosine,
with and without centering, with tombstones.  Bad requests map to their status codes
(never UNKNOWN or INTERNAL); health, reflection and /metrics are served; SIGTERM drains
and exits 0.  Only calls the gateway signed for the index they read are answered
(``rise.internalauth``): the test channel signs like the gateway, and unsigned, expired,
forged or foreign-prefix calls are refused; without a secret the scorer does not start.
The shard cache is also tested in-process (LRU by bytes, sha256 keys, verification, one
read per shard under concurrency).
"""

from __future__ import annotations

import collections
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from conftest import TEXTS, write_jsonl
from rise import api, ingest
from rise import index as I
from rise.config import make_config
from rise.data import FieldMap, read_records
from rise.datasets import open_store
from rise.errors import Corrupt
from rise.internalauth import SCORE_SHARDS, VALUE_SHARDS, Signer
from rise.metrics import names_for
from rise.model import load_model
from rise.score import QuerySet, ScoreSpec, merge_topk, queryset_to_bytes, rank_values
from rise.scorer.cache import ShardCache
from rise.settings import Settings
from rise.store import LocalStore
from rise.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc

pytestmark = pytest.mark.integration

PREFIX = "tenants/a/indexes/main/"
SECRET = "test-internal-secret-0123456789abcdef0123"
KEY = SECRET.encode()
DIMS = (16, 8, 8)
DELETED = ["doc-3", "dup-b"]
EXTRA = [
    "Gradients of the loss with respect to the logits are residuals.",
    "Replicas score disjoint shards; the gateway merges their candidates.",
    "A tombstone hides an example until compaction erases it.",
]
QUERIES = [
    "Which examples taught the model about foxes?",
    "How are shards merged by the gateway?",
    "Sketches and residuals of the head.",
]
SPECS = [
    ScoreSpec(channel="both", score="cosine"),
    ScoreSpec(channel="both", score="cosine", center=True),
    ScoreSpec(channel="both", score="cosine", center=False),
    ScoreSpec(channel="both", score="cosine", lam=0.3),
    ScoreSpec(channel="both", score="cosine", lam=0.8, center=True),
    ScoreSpec(channel="rh", score="cosine"),
    ScoreSpec(channel="rh", score="cosine", center=True),
    ScoreSpec(channel="rh", score="cosine", center=False),
    ScoreSpec(channel="gh", score="cosine"),
    ScoreSpec(channel="gh", score="cosine", center=True),
    ScoreSpec(channel="rh", score="raw"),
    ScoreSpec(channel="gh", score="raw"),
]


def spec_id(s: ScoreSpec) -> str:
    return f"{s.channel}-{s.score}-l{s.lam}" + {None: "", True: "-center", False: "-nocenter"}[s.center]


def scoring_of(s: ScoreSpec) -> common_pb2.Scoring:
    return common_pb2.Scoring(channel=s.channel, score=s.score, center=s.center,
                              **{"lambda": s.lam})


# ------------------------------------------------------------------------------ fixtures


@dataclass
class Corpus:
    root: Path  # the file endpoint's folder (the "bucket")
    settings: Settings
    index1: I.Index  # generation 1: everything live
    index2: I.Index  # generation 2: DELETED tombstoned
    queries: QuerySet
    qbytes: bytes


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, lm) -> Corpus:
    root = tmp_path_factory.mktemp("scorer-bucket")
    data_dir = tmp_path_factory.mktemp("scorer-data")
    rows = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS)]
    rows += [{"id": f"extra-{i}", "text": t} for i, t in enumerate(EXTRA)]
    # Identical texts give identical sketches: exact score ties, broken by id across
    # shards and replicas (shard size 2 puts the four copies in shards 0, 1, 2 and 6).
    rows.insert(2, {"id": "dup-b", "text": TEXTS[0]})
    rows.insert(5, {"id": "dup-c", "text": TEXTS[0]})
    rows.append({"id": "dup-a", "text": TEXTS[0]})
    data = write_jsonl(data_dir / "corpus.jsonl", rows)
    settings = Settings(s3_endpoint=f"file://{root}", internal_secret=SECRET)
    store = open_store(settings, PREFIX)
    ingest.create_index(store, lm, data, FieldMap(), make_config(dims=DIMS), shard_size=2)
    index1 = I.open_index(store)
    assert len(index1.manifest.shards) == 7
    assert I.delete(store, DELETED) == 2
    index2 = I.open_index(store)
    qfile = write_jsonl(data_dir / "queries.jsonl",
                        [{"id": f"q{i}", "text": t} for i, t in enumerate(QUERIES)])
    qs = api.sketch_queries(index2, lm, read_records(qfile, FieldMap()), FieldMap())
    return Corpus(root=root, settings=settings, index1=index1, index2=index2, queries=qs,
                  qbytes=queryset_to_bytes(qs))


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata",
                                                     "credentials", "wait_for_ready",
                                                     "compression")),
               grpc.ClientCallDetails):
    pass


class SigningInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Signs every scorer call the way the gateway does, for the prefix the request names
    and the tenant that prefix belongs to (``tenants/<tenant>/...``) unless ``tenant`` is
    given."""

    def __init__(self, signer: Signer, tenant: str | None = None) -> None:
        self.signer, self.tenant = signer, tenant

    def _signed(self, details, request):
        prefix = request.shards.prefix
        parts = prefix.split("/")
        tenant = self.tenant if self.tenant is not None else \
            (parts[1] if parts[0] == "tenants" and len(parts) > 1 else "")
        md = [*(details.metadata or ()), *self.signer.metadata(details.method, tenant, prefix)]
        return _Details(details.method, details.timeout, md, details.credentials,
                        details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._signed(details, request), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._signed(details, request), request)


def signed_stub(channel, signer: Signer | None = None, tenant: str | None = None):
    return scorer_pb2_grpc.ScorerServiceStub(grpc.intercept_channel(
        channel, SigningInterceptor(signer or Signer(KEY), tenant)))


class ScorerProcess:
    """``python -m rise.scorer`` with its stderr collected; ports parsed from its log.
    ``stub`` signs its calls like the gateway, ``unsigned`` does not."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "rise.scorer"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.address, self.metrics_port = self._wait_ready(timeout=120)
        self.channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = signed_stub(self.channel)
        self.unsigned = scorer_pb2_grpc.ScorerServiceStub(self.channel)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    def _wait_ready(self, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        pat = re.compile(r"on (\S+):(\d+), metrics on :(\d+)")
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            m = pat.search(line)
            if m and "scorer serving" in line:
                return f"127.0.0.1:{m.group(2)}", int(m.group(3))
        self.proc.kill()
        raise AssertionError("scorer did not start:\n" + "".join(self.lines))

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 30) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def scorer_env(root: Path, cache_bytes: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RISE_")}
    env.update(RISE_S3_ENDPOINT=f"file://{root}", RISE_SCORER_HOST="127.0.0.1",
               RISE_SCORER_PORT="0", RISE_METRICS_PORT="0", RISE_SCORER_THREADS="3",
               RISE_SCORER_CACHE_BYTES=str(cache_bytes), OMP_NUM_THREADS="1",
               RISE_INTERNAL_SECRET=SECRET)
    return env


@pytest.fixture(scope="module")
def scorer(corpus) -> Iterator[ScorerProcess]:
    # A cache of three shards out of seven: replicas and centering sweeps evict for real.
    biggest = max(s.bytes for s in corpus.index2.manifest.shards)
    proc = ScorerProcess(scorer_env(corpus.root, 3 * biggest))
    try:
        yield proc
    finally:
        proc.kill()


# -------------------------------------------------------------------------------- helpers


def selector(generation: int, replica: int = 0, replicas: int = 0,
             prefix: str = PREFIX) -> scorer_pb2.ShardSelector:
    return scorer_pb2.ShardSelector(prefix=prefix, generation=generation, replica=replica,
                                    replicas=replicas)


def score_replicas(stub, generation: int, qbytes: bytes, spec: ScoreSpec | None, top: int,
                   replicas: int, prefix: str = PREFIX
                   ) -> tuple[list[list[tuple[str, float]]], int]:
    """Each replica's ScoreShards call, merged like the gateway; and shards scored."""
    resps = []
    for r in range(max(1, replicas)):
        req = scorer_pb2.ScoreShardsRequest(shards=selector(generation, r, replicas, prefix),
                                            queries=qbytes, top=top)
        if spec is not None:
            req.scoring.CopyFrom(scoring_of(spec))
        resps.append(stub.ScoreShards(req, timeout=60))
    n_queries = len(resps[0].queries)
    assert all(len(r.queries) == n_queries for r in resps)
    k = top or 10
    merged = [merge_topk([[(c.score, c.id) for c in r.queries[q].candidates] for r in resps], k)
              for q in range(n_queries)]
    for r in resps:  # each replica's list is itself best first, ties by id, at most top
        for qc in r.queries:
            got = [(c.id, c.score) for c in qc.candidates]
            assert len(got) <= k
            assert got == sorted(got, key=lambda c: (-c[1], c[0]))
    return merged, sum(r.shards_scored for r in resps)


def value_replicas(stub, generation: int, tbytes: bytes, spec: ScoreSpec, replicas: int
                   ) -> tuple[list[tuple[str, float]], int]:
    resps = [list(stub.ValueShards(scorer_pb2.ValueShardsRequest(
        shards=selector(generation, r, replicas), targets=tbytes, scoring=scoring_of(spec)),
        timeout=60)) for r in range(max(1, replicas))]
    for chunks in resps:
        assert len({c.shards_scored for c in chunks}) == 1
    return (rank_values((v.id, v.score) for chunks in resps for r in chunks for v in r.values),
            sum(chunks[0].shards_scored for chunks in resps))


def expected(index: I.Index, qs: QuerySet, spec: ScoreSpec, top: int
             ) -> list[list[tuple[str, float]]]:
    hits = api.attribute_sketched(index, qs, spec, top)
    return [[(h.id, h.score) for h in per_query] for per_query in hits]


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


# ------------------------------------------------------------------- attribution, values


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_replicas_merge_to_the_embedded_answer(scorer, corpus, spec):
    n_shards = len(corpus.index2.manifest.shards)
    for top in (3, 100):
        want = expected(corpus.index2, corpus.queries, spec, top)
        assert all(len(w) == min(top, corpus.index2.live_count) for w in want)
        for replicas in (0, 1, 2, 3):
            got, scored = score_replicas(scorer.stub, 2, corpus.qbytes, spec, top, replicas)
            assert got == want, (top, replicas)
            assert scored == n_shards
            seen = {rid for q in got for rid, _ in q}
            assert not seen & set(DELETED)


def test_defaults_and_generations(scorer, corpus):
    # Unset scoring and top: both channels, cosine, lambda 0.5, no centering, top 10.
    got, _ = score_replicas(scorer.stub, 2, corpus.qbytes, None, 0, 2)
    assert got == expected(corpus.index2, corpus.queries, ScoreSpec(), 10)
    # Generation 1 still has the deleted examples; each call scores the generation it names.
    spec = ScoreSpec(center=True)
    got1, _ = score_replicas(scorer.stub, 1, corpus.qbytes, spec, 100, 3)
    assert got1 == expected(corpus.index1, corpus.queries, spec, 100)
    assert set(DELETED) <= {rid for q in got1 for rid, _ in q}
    # Ties: the three copies of TEXTS[0] score the same for every query, ranked by id.
    for q in got1:
        dups = [(rid, s) for rid, s in q if rid in ("doc-0", "dup-a", "dup-b", "dup-c")]
        assert len({s for _, s in dups}) == 1
        assert [rid for rid, _ in dups] == ["doc-0", "dup-a", "dup-b", "dup-c"]


def test_empty_replica_and_empty_queries(scorer, corpus):
    # More replicas than shards: the spare replicas score nothing and still answer.
    spec = ScoreSpec()
    got, scored = score_replicas(scorer.stub, 2, corpus.qbytes, spec, 5, 11)
    assert got == expected(corpus.index2, corpus.queries, spec, 5)
    assert scored == len(corpus.index2.manifest.shards)
    none = QuerySet(ids=[], norms=torch.zeros(0, 2, dtype=torch.float64),
                    rh=torch.zeros(0, DIMS[0] * DIMS[1], dtype=torch.float64),
                    gh=torch.zeros(0, DIMS[2] * DIMS[1], dtype=torch.float64))
    resp = scorer.stub.ScoreShards(scorer_pb2.ScoreShardsRequest(
        shards=selector(2), queries=queryset_to_bytes(none)), timeout=60)
    assert len(resp.queries) == 0
    assert resp.shards_scored == len(corpus.index2.manifest.shards)


@pytest.mark.parametrize("spec", [SPECS[i] for i in (0, 1, 4, 7, 8, 9)], ids=spec_id)
def test_value_replicas_equal_value_sketched(scorer, corpus, spec):
    targets = corpus.queries
    want = [(h.id, h.score) for h in api.value_sketched(corpus.index2, targets, spec)]
    assert len(want) == corpus.index2.live_count
    for replicas in (0, 1, 2, 3):
        got, scored = value_replicas(scorer.stub, 2, corpus.qbytes, spec, replicas)
        assert got == want, replicas
        assert scored == len(corpus.index2.manifest.shards)


@pytest.mark.parametrize("spec", [ScoreSpec(), ScoreSpec(channel="rh", center=False)],
                         ids=["default", "rh-plain"])
def test_collapse_across_replicas_equals_the_embedded_answer(scorer, corpus, spec):
    """The gateway's collapse: every replica over-fetches (ScoreShards with shard and row
    of each candidate), the merged candidates go to one replica's GroupCandidates, which
    reads their sketches from any shard: the groups equal ``attribute_sketched(...,
    collapse=)`` for 1, 2 and 3 replicas.  The corpus's byte-equal copies of one text
    (dup-a, dup-c and doc-0, dup-b being deleted: identical sketches) are one source."""
    index = corpus.index2
    top, threshold = 4, 0.9
    want = [[(h.id, h.score, [d.id for d in h.duplicates]) for h in hits]
            for hits in api.attribute_sketched(index, corpus.queries, spec, top,
                                               collapse=threshold)]
    fetch = api.overfetch(top, index.live_count)
    assert fetch >= index.live_count  # one round: the pool is small
    for replicas in (1, 2, 3):
        resps = [scorer.stub.ScoreShards(scorer_pb2.ScoreShardsRequest(
            shards=selector(2, r, replicas), queries=corpus.qbytes, top=fetch,
            scoring=scoring_of(spec)), timeout=60) for r in range(replicas)]
        merged = []
        for q in range(len(corpus.queries)):
            by_id = {c.id: c for r in resps for c in r.queries[q].candidates}
            best = merge_topk([[(c.score, c.id) for c in r.queries[q].candidates]
                               for r in resps], fetch)
            merged.append(scorer_pb2.QueryCandidates(candidates=[by_id[i] for i, _ in best]))
        reply = scorer.stub.GroupCandidates(scorer_pb2.GroupCandidatesRequest(
            shards=selector(2), scoring=scoring_of(spec), threshold=threshold, top=top,
            queries=merged), timeout=60)
        got = [[(g.members[0].id, g.members[0].score, [m.id for m in g.members[1:]])
                for g in qg.groups] for qg in reply.queries]
        assert got == want, replicas
    copies = {"doc-0", "dup-a", "dup-c"}
    for hits in want:
        assert len(hits) == top
        for rid, _, dups in hits:
            if rid in copies:
                assert copies <= {rid, *dups}
    # A candidate that is not where it says is refused, never grouped with a wrong sketch.
    bad = scorer_pb2.QueryCandidates(candidates=[scorer_pb2.Candidate(id="doc-0", score=1.0,
                                                                      shard=99, row=0)])
    assert code_of(lambda: scorer.stub.GroupCandidates(scorer_pb2.GroupCandidatesRequest(
        shards=selector(2), threshold=0.9, top=1, queries=[bad]), timeout=60)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    wrong_row = scorer_pb2.QueryCandidates(candidates=[scorer_pb2.Candidate(
        id="doc-0", score=1.0, shard=0, row=1)])
    assert code_of(lambda: scorer.stub.GroupCandidates(scorer_pb2.GroupCandidatesRequest(
        shards=selector(2), threshold=0.9, top=1, queries=[wrong_row]), timeout=60)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: scorer.unsigned.GroupCandidates(scorer_pb2.GroupCandidatesRequest(
        shards=selector(2), threshold=0.9, top=1, queries=merged), timeout=60)) \
        == grpc.StatusCode.UNAUTHENTICATED


def test_recreated_index_is_never_served_stale(scorer, corpus, lm, tmp_path):
    """An index deleted and created again reuses shard keys and generation numbers with
    other bytes: the scorer must score the new bytes (cache keyed by sha256)."""
    prefix = "tenants/b/indexes/again/"
    settings = corpus.settings
    spec = ScoreSpec(center=True)

    def build(texts: list[str]) -> I.Index:
        shutil.rmtree(corpus.root / prefix, ignore_errors=True)
        data = write_jsonl(tmp_path / "d.jsonl",
                           [{"id": f"r-{i}", "text": t} for i, t in enumerate(texts)])
        store = open_store(settings, prefix)
        ingest.create_index(store, lm, data, FieldMap(), make_config(dims=DIMS), shard_size=2)
        return I.open_index(store)

    first = build(TEXTS[:5])
    want_first = expected(first, corpus.queries, spec, 3)
    got, _ = score_replicas(scorer.stub, 1, corpus.qbytes, spec, 3, 2, prefix)
    assert got == want_first
    second = build(list(reversed(EXTRA + TEXTS[5:])))
    assert [s.key for s in second.manifest.shards] == \
        [s.key for s in first.manifest.shards]
    got, _ = score_replicas(scorer.stub, 1, corpus.qbytes, spec, 3, 2, prefix)
    assert got == expected(second, corpus.queries, spec, 3)
    assert got != want_first


# ------------------------------------------------------------------------------ errors


def test_bad_requests_map_to_status_codes(scorer, corpus):
    stub = scorer.stub
    q = corpus.qbytes

    def score(sel=None, queries=q, scoring=None, top=3):
        req = scorer_pb2.ScoreShardsRequest(shards=sel or selector(2), queries=queries, top=top)
        if scoring is not None:
            req.scoring.CopyFrom(scoring)
        return lambda: stub.ScoreShards(req, timeout=30)

    def value(sel=None, targets=q, scoring=None):
        req = scorer_pb2.ValueShardsRequest(shards=sel or selector(2), targets=targets)
        if scoring is not None:
            req.scoring.CopyFrom(scoring)
        return lambda: list(stub.ValueShards(req, timeout=30))

    # A valid safetensors payload without the gh sketches.
    from rise.shard import encode_ids
    from safetensors.torch import save

    ids, off = encode_ids(["x"])
    no_gh = save({"ids_utf8": ids, "ids_offsets": off,
                  "norms": torch.ones(1, 2, dtype=torch.float64),
                  "rh": torch.zeros(1, DIMS[0] * DIMS[1], dtype=torch.float16)})
    # Queries sketched with other widths.
    wide = QuerySet(ids=["x"], norms=torch.ones(1, 2, dtype=torch.float64),
                    rh=torch.ones(1, 64, dtype=torch.float64) / 8,
                    gh=torch.ones(1, 64, dtype=torch.float64) / 8)
    empty_targets = QuerySet(ids=[], norms=torch.zeros(0, 2, dtype=torch.float64),
                             rh=torch.zeros(0, 128, dtype=torch.float64),
                             gh=torch.zeros(0, 64, dtype=torch.float64))
    # A generation whose manifest records another sha256 for one shard.
    store = open_store(corpus.settings, PREFIX)
    m = I.read_manifest(store, 2)
    bad = list(m.shards)
    bad[5] = bad[5].model_copy(update={"sha256": "0" * 64})
    I.write_generation(store, 50, model=m.model, config=m.config, ingests=m.ingests,
                       parts=[I.write_part(store, 50, bad)], deletes=list(m.deletes))

    NF, IA, FP, DL = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                      grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS)
    cases = {
        "unknown generation": (score(selector(999)), NF),
        "unknown generation (values)": (value(selector(999)), NF),
        "unknown index": (score(selector(1, prefix="tenants/a/indexes/nope/")), NF),
        "generation 0": (score(selector(0)), IA),
        "prefix escapes": (score(selector(2, prefix="tenants/a/../../etc")), IA),
        "empty prefix": (score(selector(2, prefix="")), IA),
        "replica out of range": (score(selector(2, 3, 2)), IA),
        "replica without replicas": (score(selector(2, 1, 0)), IA),
        "malformed queries": (score(queries=b"not a safetensors payload"), IA),
        "empty queries bytes": (score(queries=b""), IA),
        "queries missing gh": (score(queries=no_gh), IA),
        "malformed targets": (value(targets=b"\x00" * 40), IA),
        "raw + both": (score(scoring=common_pb2.Scoring(channel="both", score="raw")), IA),
        "raw + both (values)": (value(scoring=common_pb2.Scoring(score="raw")), IA),
        "raw + center": (score(scoring=common_pb2.Scoring(channel="rh", score="raw",
                                                          center=True)), IA),
        "unknown channel": (score(scoring=common_pb2.Scoring(channel="xy")), IA),
        "unknown score": (score(scoring=common_pb2.Scoring(score="dot")), IA),
        "lambda out of range": (score(scoring=common_pb2.Scoring(**{"lambda": 1.5})), IA),
        "empty target set": (value(targets=queryset_to_bytes(empty_targets)), IA),
        "other sketch widths": (score(queries=queryset_to_bytes(wide)), FP),
        "shard fails sha256": (score(selector(50)), DL),
        "shard fails sha256 (centered)": (
            score(selector(50, 0, 2), scoring=common_pb2.Scoring(center=True)), DL),
    }
    got = {name: code_of(call) for name, (call, _) in cases.items()}
    assert got == {name: code for name, (_, code) in cases.items()}
    # The scorer still answers after every failure.
    ok, _ = score_replicas(stub, 2, q, ScoreSpec(), 3, 2)
    assert ok == expected(corpus.index2, corpus.queries, ScoreSpec(), 3)
    assert "Traceback" not in scorer.log()


# ------------------------------------------------------------------ signed calls only


def test_unsigned_expired_forged_and_foreign_calls_are_refused(scorer, corpus):
    """Only a call the gateway signed, unexpired, for the prefix it reads inside the signed
    tenant's area is answered: UNAUTHENTICATED without a valid signature, PERMISSION_DENIED
    for any other index (another tenant's included).  Refused calls read nothing."""
    UA, PD = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
    q = corpus.qbytes
    other = "tenants/b/indexes/main/"
    shutil.copytree(corpus.root / PREFIX, corpus.root / other, dirs_exist_ok=True)

    def score(stub, prefix=PREFIX, metadata=None):
        req = scorer_pb2.ScoreShardsRequest(shards=selector(2, prefix=prefix), queries=q, top=3)
        return lambda: stub.ScoreShards(req, timeout=30, metadata=metadata)

    def value(stub, prefix=PREFIX, metadata=None):
        req = scorer_pb2.ValueShardsRequest(shards=selector(2, prefix=prefix), targets=q)
        return lambda: list(stub.ValueShards(req, timeout=30, metadata=metadata))

    def sign(method=SCORE_SHARDS, tenant="a", prefix=PREFIX, key=KEY, clock=time.time):
        return Signer(key, clock=clock).metadata(method, tenant, prefix)

    def edit(md, **changes):
        return tuple((k, changes.get(k.removeprefix("x-rise-"), v)) for k, v in md)

    raw = scorer.unsigned
    good = sign()
    cases = {
        "no metadata": (score(raw), UA),
        "no metadata (values)": (value(raw), UA),
        "no metadata, another tenant": (score(raw, other), UA),
        "signature missing": (score(raw, metadata=good[:3]), UA),
        "another key": (score(raw, metadata=sign(key=b"k" * 40)), UA),
        "expired": (score(raw, metadata=sign(clock=lambda: time.time() - 3600)), UA),
        "far ahead": (score(raw, metadata=sign(clock=lambda: time.time() + 86400)), UA),
        "expiry moved": (score(raw, metadata=edit(good, expires=str(int(time.time()) + 500))),
                         UA),
        "tenant swapped": (score(raw, metadata=edit(good, tenant="b")), UA),
        "prefix swapped": (score(raw, other, metadata=edit(good, prefix=other)), UA),
        "signed for ScoreShards, used for ValueShards": (value(raw, metadata=good), UA),
        "bad expiry": (score(raw, metadata=edit(good, expires="soon")), UA),
        "signature repeated": (score(raw, metadata=(*good, good[-1])), UA),
        "another tenant's index": (score(raw, other, metadata=good), PD),
        "another tenant's index (values)": (value(raw, other, metadata=sign(VALUE_SHARDS)), PD),
        "signed by tenant a for b's prefix": (score(raw, other, metadata=sign(prefix=other)),
                                              PD),
        "a tenant's name as a prefix of another's": (
            score(raw, "tenants/ab/indexes/x/",
                  metadata=sign(prefix="tenants/ab/indexes/x/")), PD),
        "outside every tenant": (score(raw, "shared/main/",
                                       metadata=sign(prefix="shared/main/")), PD),
        "tenant signing the bucket root": (score(raw, "tenants/a/",
                                                 metadata=sign(tenant="", prefix="tenants/a/")),
                                           PD),
    }
    got = {name: code_of(call) for name, (call, _) in cases.items()}
    assert got == {name: code for name, (_, code) in cases.items()}
    with pytest.raises(grpc.RpcError) as info:
        score(raw)()
    assert "signed" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        score(raw, metadata=sign(clock=lambda: time.time() - 3600))()
    assert "expired" in info.value.details()
    # The same calls signed properly are answered, for either tenant's own index.
    assert len(score(raw, metadata=sign())().queries) == len(QUERIES)
    assert len(score(raw, other, metadata=sign(tenant="b", prefix=other))().queries) == \
        len(QUERIES)
    assert value(raw, metadata=sign(VALUE_SHARDS))()
    assert "Traceback" not in scorer.log()


def _start_failure(env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "rise.scorer"], env=env, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stderr


def test_scorer_refuses_to_start_without_a_secret(corpus, tmp_path):
    env = scorer_env(corpus.root, 1 << 20)
    del env["RISE_INTERNAL_SECRET"]
    code, err = _start_failure(env)
    assert code == 2 and "no internal secret" in err and "RISE_INTERNAL_AUTH=off" in err
    code, err = _start_failure({**env, "RISE_INTERNAL_SECRET": "short"})
    assert code == 2 and "at least 32" in err
    code, err = _start_failure({**env, "RISE_INTERNAL_SECRET_FILE": str(tmp_path / "none")})
    assert code == 2 and "cannot read the internal secret file" in err
    assert "Traceback" not in err


def test_secret_file_and_explicit_auth_off(corpus, tmp_path):
    """The secret may come from a file (a mounted Secret); RISE_INTERNAL_AUTH=off starts
    a scorer that answers unsigned calls, with a warning."""
    key_file = tmp_path / "internal.key"
    key_file.write_text(SECRET + "\n")
    env = scorer_env(corpus.root, 1 << 20)
    del env["RISE_INTERNAL_SECRET"]
    with_file = ScorerProcess({**env, "RISE_INTERNAL_SECRET_FILE": str(key_file)})
    try:
        req = scorer_pb2.ScoreShardsRequest(shards=selector(2), queries=corpus.qbytes, top=2)
        assert len(with_file.stub.ScoreShards(req, timeout=60).queries) == len(QUERIES)
        assert code_of(lambda: with_file.unsigned.ScoreShards(req, timeout=60)) == \
            grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert with_file.stop() == 0
    off = ScorerProcess({**env, "RISE_INTERNAL_AUTH": "off"})
    try:
        assert len(off.unsigned.ScoreShards(req, timeout=60).queries) == len(QUERIES)
        assert "RISE_INTERNAL_AUTH=off" in off.log() and "WARNING" in off.log()
        assert "internal auth OFF" in off.log()
    finally:
        assert off.stop() == 0


# ------------------------------------------------------------- health, reflection, metrics


def test_health_and_reflection(scorer):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(scorer.channel)
    for name in ("", "rise.v1.ScorerService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(scorer.channel)
    answers = list(refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"rise.v1.ScorerService", "grpc.health.v1.Health"} <= names
    # The descriptor of the service resolves too (what grpcurl needs).
    answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="rise.v1.ScorerService")]), timeout=10))
    assert answers[0].file_descriptor_response.file_descriptor_proto


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _value(text: str, sample: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(sample + " ") or line.startswith(sample + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_serve_every_scorer_name(scorer, corpus):
    # At least one success and one failure, so every series has samples.
    score_replicas(scorer.stub, 2, corpus.qbytes, ScoreSpec(), 3, 1)
    code_of(lambda: scorer.stub.ScoreShards(scorer_pb2.ScoreShardsRequest(
        shards=selector(999), queries=corpus.qbytes), timeout=10))
    text = _scrape(scorer.metrics_port)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name in names_for("scorer"):
        assert name in types, f"{name} missing from /metrics"
    assert types["rise_scorer_cache_bytes"] == "gauge"
    assert types["rise_grpc_requests_total"] == "counter"
    assert _value(text, "rise_scorer_shards_scanned_total") > 0
    assert _value(text, "rise_scorer_bytes_scanned_total") > 0
    assert _value(text, 'rise_storage_bytes_read_total{service="scorer"}') > 0
    biggest = max(s.bytes for s in corpus.index2.manifest.shards)
    assert 0 < _value(text, "rise_scorer_cache_bytes") <= 3 * biggest
    assert _value(text, 'rise_grpc_requests_total{code="OK",method="ScoreShards",'
                        'service="scorer"}') > 0
    assert _value(text, 'rise_grpc_requests_total{code="NOT_FOUND",method="ScoreShards",'
                        'service="scorer"}') > 0
    assert _value(text, 'rise_errors_total{code="NOT_FOUND",service="scorer"}') > 0
    assert _value(text, "rise_grpc_request_duration_seconds_count") > 0


def test_sigterm_drains_and_exits_zero(scorer):
    """Last test of the module: it stops the shared scorer."""
    assert scorer.proc.poll() is None
    assert scorer.stop(timeout=30) == 0
    assert "scorer stopped" in scorer.log()


# ----------------------------------------------------------------- the cache, in-process


class CountingStore:
    """A store that counts reads and can be slowed down."""

    def __init__(self, inner: LocalStore, delay: float = 0.0) -> None:
        self.inner, self.delay, self.gets = inner, delay, 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes:
        with self._lock:
            self.gets += 1
        time.sleep(self.delay)
        return self.inner.get(key)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_cache_lru_by_bytes_and_sha256_keys(corpus):
    from rise.metrics import for_service

    src = open_store(corpus.settings, PREFIX)
    store = CountingStore(src)
    entries = corpus.index2.manifest.shards

    def held(entry):  # bytes a cache holds for one shard (stored + derived row norms)
        one = ShardCache(lambda prefix: src, 1 << 40)
        one.load(PREFIX, entry)
        return one.nbytes

    size = max(held(e) for e in entries)
    assert size > max(e.bytes for e in entries)  # derived rows are counted
    metrics = for_service("scorer")
    cache = ShardCache(lambda prefix: store, 2 * size, metrics)
    a, b, c = entries[:3]
    sa = cache.load(PREFIX, a)
    assert cache.load(PREFIX, a) is sa and store.gets == 1
    cache.load(PREFIX, b)
    cache.load(PREFIX, a)  # a is now the most recent
    cache.load(PREFIX, c)  # evicts b
    assert (PREFIX, a.key, a.sha256) in cache
    assert (PREFIX, b.key, b.sha256) not in cache
    assert cache.nbytes <= 2 * size and store.gets == 3
    assert metrics.scorer_cache_bytes._value.get() == cache.nbytes
    read = metrics.storage_bytes_read_total.labels("scorer")._value.get()
    assert read == a.bytes + b.bytes + c.bytes
    # keep=False reads without caching; scan=True counts the scan.
    cache.load(PREFIX, b, keep=False, scan=True)
    assert (PREFIX, b.key, b.sha256) not in cache
    assert metrics.scorer_shards_scanned_total._value.get() == 1
    assert metrics.scorer_bytes_scanned_total._value.get() == 2 * (DIMS[0] + DIMS[2]) * \
        DIMS[1] * b.count
    # Same key, other sha256: never the cached bytes.  A mismatching sha256 is Corrupt.
    with pytest.raises(Corrupt):
        cache.load(PREFIX, a.model_copy(update={"sha256": "f" * 64}))
    # A shard bigger than the whole cache is served, not kept.
    tiny = ShardCache(lambda prefix: store, size // 2)
    assert len(tiny.load(PREFIX, a)) == a.count and len(tiny) == 0
    off = ShardCache(lambda prefix: store, 0)
    off.load(PREFIX, a)
    assert len(off) == 0 and off.nbytes == 0


def test_cache_reads_each_shard_once_under_concurrency(corpus):
    store = CountingStore(open_store(corpus.settings, PREFIX), delay=0.05)
    entries = corpus.index2.manifest.shards
    cache = ShardCache(lambda prefix: store, 1 << 30)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for e in entries[i % 3:] + entries[: i % 3]:
                sd = cache.load(PREFIX, e)
                assert len(sd) == e.count
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.gets == len(entries)
    # every shard counted once: stored bytes plus its float64 row norms (two channels of
    # 8 bytes per example)
    derived = sum(8 * 2 * e.count for e in entries)
    assert cache.nbytes == sum(e.bytes for e in entries) + derived


def test_in_process_scorer_with_store_factory(corpus):
    """The servicer with an injected store factory and one thread, on an in-process
    server: the same exact answers (what the gateway's tests can embed), also with a
    cache that holds float64 sketches."""
    from rise.grpcutil import make_server
    from rise.metrics import for_service
    from rise.scorer import Scorer, add_to_server

    opened: list[str] = []

    def factory(prefix: str) -> LocalStore:
        opened.append(prefix)
        return LocalStore(corpus.root / prefix)

    metrics = for_service("scorer")
    cache = ShardCache(factory, 1 << 30, metrics)
    scorer = Scorer(Settings(scorer_threads=1, internal_secret=SECRET), metrics,
                    store_factory=factory, cache=cache)
    server = make_server(16 * 1024**2, threads=4)
    add_to_server(scorer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = signed_stub(ch)
            for spec in (ScoreSpec(center=True), ScoreSpec(channel="gh", score="raw")):
                got, _ = score_replicas(stub, 2, corpus.qbytes, spec, 4, 2)
                assert got == expected(corpus.index2, corpus.queries, spec, 4)
                vals, _ = value_replicas(stub, 2, corpus.qbytes, spec, 3)
                assert vals == [(h.id, h.score) for h in
                                api.value_sketched(corpus.index2, corpus.queries, spec)]
            assert code_of(lambda: stub.ScoreShards(scorer_pb2.ScoreShardsRequest(
                shards=selector(7), queries=corpus.qbytes), timeout=10)) == \
                grpc.StatusCode.NOT_FOUND
        assert opened == [PREFIX]  # one store per prefix, reused
    finally:
        server.stop(None)
        scorer.close()


# ------------------------------------------------------------------------- cancellation


class _Context:
    """A servicer context that goes inactive (client gone) after ``active`` checks; its
    metadata signs ``method`` on PREFIX like the gateway."""

    def __init__(self, active: int, method: str = SCORE_SHARDS) -> None:
        self.active = active
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.metadata = Signer(KEY).metadata(method, "a", PREFIX)

    def invocation_metadata(self):
        return self.metadata

    def is_active(self) -> bool:
        self.active -= 1
        return self.active >= 0

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.aborted = (code, message)
        raise RuntimeError("aborted")


@pytest.mark.parametrize("method", ["ScoreShards", "ValueShards"])
def test_a_cancelled_call_stops_scanning(corpus, method):
    """Once the call is no longer active the scan stops at the next shard: CANCELLED, and
    the shards after it are never read."""
    from rise.scorer.server import Scorer

    scorer = Scorer(corpus.settings, threads=1, metrics=None)
    loads: list[str] = []
    real = scorer.cache.load
    scorer.cache.load = lambda prefix, entry, **kw: (loads.append(entry.key),
                                                     real(prefix, entry, **kw))[1]
    spec = common_pb2.Scoring(center=False)
    req = (scorer_pb2.ScoreShardsRequest(shards=selector(2), queries=corpus.qbytes, top=3,
                                         scoring=spec) if method == "ScoreShards" else
           scorer_pb2.ValueShardsRequest(shards=selector(2), targets=corpus.qbytes,
                                         scoring=spec))
    try:
        def call(ctx):
            out = getattr(scorer, method)(req, ctx)
            return out if method == "ScoreShards" else list(out)[-1]

        signed = SCORE_SHARDS if method == "ScoreShards" else VALUE_SHARDS
        full = call(_Context(active=100, method=signed))
        assert full.shards_scored == 7 and len(loads) == 7
        loads.clear()
        ctx = _Context(active=2, method=signed)
        with pytest.raises(RuntimeError, match="aborted"):
            call(ctx)
        assert ctx.aborted is not None and ctx.aborted[0] == grpc.StatusCode.CANCELLED
        assert "cancelled" in ctx.aborted[1]
        assert len(loads) == 2  # two shards scanned, then the check stopped it
    finally:
        scorer.close()


def test_values_stream_in_bounded_messages(corpus):
    """ValueShards sends at most value_chunk values per message; the messages together are
    the single-process valuation, best first (an index of any size fits the stream)."""
    from rise.scorer.server import Scorer

    spec = ScoreSpec(channel="both", score="cosine")
    want = [(h.id, h.score) for h in api.value_sketched(corpus.index2, corpus.queries, spec)]
    req = scorer_pb2.ValueShardsRequest(shards=selector(2), targets=corpus.qbytes,
                                        scoring=scoring_of(spec))
    for chunk in (3, 1000):
        scorer = Scorer(corpus.settings, threads=2, value_chunk=chunk)
        try:
            msgs = list(scorer.ValueShards(req, _Context(active=1000, method=VALUE_SHARDS)))
        finally:
            scorer.close()
        assert len(msgs) == -(-len(want) // chunk)
        assert all(len(m.values) <= chunk for m in msgs)
        assert all(m.shards_scored == 7 for m in msgs)
        got = [(c.id, c.score) for m in msgs for c in m.values]
        assert [i for i, _ in got] == [i for i, _ in want]
        assert max(abs(a[1] - b[1]) for a, b in zip(got, want, strict=True)) < 1e-6
