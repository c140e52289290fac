"""gRPC face of the turn store.

Errors are raised, not aborted: a bad request as `chatterbot.status.InvalidArgument`, Redis's own errors as
they come, which `context_svc.errors.redis_status` (registered by `context_svc.main`) turns into status.
"""

from __future__ import annotations

import logging
import time

import grpc
import redis.exceptions
from google.protobuf.timestamp_pb2 import Timestamp

from chatterbot import wire
from chatterbot.breaker import CircuitOpenError
from chatterbot.status import InvalidArgument
from chatterbot.v1 import context_pb2, context_pb2_grpc
from context_svc.turns import Turn, TurnStore, fit_budget

log = logging.getLogger(__name__)


def _check_scope(user_id: str, conversation_id: str) -> None:
    """The ids every call is scoped by; raises InvalidArgument."""
    if not user_id:
        raise InvalidArgument("user_id is required")
    if not conversation_id:
        raise InvalidArgument("conversation_id is required")
    if len(user_id) > wire.USER_ID_MAX:
        raise InvalidArgument("user_id or conversation_id is too long")
    if not wire.is_conversation_id(conversation_id):
        raise InvalidArgument(f"conversation_id must be {wire.CONVERSATION_ID_RULE}")


def _to_proto(turn: Turn) -> context_pb2.Turn:
    created = Timestamp()
    created.FromNanoseconds(int(turn.created_at * 1e9))
    return context_pb2.Turn(
        role=wire.role_value(turn.role),
        content=turn.content,
        token_count=turn.token_count,
        create_time=created,
        request_id=turn.request_id,
    )


class ContextServicer(context_pb2_grpc.ContextServiceServicer):
    def __init__(self, turns: TurnStore, default_budget: int) -> None:
        self.turns = turns
        self.default_budget = default_budget

    async def GetContext(
        self, request: context_pb2.GetContextRequest, context: grpc.aio.ServicerContext
    ) -> context_pb2.GetContextResponse:
        _check_scope(request.user_id, request.conversation_id)
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

    async def AppendTurns(
        self, request: context_pb2.AppendTurnsRequest, context: grpc.aio.ServicerContext
    ) -> context_pb2.AppendTurnsResponse:
        _check_scope(request.user_id, request.conversation_id)
        if not request.turns:
            raise InvalidArgument("turns must not be empty")
        # Stamped on arrival, before waiting for the conversation's lock: turns are kept in arrival order.
        now = time.time()
        turns = []
        for i, t in enumerate(request.turns):
            if t.role not in wire.ROLE_NAMES:
                raise InvalidArgument(f"turns[{i}].role must be set")
            created = t.create_time.ToNanoseconds() / 1e9 if t.HasField("create_time") else now
            turns.append(Turn(wire.role_name(t.role), t.content, t.token_count, created, t.request_id))
        kept = await self.turns.append(
            request.user_id, request.conversation_id, turns, new_conversation=request.new_conversation
        )
        return context_pb2.AppendTurnsResponse(turn_count=kept)

    async def ClearContext(
        self, request: context_pb2.ClearContextRequest, context: grpc.aio.ServicerContext
    ) -> context_pb2.ClearContextResponse:
        _check_scope(request.user_id, request.conversation_id)
        await self.turns.clear(request.user_id, request.conversation_id)
        return context_pb2.ClearContextResponse()
