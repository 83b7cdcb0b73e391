"""The scorer service: scores query sketches against an index's shards (``python -m
rise.scorer``).  ``Scorer`` is the gRPC servicer, ``ShardCache`` its shard cache."""

from rise.scorer.cache import ShardCache, StoreFactory
from rise.scorer.server import (
    DEFAULT_TOP,
    SERVICE_NAME,
    Scorer,
    add_to_server,
    decode_queries,
    default_store_factory,
)

__all__ = ["DEFAULT_TOP", "SERVICE_NAME", "Scorer", "ShardCache", "StoreFactory",
           "add_to_server", "decode_queries", "default_store_factory"]
