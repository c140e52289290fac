"""Queued chats (the seed API's asynchronous half): submit, poll, stream over SSE with resume, cancel."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.responses import Response

from chatterbot import wire
from chatterbot.events import EventFanout
from chatterbot.jetstream import DLQ_STREAM, EVENTS_STREAM, JOBS_STREAM, PRIORITIES, JobEvent
from chatterbot.logs import correlation_id as log_correlation_id
from chatterbot.v1 import chat_pb2, types_pb2
from edge.auth import Caller, authorize_turn, require_admin, require_key
from edge.browser_protocol import StreamTicket
from edge.chat_client import ChatClient, chat_client, metadata
from edge.idempotency import RESPONSES as IDEMPOTENCY_RESPONSES
from edge.idempotency import Claim, Stored, idempotency_key, keyed, openapi_parameter, run_once
from edge.middleware import StreamMeter
from edge.problems import ProblemError, downstream
from edge.protocol import (
    AsyncChatAccepted,
    ChatRequest,
    CheckResponseDone,
    CheckResponseFailed,
    CheckResponsePending,
    ConsumerStats,
    JetStreamStats,
    JobStreamError,
    Problem,
    QueueCounts,
    QueueStats,
    StreamCancelled,
    StreamChatAccepted,
    StreamEvent,
)
from edge.responses import ModelResponse
from edge.routes.chat import ERRORS, to_chat_turn, token_event
from edge.sse import EventStreamResponse
from edge.tickets import StreamTickets, Ticket, stream_reader

router = APIRouter(tags=["queued chats"])
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "Unknown correlation id"}
}


async def _submit(
    body: ChatRequest, request: Request, caller: Caller, client: ChatClient, priority: types_pb2.JobPriority
) -> str:
    turn = to_chat_turn(body, request.app.state.settings.max_message_chars)
    return await _send(turn, body, request, caller, client, priority)


async def _send(
    turn: chat_pb2.ChatTurn,
    body: ChatRequest,
    request: Request,
    caller: Caller,
    client: ChatClient,
    priority: types_pb2.JobPriority,
) -> str:
    await authorize_turn(request, caller, body.user_id, body.max_tokens)
    reply: chat_pb2.SubmitChatResponse = await downstream(
        client.call(
            client.stub.SubmitChat,
            chat_pb2.SubmitChatRequest(turn=turn, priority=priority),
            metadata=metadata(caller),
        )
    )
    return reply.correlation_id


async def _submit_once(
    body: ChatRequest,
    request: Request,
    caller: Caller,
    client: ChatClient,
    priority: types_pb2.JobPriority,
    route: str,
    key: str,
    accepted: Callable[[Request, Caller, str], AsyncChatAccepted | StreamChatAccepted],
) -> Response:
    """A submit with an Idempotency-Key (edge.idempotency): queued once; a retry gets the same correlation id
    (and a fresh stream ticket)."""
    turn = to_chat_turn(body, request.app.state.settings.max_message_chars)
    once = keyed(caller.principal.key_id, key, route, body)
    # chat_svc derives the correlation id from the user and the request id: a re-run gets the same one.
    turn.request_id = once.request_id
    log_correlation_id.set(once.request_id)

    async def run(claim: Claim) -> Response:
        correlation_id = await _send(turn, body, request, caller, client, priority)
        return ModelResponse(accepted(request, caller, correlation_id))

    def replay(stored: Stored) -> Response:
        if stored.status != 200:
            return stored.response()
        correlation_id = orjson.loads(stored.body)["correlation_id"]
        return ModelResponse(accepted(request, caller, correlation_id))

    return await run_once(
        request, once, run, wait_seconds=request.app.state.settings.deadline_seconds, replay=replay
    )


async def _result(client: ChatClient, caller: Caller, correlation_id: str) -> chat_pb2.GetChatResultResponse:
    return await downstream(
        client.call(
            client.stub.GetChatResult,
            chat_pb2.GetChatResultRequest(correlation_id=correlation_id),
            metadata=metadata(caller),
        )
    )


def _stream_endpoint(request: Request, caller: Caller, correlation_id: str) -> str:
    tickets: StreamTickets = request.app.state.tickets
    return tickets.endpoint(correlation_id, caller.principal.key_id)


def _async_accepted(request: Request, caller: Caller, cid: str) -> AsyncChatAccepted:
    return AsyncChatAccepted(
        status="processing",
        message="Your request is being processed",
        correlation_id=cid,
        check_endpoint=f"/check-response/{cid}",
        stream_endpoint=_stream_endpoint(request, caller, cid),
    )


def _stream_accepted(request: Request, caller: Caller, cid: str) -> StreamChatAccepted:
    return StreamChatAccepted(
        status="streaming",
        message="Stream is ready",
        correlation_id=cid,
        stream_endpoint=_stream_endpoint(request, caller, cid),
    )


@router.post(
    "/async-chat",
    response_model=AsyncChatAccepted,
    status_code=200,
    responses={**ERRORS, **IDEMPOTENCY_RESPONSES},
    openapi_extra=openapi_parameter(),
)
async def async_chat(
    body: ChatRequest,
    request: Request,
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
) -> AsyncChatAccepted | Response:
    """Queue a turn; poll `check_endpoint` for the answer, or watch it on `stream_endpoint`."""
    priority = types_pb2.JOB_PRIORITY_INTERACTIVE
    key = idempotency_key(request)
    if key is not None:
        return await _submit_once(
            body, request, caller, client, priority, "/async-chat", key, _async_accepted
        )
    cid = await _submit(body, request, caller, client, priority)
    return _async_accepted(request, caller, cid)


@router.post(
    "/stream-chat",
    response_model=StreamChatAccepted,
    responses={**ERRORS, **IDEMPOTENCY_RESPONSES},
    openapi_extra=openapi_parameter(),
)
async def stream_chat(
    body: ChatRequest,
    request: Request,
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
) -> StreamChatAccepted | Response:
    """Queue a turn at streaming priority; read its tokens from `stream_endpoint` (with a key, or as it is:
    it carries a ticket)."""
    priority = types_pb2.JOB_PRIORITY_STREAMING
    key = idempotency_key(request)
    if key is not None:
        return await _submit_once(
            body, request, caller, client, priority, "/stream-chat", key, _stream_accepted
        )
    cid = await _submit(body, request, caller, client, priority)
    return _stream_accepted(request, caller, cid)


@router.get(
    "/check-response/{correlation_id}",
    response_model=CheckResponseDone | CheckResponsePending | CheckResponseFailed,
    responses={**ERRORS, **_NOT_FOUND},
)
async def check_response(
    correlation_id: str, caller: Caller = Depends(require_key), client: ChatClient = Depends(chat_client)
) -> CheckResponseDone | CheckResponsePending | CheckResponseFailed:
    """The answer when done; `pending` while queued or running; `failed` after the last try."""
    r = await _result(client, caller, correlation_id)
    if r.status == types_pb2.JOB_STATUS_SUCCEEDED:
        return CheckResponseDone(
            response=r.response, conversation_id=r.conversation_id, processing_time=r.processing_time
        )
    if r.status in (types_pb2.JOB_STATUS_FAILED, types_pb2.JOB_STATUS_CANCELLED):
        return CheckResponseFailed(status="failed", correlation_id=correlation_id, error=r.error or "failed")
    return CheckResponsePending(
        status="pending", correlation_id=correlation_id, message="Your request is still being processed"
    )


def _sse(event: JobEvent) -> dict[str, str]:
    """A job event as an SSE event: the seed's {token, done} body, plus details on the last one."""
    seq = str(event.seq)
    if event.error:
        return {"id": seq, "event": "error", "data": JobStreamError(error=event.error).model_dump_json()}
    if not (event.done or event.restart):
        return {"id": seq, "data": token_event(event.token)}  # the hot path: a token
    # Only what the event carries is set, so that the body leaves out the rest (exclude_unset).
    details: dict[str, Any] = {"restart": True} if event.restart else {}
    if event.done:
        details.update(
            conversation_id=event.conversation_id,
            finish_reason=event.finish_reason,
            processing_time=event.processing_time,
        )
        if event.usage is not None:
            details["usage"] = wire.usage_dict(event.usage)
    body = StreamEvent(token=event.token, done=event.done, **details)
    return {"id": seq, "data": body.model_dump_json(exclude_unset=True)}


@router.get(
    "/stream/{correlation_id}",
    responses={
        **ERRORS,
        **_NOT_FOUND,
        200: {"content": {"text/event-stream": {}}, "description": "data: {token, done} events, then [DONE]"},
    },
)
async def stream(
    correlation_id: str,
    request: Request,
    reader: Caller | Ticket = Depends(stream_reader),
    client: ChatClient = Depends(chat_client),
    last_event_id: str | None = Header(None, description="Resume after this event id"),
    last_event_id_query: str | None = Query(
        None,
        alias="last_event_id",
        max_length=20,
        description="The same, for clients that cannot send headers (the header wins)",
    ),
) -> EventStreamResponse:
    """Token events of a queued turn. Reconnect with `Last-Event-ID` to continue after the last event seen;
    a finished job is replayed whole while its events are retained. Send a key, or open a `stream_endpoint`
    with its ticket as it is."""
    # A ticket was signed for this stream: the key that got it could see it, so there is nothing to ask.
    result = await _result(client, reader, correlation_id) if isinstance(reader, Caller) else None
    last_event_id = last_event_id or last_event_id_query
    try:
        after = int(last_event_id) if last_event_id else 0
    except ValueError:
        raise ProblemError(422, "Last-Event-ID must be an event id of this stream") from None
    fanout: EventFanout = request.app.state.fanout
    meter = StreamMeter(request, "/stream/{correlation_id}")

    async def events() -> AsyncIterator[dict[str, str] | None]:
        seen = after
        try:
            async with contextlib.aclosing(fanout.watch(correlation_id, after, keepalive=True)) as watched:
                async for event in watched:
                    if event is None:
                        yield None  # keep-alive
                        continue
                    seen = event.seq
                    if event.token:
                        meter.token()
                    yield _sse(event)
                    if event.done:
                        yield {"id": str(seen + 1), "data": "[DONE]"}
                        return
                    if event.error:
                        return
            if seen == after and result is not None and result.status == types_pb2.JOB_STATUS_SUCCEEDED:
                # Finished and no longer retained: the stored answer, whole.
                meter.token()
                yield _sse(JobEvent(after + 1, result.response))
                # Its end carries the conversation id alone (a done JobEvent would add the other details).
                done = StreamEvent(token="", done=True, conversation_id=result.conversation_id)
                yield {"id": str(after + 2), "data": done.model_dump_json(exclude_unset=True)}
                yield {"id": str(after + 3), "data": "[DONE]"}
        finally:
            meter.close()

    # Draining, the edge ends these streams at once (EventFanout.drain): the client resumes on another replica
    # with Last-Event-ID.
    return EventStreamResponse(events())


@router.post(
    "/stream/{correlation_id}/ticket", response_model=StreamTicket, responses={**ERRORS, **_NOT_FOUND}
)
async def stream_ticket(
    correlation_id: str,
    request: Request,
    caller: Caller = Depends(require_key),
    client: ChatClient = Depends(chat_client),
) -> StreamTicket:
    """A new ticket to a queued turn's stream, for a client that cannot send its key when it reopens it (the
    ticket handed out with the turn expires)."""
    r = await _result(client, caller, correlation_id)
    tickets: StreamTickets = request.app.state.tickets
    return StreamTicket(
        correlation_id=correlation_id,
        stream_endpoint=tickets.endpoint(correlation_id, caller.principal.key_id),
        expires_in=tickets.lifetime_seconds,
        job_status=types_pb2.JobStatus.Name(r.status).removeprefix("JOB_STATUS_").lower(),
    )


@router.delete("/stream/{correlation_id}", response_model=StreamCancelled, responses={**ERRORS, **_NOT_FOUND})
async def cancel_stream(
    correlation_id: str, caller: Caller = Depends(require_key), client: ChatClient = Depends(chat_client)
) -> StreamCancelled:
    """Cancel a queued turn and its generation."""
    r: chat_pb2.CancelChatResponse = await downstream(
        client.call(
            client.stub.CancelChat,
            chat_pb2.CancelChatRequest(correlation_id=correlation_id),
            metadata=metadata(caller),
        )
    )
    return StreamCancelled(
        status=types_pb2.JobStatus.Name(r.status).removeprefix("JOB_STATUS_").lower(),
        correlation_id=correlation_id,
    )


@router.get("/debug/queue-stats", response_model=QueueStats, responses=ERRORS)
async def queue_stats(request: Request, caller: Caller = Depends(require_admin)) -> QueueStats:
    """The seed's queue view mapped onto JetStream (see README), with the consumers' own figures."""
    js = request.app.state.nc.jetstream()
    try:
        consumers: dict[str, ConsumerStats] = {}
        for priority, (_, durable) in PRIORITIES.items():
            info = await js.consumer_info(JOBS_STREAM, durable)
            consumers[priority] = ConsumerStats(
                pending=info.num_pending,
                ack_pending=info.num_ack_pending,
                redelivered=info.num_redelivered,
                waiting_pulls=info.num_waiting,
            )
        events = await js.stream_info(EVENTS_STREAM)
        dlq = await js.stream_info(DLQ_STREAM)
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
        raise ProblemError(503, f"NATS unavailable: {type(exc).__name__}", {"Retry-After": "1"}) from None

    def queue(*priorities: str) -> QueueCounts:
        return QueueCounts(
            message_count=sum(consumers[p].pending + consumers[p].ack_pending for p in priorities),
            consumer_count=sum(consumers[p].waiting_pulls for p in priorities),
        )

    return QueueStats(
        chat_queue=queue("streaming", "interactive"),
        response_queue=QueueCounts(
            message_count=events.state.messages, consumer_count=events.state.consumer_count
        ),
        batch_queue=queue("batch"),
        jetstream=JetStreamStats(
            consumers=consumers, events_retained=events.state.messages, dlq_size=dlq.state.messages
        ),
    )
