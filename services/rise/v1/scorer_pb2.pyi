from rise.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardSelector(_message.Message):
    __slots__ = ("prefix", "generation", "replica", "replicas")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    generation: int
    replica: int
    replicas: int
    def __init__(self, prefix: _Optional[str] = ..., generation: _Optional[int] = ..., replica: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class ScoreShardsRequest(_message.Message):
    __slots__ = ("shards", "queries", "scoring", "top")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    shards: ShardSelector
    queries: bytes
    scoring: _common_pb2.Scoring
    top: int
    def __init__(self, shards: _Optional[_Union[ShardSelector, _Mapping]] = ..., queries: _Optional[bytes] = ..., scoring: _Optional[_Union[_common_pb2.Scoring, _Mapping]] = ..., top: _Optional[int] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("id", "score", "shard", "row")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    shard: int
    row: int
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., shard: _Optional[int] = ..., row: _Optional[int] = ...) -> None: ...

class QueryCandidates(_message.Message):
    __slots__ = ("candidates",)
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class ScoreShardsResponse(_message.Message):
    __slots__ = ("queries", "shards_scored")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_SCORED_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[QueryCandidates]
    shards_scored: int
    def __init__(self, queries: _Optional[_Iterable[_Union[QueryCandidates, _Mapping]]] = ..., shards_scored: _Optional[int] = ...) -> None: ...

class ValueShardsRequest(_message.Message):
    __slots__ = ("shards", "targets", "scoring")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    shards: ShardSelector
    targets: bytes
    scoring: _common_pb2.Scoring
    def __init__(self, shards: _Optional[_Union[ShardSelector, _Mapping]] = ..., targets: _Optional[bytes] = ..., scoring: _Optional[_Union[_common_pb2.Scoring, _Mapping]] = ...) -> None: ...

class ValueShardsResponse(_message.Message):
    __slots__ = ("values", "shards_scored")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_SCORED_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Candidate]
    shards_scored: int
    def __init__(self, values: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., shards_scored: _Optional[int] = ...) -> None: ...

class GroupCandidatesRequest(_message.Message):
    __slots__ = ("shards", "scoring", "threshold", "top", "queries")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    shards: ShardSelector
    scoring: _common_pb2.Scoring
    threshold: float
    top: int
    queries: _containers.RepeatedCompositeFieldContainer[QueryCandidates]
    def __init__(self, shards: _Optional[_Union[ShardSelector, _Mapping]] = ..., scoring: _Optional[_Union[_common_pb2.Scoring, _Mapping]] = ..., threshold: _Optional[float] = ..., top: _Optional[int] = ..., queries: _Optional[_Iterable[_Union[QueryCandidates, _Mapping]]] = ...) -> None: ...

class CandidateGroup(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, members: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class QueryGroups(_message.Message):
    __slots__ = ("groups",)
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[CandidateGroup]
    def __init__(self, groups: _Optional[_Iterable[_Union[CandidateGroup, _Mapping]]] = ...) -> None: ...

class GroupCandidatesResponse(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[QueryGroups]
    def __init__(self, queries: _Optional[_Iterable[_Union[QueryGroups, _Mapping]]] = ...) -> None: ...
