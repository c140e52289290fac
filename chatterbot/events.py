"""Token events of queued chats: published by workers, watched by SSE clients and WatchChat callers.

One process holds ONE core-NATS subscription to every job's events and fans them out to its local watchers
by correlation id. A watcher that starts late or resumes (Last-Event-ID) first reads the retained events of
its job once, from CHAT_EVENTS, then continues on the live fan-out; no JetStream consumer lives per client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import api

from chatterbot.jetstream import EVENTS_STREAM, EVENTS_SUBJECT_PREFIX, events_subject

log = logging.getLogger(__name__)

REPLAY_BATCH = 256


def is_final(event: dict) -> bool:
    return bool(event.get("done") or event.get("error"))


class EventFanout:
    """Live events of every job, handed to the local watchers of each correlation id."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self._watchers: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self._sub = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(EVENTS_SUBJECT_PREFIX + ">", cb=self._on_event)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    async def _on_event(self, msg) -> None:
        watchers = self._watchers.get(msg.subject[len(EVENTS_SUBJECT_PREFIX):])
        if not watchers:
            return
        event = orjson.loads(msg.data)
        for queue in watchers:
            queue.put_nowait(event)

    async def watch(self, correlation_id: str, after_seq: int = 0) -> AsyncIterator[dict]:
        """Events with seq > after_seq, retained ones first, until the final one (done or error)."""
        queue: asyncio.Queue = asyncio.Queue()
        # Subscribe before replaying, so nothing published during the replay falls between the two.
        self._watchers[correlation_id].add(queue)
        try:
            last = after_seq
            async for event in self.replay(correlation_id, after_seq):
                last = event["seq"]
                yield event
                if is_final(event):
                    return
            while True:
                event = await queue.get()
                if event["seq"] <= last:
                    continue  # already sent by the replay
                last = event["seq"]
                yield event
                if is_final(event):
                    return
        finally:
            watchers = self._watchers[correlation_id]
            watchers.discard(queue)
            if not watchers:
                del self._watchers[correlation_id]

    async def replay(self, correlation_id: str, after_seq: int = 0) -> AsyncIterator[dict]:
        """The retained events of one job with seq > after_seq, read once through a short-lived consumer."""
        subject = events_subject(correlation_id)
        try:
            await self.js.get_last_msg(EVENTS_STREAM, subject)
        except nats.js.errors.NotFoundError:
            return  # nothing retained (not started yet, or expired)
        sub = await self.js.pull_subscribe(
            subject,
            stream=EVENTS_STREAM,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.NONE,
                inactive_threshold=30.0,
                mem_storage=True,
            ),
        )
        try:
            while True:
                try:
                    msgs = await sub.fetch(REPLAY_BATCH, timeout=1.0)
                except nats.errors.TimeoutError:
                    return
                for msg in msgs:
                    event = orjson.loads(msg.data)
                    if event["seq"] > after_seq:
                        yield event
                if msgs[-1].metadata.num_pending == 0:
                    return
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


async def last_event_seq(js, correlation_id: str) -> int:
    """The seq of the newest retained event of a job, 0 when there is none."""
    try:
        msg = await js.get_last_msg(EVENTS_STREAM, events_subject(correlation_id))
    except nats.js.errors.NotFoundError:
        return 0
    return int(orjson.loads(msg.data)["seq"])
