"""Where the services' bytes live: errors name what the caller named (a bucket, a key, a
dataset URI), never the endpoint's host:port nor a path of the machine."""

from __future__ import annotations

import socket

import pytest
from rise.datasets import materialize, open_store
from rise.errors import InvalidInput, NotFound, StorageError
from rise.index import open_index
from rise.s3store import S3Store
from rise.settings import Settings
from servers import s3_server  # noqa: F401


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_store_is_named_by_bucket_not_by_host(tmp_path):
    port = closed_port()
    # keys given: without them the store asks the credential providers first, and the
    # endpoint is never reached
    settings = Settings(s3_endpoint=f"127.0.0.1:{port}", s3_bucket="rise",
                        s3_access_key="key", s3_secret_key="secret",
                        cache_dir=str(tmp_path / "cache"))
    store = open_store(settings, "tenants/a/indexes/docs")
    with pytest.raises(StorageError) as e:
        store.get("manifest-00000001.json")
    msg = str(e.value)
    assert "s3://rise/tenants/a/indexes/docs/" in msg and "unreachable" in msg
    assert "127.0.0.1" not in msg and str(port) not in msg
    with pytest.raises(StorageError) as e:
        materialize("s3://rise/tenants/a/d.jsonl", settings)
    msg = str(e.value)
    assert "s3://rise/tenants/a/d.jsonl" in msg
    assert "127.0.0.1" not in msg and str(port) not in msg and str(tmp_path) not in msg


def test_a_file_endpoint_store_is_named_as_the_bucket_it_plays(tmp_path):
    settings = Settings(s3_endpoint=f"file://{tmp_path}", s3_bucket="rise")
    store = open_store(settings, "tenants/a/indexes/docs")
    assert store.describe() == "s3://rise/tenants/a/indexes/docs/"
    with pytest.raises(NotFound) as e:
        open_index(store)
    assert str(tmp_path) not in str(e.value)
    with pytest.raises(NotFound) as e:
        store.get("shards/x")
    assert str(tmp_path) not in str(e.value)
    assert open_store(settings, "").describe() == "s3://rise/"


# Findings of the fuzz run (tests/fuzz/, report tests/benchmarks/reports/fuzz.md).  The
# gateway refuses these keys now (gateway/test_service.py); the workers' materialize, which
# the CLI and jobs of older gateways reach too, refuses them on its own.


def test_a_dataset_key_with_dot_segments_is_invalid_input(tmp_path):
    """F2: a key with a '..' segment reached the S3 client, whose ValueError failed the job
    INTERNAL; it is the caller's error."""
    settings = Settings(s3_endpoint=f"127.0.0.1:{closed_port()}", s3_bucket="rise",
                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(InvalidInput):  # refused before any request: no store needed
        materialize("s3://rise/tenants/a/../b/data.jsonl", settings)


def test_a_dataset_key_cannot_leave_the_tenants_area_on_a_file_endpoint(tmp_path):
    """F2: on a file:// endpoint the key tenants/a/../b/data.jsonl was a path that resolved
    into tenant b's area."""
    for tenant in ("a", "b"):  # a's folder exists as soon as a has any data
        (tmp_path / "tenants" / tenant).mkdir(parents=True)
    (tmp_path / "tenants" / "b" / "data.jsonl").write_text('{"id": "1", "text": "secret"}\n')
    settings = Settings(s3_endpoint=f"file://{tmp_path}", s3_bucket="rise")
    with pytest.raises(InvalidInput):
        materialize("s3://rise/tenants/a/../b/data.jsonl", settings)


@pytest.mark.integration
@pytest.mark.parametrize("key", ["tenants/a/a\x00.jsonl", "tenants/a/..\\b\\data.jsonl",
                                 "tenants/a/" + "k" * 1100 + ".jsonl"],
                         ids=["nul", "backslash", "long"])
def test_a_dataset_key_the_store_refuses_is_the_callers_error(tmp_path, s3_server, key):
    """F3: the S3 server refused a key with a NUL character (or a backslashed '..') as a
    bad request, and the worker retried it as an outage: the job never ended."""
    settings = Settings(s3_endpoint=s3_server.endpoint, s3_access_key=s3_server.access_key,
                        s3_secret_key=s3_server.secret_key, s3_bucket="rise-test",
                        cache_dir=str(tmp_path / "cache"))
    S3Store.from_url(s3_server.endpoint, s3_server.access_key, s3_server.secret_key,
                     "rise-test").ensure_bucket()
    with pytest.raises(InvalidInput):  # not retryable: the key is the problem
        materialize(f"s3://rise-test/{key}", settings)
