import datetime

from chatterbot.v1 import types_pb2 as _types_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContextSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTEXT_SOURCE_UNSPECIFIED: _ClassVar[ContextSource]
    CONTEXT_SOURCE_CACHE: _ClassVar[ContextSource]
    CONTEXT_SOURCE_STORE: _ClassVar[ContextSource]
    CONTEXT_SOURCE_EMPTY: _ClassVar[ContextSource]
CONTEXT_SOURCE_UNSPECIFIED: ContextSource
CONTEXT_SOURCE_CACHE: ContextSource
CONTEXT_SOURCE_STORE: ContextSource
CONTEXT_SOURCE_EMPTY: ContextSource

class Turn(_message.Message):
    __slots__ = ("role", "content", "token_count", "create_time", "request_id")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    role: _types_pb2.Role
    content: str
    token_count: int
    create_time: _timestamp_pb2.Timestamp
    request_id: str
    def __init__(self, role: _Optional[_Union[_types_pb2.Role, str]] = ..., content: _Optional[str] = ..., token_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetContextRequest(_message.Message):
    __slots__ = ("user_id", "conversation_id", "token_budget")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_id: str
    token_budget: int
    def __init__(self, user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., token_budget: _Optional[int] = ...) -> None: ...

class GetContextResponse(_message.Message):
    __slots__ = ("turns", "token_count", "truncated", "source")
    TURNS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    token_count: int
    truncated: bool
    source: ContextSource
    def __init__(self, turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., token_count: _Optional[int] = ..., truncated: _Optional[bool] = ..., source: _Optional[_Union[ContextSource, str]] = ...) -> None: ...

class AppendTurnsRequest(_message.Message):
    __slots__ = ("user_id", "conversation_id", "turns", "new_conversation")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    NEW_CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_id: str
    turns: _containers.RepeatedCompositeFieldContainer[Turn]
    new_conversation: bool
    def __init__(self, user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., turns: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., new_conversation: _Optional[bool] = ...) -> None: ...

class AppendTurnsResponse(_message.Message):
    __slots__ = ("turn_count",)
    TURN_COUNT_FIELD_NUMBER: _ClassVar[int]
    turn_count: int
    def __init__(self, turn_count: _Optional[int] = ...) -> None: ...

class ClearContextRequest(_message.Message):
    __slots__ = ("user_id", "conversation_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_id: str
    def __init__(self, user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class ClearContextResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
