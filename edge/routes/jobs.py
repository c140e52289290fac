"""Queued chats (the seed API's asynchronous half): submit, poll, stream over SSE with resume, cancel."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import nats.errors
import nats.js.errors
import orjson
from fastapi import APIRouter, Depends, Header, Request

from chatterbot.api_keys import API_KEY_METADATA
from chatterbot.breaker import CircuitOpenError
from chatterbot.jetstream import DLQ_STREAM, EVENTS_STREAM, JOBS_STREAM, PRIORITIES
from chatterbot.v1 import chat_pb2, types_pb2
from edge.auth import Caller, authorize_turn, require_admin, require_key
from edge.problems import ProblemError, problem_for_downstream
from edge.protocol import (
    AsyncChatAccepted,
    ChatRequest,
    CheckResponseDone,
    CheckResponseFailed,
    CheckResponsePending,
    Problem,
    QueueStats,
    StreamChatAccepted,
)
from edge.routes.chat import _ERRORS, to_chat_turn
from edge.sse import EventStreamResponse

router = APIRouter(tags=["queued chats"])
_NOT_FOUND = {404: {"model": Problem, "description": "Unknown correlation id"}}


def _metadata(caller: Caller) -> tuple:
    return ((API_KEY_METADATA, caller.key),)


async def _call(request: Request, method: str, message, caller: Caller):
    chat = request.app.state.chat
    try:
        return await chat.call(getattr(chat.stub, method), message, metadata=_metadata(caller))
    except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
        raise problem_for_downstream(exc) from None


async def _submit(body: ChatRequest, request: Request, caller: Caller, priority: int) -> str:
    turn = to_chat_turn(body, request.app.state.settings.max_message_chars)
    await authorize_turn(request, caller, body.user_id, body.max_tokens)
    reply = await _call(
        request, "SubmitChat", chat_pb2.SubmitChatRequest(turn=turn, priority=priority), caller
    )
    return reply.correlation_id


@router.post("/async-chat", response_model=AsyncChatAccepted, status_code=200, responses=_ERRORS)
async def async_chat(body: ChatRequest, request: Request, caller: Caller = Depends(require_key)):
    """Queue a turn; poll `check_endpoint` for the answer."""
    cid = await _submit(body, request, caller, types_pb2.JOB_PRIORITY_INTERACTIVE)
    return AsyncChatAccepted(
        status="processing",
        message="Your request is being processed",
        correlation_id=cid,
        check_endpoint=f"/check-response/{cid}",
    )


@router.post("/stream-chat", response_model=StreamChatAccepted, responses=_ERRORS)
async def stream_chat(body: ChatRequest, request: Request, caller: Caller = Depends(require_key)):
    """Queue a turn at streaming priority; read its tokens from `stream_endpoint`."""
    cid = await _submit(body, request, caller, types_pb2.JOB_PRIORITY_STREAMING)
    return StreamChatAccepted(
        status="streaming", message="Stream is ready", correlation_id=cid, stream_endpoint=f"/stream/{cid}"
    )


@router.get(
    "/check-response/{correlation_id}",
    response_model=CheckResponseDone | CheckResponsePending | CheckResponseFailed,
    responses={**_ERRORS, **_NOT_FOUND},
)
async def check_response(correlation_id: str, request: Request, caller: Caller = Depends(require_key)):
    """The answer when done; `pending` while queued or running; `failed` after the last try."""
    r = await _call(
        request, "GetChatResult", chat_pb2.GetChatResultRequest(correlation_id=correlation_id), caller
    )
    if r.status == types_pb2.JOB_STATUS_SUCCEEDED:
        return CheckResponseDone(
            response=r.response, conversation_id=r.conversation_id, processing_time=r.processing_time
        )
    if r.status in (types_pb2.JOB_STATUS_FAILED, types_pb2.JOB_STATUS_CANCELLED):
        return CheckResponseFailed(status="failed", correlation_id=correlation_id, error=r.error or "failed")
    return CheckResponsePending(
        status="pending", correlation_id=correlation_id, message="Your request is still being processed"
    )


def _sse(event: dict) -> dict:
    """A job event as an SSE event: the seed's {token, done} body, plus details on the last one."""
    if event.get("error"):
        return {
            "id": str(event["seq"]),
            "event": "error",
            "data": orjson.dumps({"error": event["error"], "done": True}).decode(),
        }
    body = {"token": event.get("token", ""), "done": bool(event.get("done"))}
    if event.get("restart"):
        body["restart"] = True
    for key in ("conversation_id", "finish_reason", "usage", "processing_time"):
        if key in event:
            body[key] = event[key]
    return {"id": str(event["seq"]), "data": orjson.dumps(body).decode()}


@router.get(
    "/stream/{correlation_id}",
    responses={
        **_ERRORS,
        **_NOT_FOUND,
        200: {"content": {"text/event-stream": {}}, "description": "data: {token, done} events, then [DONE]"},
    },
)
async def stream(
    correlation_id: str,
    request: Request,
    caller: Caller = Depends(require_key),
    last_event_id: str | None = Header(None, description="Resume after this event id"),
):
    """Token events of a queued turn. Reconnect with `Last-Event-ID` to continue after the last event seen;
    a finished job is replayed whole while its events are retained."""
    result = await _call(
        request, "GetChatResult", chat_pb2.GetChatResultRequest(correlation_id=correlation_id), caller
    )
    try:
        after = int(last_event_id) if last_event_id else 0
    except ValueError:
        raise ProblemError(422, "Last-Event-ID must be an event id of this stream") from None
    fanout = request.app.state.fanout

    async def events() -> AsyncIterator[dict | None]:
        seen = after
        async with contextlib.aclosing(fanout.watch(correlation_id, after, keepalive=True)) as watched:
            async for event in watched:
                if event is None:
                    yield None  # keep-alive
                    continue
                seen = event["seq"]
                yield _sse(event)
                if event.get("done"):
                    yield {"id": str(seen + 1), "data": "[DONE]"}
                    return
                if event.get("error"):
                    return
        if seen == after and result.status == types_pb2.JOB_STATUS_SUCCEEDED:
            # Finished and no longer retained: the stored answer, whole.
            yield _sse({"seq": after + 1, "token": result.response})
            yield _sse(
                {"seq": after + 2, "token": "", "done": True, "conversation_id": result.conversation_id}
            )
            yield {"id": str(after + 3), "data": "[DONE]"}

    # Draining, the edge ends these streams at once (EventFanout.drain): the client resumes on another replica
    # with Last-Event-ID.
    return EventStreamResponse(events())


@router.delete("/stream/{correlation_id}", responses={**_ERRORS, **_NOT_FOUND})
async def cancel_stream(correlation_id: str, request: Request, caller: Caller = Depends(require_key)):
    """Cancel a queued turn and its generation."""
    r = await _call(request, "CancelChat", chat_pb2.CancelChatRequest(correlation_id=correlation_id), caller)
    return {
        "status": types_pb2.JobStatus.Name(r.status).removeprefix("JOB_STATUS_").lower(),
        "correlation_id": correlation_id,
    }


@router.get("/debug/queue-stats", response_model=QueueStats, responses={**_ERRORS})
async def queue_stats(request: Request, caller: Caller = Depends(require_admin)):
    """The seed's queue view mapped onto JetStream (see README), with the consumers' own figures."""
    js = request.app.state.nc.jetstream()
    try:
        consumers = {}
        for priority, (_, durable) in PRIORITIES.items():
            info = await js.consumer_info(JOBS_STREAM, durable)
            consumers[priority] = {
                "pending": info.num_pending,
                "ack_pending": info.num_ack_pending,
                "redelivered": info.num_redelivered,
                "waiting_pulls": info.num_waiting,
            }
        events = await js.stream_info(EVENTS_STREAM)
        dlq = await js.stream_info(DLQ_STREAM)
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
        raise ProblemError(503, f"NATS unavailable: {type(exc).__name__}", {"Retry-After": "1"}) from None

    def queue(*priorities: str) -> dict:
        return {
            "message_count": sum(consumers[p]["pending"] + consumers[p]["ack_pending"] for p in priorities),
            "consumer_count": sum(consumers[p]["waiting_pulls"] for p in priorities),
        }

    return QueueStats(
        chat_queue=queue("streaming", "interactive"),
        response_queue={
            "message_count": events.state.messages,
            "consumer_count": events.state.consumer_count,
        },
        batch_queue=queue("batch"),
        jetstream={
            "consumers": consumers,
            "events_retained": events.state.messages,
            "dlq_size": dlq.state.messages,
        },
    )
