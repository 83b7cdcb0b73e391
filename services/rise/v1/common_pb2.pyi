from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Record(_message.Message):
    __slots__ = ("id", "text", "prompt", "response")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    prompt: str
    response: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., prompt: _Optional[str] = ..., response: _Optional[str] = ...) -> None: ...

class FieldMap(_message.Message):
    __slots__ = ("text_field", "id_field", "prompt_field", "response_field", "chat_template")
    TEXT_FIELD_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    text_field: str
    id_field: str
    prompt_field: str
    response_field: str
    chat_template: bool
    def __init__(self, text_field: _Optional[str] = ..., id_field: _Optional[str] = ..., prompt_field: _Optional[str] = ..., response_field: _Optional[str] = ..., chat_template: _Optional[bool] = ...) -> None: ...

class SketchConfig(_message.Message):
    __slots__ = ("mode", "topk", "topk_all", "temperature", "kr", "kh", "kg", "seed", "weighting", "max_length")
    MODE_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    TOPK_ALL_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    KR_FIELD_NUMBER: _ClassVar[int]
    KH_FIELD_NUMBER: _ClassVar[int]
    KG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    mode: str
    topk: int
    topk_all: bool
    temperature: float
    kr: int
    kh: int
    kg: int
    seed: int
    weighting: str
    max_length: int
    def __init__(self, mode: _Optional[str] = ..., topk: _Optional[int] = ..., topk_all: _Optional[bool] = ..., temperature: _Optional[float] = ..., kr: _Optional[int] = ..., kh: _Optional[int] = ..., kg: _Optional[int] = ..., seed: _Optional[int] = ..., weighting: _Optional[str] = ..., max_length: _Optional[int] = ...) -> None: ...

class Scoring(_message.Message):
    __slots__ = ("channel", "score", "center")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    CENTER_FIELD_NUMBER: _ClassVar[int]
    channel: str
    score: str
    center: bool
    def __init__(self, channel: _Optional[str] = ..., score: _Optional[str] = ..., center: _Optional[bool] = ..., **kwargs) -> None: ...
