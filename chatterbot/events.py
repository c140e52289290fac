"""Token events of queued chats: published by workers, watched by SSE clients and WatchChat callers.

One process holds ONE core-NATS subscription to every job's events and fans them out to its local watchers
by correlation id. A watcher that starts late or resumes (Last-Event-ID) first reads the retained events of
its job once, from CHAT_EVENTS, then continues on the live fan-out; no JetStream consumer lives per client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncGenerator
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from chatterbot.jetstream import EVENTS_STREAM, EVENTS_SUBJECT_PREFIX, JobEvent, events_subject

log = logging.getLogger(__name__)

REPLAY_BATCH = 256


# Handed to every watcher when the process drains: its stream ends, and its client resumes elsewhere.
_DRAIN = object()


class _Mailbox:
    """One watcher's pending events: a list and at most one waiting reader (an asyncio.Queue costs several
    times the memory, and an edge holds ten thousand of these)."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        # JobEvents, None for a keep-alive tick, or _DRAIN.
        self.items: list[Any] = []
        self.waiter: asyncio.Future[None] | None = None

    def put(self, item: Any) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> Any:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.pop(0)


class EventFanout:
    """Live events of every job, handed to the local watchers of each correlation id.

    Every `keepalive_seconds` one timer hands every live watcher a None, which `watch(keepalive=True)` passes
    on (an SSE stream sends a keep-alive comment for it): idle streams need no timer of their own. `drain()`
    ends every watch at once.
    """

    def __init__(self, nc: NATS, keepalive_seconds: float = 15.0) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.jsm = nc.jsm()
        self.keepalive_seconds = keepalive_seconds
        self._watchers: dict[str, set[_Mailbox]] = defaultdict(set)
        self._sub: Subscription | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(EVENTS_SUBJECT_PREFIX + ">", cb=self._on_event)
        self._ticker = asyncio.create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_seconds)
            self._hand_everyone(None)

    def _hand_everyone(self, item: Any) -> None:
        for watchers in list(self._watchers.values()):
            for mailbox in watchers:
                mailbox.put(item)

    def drain(self) -> None:
        """End every watch now (the process is shutting down; watchers resume elsewhere)."""
        self._hand_everyone(_DRAIN)

    async def _on_event(self, msg: Msg) -> None:
        watchers = self._watchers.get(msg.subject[len(EVENTS_SUBJECT_PREFIX) :])
        if not watchers:
            return
        event = JobEvent.decode(msg.data)
        for mailbox in watchers:
            mailbox.put(event)

    async def watch(
        self, correlation_id: str, after_seq: int = 0, *, keepalive: bool = False
    ) -> AsyncGenerator[JobEvent | None, None]:
        """Events with seq > after_seq, retained ones first, until the final one (done or error); with
        `keepalive`, also a None every `keepalive_seconds` while the job is live. Ends early on `drain()`."""
        mailbox = _Mailbox()
        # Subscribe before replaying, so nothing published during the replay falls between the two.
        self._watchers[correlation_id].add(mailbox)
        try:
            last = after_seq
            # Closed as soon as it is read (or left), so that its JetStream consumer goes at once.
            async with contextlib.aclosing(self.replay(correlation_id, after_seq)) as retained:
                async for event in retained:
                    last = event.seq
                    yield event
                    if event.final:
                        return
            while True:
                event = await mailbox.get()
                if event is _DRAIN:
                    return
                if event is None:
                    if keepalive:
                        yield None
                    continue
                if event.seq <= last:
                    continue  # already sent by the replay
                last = event.seq
                yield event
                if event.final:
                    return
        finally:
            watchers = self._watchers[correlation_id]
            watchers.discard(mailbox)
            if not watchers:
                del self._watchers[correlation_id]

    async def replay(self, correlation_id: str, after_seq: int = 0) -> AsyncGenerator[JobEvent, None]:
        """The retained events of one job with seq > after_seq, read once through a short-lived consumer."""
        subject = events_subject(correlation_id)
        try:
            await self.js.get_last_msg(EVENTS_STREAM, subject)
        except nats.js.errors.NotFoundError:
            return  # nothing retained (not started yet, or expired)
        # Named here so that it can be deleted at once after the replay: NATS caps the consumers of a stream
        # (1,000 by default), and one left for its inactivity timeout would hold a place for 30 s per viewer.
        name = "replay-" + uuid.uuid4().hex
        await self.jsm.add_consumer(
            EVENTS_STREAM,
            api.ConsumerConfig(
                name=name,
                filter_subject=subject,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.NONE,
                inactive_threshold=30.0,  # a backstop, should the delete below not happen
                mem_storage=True,
            ),
        )
        sub = await self.js.pull_subscribe_bind(consumer=name, stream=EVENTS_STREAM)
        try:
            while True:
                try:
                    msgs = await sub.fetch(REPLAY_BATCH, timeout=1.0)
                except nats.errors.TimeoutError:
                    return
                for msg in msgs:
                    event = JobEvent.decode(msg.data)
                    if event.seq > after_seq:
                        yield event
                if msgs[-1].metadata.num_pending == 0:
                    return
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self.jsm.delete_consumer(EVENTS_STREAM, name)


async def last_event(js: JetStreamContext, correlation_id: str) -> JobEvent | None:
    """The newest retained event of a job, None when there is none."""
    try:
        msg = await js.get_last_msg(EVENTS_STREAM, events_subject(correlation_id))
    except nats.js.errors.NotFoundError:
        return None
    return JobEvent.decode(msg.data) if msg.data else None


async def last_event_seq(js: JetStreamContext, correlation_id: str) -> int:
    """The seq of the newest retained event of a job, 0 when there is none."""
    event = await last_event(js, correlation_id)
    return event.seq if event is not None else 0
