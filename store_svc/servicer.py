"""StoreService over gRPC: translates protobuf to repository calls and back, and errors to status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc

from chatterbot.api_keys import kind_from_pb, record_to_pb
from chatterbot.v1 import store_pb2, store_pb2_grpc, types_pb2
from store_svc.errors import InvalidInput, NotFound
from store_svc.keys import ApiKeyRepository
from store_svc.repository import Conversation, JobResult, Message, StoreRepository, User

log = logging.getLogger(__name__)

# The database is down, restarting, failing over or out of connections: worth a retry, maybe elsewhere.
# OSError covers refused and reset connections and timeouts (TimeoutError is an OSError); asyncpg raises
# InterfaceError for a connection or pool that has been closed under it.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
)

_ROLES = {
    "system": types_pb2.ROLE_SYSTEM,
    "user": types_pb2.ROLE_USER,
    "assistant": types_pb2.ROLE_ASSISTANT,
}

_Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _status_codes(handler: _Handler) -> _Handler:
    """Turn the repository's exceptions into gRPC status codes."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except InvalidInput as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncpg.exceptions.DataError as exc:
            # Values PostgreSQL refuses (a NUL byte in text, a number out of range) are the caller's to fix.
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rejected by the database: {exc}")
        except UNAVAILABLE_ERRORS as exc:
            log.warning("database unavailable", extra={"method": handler.__name__, "error": repr(exc)})
            await context.abort(grpc.StatusCode.UNAVAILABLE, "database unavailable")

    return wrapper


class StoreServicer(store_pb2_grpc.StoreServiceServicer):
    """The gRPC face of `StoreRepository`; all the logic lives there."""

    def __init__(self, repo: StoreRepository, keys: ApiKeyRepository | None = None) -> None:
        self.repo = repo
        self.keys = keys or ApiKeyRepository.on_control_shard(repo.shards)

    @_status_codes
    async def EnsureUser(self, request, context):
        user, created = await self.repo.ensure_user(request.user_id)
        return store_pb2.EnsureUserResponse(user=_user_pb(user), created=created)

    @_status_codes
    async def GetUser(self, request, context):
        return store_pb2.GetUserResponse(user=_user_pb(await self.repo.get_user(request.user_id)))

    @_status_codes
    async def CreateConversation(self, request, context):
        conversation = await self.repo.create_conversation(
            request.user_id, title=request.title, conversation_id=request.conversation_id
        )
        return store_pb2.StoreServiceCreateConversationResponse(conversation=_conversation_pb(conversation))

    @_status_codes
    async def GetConversation(self, request, context):
        conversation = await self.repo.get_conversation(request.user_id, request.conversation_id)
        return store_pb2.GetConversationResponse(conversation=_conversation_pb(conversation))

    @_status_codes
    async def ListConversations(self, request, context):
        page = await self.repo.list_conversations(request.user_id, request.page_size, request.page_token)
        return store_pb2.StoreServiceListConversationsResponse(
            conversations=[_conversation_pb(c) for c in page.conversations],
            next_page_token=page.next_page_token,
        )

    @_status_codes
    async def RenameConversation(self, request, context):
        conversation = await self.repo.rename_conversation(
            request.user_id, request.conversation_id, request.title
        )
        return store_pb2.StoreServiceRenameConversationResponse(conversation=_conversation_pb(conversation))

    @_status_codes
    async def DeleteConversation(self, request, context):
        deleted = await self.repo.delete_conversation(request.user_id, request.conversation_id)
        return store_pb2.StoreServiceDeleteConversationResponse(message_count=deleted)

    @_status_codes
    async def ListMessages(self, request, context):
        page = await self.repo.list_messages(
            request.user_id, request.conversation_id, request.page_size, request.before_message_id
        )
        return store_pb2.StoreServiceListMessagesResponse(
            messages=[_message_pb(m) for m in page.messages],
            next_before_message_id=page.next_before_message_id,
        )

    @_status_codes
    async def AppendExchange(self, request, context):
        exchange = await self.repo.append_exchange(
            request.user_id,
            request.conversation_id,
            request.request_id,
            request.user_message.content,
            request.assistant_message.content,
            user_token_count=request.user_message.token_count,
            assistant_token_count=request.assistant_message.token_count,
            model=request.model,
            processing_time=request.processing_time,
            title=request.title,
        )
        return store_pb2.AppendExchangeResponse(
            conversation=_conversation_pb(exchange.conversation),
            user_message=_message_pb(exchange.user_message),
            assistant_message=_message_pb(exchange.assistant_message),
            created=exchange.created,
        )

    @_status_codes
    async def PutJobResult(self, request, context):
        r = request.result
        stored = await self.repo.put_job_result(
            JobResult(
                user_id=r.user_id,
                correlation_id=r.correlation_id,
                status=r.status,
                response=r.response,
                conversation_id=r.conversation_id,
                processing_time=r.processing_time,
                error=r.error,
                finish_reason=r.finish_reason,
                prompt_tokens=r.usage.prompt_tokens,
                completion_tokens=r.usage.completion_tokens,
            ),
            ttl_seconds=request.ttl_seconds,
        )
        return store_pb2.PutJobResultResponse(result=_job_result_pb(stored))

    @_status_codes
    async def GetJobResult(self, request, context):
        result = await self.repo.get_job_result(request.user_id, request.correlation_id)
        return store_pb2.GetJobResultResponse(result=_job_result_pb(result))

    # --- API keys, on the control shard ---

    @_status_codes
    async def CreateApiKey(self, request, context):
        try:
            kind = kind_from_pb(request.kind)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        record = await self.keys.create(
            request.key_hash,
            request.prefix,
            kind,
            user_id=request.user_id,
            name=request.name,
            requests_per_minute=request.requests_per_minute,
            tokens_per_minute=request.tokens_per_minute,
        )
        return store_pb2.CreateApiKeyResponse(api_key=record_to_pb(record))

    @_status_codes
    async def GetApiKey(self, request, context):
        return store_pb2.GetApiKeyResponse(
            api_key=record_to_pb(await self.keys.get_by_hash(request.key_hash))
        )

    @_status_codes
    async def ListApiKeys(self, request, context):
        records = await self.keys.list_keys(request.user_id)
        return store_pb2.ListApiKeysResponse(api_keys=[record_to_pb(r) for r in records])

    @_status_codes
    async def RevokeApiKey(self, request, context):
        record = await self.keys.revoke(request.key_id_or_prefix)
        return store_pb2.RevokeApiKeyResponse(api_key=record_to_pb(record))


# --- dataclasses to protobuf ------------------------------------------------------------------------------


def _user_pb(user: User) -> store_pb2.User:
    pb = store_pb2.User(user_id=user.user_id)
    pb.create_time.FromDatetime(user.created_at)
    return pb


def _conversation_pb(conversation: Conversation) -> types_pb2.Conversation:
    pb = types_pb2.Conversation(
        user_id=conversation.user_id,
        conversation_id=conversation.conversation_id,
        title=conversation.title,
        message_count=conversation.message_count,
    )
    pb.create_time.FromDatetime(conversation.created_at)
    pb.update_time.FromDatetime(conversation.updated_at)
    return pb


def _message_pb(message: Message) -> types_pb2.HistoryMessage:
    pb = types_pb2.HistoryMessage(
        message_id=message.message_id,
        conversation_id=message.conversation_id,
        role=_ROLES.get(message.role, types_pb2.ROLE_UNSPECIFIED),
        content=message.content,
        token_count=message.token_count,
        processing_time=message.processing_time,
        model=message.model,
        request_id=message.request_id,
    )
    pb.create_time.FromDatetime(message.created_at)
    return pb


def _job_result_pb(result: JobResult) -> store_pb2.JobResult:
    pb = store_pb2.JobResult(
        correlation_id=result.correlation_id,
        user_id=result.user_id,
        status=result.status,
        response=result.response,
        conversation_id=result.conversation_id,
        processing_time=result.processing_time,
        error=result.error,
        finish_reason=result.finish_reason,
        usage=types_pb2.Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
    )
    for field, value in (
        (pb.create_time, result.created_at),
        (pb.update_time, result.updated_at),
        (pb.expire_time, result.expires_at),
    ):
        if value is not None:
            field.FromDatetime(value)
    return pb
