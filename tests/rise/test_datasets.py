"""Where the services' bytes live: errors name what the caller named (a bucket, a key, a
dataset URI), never the endpoint's host:port nor a path of the machine."""

from __future__ import annotations

import socket

import pytest
from rise.datasets import materialize, open_store
from rise.errors import NotFound, StorageError
from rise.index import open_index
from rise.settings import Settings


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_store_is_named_by_bucket_not_by_host(tmp_path):
    port = closed_port()
    settings = Settings(s3_endpoint=f"127.0.0.1:{port}", s3_bucket="rise",
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
