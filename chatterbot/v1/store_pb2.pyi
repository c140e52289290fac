import datetime

from chatterbot.v1 import types_pb2 as _types_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApiKeyKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    API_KEY_KIND_UNSPECIFIED: _ClassVar[ApiKeyKind]
    API_KEY_KIND_USER: _ClassVar[ApiKeyKind]
    API_KEY_KIND_SERVICE: _ClassVar[ApiKeyKind]
    API_KEY_KIND_ADMIN: _ClassVar[ApiKeyKind]
API_KEY_KIND_UNSPECIFIED: ApiKeyKind
API_KEY_KIND_USER: ApiKeyKind
API_KEY_KIND_SERVICE: ApiKeyKind
API_KEY_KIND_ADMIN: ApiKeyKind

class User(_message.Message):
    __slots__ = ("user_id", "create_time")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EnsureUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class EnsureUserResponse(_message.Message):
    __slots__ = ("user", "created")
    USER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    user: User
    created: bool
    def __init__(self, user: _Optional[_Union[User, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class GetUserResponse(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: User
    def __init__(self, user: _Optional[_Union[User, _Mapping]] = ...) -> None: ...

class StoreServiceCreateConversationRequest(_message.Message):
    __slots__ = ("user_id", "title", "conversation_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    title: str
    conversation_id: str
    def __init__(self, user_id: _Optional[str] = ..., title: _Optional[str] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class StoreServiceCreateConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: _types_pb2.Conversation
    def __init__(self, conversation: _Optional[_Union[_types_pb2.Conversation, _Mapping]] = ...) -> None: ...

class GetConversationRequest(_message.Message):
    __slots__ = ("user_id", "conversation_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_id: str
    def __init__(self, user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class GetConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: _types_pb2.Conversation
    def __init__(self, conversation: _Optional[_Union[_types_pb2.Conversation, _Mapping]] = ...) -> None: ...

class StoreServiceListConversationsRequest(_message.Message):
    __slots__ = ("user_id", "page_size", "page_token")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    page_size: int
    page_token: str
    def __init__(self, user_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class StoreServiceListConversationsResponse(_message.Message):
    __slots__ = ("conversations", "next_page_token")
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[_types_pb2.Conversation]
    next_page_token: str
    def __init__(self, conversations: _Optional[_Iterable[_Union[_types_pb2.Conversation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StoreServiceRenameConversationRequest(_message.Message):
    __slots__ = ("user_id", "conversation_id", "title")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_id: str
    title: str
    def __init__(self, user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., title: _Optional[str] = ...) -> None: ...

class StoreServiceRenameConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: _types_pb2.Conversation
    def __init__(self, conversation: _Optional[_Union[_types_pb2.Conversation, _Mapping]] = ...) -> None: ...

class StoreServiceDeleteConversationRequest(_message.Message):
    __slots__ = ("user_id", "conversation_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_id: str
    def __init__(self, user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class StoreServiceDeleteConversationResponse(_message.Message):
    __slots__ = ("message_count",)
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    message_count: int
    def __init__(self, message_count: _Optional[int] = ...) -> None: ...

class StoreServiceListMessagesRequest(_message.Message):
    __slots__ = ("user_id", "conversation_id", "page_size", "before_message_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    BEFORE_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_id: str
    page_size: int
    before_message_id: int
    def __init__(self, user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., page_size: _Optional[int] = ..., before_message_id: _Optional[int] = ...) -> None: ...

class StoreServiceListMessagesResponse(_message.Message):
    __slots__ = ("messages", "next_before_message_id")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_BEFORE_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_types_pb2.HistoryMessage]
    next_before_message_id: int
    def __init__(self, messages: _Optional[_Iterable[_Union[_types_pb2.HistoryMessage, _Mapping]]] = ..., next_before_message_id: _Optional[int] = ...) -> None: ...

class ExchangeMessage(_message.Message):
    __slots__ = ("content", "token_count", "tool_calls", "tool_call_id")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    content: str
    token_count: int
    tool_calls: _containers.RepeatedCompositeFieldContainer[_types_pb2.ToolCall]
    tool_call_id: str
    def __init__(self, content: _Optional[str] = ..., token_count: _Optional[int] = ..., tool_calls: _Optional[_Iterable[_Union[_types_pb2.ToolCall, _Mapping]]] = ..., tool_call_id: _Optional[str] = ...) -> None: ...

class AppendExchangeRequest(_message.Message):
    __slots__ = ("user_id", "conversation_id", "request_id", "user_message", "assistant_message", "model", "processing_time", "title", "continues_digest", "head_digest", "tool_results")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CONTINUES_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULTS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_id: str
    request_id: str
    user_message: ExchangeMessage
    assistant_message: ExchangeMessage
    model: str
    processing_time: float
    title: str
    continues_digest: str
    head_digest: str
    tool_results: _containers.RepeatedCompositeFieldContainer[ExchangeMessage]
    def __init__(self, user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., request_id: _Optional[str] = ..., user_message: _Optional[_Union[ExchangeMessage, _Mapping]] = ..., assistant_message: _Optional[_Union[ExchangeMessage, _Mapping]] = ..., model: _Optional[str] = ..., processing_time: _Optional[float] = ..., title: _Optional[str] = ..., continues_digest: _Optional[str] = ..., head_digest: _Optional[str] = ..., tool_results: _Optional[_Iterable[_Union[ExchangeMessage, _Mapping]]] = ...) -> None: ...

class AppendExchangeResponse(_message.Message):
    __slots__ = ("conversation", "user_message", "assistant_message", "created", "tool_results")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    USER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULTS_FIELD_NUMBER: _ClassVar[int]
    conversation: _types_pb2.Conversation
    user_message: _types_pb2.HistoryMessage
    assistant_message: _types_pb2.HistoryMessage
    created: bool
    tool_results: _containers.RepeatedCompositeFieldContainer[_types_pb2.HistoryMessage]
    def __init__(self, conversation: _Optional[_Union[_types_pb2.Conversation, _Mapping]] = ..., user_message: _Optional[_Union[_types_pb2.HistoryMessage, _Mapping]] = ..., assistant_message: _Optional[_Union[_types_pb2.HistoryMessage, _Mapping]] = ..., created: _Optional[bool] = ..., tool_results: _Optional[_Iterable[_Union[_types_pb2.HistoryMessage, _Mapping]]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("correlation_id", "user_id", "status", "response", "conversation_id", "processing_time", "error", "finish_reason", "usage", "create_time", "update_time", "expire_time")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    user_id: str
    status: _types_pb2.JobStatus
    response: str
    conversation_id: str
    processing_time: float
    error: str
    finish_reason: _types_pb2.FinishReason
    usage: _types_pb2.Usage
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, correlation_id: _Optional[str] = ..., user_id: _Optional[str] = ..., status: _Optional[_Union[_types_pb2.JobStatus, str]] = ..., response: _Optional[str] = ..., conversation_id: _Optional[str] = ..., processing_time: _Optional[float] = ..., error: _Optional[str] = ..., finish_reason: _Optional[_Union[_types_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_types_pb2.Usage, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PutJobResultRequest(_message.Message):
    __slots__ = ("result", "ttl_seconds")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    result: JobResult
    ttl_seconds: int
    def __init__(self, result: _Optional[_Union[JobResult, _Mapping]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class PutJobResultResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: JobResult
    def __init__(self, result: _Optional[_Union[JobResult, _Mapping]] = ...) -> None: ...

class GetJobResultRequest(_message.Message):
    __slots__ = ("user_id", "correlation_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    correlation_id: str
    def __init__(self, user_id: _Optional[str] = ..., correlation_id: _Optional[str] = ...) -> None: ...

class GetJobResultResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: JobResult
    def __init__(self, result: _Optional[_Union[JobResult, _Mapping]] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("key_id", "prefix", "kind", "user_id", "name", "requests_per_minute", "tokens_per_minute", "create_time", "revoke_time", "route_limits")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    ROUTE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    prefix: str
    kind: ApiKeyKind
    user_id: str
    name: str
    requests_per_minute: int
    tokens_per_minute: int
    create_time: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    route_limits: _containers.RepeatedCompositeFieldContainer[RouteLimit]
    def __init__(self, key_id: _Optional[str] = ..., prefix: _Optional[str] = ..., kind: _Optional[_Union[ApiKeyKind, str]] = ..., user_id: _Optional[str] = ..., name: _Optional[str] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., route_limits: _Optional[_Iterable[_Union[RouteLimit, _Mapping]]] = ...) -> None: ...

class RouteLimit(_message.Message):
    __slots__ = ("route", "limit")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    route: str
    limit: str
    def __init__(self, route: _Optional[str] = ..., limit: _Optional[str] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("key_hash", "prefix", "kind", "user_id", "name", "requests_per_minute", "tokens_per_minute", "route_limits")
    KEY_HASH_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    key_hash: bytes
    prefix: str
    kind: ApiKeyKind
    user_id: str
    name: str
    requests_per_minute: int
    tokens_per_minute: int
    route_limits: _containers.RepeatedCompositeFieldContainer[RouteLimit]
    def __init__(self, key_hash: _Optional[bytes] = ..., prefix: _Optional[str] = ..., kind: _Optional[_Union[ApiKeyKind, str]] = ..., user_id: _Optional[str] = ..., name: _Optional[str] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., route_limits: _Optional[_Iterable[_Union[RouteLimit, _Mapping]]] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class GetApiKeyRequest(_message.Message):
    __slots__ = ("key_hash",)
    KEY_HASH_FIELD_NUMBER: _ClassVar[int]
    key_hash: bytes
    def __init__(self, key_hash: _Optional[bytes] = ...) -> None: ...

class GetApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("api_keys",)
    API_KEYS_FIELD_NUMBER: _ClassVar[int]
    api_keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, api_keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id_or_prefix",)
    KEY_ID_OR_PREFIX_FIELD_NUMBER: _ClassVar[int]
    key_id_or_prefix: str
    def __init__(self, key_id_or_prefix: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class UpdateApiKeyRequest(_message.Message):
    __slots__ = ("key_id_or_prefix", "api_key", "update_mask")
    KEY_ID_OR_PREFIX_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    key_id_or_prefix: str
    api_key: ApiKey
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, key_id_or_prefix: _Optional[str] = ..., api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...
