from chatterbot.v1 import inference_pb2 as _inference_pb2
from chatterbot.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DegradationRung(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEGRADATION_RUNG_UNSPECIFIED: _ClassVar[DegradationRung]
    DEGRADATION_RUNG_NONE: _ClassVar[DegradationRung]
    DEGRADATION_RUNG_REDUCED_CONTEXT: _ClassVar[DegradationRung]
    DEGRADATION_RUNG_LIGHT_MODEL: _ClassVar[DegradationRung]
    DEGRADATION_RUNG_CACHE_ONLY: _ClassVar[DegradationRung]
    DEGRADATION_RUNG_SHED: _ClassVar[DegradationRung]
DEGRADATION_RUNG_UNSPECIFIED: DegradationRung
DEGRADATION_RUNG_NONE: DegradationRung
DEGRADATION_RUNG_REDUCED_CONTEXT: DegradationRung
DEGRADATION_RUNG_LIGHT_MODEL: DegradationRung
DEGRADATION_RUNG_CACHE_ONLY: DegradationRung
DEGRADATION_RUNG_SHED: DegradationRung

class ChatTurn(_message.Message):
    __slots__ = ("user_id", "message", "context", "max_tokens", "temperature", "conversation_id", "request_id", "model", "top_p", "seed", "stop", "messages", "greedy", "options")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    message: str
    context: _containers.RepeatedScalarFieldContainer[str]
    max_tokens: int
    temperature: float
    conversation_id: str
    request_id: str
    model: str
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    messages: _containers.RepeatedCompositeFieldContainer[_types_pb2.ChatMessage]
    greedy: bool
    options: _types_pb2.GenerationOptions
    def __init__(self, user_id: _Optional[str] = ..., message: _Optional[str] = ..., context: _Optional[_Iterable[str]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., conversation_id: _Optional[str] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., messages: _Optional[_Iterable[_Union[_types_pb2.ChatMessage, _Mapping]]] = ..., greedy: _Optional[bool] = ..., options: _Optional[_Union[_types_pb2.GenerationOptions, _Mapping]] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("turn",)
    TURN_FIELD_NUMBER: _ClassVar[int]
    turn: ChatTurn
    def __init__(self, turn: _Optional[_Union[ChatTurn, _Mapping]] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("response", "conversation_id", "processing_time", "request_id", "finish_reason", "usage", "model", "tool_calls", "logprobs")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    response: str
    conversation_id: str
    processing_time: float
    request_id: str
    finish_reason: _types_pb2.FinishReason
    usage: _types_pb2.Usage
    model: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[_types_pb2.ToolCall]
    logprobs: _containers.RepeatedCompositeFieldContainer[_types_pb2.TokenLogprob]
    def __init__(self, response: _Optional[str] = ..., conversation_id: _Optional[str] = ..., processing_time: _Optional[float] = ..., request_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_types_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_types_pb2.Usage, _Mapping]] = ..., model: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[_types_pb2.ToolCall, _Mapping]]] = ..., logprobs: _Optional[_Iterable[_Union[_types_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class StreamChatRequest(_message.Message):
    __slots__ = ("turn",)
    TURN_FIELD_NUMBER: _ClassVar[int]
    turn: ChatTurn
    def __init__(self, turn: _Optional[_Union[ChatTurn, _Mapping]] = ...) -> None: ...

class StreamChatResponse(_message.Message):
    __slots__ = ("text", "conversation_id", "finish_reason", "usage", "processing_time", "model", "request_id", "tool_calls", "logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    conversation_id: str
    finish_reason: _types_pb2.FinishReason
    usage: _types_pb2.Usage
    processing_time: float
    model: str
    request_id: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[_types_pb2.ToolCallDelta]
    logprobs: _containers.RepeatedCompositeFieldContainer[_types_pb2.TokenLogprob]
    def __init__(self, text: _Optional[str] = ..., conversation_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_types_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_types_pb2.Usage, _Mapping]] = ..., processing_time: _Optional[float] = ..., model: _Optional[str] = ..., request_id: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[_types_pb2.ToolCallDelta, _Mapping]]] = ..., logprobs: _Optional[_Iterable[_Union[_types_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class SubmitChatRequest(_message.Message):
    __slots__ = ("turn", "priority")
    TURN_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    turn: ChatTurn
    priority: _types_pb2.JobPriority
    def __init__(self, turn: _Optional[_Union[ChatTurn, _Mapping]] = ..., priority: _Optional[_Union[_types_pb2.JobPriority, str]] = ...) -> None: ...

class SubmitChatResponse(_message.Message):
    __slots__ = ("correlation_id", "status")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    status: _types_pb2.JobStatus
    def __init__(self, correlation_id: _Optional[str] = ..., status: _Optional[_Union[_types_pb2.JobStatus, str]] = ...) -> None: ...

class GetChatResultRequest(_message.Message):
    __slots__ = ("user_id", "correlation_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    correlation_id: str
    def __init__(self, user_id: _Optional[str] = ..., correlation_id: _Optional[str] = ...) -> None: ...

class GetChatResultResponse(_message.Message):
    __slots__ = ("correlation_id", "status", "response", "conversation_id", "processing_time", "error", "finish_reason", "usage")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    status: _types_pb2.JobStatus
    response: str
    conversation_id: str
    processing_time: float
    error: str
    finish_reason: _types_pb2.FinishReason
    usage: _types_pb2.Usage
    def __init__(self, correlation_id: _Optional[str] = ..., status: _Optional[_Union[_types_pb2.JobStatus, str]] = ..., response: _Optional[str] = ..., conversation_id: _Optional[str] = ..., processing_time: _Optional[float] = ..., error: _Optional[str] = ..., finish_reason: _Optional[_Union[_types_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_types_pb2.Usage, _Mapping]] = ...) -> None: ...

class WatchChatRequest(_message.Message):
    __slots__ = ("user_id", "correlation_id", "after_sequence")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    correlation_id: str
    after_sequence: int
    def __init__(self, user_id: _Optional[str] = ..., correlation_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchChatResponse(_message.Message):
    __slots__ = ("sequence", "text", "done", "finish_reason", "usage", "conversation_id", "processing_time", "error", "restart")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    text: str
    done: bool
    finish_reason: _types_pb2.FinishReason
    usage: _types_pb2.Usage
    conversation_id: str
    processing_time: float
    error: str
    restart: bool
    def __init__(self, sequence: _Optional[int] = ..., text: _Optional[str] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[_Union[_types_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_types_pb2.Usage, _Mapping]] = ..., conversation_id: _Optional[str] = ..., processing_time: _Optional[float] = ..., error: _Optional[str] = ..., restart: _Optional[bool] = ...) -> None: ...

class CancelChatRequest(_message.Message):
    __slots__ = ("user_id", "correlation_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    correlation_id: str
    def __init__(self, user_id: _Optional[str] = ..., correlation_id: _Optional[str] = ...) -> None: ...

class CancelChatResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _types_pb2.JobStatus
    def __init__(self, status: _Optional[_Union[_types_pb2.JobStatus, str]] = ...) -> None: ...

class ListConversationsRequest(_message.Message):
    __slots__ = ("user_id", "page_size", "page_token")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    page_size: int
    page_token: str
    def __init__(self, user_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListConversationsResponse(_message.Message):
    __slots__ = ("conversations", "next_page_token")
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    conversations: _containers.RepeatedCompositeFieldContainer[_types_pb2.Conversation]
    next_page_token: str
    def __init__(self, conversations: _Optional[_Iterable[_Union[_types_pb2.Conversation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateConversationRequest(_message.Message):
    __slots__ = ("user_id", "title")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    title: str
    def __init__(self, user_id: _Optional[str] = ..., title: _Optional[str] = ...) -> None: ...

class CreateConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: _types_pb2.Conversation
    def __init__(self, conversation: _Optional[_Union[_types_pb2.Conversation, _Mapping]] = ...) -> None: ...

class RenameConversationRequest(_message.Message):
    __slots__ = ("user_id", "conversation_id", "title")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_id: str
    title: str
    def __init__(self, user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., title: _Optional[str] = ...) -> None: ...

class RenameConversationResponse(_message.Message):
    __slots__ = ("conversation",)
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    conversation: _types_pb2.Conversation
    def __init__(self, conversation: _Optional[_Union[_types_pb2.Conversation, _Mapping]] = ...) -> None: ...

class DeleteConversationRequest(_message.Message):
    __slots__ = ("user_id", "conversation_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    conversation_id: str
    def __init__(self, user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class DeleteConversationResponse(_message.Message):
    __slots__ = ("message_count",)
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    message_count: int
    def __init__(self, message_count: _Optional[int] = ...) -> None: ...

class ListMessagesRequest(_message.Message):
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

class ListMessagesResponse(_message.Message):
    __slots__ = ("messages", "next_before_message_id")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_BEFORE_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_types_pb2.HistoryMessage]
    next_before_message_id: int
    def __init__(self, messages: _Optional[_Iterable[_Union[_types_pb2.HistoryMessage, _Mapping]]] = ..., next_before_message_id: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("rung", "reason", "inference_waiting", "breakers")
    class BreakersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUNG_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_WAITING_FIELD_NUMBER: _ClassVar[int]
    BREAKERS_FIELD_NUMBER: _ClassVar[int]
    rung: DegradationRung
    reason: str
    inference_waiting: int
    breakers: _containers.ScalarMap[str, str]
    def __init__(self, rung: _Optional[_Union[DegradationRung, str]] = ..., reason: _Optional[str] = ..., inference_waiting: _Optional[int] = ..., breakers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ChatServiceListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChatServiceListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_inference_pb2.Model]
    def __init__(self, models: _Optional[_Iterable[_Union[_inference_pb2.Model, _Mapping]]] = ...) -> None: ...
