from rise.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_KIND_CREATE_INDEX: _ClassVar[JobKind]
    JOB_KIND_APPEND: _ClassVar[JobKind]
    JOB_KIND_COMPACT: _ClassVar[JobKind]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_KIND_UNSPECIFIED: JobKind
JOB_KIND_CREATE_INDEX: JobKind
JOB_KIND_APPEND: JobKind
JOB_KIND_COMPACT: JobKind
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class CreateIndexRequest(_message.Message):
    __slots__ = ("index", "dataset_uri", "pool", "fields", "config", "shard_size", "request_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATASET_URI_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    index: str
    dataset_uri: str
    pool: str
    fields: _common_pb2.FieldMap
    config: _common_pb2.SketchConfig
    shard_size: int
    request_id: str
    def __init__(self, index: _Optional[str] = ..., dataset_uri: _Optional[str] = ..., pool: _Optional[str] = ..., fields: _Optional[_Union[_common_pb2.FieldMap, _Mapping]] = ..., config: _Optional[_Union[_common_pb2.SketchConfig, _Mapping]] = ..., shard_size: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class AppendToIndexRequest(_message.Message):
    __slots__ = ("index", "dataset_uri", "fields", "request_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATASET_URI_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    index: str
    dataset_uri: str
    fields: _common_pb2.FieldMap
    request_id: str
    def __init__(self, index: _Optional[str] = ..., dataset_uri: _Optional[str] = ..., fields: _Optional[_Union[_common_pb2.FieldMap, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteExamplesRequest(_message.Message):
    __slots__ = ("index", "ids", "request_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    index: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, index: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CompactIndexRequest(_message.Message):
    __slots__ = ("index", "request_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    index: str
    request_id: str
    def __init__(self, index: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteIndexRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: str
    def __init__(self, index: _Optional[str] = ...) -> None: ...

class DeleteIndexResponse(_message.Message):
    __slots__ = ("objects_deleted",)
    OBJECTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    objects_deleted: int
    def __init__(self, objects_deleted: _Optional[int] = ...) -> None: ...

class ListIndexesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListIndexesResponse(_message.Message):
    __slots__ = ("indexes", "next_page_token")
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    indexes: _containers.RepeatedCompositeFieldContainer[Index]
    next_page_token: str
    def __init__(self, indexes: _Optional[_Iterable[_Union[Index, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetIndexRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: str
    def __init__(self, index: _Optional[str] = ...) -> None: ...

class ImportIndexRequest(_message.Message):
    __slots__ = ("index", "pool", "request_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    index: str
    pool: str
    request_id: str
    def __init__(self, index: _Optional[str] = ..., pool: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class Index(_message.Message):
    __slots__ = ("name", "pool", "generation", "live_count", "tombstones", "shards", "bytes", "model", "config", "ingests")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LIVE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    INGESTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    pool: str
    generation: int
    live_count: int
    tombstones: int
    shards: int
    bytes: int
    model: ModelIdentity
    config: _common_pb2.SketchConfig
    ingests: _containers.RepeatedCompositeFieldContainer[Ingest]
    def __init__(self, name: _Optional[str] = ..., pool: _Optional[str] = ..., generation: _Optional[int] = ..., live_count: _Optional[int] = ..., tombstones: _Optional[int] = ..., shards: _Optional[int] = ..., bytes: _Optional[int] = ..., model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., config: _Optional[_Union[_common_pb2.SketchConfig, _Mapping]] = ..., ingests: _Optional[_Iterable[_Union[Ingest, _Mapping]]] = ...) -> None: ...

class Ingest(_message.Message):
    __slots__ = ("generation", "dataset_uri", "dataset_sha256", "records", "truncated")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DATASET_URI_FIELD_NUMBER: _ClassVar[int]
    DATASET_SHA256_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    generation: int
    dataset_uri: str
    dataset_sha256: str
    records: int
    truncated: int
    def __init__(self, generation: _Optional[int] = ..., dataset_uri: _Optional[str] = ..., dataset_sha256: _Optional[str] = ..., records: _Optional[int] = ..., truncated: _Optional[int] = ...) -> None: ...

class ModelIdentity(_message.Message):
    __slots__ = ("name", "config_sha256", "head_sha256", "tokenizer_sha256", "adapter_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SHA256_FIELD_NUMBER: _ClassVar[int]
    HEAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_sha256: str
    head_sha256: str
    tokenizer_sha256: str
    adapter_sha256: str
    def __init__(self, name: _Optional[str] = ..., config_sha256: _Optional[str] = ..., head_sha256: _Optional[str] = ..., tokenizer_sha256: _Optional[str] = ..., adapter_sha256: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "state", "index", "shards_total", "shards_done", "examples_total", "examples_done", "tokens_done", "examples_per_second", "tokens_per_second", "eta_seconds", "created_at", "started_at", "finished_at", "generation", "error_code", "error_message")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SHARDS_DONE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_DONE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: JobKind
    state: JobState
    index: str
    shards_total: int
    shards_done: int
    examples_total: int
    examples_done: int
    tokens_done: int
    examples_per_second: float
    tokens_per_second: float
    eta_seconds: float
    created_at: float
    started_at: float
    finished_at: float
    generation: int
    error_code: str
    error_message: str
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., index: _Optional[str] = ..., shards_total: _Optional[int] = ..., shards_done: _Optional[int] = ..., examples_total: _Optional[int] = ..., examples_done: _Optional[int] = ..., tokens_done: _Optional[int] = ..., examples_per_second: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., generation: _Optional[int] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("index", "limit", "page_size", "page_token")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    index: str
    limit: int
    page_size: int
    page_token: str
    def __init__(self, index: _Optional[str] = ..., limit: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id", "interval_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    interval_seconds: float
    def __init__(self, id: _Optional[str] = ..., interval_seconds: _Optional[float] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class AttributeRequest(_message.Message):
    __slots__ = ("index", "queries", "fields", "top", "scoring", "return_texts", "generate", "collapse", "collapse_threshold")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    RETURN_TEXTS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    COLLAPSE_FIELD_NUMBER: _ClassVar[int]
    COLLAPSE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    index: str
    queries: _containers.RepeatedCompositeFieldContainer[_common_pb2.Record]
    fields: _common_pb2.FieldMap
    top: int
    scoring: _common_pb2.Scoring
    return_texts: bool
    generate: Generation
    collapse: bool
    collapse_threshold: float
    def __init__(self, index: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[_common_pb2.Record, _Mapping]]] = ..., fields: _Optional[_Union[_common_pb2.FieldMap, _Mapping]] = ..., top: _Optional[int] = ..., scoring: _Optional[_Union[_common_pb2.Scoring, _Mapping]] = ..., return_texts: _Optional[bool] = ..., generate: _Optional[_Union[Generation, _Mapping]] = ..., collapse: _Optional[bool] = ..., collapse_threshold: _Optional[float] = ...) -> None: ...

class Generation(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class AttributeResponse(_message.Message):
    __slots__ = ("results", "generation")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[QueryResult]
    generation: int
    def __init__(self, results: _Optional[_Iterable[_Union[QueryResult, _Mapping]]] = ..., generation: _Optional[int] = ...) -> None: ...

class QueryResult(_message.Message):
    __slots__ = ("query_id", "hits", "prompt", "generated_text")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TEXT_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    prompt: str
    generated_text: str
    def __init__(self, query_id: _Optional[str] = ..., hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., prompt: _Optional[str] = ..., generated_text: _Optional[str] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "record_json", "duplicates")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RECORD_JSON_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    record_json: str
    duplicates: _containers.RepeatedCompositeFieldContainer[Hit]
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., record_json: _Optional[str] = ..., duplicates: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("index", "queries", "query_id", "hit_id", "fields", "scoring", "top")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    HIT_ID_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    index: str
    queries: _containers.RepeatedCompositeFieldContainer[_common_pb2.Record]
    query_id: str
    hit_id: str
    fields: _common_pb2.FieldMap
    scoring: _common_pb2.Scoring
    top: int
    def __init__(self, index: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[_common_pb2.Record, _Mapping]]] = ..., query_id: _Optional[str] = ..., hit_id: _Optional[str] = ..., fields: _Optional[_Union[_common_pb2.FieldMap, _Mapping]] = ..., scoring: _Optional[_Union[_common_pb2.Scoring, _Mapping]] = ..., top: _Optional[int] = ...) -> None: ...

class ExplainToken(_message.Message):
    __slots__ = ("position", "token_id", "text", "supervised", "contribution")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SUPERVISED_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    position: int
    token_id: int
    text: str
    supervised: bool
    contribution: float
    def __init__(self, position: _Optional[int] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., supervised: _Optional[bool] = ..., contribution: _Optional[float] = ...) -> None: ...

class ExplainChannel(_message.Message):
    __slots__ = ("channel", "weight", "value", "pairs", "centering", "query_norm", "hit_norm")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    CENTERING_FIELD_NUMBER: _ClassVar[int]
    QUERY_NORM_FIELD_NUMBER: _ClassVar[int]
    HIT_NORM_FIELD_NUMBER: _ClassVar[int]
    channel: str
    weight: float
    value: float
    pairs: float
    centering: float
    query_norm: float
    hit_norm: float
    def __init__(self, channel: _Optional[str] = ..., weight: _Optional[float] = ..., value: _Optional[float] = ..., pairs: _Optional[float] = ..., centering: _Optional[float] = ..., query_norm: _Optional[float] = ..., hit_norm: _Optional[float] = ...) -> None: ...

class ExplainPair(_message.Message):
    __slots__ = ("query_position", "hit_position", "contribution")
    QUERY_POSITION_FIELD_NUMBER: _ClassVar[int]
    HIT_POSITION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    query_position: int
    hit_position: int
    contribution: float
    def __init__(self, query_position: _Optional[int] = ..., hit_position: _Optional[int] = ..., contribution: _Optional[float] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("query_id", "hit_id", "score", "pair_total", "centering", "sketched_score", "channel", "score_kind", "centered", "channels", "query_tokens", "hit_tokens", "pair_rows", "pair_cols", "pairs", "top_pairs", "top_pairs_share", "top_pairs_abs_share", "top_query_tokens", "top_hit_tokens", "generation")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    HIT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PAIR_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CENTERING_FIELD_NUMBER: _ClassVar[int]
    SKETCHED_SCORE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    CENTERED_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAIR_ROWS_FIELD_NUMBER: _ClassVar[int]
    PAIR_COLS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    TOP_PAIRS_FIELD_NUMBER: _ClassVar[int]
    TOP_PAIRS_SHARE_FIELD_NUMBER: _ClassVar[int]
    TOP_PAIRS_ABS_SHARE_FIELD_NUMBER: _ClassVar[int]
    TOP_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    hit_id: str
    score: float
    pair_total: float
    centering: float
    sketched_score: float
    channel: str
    score_kind: str
    centered: bool
    channels: _containers.RepeatedCompositeFieldContainer[ExplainChannel]
    query_tokens: _containers.RepeatedCompositeFieldContainer[ExplainToken]
    hit_tokens: _containers.RepeatedCompositeFieldContainer[ExplainToken]
    pair_rows: _containers.RepeatedScalarFieldContainer[int]
    pair_cols: _containers.RepeatedScalarFieldContainer[int]
    pairs: _containers.RepeatedScalarFieldContainer[float]
    top_pairs: _containers.RepeatedCompositeFieldContainer[ExplainPair]
    top_pairs_share: float
    top_pairs_abs_share: float
    top_query_tokens: _containers.RepeatedScalarFieldContainer[int]
    top_hit_tokens: _containers.RepeatedScalarFieldContainer[int]
    generation: int
    def __init__(self, query_id: _Optional[str] = ..., hit_id: _Optional[str] = ..., score: _Optional[float] = ..., pair_total: _Optional[float] = ..., centering: _Optional[float] = ..., sketched_score: _Optional[float] = ..., channel: _Optional[str] = ..., score_kind: _Optional[str] = ..., centered: _Optional[bool] = ..., channels: _Optional[_Iterable[_Union[ExplainChannel, _Mapping]]] = ..., query_tokens: _Optional[_Iterable[_Union[ExplainToken, _Mapping]]] = ..., hit_tokens: _Optional[_Iterable[_Union[ExplainToken, _Mapping]]] = ..., pair_rows: _Optional[_Iterable[int]] = ..., pair_cols: _Optional[_Iterable[int]] = ..., pairs: _Optional[_Iterable[float]] = ..., top_pairs: _Optional[_Iterable[_Union[ExplainPair, _Mapping]]] = ..., top_pairs_share: _Optional[float] = ..., top_pairs_abs_share: _Optional[float] = ..., top_query_tokens: _Optional[_Iterable[int]] = ..., top_hit_tokens: _Optional[_Iterable[int]] = ..., generation: _Optional[int] = ..., **kwargs) -> None: ...

class ValueRequest(_message.Message):
    __slots__ = ("index", "targets", "fields", "scoring", "top", "select_fraction", "selection_uri", "values_uri")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    SELECT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SELECTION_URI_FIELD_NUMBER: _ClassVar[int]
    VALUES_URI_FIELD_NUMBER: _ClassVar[int]
    index: str
    targets: _containers.RepeatedCompositeFieldContainer[_common_pb2.Record]
    fields: _common_pb2.FieldMap
    scoring: _common_pb2.Scoring
    top: int
    select_fraction: float
    selection_uri: str
    values_uri: str
    def __init__(self, index: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[_common_pb2.Record, _Mapping]]] = ..., fields: _Optional[_Union[_common_pb2.FieldMap, _Mapping]] = ..., scoring: _Optional[_Union[_common_pb2.Scoring, _Mapping]] = ..., top: _Optional[int] = ..., select_fraction: _Optional[float] = ..., selection_uri: _Optional[str] = ..., values_uri: _Optional[str] = ...) -> None: ...

class ValueSummary(_message.Message):
    __slots__ = ("count", "min", "max", "mean")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    count: int
    min: float
    max: float
    mean: float
    def __init__(self, count: _Optional[int] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., mean: _Optional[float] = ...) -> None: ...

class ValueResponse(_message.Message):
    __slots__ = ("values", "examples", "selected", "selection_uri", "generation", "values_uri", "summary")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    SELECTION_URI_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    VALUES_URI_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Hit]
    examples: int
    selected: int
    selection_uri: str
    generation: int
    values_uri: str
    summary: ValueSummary
    def __init__(self, values: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., examples: _Optional[int] = ..., selected: _Optional[int] = ..., selection_uri: _Optional[str] = ..., generation: _Optional[int] = ..., values_uri: _Optional[str] = ..., summary: _Optional[_Union[ValueSummary, _Mapping]] = ...) -> None: ...
