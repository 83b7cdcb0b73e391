"""S3Store against a real S3 server (SeaweedFS ``weed mini``, started by the fixtures).

Round trip, multipart, create-only (conflict and a real two-thread race), sha256
verification, error translation (NotFound, StorageError when the server is gone), and the
index engine end to end on S3 -- byte-identical shards to a local build.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
import time
import uuid

import pytest
import urllib3
from conftest import TEXTS, write_jsonl
from minio import Minio
from minio.error import ServerError
from rise.errors import AlreadyExists, Corrupt, InvalidInput, NotFound, StorageError
from rise.s3store import PART_SIZE, S3Store
from rise.store import LocalStore, Store
from servers import redis_server, s3_server, start_s3  # noqa: F401

pytestmark = pytest.mark.integration

BUCKET = "rise-test"


def make_store(server, prefix: str | None = None, **kw) -> S3Store:
    prefix = prefix if prefix is not None else f"tenants/t1/indexes/{uuid.uuid4().hex[:12]}/"
    store = S3Store.from_url(server.endpoint, server.access_key, server.secret_key, BUCKET,
                             prefix)
    if kw:
        store = S3Store(store.client, BUCKET, store.prefix, **kw)
    store.ensure_bucket()
    return store


def raw_client(server) -> Minio:
    return Minio(server.endpoint, access_key=server.access_key,
                 secret_key=server.secret_key, secure=False)


@pytest.fixture
def store(s3_server) -> S3Store:
    return make_store(s3_server)


def test_protocol_round_trip(store: S3Store, s3_server):
    assert isinstance(store, Store)
    assert store.describe() == f"s3://{BUCKET}/{store.prefix}"
    assert store.list() == []
    store.put("shards/g1/b.bin", b"bee")
    store.put("shards/g1/a.bin", b"ay")
    store.put("manifest-00000001.json", b"{}")
    store.put("empty", b"")
    assert store.get("shards/g1/a.bin") == b"ay"
    assert store.get("empty") == b""
    assert store.exists("shards/g1/b.bin") and not store.exists("shards/g1/c.bin")
    assert store.list() == ["empty", "manifest-00000001.json", "shards/g1/a.bin",
                            "shards/g1/b.bin"]
    assert store.list("shards/") == ["shards/g1/a.bin", "shards/g1/b.bin"]
    assert store.list("manifest-") == ["manifest-00000001.json"]
    store.put("shards/g1/a.bin", b"overwritten")
    assert store.get("shards/g1/a.bin") == b"overwritten"
    # Another tenant's prefix in the same bucket is invisible.
    other = make_store(s3_server, prefix="tenants/t2/indexes/x")
    other.put("shards/g1/a.bin", b"theirs")
    assert store.get("shards/g1/a.bin") == b"overwritten"
    assert other.list() == ["shards/g1/a.bin"]
    store.delete("shards/g1/a.bin")
    store.delete("shards/g1/a.bin")  # idempotent
    assert store.list("shards/") == ["shards/g1/b.bin"]
    other.delete("shards/g1/a.bin")
    # The sha256 travels as user metadata.
    st = raw_client(s3_server).stat_object(BUCKET, store.prefix + "shards/g1/b.bin")
    assert st.metadata["x-amz-meta-sha256"] == hashlib.sha256(b"bee").hexdigest()


def test_missing_bucket_and_url_endpoint(s3_server):
    url = f"http://{s3_server.endpoint}/"
    nowhere = S3Store.from_url(url, s3_server.access_key, s3_server.secret_key,
                               "rise-no-such-bucket", "p")
    assert nowhere.describe() == "s3://rise-no-such-bucket/p/"
    assert nowhere.list() == []
    with pytest.raises(StorageError, match="NoSuchBucket"):
        nowhere.get("a")
    nowhere.ensure_bucket()
    nowhere.ensure_bucket()  # idempotent
    nowhere.put("a", b"1")
    assert nowhere.list() == ["a"]


def test_not_found_and_invalid_keys(store: S3Store):
    with pytest.raises(NotFound, match="nope"):
        store.get("nope")
    assert not store.exists("nope")
    store.delete("nope")
    for bad in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(InvalidInput):
            store.put(bad, b"x")


def test_multipart_round_trip(store: S3Store, s3_server):
    data = random.Random(7).randbytes(PART_SIZE + 1024 * 1024)  # 17 MiB: two parts
    store.put("big.bin", data)
    assert store.get("big.bin") == data
    etag = raw_client(s3_server).stat_object(BUCKET, store.prefix + "big.bin").etag
    assert etag.endswith("-2"), etag
    # create_only is one conditional PUT whatever the size (multipart completions race
    # on SeaweedFS), so no multipart suffix here.
    store.put("big-once.bin", data, create_only=True)
    assert "-" not in raw_client(s3_server).stat_object(
        BUCKET, store.prefix + "big-once.bin").etag
    with pytest.raises(AlreadyExists):
        store.put("big-once.bin", data[::-1], create_only=True)
    assert store.get("big-once.bin") == data


def test_create_only_conflict(store: S3Store):
    store.put("manifest-00000001.json", b"first", create_only=True)
    with pytest.raises(AlreadyExists, match="manifest-00000001.json"):
        store.put("manifest-00000001.json", b"second", create_only=True)
    assert store.get("manifest-00000001.json") == b"first"
    with pytest.raises(AlreadyExists):  # even with the same bytes: create means create
        store.put("manifest-00000001.json", b"first", create_only=True)


def payload(i: int, size: int) -> bytes:
    return (f"writer-{i}-".encode() * (size // 9 + 1))[:size]


def race(store: S3Store, key: str, n_threads: int = 2, size: int = 8000
         ) -> tuple[list[int], list[int]]:
    """All threads create_only ``key`` at once with their own bytes; winners, losers."""
    barrier = threading.Barrier(n_threads)
    won: list[int] = []
    lost: list[int] = []
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        data = payload(i, size)
        barrier.wait()
        try:
            store.put(key, data, create_only=True)
            won.append(i)
        except AlreadyExists:
            lost.append(i)
        except BaseException as e:  # surfaced below, not swallowed by the thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return won, lost


@pytest.mark.parametrize("conditional", [True, False], ids=["if-none-match", "lock"])
def test_create_only_race(s3_server, conditional):
    store = make_store(s3_server, conditional=conditional)
    # Mostly two writers; a few rounds of four (SeaweedFS makes losers of a crowded race
    # wait ~1 s on its object lock, so many crowded rounds would only cost time).
    for round_, n in enumerate([2] * 12 + [4] * 3):
        key = f"manifest-{round_:08d}.json"
        won, lost = race(store, key, n_threads=n)
        assert len(won) == 1, (round_, won, lost)
        assert sorted(won + lost) == list(range(n))
        assert store.get(key) == payload(won[0], 8000)


def test_create_only_race_large(store: S3Store):
    """Objects over the multipart threshold: still exactly one winner."""
    for round_ in range(3):
        key = f"big-{round_}"
        won, lost = race(store, key, n_threads=3, size=PART_SIZE + 4096)
        assert len(won) == 1 and len(lost) == 2, (round_, won, lost)
        assert store.get(key) == payload(won[0], PART_SIZE + 4096)


def test_sha256_mismatch_is_corrupt(store: S3Store, s3_server):
    client = raw_client(s3_server)
    client.put_object(BUCKET, store.prefix + "tampered", io.BytesIO(b"evil"), 4,
                      metadata={"sha256": "0" * 64})
    with pytest.raises(Corrupt, match="tampered.*sha256"):
        store.get("tampered")
    client.put_object(BUCKET, store.prefix + "foreign", io.BytesIO(b"x"), 1)
    with pytest.raises(Corrupt, match="no sha256"):
        store.get("foreign")


def test_transient_failures_are_retried(store: S3Store, monkeypatch):
    real_put = store.client._put_object
    calls = []

    def lost_answer(*args, **kwargs):
        calls.append(args[1])
        result = real_put(*args, **kwargs)
        if len(calls) == 1:  # the first create lands, but its answer never arrives
            raise urllib3.exceptions.ProtocolError("Connection reset by peer")
        return result

    monkeypatch.setattr(store.client, "_put_object", lost_answer)
    # The retry meets its own first attempt (412) and sees its own bytes: success.
    store.put("manifest-00000001.json", b"mine", create_only=True)
    assert len(calls) == 2 and store.get("manifest-00000001.json") == b"mine"
    with pytest.raises(AlreadyExists):  # a different writer still loses
        store.put("manifest-00000001.json", b"theirs", create_only=True)

    real_get = store.client.get_object
    failures = [ServerError("503 Service Unavailable", 503)]

    def flaky_get(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real_get(*args, **kwargs)

    monkeypatch.setattr(store.client, "get_object", flaky_get)
    assert store.get("manifest-00000001.json") == b"mine"
    assert not failures


def test_storage_error_when_server_is_gone(tmp_path):
    server = start_s3(tmp_path / "s3")
    try:
        store = make_store(server)
        store.put("a", b"1")
        assert store.get("a") == b"1"
    finally:
        server.stop()
    calls = [lambda: store.get("a"), lambda: store.put("b", b"2"),
             lambda: store.put("c", b"3", create_only=True), lambda: store.exists("a"),
             lambda: store.list(), lambda: store.delete("a"), store.ensure_bucket]
    for call in calls:
        t0 = time.monotonic()
        with pytest.raises(StorageError) as exc:
            call()
        assert time.monotonic() - t0 < 10  # 3 tries with backoff, not minutes
        msg = str(exc.value)
        assert "\n" not in msg and "after 3 tries" in msg, msg
        assert exc.value.grpc_code == "UNAVAILABLE"
        host, port = server.endpoint.rsplit(":", 1)  # logged, never in the error
        assert host not in msg and f":{port}" not in msg and "unreachable" in msg, msg


def test_index_engine_on_s3(store: S3Store, tiny_model, tmp_path):
    from rise import index, ingest
    from rise.config import make_config
    from rise.data import FieldMap
    from rise.model import load_model

    lm = load_model(tiny_model)
    path = write_jsonl(tmp_path / "corpus.jsonl",
                       [{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS)])
    config = make_config(dims=(16, 8, 8))
    ingest.create_index(store, lm, path, FieldMap(), config, shard_size=3)
    opened = index.open_index(store)
    assert opened.generation == 1 and opened.live_count == len(TEXTS)
    report = index.verify(store)
    assert report.ok and report.shards_checked == 3, report

    local = LocalStore(tmp_path / "local")
    ingest.create_index(local, lm, path, FieldMap(), config, shard_size=3)
    assert store.list() == local.list()
    shard_keys = store.list("shards/")
    assert len(shard_keys) == 3
    for key in shard_keys:
        assert store.get(key) == local.get(key), key
    # Two writers can never both commit generation 1.
    with pytest.raises(AlreadyExists):
        index.write_manifest(store, index.read_manifest(store, 1))


@pytest.mark.parametrize("key", ["sel/a\x00.jsonl", "k" * 1100 + ".jsonl", "sel\\a.jsonl"],
                         ids=["nul", "long", "backslash"])
def test_a_key_the_server_refuses_is_invalid_input(store: S3Store, key):
    """F4 (fuzz): a key the server refuses (a NUL character, over 1024 bytes) was a
    StorageError, so Value with such a selection_uri answered UNAVAILABLE, which clients
    retry, after the scoring ran.  Refused before any request now, by every store."""
    for op in (lambda: store.put(key, b"{}\n"), lambda: store.get(key),
               lambda: store.exists(key), lambda: store.delete(key)):
        with pytest.raises(InvalidInput):
            op()


def test_rise_copy_between_folders_and_s3_every_way(s3_server, tiny_model, tmp_path,
                                                    monkeypatch, capsys):
    """``rise copy``: folder -> S3 -> S3 -> folder, each copy verified (``rise verify`` of
    the last one, byte-identical objects); a copy onto an index is refused (exit 4) and a
    bucket the endpoint lacks is a storage error, never a half-visible index."""
    from rise import ingest
    from rise.cli import main
    from rise.config import make_config
    from rise.data import FieldMap
    from rise.model import load_model

    path = write_jsonl(tmp_path / "corpus.jsonl",
                       [{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS)])
    local = LocalStore(tmp_path / "built")
    ingest.create_index(local, load_model(tiny_model), path, FieldMap(),
                        make_config(dims=(16, 8, 8)), shard_size=3)
    make_store(s3_server, prefix="")  # the bucket
    for k, v in (("ENDPOINT", s3_server.endpoint), ("ACCESS_KEY", s3_server.access_key),
                 ("SECRET_KEY", s3_server.secret_key), ("S3_BUCKET", BUCKET)):
        monkeypatch.setenv(f"RISE_{k}" if k == "S3_BUCKET" else f"RISE_S3_{k}", v)
    run = uuid.uuid4().hex[:8]
    a, b = f"s3://{BUCKET}/{run}/a/", f"s3://{BUCKET}/{run}/b"
    back = tmp_path / "back"
    for src, dst in ((tmp_path / "built", a), (a, b), (b, back)):
        capsys.readouterr()
        code = main(["copy", str(src), str(dst), "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        summary = json.loads(out)
        assert summary["verified"] and (summary["shards"], summary["copied"]) == (3, 3)
    assert objects_of(LocalStore(back)) == objects_of(local)
    s3b = make_store(s3_server, prefix=f"{run}/b/")
    assert objects_of(s3b) == objects_of(local)
    assert main(["verify", str(back)]) == 0
    capsys.readouterr()
    assert main(["copy", str(tmp_path / "built"), a]) == 4
    assert "already holds an index" in capsys.readouterr().err
    assert main(["copy", str(tmp_path / "nowhere"), a]) == 3
    capsys.readouterr()


def objects_of(store) -> dict[str, bytes]:
    return {k: store.get(k) for k in store.list()}


def test_ranged_get(store: S3Store):
    """A ranged GET returns just those bytes (a dataset's range, checked by its caller)."""
    store.put("data/d.jsonl", b"0123456789")
    assert store.get_range("data/d.jsonl", 2, 3) == b"234"
    assert store.get_range("data/d.jsonl", 8, 10) == b"89"
    assert store.get_range("data/d.jsonl", 4, 0) == b""
    with pytest.raises(NotFound):
        store.get_range("data/none.jsonl", 0, 4)
