"""gRPC face of the turn store."""

from __future__ import annotations

import functools
import logging
import time

import grpc
import redis.exceptions
from google.protobuf.timestamp_pb2 import Timestamp

from chatterbot.breaker import CircuitOpenError
from chatterbot.guarded_client import dependency_unavailable_metadata
from chatterbot.v1 import context_pb2, context_pb2_grpc, types_pb2
from context_svc.turns import Turn, TurnStore, fit_budget

_ROLE_NAMES = {
    types_pb2.ROLE_SYSTEM: "system",
    types_pb2.ROLE_USER: "user",
    types_pb2.ROLE_ASSISTANT: "assistant",
}
_ROLE_VALUES = {name: value for value, name in _ROLE_NAMES.items()}
log = logging.getLogger(__name__)


def _redis_unavailable(handler):
    """Redis down or timing out is UNAVAILABLE (callers answer without context), not UNKNOWN."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except redis.exceptions.LockError as exc:
            # Another turn of the conversation holds it for too long; the conversation is busy, Redis is not.
            log.warning("context lock not acquired", extra={"method": handler.__name__, "error": repr(exc)})
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "conversation context is busy; retry",
                trailing_metadata=dependency_unavailable_metadata("context-lock", 1.0),
            )
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            log.warning("redis unavailable", extra={"method": handler.__name__, "error": repr(exc)})
            await context.abort(grpc.StatusCode.UNAVAILABLE, "context cache unavailable")

    return wrapper


def _check_scope(user_id: str, conversation_id: str) -> str | None:
    if not user_id:
        return "user_id is required"
    if not conversation_id:
        return "conversation_id is required"
    if len(user_id) > 50 or len(conversation_id) > 64:
        return "user_id or conversation_id is too long"
    return None


def _to_proto(turn: Turn) -> context_pb2.Turn:
    created = Timestamp()
    created.FromNanoseconds(int(turn.created_at * 1e9))
    return context_pb2.Turn(
        role=_ROLE_VALUES[turn.role],
        content=turn.content,
        token_count=turn.token_count,
        create_time=created,
        request_id=turn.request_id,
    )


class ContextServicer(context_pb2_grpc.ContextServiceServicer):
    def __init__(self, turns: TurnStore, default_budget: int) -> None:
        self.turns = turns
        self.default_budget = default_budget

    @_redis_unavailable
    async def GetContext(self, request, context):
        if problem := _check_scope(request.user_id, request.conversation_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            found = await self.turns.read(request.user_id, request.conversation_id)
        except (CircuitOpenError, grpc.aio.AioRpcError, redis.exceptions.LockError) as exc:
            # A miss that history cannot fill now: the turn is answered without earlier context.
            log.warning(
                "context not rebuilt", extra={"conversation_id": request.conversation_id, "error": repr(exc)}
            )
            found = None
        if found is None:
            return context_pb2.GetContextResponse(source=context_pb2.CONTEXT_SOURCE_EMPTY)
        turns, rebuilt = found
        fitted = fit_budget(turns, request.token_budget or self.default_budget)
        return context_pb2.GetContextResponse(
            turns=[_to_proto(t) for t in fitted.turns],
            token_count=fitted.token_count,
            truncated=fitted.truncated,
            source=context_pb2.CONTEXT_SOURCE_STORE if rebuilt else context_pb2.CONTEXT_SOURCE_CACHE,
        )

    @_redis_unavailable
    async def AppendTurns(self, request, context):
        if problem := _check_scope(request.user_id, request.conversation_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if not request.turns:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "turns must not be empty")
        # Stamped on arrival, before waiting for the conversation's lock: turns are kept in arrival order.
        now = time.time()
        turns = []
        for i, t in enumerate(request.turns):
            if t.role not in _ROLE_NAMES:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"turns[{i}].role must be set")
            created = t.create_time.ToNanoseconds() / 1e9 if t.HasField("create_time") else now
            turns.append(Turn(_ROLE_NAMES[t.role], t.content, t.token_count, created, t.request_id))
        kept = await self.turns.append(
            request.user_id, request.conversation_id, turns, new_conversation=request.new_conversation
        )
        return context_pb2.AppendTurnsResponse(turn_count=kept)

    @_redis_unavailable
    async def ClearContext(self, request, context):
        if problem := _check_scope(request.user_id, request.conversation_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        await self.turns.clear(request.user_id, request.conversation_id)
        return context_pb2.ClearContextResponse()
