"""The dead-letter stream: jobs that failed their last try, listed and replayed by `chatterbot dlq`."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from chatterbot.jetstream import DLQ_STREAM, DLQ_SUBJECT_PREFIX, PRIORITIES, Job


@dataclass(frozen=True)
class DeadLetter:
    correlation_id: str
    priority: str
    user_id: str
    error: str
    time: datetime
    seq: int


def _dead_letter(msg: Msg) -> DeadLetter:
    job = Job.decode(msg.data)
    error = (msg.headers or {}).get("Chatterbot-Error", "")
    return DeadLetter(
        job.correlation_id,
        job.priority,
        job.user_id,
        error,
        msg.metadata.timestamp,
        msg.metadata.sequence.stream,
    )


async def list_dead_letters(js: JetStreamContext) -> list[DeadLetter]:
    """Every job in the dead-letter stream, oldest first."""
    sub = await js.pull_subscribe(
        DLQ_SUBJECT_PREFIX + ">",
        stream=DLQ_STREAM,
        config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, mem_storage=True, inactive_threshold=30.0),
    )
    letters: list[DeadLetter] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except nats.errors.TimeoutError:
                break
            letters.extend(_dead_letter(m) for m in msgs)
            if msgs[-1].metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return letters


async def replay(
    js: JetStreamContext, correlation_id: str, before_publish: Callable[[Job], Awaitable[None]]
) -> Job:
    """Queue a dead-lettered job again and remove it from the dead-letter stream.

    `before_publish` marks the job's result pending again: workers skip jobs whose result is final, so it
    must happen before the job is back in the queue."""
    try:
        stored = await js.get_last_msg(DLQ_STREAM, DLQ_SUBJECT_PREFIX + correlation_id)
    except nats.js.errors.NotFoundError:
        raise LookupError(correlation_id) from None
    data, seq = stored.data or b"", stored.seq or 0
    job = Job.decode(data)
    await before_publish(job)
    # A fresh message id: the original one may still be inside the jobs stream's duplicate window.
    await js.publish(
        PRIORITIES[job.priority][0], data, headers={"Nats-Msg-Id": f"{correlation_id}:replay:{seq}"}
    )
    await js.delete_msg(DLQ_STREAM, seq)
    return job
