"""StoreService over gRPC: translates protobuf to repository calls and back.

Errors are raised, not aborted: the store's own are `chatterbot.status` errors, and asyncpg's become status
through `store_svc.errors.database_status`, which `store_svc.main` registers with the shared interceptor.
"""

from __future__ import annotations

import grpc

from chatterbot import wire
from chatterbot.api_keys import kind_from_pb, record_to_pb
from chatterbot.status import InvalidArgument
from chatterbot.v1 import store_pb2, store_pb2_grpc, types_pb2
from store_svc.keys import ApiKeyRepository
from store_svc.repository import (
    Conversation,
    JobResult,
    Message,
    StoreRepository,
    ToolCall,
    ToolResult,
    User,
)


class StoreServicer(store_pb2_grpc.StoreServiceServicer):
    """The gRPC face of `StoreRepository`; all the logic lives there."""

    def __init__(self, repo: StoreRepository, keys: ApiKeyRepository | None = None) -> None:
        self.repo = repo
        self.keys = keys or ApiKeyRepository.on_control_shard(repo.shards)

    async def EnsureUser(
        self, request: store_pb2.EnsureUserRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.EnsureUserResponse:
        user, created = await self.repo.ensure_user(request.user_id)
        return store_pb2.EnsureUserResponse(user=_user_pb(user), created=created)

    async def GetUser(
        self, request: store_pb2.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.GetUserResponse:
        return store_pb2.GetUserResponse(user=_user_pb(await self.repo.get_user(request.user_id)))

    async def CreateConversation(
        self, request: store_pb2.StoreServiceCreateConversationRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.StoreServiceCreateConversationResponse:
        conversation = await self.repo.create_conversation(
            request.user_id, title=request.title, conversation_id=request.conversation_id
        )
        return store_pb2.StoreServiceCreateConversationResponse(conversation=_conversation_pb(conversation))

    async def GetConversation(
        self, request: store_pb2.GetConversationRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.GetConversationResponse:
        conversation = await self.repo.get_conversation(request.user_id, request.conversation_id)
        return store_pb2.GetConversationResponse(conversation=_conversation_pb(conversation))

    async def ListConversations(
        self, request: store_pb2.StoreServiceListConversationsRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.StoreServiceListConversationsResponse:
        page = await self.repo.list_conversations(request.user_id, request.page_size, request.page_token)
        return store_pb2.StoreServiceListConversationsResponse(
            conversations=[_conversation_pb(c) for c in page.conversations],
            next_page_token=page.next_page_token,
        )

    async def RenameConversation(
        self, request: store_pb2.StoreServiceRenameConversationRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.StoreServiceRenameConversationResponse:
        conversation = await self.repo.rename_conversation(
            request.user_id, request.conversation_id, request.title
        )
        return store_pb2.StoreServiceRenameConversationResponse(conversation=_conversation_pb(conversation))

    async def DeleteConversation(
        self, request: store_pb2.StoreServiceDeleteConversationRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.StoreServiceDeleteConversationResponse:
        deleted = await self.repo.delete_conversation(request.user_id, request.conversation_id)
        return store_pb2.StoreServiceDeleteConversationResponse(message_count=deleted)

    async def ListMessages(
        self, request: store_pb2.StoreServiceListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.StoreServiceListMessagesResponse:
        page = await self.repo.list_messages(
            request.user_id, request.conversation_id, request.page_size, request.before_message_id
        )
        return store_pb2.StoreServiceListMessagesResponse(
            messages=[_message_pb(m) for m in page.messages],
            next_before_message_id=page.next_before_message_id,
        )

    async def AppendExchange(
        self, request: store_pb2.AppendExchangeRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.AppendExchangeResponse:
        _check_tool_fields(request)
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
            continues_digest=request.continues_digest,
            head_digest=request.head_digest,
            tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in request.assistant_message.tool_calls],
            tool_results=[ToolResult(m.tool_call_id, m.content, m.token_count) for m in request.tool_results],
        )
        response = store_pb2.AppendExchangeResponse(
            conversation=_conversation_pb(exchange.conversation),
            assistant_message=_message_pb(exchange.assistant_message),
            created=exchange.created,
            tool_results=[_message_pb(m) for m in exchange.tool_results],
        )
        if exchange.user_message is not None:
            response.user_message.CopyFrom(_message_pb(exchange.user_message))
        return response

    async def PutJobResult(
        self, request: store_pb2.PutJobResultRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.PutJobResultResponse:
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

    async def GetJobResult(
        self, request: store_pb2.GetJobResultRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.GetJobResultResponse:
        result = await self.repo.get_job_result(request.user_id, request.correlation_id)
        return store_pb2.GetJobResultResponse(result=_job_result_pb(result))

    # --- API keys, on the control shard; all but GetApiKey answer admin keys only (store_svc.auth) ---

    async def CreateApiKey(
        self, request: store_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.CreateApiKeyResponse:
        record = await self.keys.create(
            request.key_hash,
            request.prefix,
            kind_from_pb(request.kind),  # an unknown kind is INVALID_ARGUMENT
            user_id=request.user_id,
            name=request.name,
            requests_per_minute=request.requests_per_minute,
            tokens_per_minute=request.tokens_per_minute,
            route_limits=tuple((r.route, r.limit) for r in request.route_limits),
        )
        return store_pb2.CreateApiKeyResponse(api_key=record_to_pb(record))

    async def GetApiKey(
        self, request: store_pb2.GetApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.GetApiKeyResponse:
        return store_pb2.GetApiKeyResponse(
            api_key=record_to_pb(await self.keys.get_by_hash(request.key_hash))
        )

    async def ListApiKeys(
        self, request: store_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.ListApiKeysResponse:
        records = await self.keys.list_keys(request.user_id)
        return store_pb2.ListApiKeysResponse(api_keys=[record_to_pb(r) for r in records])

    async def RevokeApiKey(
        self, request: store_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.RevokeApiKeyResponse:
        record = await self.keys.revoke(request.key_id_or_prefix)
        return store_pb2.RevokeApiKeyResponse(api_key=record_to_pb(record))

    async def UpdateApiKey(
        self, request: store_pb2.UpdateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> store_pb2.UpdateApiKeyResponse:
        paths = set(request.update_mask.paths)
        unknown = paths - UPDATABLE_KEY_FIELDS
        if unknown or not paths:
            raise InvalidArgument(
                f"update_mask must name some of {', '.join(sorted(UPDATABLE_KEY_FIELDS))}"
                + (f"; not {', '.join(sorted(unknown))}" if unknown else "")
            )
        key = request.api_key
        record = await self.keys.update_limits(
            request.key_id_or_prefix,
            requests_per_minute=key.requests_per_minute if "requests_per_minute" in paths else None,
            tokens_per_minute=key.tokens_per_minute if "tokens_per_minute" in paths else None,
            route_limits=(
                tuple((r.route, r.limit) for r in key.route_limits) if "route_limits" in paths else None
            ),
        )
        return store_pb2.UpdateApiKeyResponse(api_key=record_to_pb(record))


UPDATABLE_KEY_FIELDS = frozenset({"requests_per_minute", "tokens_per_minute", "route_limits"})


def _check_tool_fields(request: store_pb2.AppendExchangeRequest) -> None:
    """Refuse the tool fields of ExchangeMessage where the exchange has no place for them."""
    if request.user_message.tool_calls or request.user_message.tool_call_id:
        raise InvalidArgument("user_message takes no tool_calls or tool_call_id")
    if request.assistant_message.tool_call_id:
        raise InvalidArgument("assistant_message takes no tool_call_id")
    if any(m.tool_calls for m in request.tool_results):
        raise InvalidArgument("tool_results take no tool_calls")


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
        role=wire.role_value(message.role),
        content=message.content,
        token_count=message.token_count,
        processing_time=message.processing_time,
        model=message.model,
        request_id=message.request_id,
        tool_calls=[
            types_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in message.tool_calls
        ],
        tool_call_id=message.tool_call_id,
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
        usage=wire.usage_pb(result.prompt_tokens, result.completion_tokens),
    )
    for field, value in (
        (pb.create_time, result.created_at),
        (pb.update_time, result.updated_at),
        (pb.expire_time, result.expires_at),
    ):
        if value is not None:
            field.FromDatetime(value)
    return pb
