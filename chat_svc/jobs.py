"""Queued chats: submit a turn to JetStream, read its result, cancel it.

A correlation id routes itself: it carries the user id (base64url) after a random part, so
`/check-response/{id}` finds the user's shard without any other lookup, and a repeated client request id
maps to the same correlation id (JetStream drops the duplicate publish).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from chat_svc.turn import TurnInput
from chatterbot.events import last_event_seq
from chatterbot.jetstream import PRIORITIES, Job, JobEvent, cancel_subject, events_subject
from chatterbot.status import NotFound
from chatterbot.tracing import publishing
from chatterbot.v1 import store_pb2, types_pb2

if TYPE_CHECKING:
    from chat_svc.clients import StoreClient

PRIORITY_NAMES: dict[types_pb2.JobPriority, str] = {
    types_pb2.JOB_PRIORITY_UNSPECIFIED: "interactive",
    types_pb2.JOB_PRIORITY_STREAMING: "streaming",
    types_pb2.JOB_PRIORITY_INTERACTIVE: "interactive",
    types_pb2.JOB_PRIORITY_BATCH: "batch",
}
TERMINAL: tuple[types_pb2.JobStatus, ...] = (
    types_pb2.JOB_STATUS_SUCCEEDED,
    types_pb2.JOB_STATUS_FAILED,
    types_pb2.JOB_STATUS_CANCELLED,
)


class BadCorrelationId(NotFound, ValueError):
    """Not a correlation id this service issued: answered like an unknown one."""

    def __init__(self) -> None:
        super().__init__("unknown correlation id")


def new_correlation_id(user_id: str, request_id: str = "") -> str:
    head = (
        hashlib.sha256(f"{user_id}\0{request_id}".encode()).hexdigest()[:32]
        if request_id
        else uuid.uuid4().hex
    )
    return f"{head}.{base64.urlsafe_b64encode(user_id.encode()).decode().rstrip('=')}"


def user_of(correlation_id: str) -> str:
    """The user id a correlation id was issued for."""
    head, _, tail = correlation_id.partition(".")
    if len(head) != 32 or not tail:
        raise BadCorrelationId
    try:
        return base64.urlsafe_b64decode(tail + "=" * (-len(tail) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise BadCorrelationId from exc


@dataclass
class JobDeps:
    js: JetStreamContext
    nc: NATS
    store: StoreClient
    result_ttl_seconds: int


async def put_result(
    deps: JobDeps, correlation_id: str, user_id: str, status: types_pb2.JobStatus, **fields: Any
) -> None:
    """Record the job's result row (store_pb2.JobResult fields) with the configured TTL."""
    result = store_pb2.JobResult(correlation_id=correlation_id, user_id=user_id, status=status, **fields)
    await deps.store.call(
        deps.store.stub.PutJobResult,
        store_pb2.PutJobResultRequest(result=result, ttl_seconds=deps.result_ttl_seconds),
    )


async def submit(deps: JobDeps, turn: TurnInput, priority: types_pb2.JobPriority) -> str:
    """Record the job as pending, then publish it; returns the correlation id."""
    correlation_id = new_correlation_id(turn.user_id, turn.request_id)
    job = Job.of(
        turn,
        correlation_id=correlation_id,
        priority=PRIORITY_NAMES.get(priority, "interactive"),
        # Fixed now, so a retried job stays in one conversation.
        conversation_id=turn.conversation_id or uuid.uuid4().hex,
    )
    existing = await find_result(deps, correlation_id, turn.user_id)
    if existing is None:
        await put_result(
            deps,
            correlation_id,
            turn.user_id,
            types_pb2.JOB_STATUS_PENDING,
            conversation_id=job.conversation_id,
        )
    subject = PRIORITIES[job.priority][0]
    headers = {"Nats-Msg-Id": correlation_id}
    # The worker's span for the job continues this request's trace from these headers.
    with publishing(subject, headers, correlation_id):
        await deps.js.publish(subject, job.encode(), headers=headers)
    return correlation_id


async def get_result(deps: JobDeps, correlation_id: str, user_id: str = "") -> store_pb2.JobResult:
    """The job's result row; NOT_FOUND (from the store) when there is none."""
    response: store_pb2.GetJobResultResponse = await deps.store.call(
        deps.store.stub.GetJobResult,
        store_pb2.GetJobResultRequest(
            user_id=user_id or user_of(correlation_id), correlation_id=correlation_id
        ),
    )
    return response.result


async def find_result(deps: JobDeps, correlation_id: str, user_id: str = "") -> store_pb2.JobResult | None:
    """The job's result row, None when there is none."""
    try:
        return await get_result(deps, correlation_id, user_id)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def publish_event(js: JetStreamContext, correlation_id: str, event: JobEvent) -> None:
    """Publish one event of a job; deduplicated on (job, seq) so a retried publish is stored once."""
    await js.publish(
        events_subject(correlation_id),
        event.encode(),
        headers={"Nats-Msg-Id": f"{correlation_id}:{event.seq}"},
    )


async def cancel(deps: JobDeps, correlation_id: str, user_id: str) -> types_pb2.JobStatus:
    """Cancel a job: its worker stops generating, watchers get a final error event. Returns the status."""
    result = await get_result(deps, correlation_id, user_id)
    if result.status in TERMINAL:
        return result.status
    await put_result(
        deps,
        correlation_id,
        result.user_id,
        types_pb2.JOB_STATUS_CANCELLED,
        conversation_id=result.conversation_id,
        error="cancelled",
    )
    await deps.nc.publish(cancel_subject(correlation_id), b"")
    if result.status == types_pb2.JOB_STATUS_PENDING:
        # No worker has it yet: end the event stream here; the worker that dequeues it will skip it.
        seq = await last_event_seq(deps.js, correlation_id) + 1
        await publish_event(deps.js, correlation_id, JobEvent(seq, error="cancelled"))
    return types_pb2.JOB_STATUS_CANCELLED
