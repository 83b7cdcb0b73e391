"""The whole platform as deployed locally (rise.stack): real Redis, real S3
(SeaweedFS), the gateway, one Celery worker and the scorer as separate processes, driven
over real gRPC with rise.client and the ``rise remote`` CLI.

One stack per module (a tiny random Llama as the pool's model, two tenants); answers must
equal the embedded path (rise.index + rise.api on a LocalStore) on the same data and
configuration; tenants must not see each other; every service's /metrics serves its
catalogue; ``python -m rise.stack down`` leaves no process behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TEXTS, save_tiny_model, write_jsonl
from rise import errors
from rise.client import RiseClient, state_name
from rise.stack import Stack, minio_client, running

pytestmark = pytest.mark.integration

TOKENS = {"a": "tok-a-7f3c9e", "b": "tok-b-1d2e4a", "c": "tok-c-93b0f2"}
POOL = "tiny"
ROWS = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS + [
    "The dog sleeps while the fox runs.",
    "Influence functions approximate leave-one-out retraining.",
    "Object stores keep immutable blobs under keys.",
    "Celery workers take shard tasks from a queue.",
])]
QUERIES = [{"id": "q-fox", "text": "A fox jumped over a dog."},
           {"id": "q-shard", "text": "Shards and manifests are immutable."},
           {"text": "Workers read blobs from the store."}]  # no id: takes its position
SPECS = [dict(), dict(channel="rh", score="raw"), dict(lam=0.25, center=True), dict(center=False)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    model = save_tiny_model("llama", root / "tiny-llama")
    corpus = write_jsonl(root / "c.jsonl", ROWS)
    queries = write_jsonl(root / "q.jsonl", QUERIES)
    t0 = time.monotonic()
    stack = Stack.up(root / "stack", pools={POOL: str(model)}, tokens=TOKENS,
                     gateway_port="auto", scorer_port="auto", metrics_port="auto",
                     die_with_parent=True)
    up_s = time.monotonic() - t0
    try:
        s3 = minio_client(stack.s3["endpoint"], stack.s3["access_key"], stack.s3["secret_key"])
        data = corpus.read_bytes()
        for tenant in ("a", "b", "c"):
            s3.put_object("rise", f"tenants/{tenant}/data/c.jsonl", io.BytesIO(data), len(data))
        yield SimpleNamespace(stack=stack, root=root, model=model, corpus=corpus,
                              queries=queries, s3=s3, gateway=stack.endpoints["gateway"],
                              up_s=up_s)
    finally:
        stack.down()


@pytest.fixture(scope="module")
def a(env):
    with RiseClient(env.gateway, TOKENS["a"], timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def b(env):
    with RiseClient(env.gateway, TOKENS["b"], timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def built(env, a):
    """Tenant a's index "c" (shard size 4: 3 shards), watched to the end, while the pool's
    model is only in the stack's S3: its local folder is moved away meanwhile."""
    away = env.model.with_name("moved-away")
    env.model.rename(away)
    try:
        job = a.create_index("c", "s3://rise/tenants/a/data/c.jsonl", POOL, shard_size=4)
        assert state_name(job) == "QUEUED" and job.index == "c"
        updates = list(a.watch_job(job.id, interval=0.1))
    finally:
        away.rename(env.model)
    return SimpleNamespace(job=job, updates=updates)


@pytest.fixture(scope="module")
def embedded(env):
    """The same corpus and configuration through the embedded path."""
    from rise.config import make_config
    from rise.data import FieldMap
    from rise.index import open_index
    from rise.ingest import create_index
    from rise.model import load_model
    from rise.store import LocalStore

    lm = load_model(str(env.model), dtype="float32")
    folder = env.root / "local-index"
    create_index(LocalStore(folder), lm, env.corpus, FieldMap(), make_config(), shard_size=4)
    return SimpleNamespace(lm=lm, folder=folder, index=open_index(LocalStore(folder)))


def test_create_index_job_progress(built, a):
    done = [j.shards_done for j in built.updates]
    states = [state_name(j) for j in built.updates]
    assert states[-1] == "SUCCEEDED", built.updates[-1]
    assert all(s not in ("SUCCEEDED", "FAILED", "CANCELLED") for s in states[:-1])
    assert done == sorted(done) and done[-1] == built.updates[-1].shards_total == 3
    assert len(set(done)) >= 2  # progress seen before the end, not just the end
    last = built.updates[-1]
    assert (last.examples_done, last.examples_total, last.generation) == (12, 12, 1)
    assert a.wait(built.job.id, timeout=5).state == last.state
    idx = a.get_index("c")
    assert (idx.generation, idx.live_count, idx.shards, idx.tombstones) == (1, 12, 3, 0)
    assert [i.dataset_uri for i in idx.ingests] == ["s3://rise/tenants/a/data/c.jsonl"]
    assert [j.id for j in a.list_jobs(index="c")] == [built.job.id]


def test_the_pool_model_came_from_s3(built, env):
    """``Stack.up`` pushed the model folder into its S3 and the pool names the S3 prefix:
    the worker fetched it into its cache, verified against the manifest."""
    uri = "s3://rise/models/tiny-llama/"
    assert env.stack.pools == {POOL: uri}
    assert env.stack.models == {POOL: str(env.model.resolve())}
    manifest = json.loads(env.s3.get_object("rise", "models/tiny-llama/rise-model.json").read())
    files = sorted(p.name for p in env.model.iterdir())
    assert sorted(f["path"] for f in manifest["files"]) == files
    cached = list((Path(env.stack.dir) / "cache" / "models" / "s3").glob("*/*/tiny-llama"))
    assert len(cached) == 1
    for name in files:
        assert (cached[0] / name).read_bytes() == (env.model / name).read_bytes()


def test_index_matches_embedded(built, a, embedded):
    from rise.v1convert import config_to

    idx = a.get_index("c")
    m = embedded.index.manifest
    assert idx.config == config_to(m.config.to_dict())
    assert idx.model.head_sha256 == m.model.head_sha256
    assert idx.model.tokenizer_sha256 == m.model.tokenizer_sha256


@pytest.mark.parametrize("spec", SPECS, ids=["default", "rh-raw", "lam-center", "no-center"])
def test_attribute_and_value_equal_embedded(built, a, env, embedded, spec):
    from rise import api
    from rise.score import ScoreSpec

    local_spec = ScoreSpec(**spec)
    want = api.attribute(embedded.index, embedded.lm, env.queries, spec=local_spec, top=5)
    got = a.attribute("c", QUERIES, top=5, **spec)
    assert [q for q, _ in got] == [q for q, _ in want] == ["q-fox", "q-shard", "2"]
    for (_, hits), (_, local) in zip(got, want, strict=True):
        assert [h[0] for h in hits] == [h.id for h in local]
        assert [h[1] for h in hits] == pytest.approx([h.score for h in local], abs=1e-6)
        assert all(h[2] is None for h in hits)

    want_v = api.value(embedded.index, embedded.lm, env.queries, spec=local_spec)
    values, selected = a.value("c", QUERIES, **spec)
    assert selected == 0 and len(values) == 12
    assert [i for i, _ in values] == [h.id for h in want_v]
    assert [v for _, v in values] == pytest.approx([h.score for h in want_v], abs=1e-6)
    top3, _ = a.value("c", QUERIES, top=3, **spec)
    assert top3 == values[:3]


def test_return_texts_returns_the_records(built, a):
    by_id = {r["id"]: r for r in ROWS}
    for _, hits in a.attribute("c", QUERIES[:2], top=4, return_texts=True):
        assert [rec for _, _, rec in hits] == [by_id[i] for i, _, _ in hits]


def test_collapse_through_the_gateway_equals_embedded(built, a, env, embedded):
    """Attribute with collapse: over-fetched candidates, grouped by a scorer
    (GroupCandidates), equal the embedded collapse, duplicates included."""
    from rise import api, constants

    for threshold in (constants.DEFAULT_COLLAPSE, 0.3):
        want = api.attribute(embedded.index, embedded.lm, env.queries, top=5,
                             collapse=threshold)
        got = a.attribute_collapsed("c", QUERIES, top=5, threshold=threshold)
        assert [q for q, _ in got] == [q for q, _ in want]
        for (_, groups), (_, local) in zip(got, want, strict=True):
            assert [(h[0], [d[0] for d in dups]) for h, dups in groups] == \
                [(h.id, [d.id for d in h.duplicates]) for h in local]
            assert [h[1] for h, _ in groups] == pytest.approx([h.score for h in local],
                                                              abs=1e-6)
    with pytest.raises(errors.InvalidInput, match="collapse threshold"):
        a.attribute_collapsed("c", QUERIES, threshold=1.5)


def test_value_writes_the_selection(built, a, env):
    uri = "s3://rise/tenants/a/sel.jsonl"
    values, selected = a.value("c", QUERIES, select_fraction=0.25, selection_uri=uri)
    assert selected == math.ceil(0.25 * 12) == 3
    obj = env.s3.get_object("rise", "tenants/a/sel.jsonl")
    try:
        rows = [json.loads(line) for line in obj.data.decode().splitlines()]
    finally:
        obj.close()
        obj.release_conn()
    by_id = {r["id"]: r for r in ROWS}
    assert rows == [by_id[i] for i, _ in values[:3]]


def test_value_writes_every_value_to_parquet(built, a, env):
    """values_uri: every value in a Parquet file of the tenant's area, the answer its
    location, the summary and the best top; the same values as inline."""
    import io

    import pyarrow.parquet as pq

    inline, _ = a.value("c", QUERIES)
    resp = a.value_response("c", QUERIES, top=2, values_uri="s3://rise/tenants/a/v/all.parquet")
    assert resp.values_uri == "s3://rise/tenants/a/v/all.parquet" and resp.examples == 12
    assert [(h.id, h.score) for h in resp.values] == inline[:2]
    vals = [v for _, v in inline]
    assert (resp.summary.count, resp.summary.min, resp.summary.max) == (12, min(vals), max(vals))
    obj = env.s3.get_object("rise", "tenants/a/v/all.parquet")
    try:
        table = pq.read_table(io.BytesIO(obj.data))
    finally:
        obj.close()
        obj.release_conn()
    assert list(zip(table["id"].to_pylist(), table["value"].to_pylist(), strict=True)) == inline
    assert table["rank"].to_pylist() == list(range(1, 13))


# ------------------------------------------------------------------ explain, generations
# Before the tests that delete from, append to or copy index "c": they compare with the
# embedded index as built.


def test_explain_equals_embedded(built, a, b, embedded):
    """Explain runs on the pool's worker (it reads the hit back from the dataset in S3)
    and answers what the embedded rise.explain answers."""
    from rise import api
    from rise.client import explanation_dict
    from rise.data import Record

    resp = a.explain("c", QUERIES[:2], "doc-0", query_id="q-fox", top=4)
    got = explanation_dict(resp)
    q = Record(id="q-fox", number=0, text=QUERIES[0]["text"], prompt=None, response=None, raw={})
    want = api.explain(embedded.index, embedded.lm, q, "doc-0", top=4).to_dict()
    assert resp.generation == 1
    for key in ("score", "pair_total", "centering", "sketched_score"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert got["pair_rows"] == want["pair_rows"] and got["pair_cols"] == want["pair_cols"]
    assert [t["text"] for t in got["hit_tokens"]] == [t["text"] for t in want["hit_tokens"]]
    assert got["score"] == pytest.approx(got["pair_total"] + got["centering"], abs=1e-12)
    assert len(got["top_pairs"]) == 4
    # the sketched score is the one Attribute answers for that pair
    hits = dict((i, s) for i, s, _ in a.attribute("c", QUERIES[:1], top=12)[0][1])
    assert hits["doc-0"] == pytest.approx(got["sketched_score"], abs=1e-6)
    with pytest.raises(errors.NotFound, match="doc-404"):
        a.explain("c", QUERIES[:2], "doc-404", query_id="q-fox")
    with pytest.raises(errors.InvalidInput, match="not among the queries"):
        a.explain("c", QUERIES[:2], "doc-0", query_id="q-nope")
    with pytest.raises(errors.InvalidInput, match="name one"):
        a.explain("c", QUERIES[:2], "doc-0")
    with pytest.raises(errors.NotFound):
        b.explain("c", QUERIES[:1], "doc-0")


def test_attribute_generated_equals_embedded(built, a, embedded):
    from rise import api
    from rise.data import Record
    from rise.generate import GenerateSpec

    prompts = [{"id": "g1", "text": "The quick brown"}, {"id": "g2", "text": "Shards are"}]
    got = a.attribute_generated("c", prompts, max_new_tokens=6, top=3)
    recs = [Record(id=p["id"], number=i, text=p["text"], prompt=None, response=None, raw={})
            for i, p in enumerate(prompts)]
    want = api.attribute_generated(embedded.index, embedded.lm, recs,
                                   GenerateSpec(max_new_tokens=6), top=3)
    assert [(q, p, g) for q, p, g, _ in got] == [(r.id, r.prompt, r.response) for r, _ in want]
    for (_, _, _, hits), (_, local) in zip(got, want, strict=True):
        assert [h[0] for h in hits] == [h.id for h in local]
        assert [h[1] for h in hits] == pytest.approx([h.score for h in local], abs=1e-6)
    sampled = a.attribute_generated("c", prompts, max_new_tokens=6, temperature=1.3, seed=4)
    assert sampled == a.attribute_generated("c", prompts, max_new_tokens=6, temperature=1.3,
                                            seed=4)
    with pytest.raises(errors.InvalidInput, match="max new tokens must be in"):
        a.attribute_generated("c", prompts, max_new_tokens=100_000)
    with pytest.raises(errors.InvalidInput, match="below the index's max_length"):
        a.attribute_generated("c", prompts, max_new_tokens=1000)


def test_remote_explain_and_generate(built, env, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RISE_GATEWAY", env.gateway)
    monkeypatch.setenv("RISE_TOKEN", TOKENS["a"])
    html = tmp_path / "e.html"
    code, out, err = run_cli(capsys, "remote", "explain", "c", "--queries", env.queries,
                             "--query", "q-shard", "--hit", "doc-4", "--html", html, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert (d["query_id"], d["hit_id"]) == ("q-shard", "doc-4")
    assert html.read_text().startswith("<!DOCTYPE html>")
    code, _, err = run_cli(capsys, "remote", "explain", "c", "--queries", env.queries,
                           "--query", "q-shard", "--hit", "nope")
    assert code == 3 and "nope" in err
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "p1", "text": "A fox"}])
    out_file = tmp_path / "gen.jsonl"
    code, _, err = run_cli(capsys, "remote", "attribute", "c", "--generate", "--prompts",
                           prompts, "--max-new-tokens", "5", "--output", out_file)
    assert code == 0, err
    row = json.loads(out_file.read_text())
    assert row["query_id"] == "p1" and row["prompt"] == "A fox" and row["generated"]
    assert len(row["results"]) == 10


def test_bearer_token_is_required(env):
    for token in ("", "not-a-token"):
        with RiseClient(env.gateway, token, timeout=30) as c:
            with pytest.raises(errors.Unauthenticated):
                c.list_indexes()
            with pytest.raises(errors.Unauthenticated):
                c.get_index("c")


def test_tenants_are_isolated(built, a, b):
    assert [i.name for i in a.list_indexes()] == ["c"]
    assert b.list_indexes() == []
    assert b.list_jobs() == []
    not_found = [
        lambda: b.get_index("c"),
        lambda: b.attribute("c", ["a fox"]),
        lambda: b.value("c", ["a fox"]),
        lambda: b.append("c", "s3://rise/tenants/b/data/c.jsonl"),
        lambda: b.delete_examples("c", ["doc-1"]),
        lambda: b.compact("c"),
        lambda: b.delete_index("c"),
        lambda: b.get_job(built.job.id),
        lambda: b.cancel_job(built.job.id),
        lambda: list(b.watch_job(built.job.id)),
    ]
    for call in not_found:
        with pytest.raises(errors.NotFound):
            call()
    with pytest.raises(errors.PermissionDenied):
        b.create_index("stolen", "s3://rise/tenants/a/data/c.jsonl", POOL)
    with pytest.raises(errors.PermissionDenied):
        b.value("c", ["a fox"], select_fraction=0.5, selection_uri="s3://rise/tenants/a/x.jsonl")
    assert [i.name for i in a.list_indexes()] == ["c"]  # nothing of a's changed
    assert a.get_index("c").live_count == 12


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from rise.cli import main

    capsys.readouterr()
    try:
        code = main([str(x) for x in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_remote_cli(built, env, embedded, b, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RISE_GATEWAY", env.gateway)
    monkeypatch.setenv("RISE_TOKEN", TOKENS["a"])
    code, out, err = run_cli(capsys, "remote", "list", "--json")
    assert code == 0, err
    listed = json.loads(out)["indexes"]
    assert [(i["name"], i["live_count"], i["generation"]) for i in listed] == [("c", 12, 1)]

    remote_out, local_out = tmp_path / "remote.jsonl", tmp_path / "local.jsonl"
    code, _, err = run_cli(capsys, "remote", "attribute", "c", "--queries", env.queries,
                           "--output", remote_out, "--top", "4")
    assert code == 0, err
    code, _, err = run_cli(capsys, "attribute", "--index", embedded.folder, "--model",
                           env.model, "--queries", env.queries, "--output", local_out,
                           "--top", "4")
    assert code == 0, err
    _same_jsonl(remote_out, local_out, "results")

    code, _, err = run_cli(capsys, "remote", "value", "--index", "c", "--target", env.queries,
                           "--output", remote_out)
    assert code == 0, err
    code, _, err = run_cli(capsys, "value", "--index", embedded.folder, "--model", env.model,
                           "--target", env.queries, "--output", local_out)
    assert code == 0, err
    _same_jsonl(remote_out, local_out, None)

    # Tenant b builds its own index from the CLI and follows the job to the end.
    code, out, err = run_cli(capsys, "remote", "--token", TOKENS["b"], "index", "mine",
                             "--data", "s3://rise/tenants/b/data/c.jsonl", "--pool", POOL,
                             "--shard-size", "6", "--wait", "--json")
    assert code == 0, err
    job = json.loads(out)
    assert (job["state"], job["shards_done"], job["shards_total"]) == ("SUCCEEDED", 2, 2)
    code, out, _ = run_cli(capsys, "remote", "--token", TOKENS["b"], "jobs", "--json")
    assert [j["id"] for j in json.loads(out)["jobs"]] == [job["id"]]
    code, out, err = run_cli(capsys, "remote", "--token", TOKENS["b"], "drop", "mine", "--json")
    assert code == 0 and json.loads(out)["objects_deleted"] >= 3, err  # manifest + 2 shards
    assert b.list_indexes() == []
    assert not list(env.s3.list_objects("rise", prefix="tenants/b/indexes/", recursive=True))

    code, out, err = run_cli(capsys, "remote", "show", "c", "--token", TOKENS["b"])
    assert (code, out) == (3, "")
    assert err.strip() == "rise: error: index 'c' not found"
    code, _, err = run_cli(capsys, "remote", "show", "c", "--token", "wrong")
    assert code == 10 and err.startswith("rise: error: ") and len(err.splitlines()) == 1


def _same_jsonl(got: Path, want: Path, nested: str | None) -> None:
    """Same lines; scores equal to 1e-6 (byte-identical in practice)."""
    g = [json.loads(x) for x in got.read_text().splitlines()]
    w = [json.loads(x) for x in want.read_text().splitlines()]
    assert len(g) == len(w)
    for x, y in zip(g, w, strict=True):
        if nested:
            assert x["query_id"] == y["query_id"]
            x, y = x[nested], y[nested]
        else:
            x, y = [x], [y]
        assert [r["id"] for r in x] == [r["id"] for r in y]
        key = "score" if "score" in x[0] else "value"
        assert [r[key] for r in x] == pytest.approx([r[key] for r in y], abs=1e-6)


def test_deleted_examples_are_never_returned(built, a):
    values, _ = a.value("c", QUERIES)
    gone = [values[0][0], values[5][0]]
    idx = a.delete_examples("c", gone)
    assert (idx.live_count, idx.tombstones) == (10, 2)
    for _, hits in a.attribute("c", QUERIES, top=12):
        assert len(hits) == 10 and not set(gone) & {h[0] for h in hits}
    values, _ = a.value("c", QUERIES)
    assert len(values) == 10 and not set(gone) & {i for i, _ in values}
    with pytest.raises(errors.InvalidInput):
        a.delete_examples("c", [])


def test_the_scorer_answers_only_the_gateway(built, a, env):
    """The gateway's scorer calls are signed (Attribute works, tests above); a call
    straight to the scorer's port is refused, for the tenant's own index as for any other,
    and a signature for one tenant does not open another tenant's index."""
    import os
    import stat

    import grpc
    from rise.internalauth import SCORE_SHARDS, Signer
    from rise.v1 import scorer_pb2, scorer_pb2_grpc

    key_file = Path(env.stack.proc("scorer").env["RISE_INTERNAL_SECRET_FILE"])
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert a.attribute("c", ["A fox."], top=1)
    generation = a.get_index("c").generation
    a_prefix = "tenants/a/indexes/c/"

    def score(prefix: str, metadata=()):
        with grpc.insecure_channel(env.stack.endpoints["scorer"]) as ch:
            req = scorer_pb2.ScoreShardsRequest(shards=scorer_pb2.ShardSelector(
                prefix=prefix, generation=generation), queries=b"", top=1)
            try:
                scorer_pb2_grpc.ScorerServiceStub(ch).ScoreShards(req, timeout=30,
                                                                  metadata=metadata)
            except grpc.RpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    assert score(a_prefix) == grpc.StatusCode.UNAUTHENTICATED
    assert score("tenants/b/indexes/c/") == grpc.StatusCode.UNAUTHENTICATED
    signer = Signer(key_file.read_text().strip().encode())
    as_b = signer.metadata(SCORE_SHARDS, "b", "tenants/b/indexes/c/")
    assert score(a_prefix, as_b) == grpc.StatusCode.PERMISSION_DENIED  # signed for b's index
    foreign = signer.metadata(SCORE_SHARDS, "b", a_prefix)
    assert score(a_prefix, foreign) == grpc.StatusCode.PERMISSION_DENIED
    # signed for its own tenant and prefix, the call gets past the checks (to the payload)
    own = signer.metadata(SCORE_SHARDS, "a", a_prefix)
    assert score(a_prefix, own) == grpc.StatusCode.INVALID_ARGUMENT
    # every /metrics listens on loopback only (RISE_METRICS_HOST), never on every interface
    from urllib.parse import urlsplit

    for name, url in env.stack.endpoints["metrics"].items():
        assert listening_addresses(urlsplit(url).port) == {"0100007F"}, name


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) of the sockets listening on
    ``port``, IPv4 and IPv6."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                out.add(address)
    return out


def test_metrics_endpoints_serve_the_catalogue(built, env):
    from rise.metrics import CATALOGUE, names_for

    for name, url in env.stack.endpoints["metrics"].items():
        service = name.split("-")[0]  # worker-<pool> -> worker
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                    if line and not line.startswith("#")}
        missing = []
        for metric in names_for(service):
            kind = CATALOGUE[metric][0]
            want = metric + "_bucket" if kind == "histogram" else metric
            if want not in exported:
                missing.append(want)
        assert not missing, f"{name} ({url}) does not serve {missing}"


def test_job_metrics_follow_the_job_store(built, env, a, b):
    """rise_jobs{pool,state} (the gateway's, refreshed every 5 s from the active set) must
    show no job left once they all ended, and the controller's rise_job_duration_seconds
    must count each job that succeeded once (a's index, and b's from test_remote_cli when
    it ran)."""
    want = len([j for c in (a, b) for j in c.list_jobs() if state_name(j) == "SUCCEEDED"])
    urls = env.stack.endpoints["metrics"]
    seen = active = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with urllib.request.urlopen(urls["gateway"], timeout=10) as r:
            active = sum(float(line.split()[-1]) for line in r.read().decode().splitlines()
                         if line.startswith(f'rise_jobs{{pool="{POOL}",'))
        with urllib.request.urlopen(urls["controller"], timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("rise_job_duration_seconds_count{") and \
                        f'pool="{POOL}"' in line and 'state="SUCCEEDED"' in line and \
                        'kind="CREATE_INDEX"' in line:
                    seen = float(line.split()[-1])
        if seen == want and active == 0:
            break
        time.sleep(1)
    assert (seen, active) == (want, 0), \
        f"jobs ended per the controller {seen}, active per the gateway {active}; want {want}, 0"


def test_append_after_delete_is_refused_as_by_the_cli(env):
    """Through the gateway, an id deleted but not compacted is refused by the very check
    the CLI and the API run (the function rise.ingest.plan): the job ends FAILED, INVALID_ARGUMENT, with
    the message of tests/rise/test_cli.py, and the index keeps its generation."""
    again = b'{"id": "doc-1", "text": "a new text"}\n'
    env.s3.put_object("rise", "tenants/c/data/again.jsonl", io.BytesIO(again), len(again))
    with RiseClient(env.gateway, TOKENS["c"], timeout=120) as c:
        job = c.wait(c.create_index("ad", "s3://rise/tenants/c/data/c.jsonl", POOL,
                                    shard_size=4).id, timeout=120)
        assert state_name(job) == "SUCCEEDED", job
        assert c.delete_examples("ad", ["doc-1"]).live_count == len(ROWS) - 1
        job = c.wait(c.append("ad", "s3://rise/tenants/c/data/again.jsonl").id, timeout=120)
        assert state_name(job) == "FAILED", job
        assert job.error_code == "INVALID_ARGUMENT"
        assert job.error_message == ("id 'doc-1' of record 0 clashes with a deleted id not "
                                     "yet compacted (run rise compact first)")
        idx = c.get_index("ad")
        assert (idx.generation, idx.live_count, idx.tombstones) == (2, len(ROWS) - 1, 1)


def test_a_retried_append_makes_no_second_job(env):
    """A retry with the same request id (a lost answer) gets the first job back, even after
    it ended: no second job that would fail on the ids the first one added."""
    more = "".join(json.dumps({"id": f"more-{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS))
    env.s3.put_object("rise", "tenants/c/data/more.jsonl", io.BytesIO(more.encode()),
                      len(more.encode()))
    with RiseClient(env.gateway, TOKENS["c"]) as c:
        create = c.create_index("rid", "s3://rise/tenants/c/data/c.jsonl", POOL,
                                shard_size=4, request_id="stack-create")
        assert c.create_index("rid", "s3://rise/tenants/c/data/c.jsonl", POOL, shard_size=4,
                              request_id="stack-create").id == create.id
        assert state_name(c.wait(create.id, timeout=120)) == "SUCCEEDED"
        first = c.append("rid", "s3://rise/tenants/c/data/more.jsonl",
                         request_id="stack-append")
        assert c.append("rid", "s3://rise/tenants/c/data/more.jsonl",
                        request_id="stack-append").id == first.id
        assert state_name(c.wait(first.id, timeout=120)) == "SUCCEEDED"
        again = c.append("rid", "s3://rise/tenants/c/data/more.jsonl", request_id="stack-append")
        assert again.id == first.id and state_name(again) == "SUCCEEDED"
        assert sorted(j.id for j in c.list_jobs("rid")) == sorted([create.id, first.id])
        idx = c.get_index("rid")
        assert (idx.generation, idx.live_count) == (2, len(ROWS) + len(TEXTS))


def test_bad_input_is_refused_at_the_door_with_its_code(built, a):
    """docs/bad-input.md through the real stack: refused at submit or query time with
    INVALID_ARGUMENT, not accepted to fail later (INTERNAL) nor retried (UNAVAILABLE)."""
    src = "s3://rise/tenants/a/data/c.jsonl"
    for config, words in (({"temperature": 1e-300}, "temperature must be in"),
                          ({"kr": 2**32 - 1}, "dims must be at most")):
        with pytest.raises(errors.InvalidInput, match=words):
            a.create_index("never", src, POOL, config=config)
    with pytest.raises(errors.InvalidInput, match="index name"):
        a.create_index("never\n", src, POOL)
    # A one-token query has no supervised position: the worker refuses it, and the
    # gateway answers the worker's code (it was UNAVAILABLE, which clients retry).
    with pytest.raises(errors.InvalidInput, match="no position is supervised"):
        a.attribute("c", ["a"])
    with pytest.raises(errors.InvalidInput, match="over the limit of 1,048,576 bytes"):
        a.attribute("c", ["x" * (2**20 + 1)])
    assert [n for n in (i.name for i in a.list_indexes()) if n.startswith("never")] == []


BAD_DATASETS = {
    "deep": '{"id": "d", "text": "t", "a": ' + "[" * 200_000 + "]" * 200_000 + "}\n",
    "digits": '{"id": ' + "7" * 5000 + ', "text": "t"}\n',
    "huge": json.dumps({"id": "h", "text": "a" * (2 * 2**20)}) + "\n",
}


@pytest.mark.parametrize("kind,words", [("deep", "nested deeper than 64 levels"),
                                        ("digits", "a number of more than 4300 digits"),
                                        ("huge", "over the limit of 1,048,576 bytes")])
def test_bad_records_fail_their_job_as_invalid_argument_naming_the_uri(env, kind, words):
    """They were INTERNAL; and a job's message named the worker's cached copy."""
    data = BAD_DATASETS[kind].encode()
    key = f"tenants/c/data/bad-{kind}.jsonl"
    env.s3.put_object("rise", key, io.BytesIO(data), len(data))
    with RiseClient(env.gateway, TOKENS["c"], timeout=120) as c:
        job = c.wait(c.create_index(f"bad-{kind}", f"s3://rise/{key}", POOL).id, timeout=120)
    assert state_name(job) == "FAILED" and job.error_code == "INVALID_ARGUMENT", job
    assert job.error_message.startswith(f"s3://rise/{key} line 1 (record 0): ")
    assert words in job.error_message and str(env.root) not in job.error_message


def test_a_removed_token_stops_working_within_5_seconds(env):
    path = Path(env.stack.tokens_file)
    original = path.read_text()
    current = json.loads(original)

    def write(mapping):
        tmp = path.with_suffix(".new")
        tmp.write_text(json.dumps(mapping))
        os.replace(tmp, path)

    digest = "sha256:" + hashlib.sha256(b"tok-d-5e8a").hexdigest()
    try:
        write({**current, digest: "d"})  # a hashed key: the file need not hold the token
        deadline = time.monotonic() + 5
        with RiseClient(env.gateway, "tok-d-5e8a", timeout=30) as d:
            while True:
                try:
                    assert d.list_indexes() == []
                    break
                except errors.Unauthenticated:
                    assert time.monotonic() < deadline, "a new token not accepted in 5 s"
                    time.sleep(0.2)
            write(current)
            start = time.monotonic()
            with pytest.raises(errors.Unauthenticated):
                while True:
                    d.list_indexes()
                    assert time.monotonic() - start < 5, "a removed token works after 5 s"
                    time.sleep(0.2)
    finally:
        write(json.loads(original))


def test_an_index_copied_in_is_invisible_until_imported(env, embedded, capsys, monkeypatch,
                                                        tmp_path):
    """An index built locally, ``rise copy``-ed into tenant c's area, stays invisible until
    ImportIndex (client and ``rise remote import``) verifies it and checks the pool's model
    identity; then it answers as the embedded index.  An index of another model is refused
    FAILED_PRECONDITION and stays invisible."""
    from rise import api
    from rise.config import make_config
    from rise.data import FieldMap
    from rise.ingest import create_index
    from rise.model import load_model
    from rise.store import LocalStore

    for k in ("endpoint", "access_key", "secret_key"):
        monkeypatch.setenv(f"RISE_S3_{k.upper()}", env.stack.s3[k])
    monkeypatch.setenv("RISE_S3_BUCKET", env.stack.s3["bucket"])
    area = f"s3://{env.stack.s3['bucket']}/tenants/c/indexes"
    code, out, err = run_cli(capsys, "copy", embedded.folder, f"{area}/copied/", "--json")
    assert code == 0, err
    assert json.loads(out)["verified"] and json.loads(out)["shards"] == 3
    with RiseClient(env.gateway, TOKENS["c"], timeout=120) as c:
        with pytest.raises(errors.NotFound):
            c.get_index("copied")
        assert "copied" not in [i.name for i in c.list_indexes()]
        idx = c.import_index("copied", POOL)
        assert (idx.name, idx.pool, idx.generation, idx.live_count) == ("copied", POOL, 1, 12)
        assert "copied" in [i.name for i in c.list_indexes()]
        want = api.attribute(embedded.index, embedded.lm, env.queries, top=5)
        got = c.attribute("copied", QUERIES, top=5)
        for (_, hits), (_, local) in zip(got, want, strict=True):
            assert [h[0] for h in hits] == [h.id for h in local]
        with pytest.raises(errors.AlreadyExists):
            c.import_index("copied", POOL)
        with pytest.raises(errors.NotFound, match="copy one there first"):
            c.import_index("nothing-here", POOL)
        with pytest.raises(errors.InvalidInput, match="unknown pool"):
            c.import_index("copied", "no-such-pool")

        other_model = save_tiny_model("llama", tmp_path / "other-llama", seed=3)
        other = LocalStore(tmp_path / "other-index")
        create_index(other, load_model(other_model), env.corpus, FieldMap(), make_config(),
                     shard_size=6)
        code, _, err = run_cli(capsys, "copy", tmp_path / "other-index", f"{area}/other/")
        assert code == 0, err
        with pytest.raises(errors.Mismatch, match="model mismatch.*differs in"):
            c.import_index("other", POOL)
        with pytest.raises(errors.NotFound):
            c.get_index("other")

    # A shard damaged after the copy: DATA_LOSS, and the index stays invisible.
    code, _, err = run_cli(capsys, "copy", embedded.folder, f"{area}/damaged/")
    assert code == 0, err
    bucket = env.stack.s3["bucket"]
    key = next(o.object_name for o in env.s3.list_objects(
        bucket, prefix="tenants/c/indexes/damaged/shards/", recursive=True)
        if o.object_name.endswith(".safetensors"))
    env.s3.put_object(bucket, key, io.BytesIO(b"not a shard"), 11)
    with RiseClient(env.gateway, TOKENS["c"], timeout=120) as c:
        with pytest.raises(errors.Corrupt, match="does not verify"):
            c.import_index("damaged", POOL)
        with pytest.raises(errors.NotFound):
            c.get_index("damaged")

    # The CLI: copy and `rise remote import`.
    code, _, err = run_cli(capsys, "copy", embedded.folder, f"{area}/viacli/")
    assert code == 0, err
    code, out, err = run_cli(capsys, "remote", "--gateway", env.gateway, "--token",
                             TOKENS["c"], "import", "viacli", "--pool", POOL, "--json")
    assert code == 0, err
    assert json.loads(out)["live_count"] == 12


# Last: it stops the module's stack.
def test_stack_down_leaves_no_process(env):
    stack = env.stack
    pids = sorted({pid for p in stack.procs for pid in p.members()})
    assert len(pids) >= 6  # redis, weed, gateway, celery main + child, scorer
    status = subprocess.run([sys.executable, "-m", "rise.stack", "status",
                             "--dir", stack.dir, "--json"], capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0, status.stderr
    assert all(r["running"] for r in json.loads(status.stdout)["processes"].values())
    down = subprocess.run([sys.executable, "-m", "rise.stack", "down",
                           "--dir", stack.dir], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    for p in stack.procs:  # reap our children so that none lingers as a zombie
        if p.popen is not None:
            p.popen.wait(10)
    left = [pid for pid in pids if running(pid)]
    assert not left, f"still running after down: {left}"
    assert not Path(stack.dir, "stack.json").exists()
