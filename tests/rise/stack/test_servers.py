"""The Redis fixture is a real server: PING, SET and GET through the redis client."""

from __future__ import annotations

import pytest
import redis
from servers import redis_server  # noqa: F401

pytestmark = pytest.mark.integration


def test_redis_answers(redis_server):
    assert redis_server.url.startswith("redis://127.0.0.1:")
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping() is True
        client.set("rise:test", b"value")
        assert client.get("rise:test") == b"value"
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        client.close()
