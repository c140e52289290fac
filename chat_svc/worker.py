"""Job workers: pull queued chats from JetStream by priority, run each turn, publish its token events.

Nothing lost, nothing doubled:
- a job is acknowledged only after its answer is stored and its result recorded; a worker that dies
  mid-job leaves it unacknowledged, and JetStream redelivers it after `ack_wait` (kept alive meanwhile
  by in-progress heartbeats while the worker lives);
- the exchange is stored idempotently on the correlation id, so a redelivered job stores nothing twice;
- a retry that finds events of an earlier try publishes a restart marker first, so watchers discard the
  earlier partial text instead of seeing tokens twice;
- a job that fails its last try goes to the dead-letter stream and its result becomes `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

import grpc
import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from opentelemetry.trace import Status, StatusCode

from chat_svc.jobs import TERMINAL, JobDeps, find_result, publish_event, put_result
from chat_svc.turn import TurnDeps, TurnInput, TurnResult, stream_turn
from chatterbot import wire
from chatterbot.events import last_event, last_event_seq
from chatterbot.jetstream import (
    CANCEL_SUBJECT_PREFIX,
    DLQ_SUBJECT_PREFIX,
    JOBS_STREAM,
    PRIORITIES,
    Job,
    JobEvent,
    queued_fields,
)
from chatterbot.logs import correlation_id as log_correlation_id
from chatterbot.settings import Settings
from chatterbot.tracing import processing
from chatterbot.v1 import store_pb2, types_pb2

log = logging.getLogger(__name__)

MAX_DELIVERIES_ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{JOBS_STREAM}.*"
# An idle worker asks each priority in turn; short waits keep a new streaming job's pickup fast.
IDLE_FETCH_TIMEOUT = 0.1
# While a lower priority has jobs waiting, an empty higher one is asked only this long before the next turn.
BUSY_FETCH_TIMEOUT = 0.005
# Tells watchers a new try begins: the text so far is to be discarded (its seq is the publisher's).
RESTART = JobEvent(0, restart=True)
# How one delivery of a job ended, on its span: done, retried, dead-lettered, cancelled or handed back.
OUTCOME = "chatterbot.job.outcome"


def _permanent(exc: Exception) -> bool:
    """Failures another try cannot mend (a bad request, an unknown model)."""
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
    )


def _done(
    conversation_id: str, finish_reason: int, usage: types_pb2.Usage, processing_time: float
) -> JobEvent:
    """A stream's last event, for the answer stored as the conversation's turn."""
    return JobEvent(
        0,
        done=True,
        conversation_id=conversation_id,
        finish_reason=wire.finish_name(finish_reason) or "stop",
        usage=usage,
        processing_time=processing_time,
    )


class EventPublisher:
    """Publishes one job's events in order; tokens that pile up while a publish is in flight go out as one."""

    def __init__(self, js: JetStreamContext, correlation_id: str, last_seq: int) -> None:
        self.js = js
        self.correlation_id = correlation_id
        self.seq = last_seq
        self._pending: list[str] = []
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._task: asyncio.Task[None] = asyncio.create_task(self._run())

    def token(self, text: str) -> None:
        self._pending.append(text)
        self._idle.clear()
        self._ready.set()

    async def _run(self) -> None:
        while not self._closed:
            await self._ready.wait()
            self._ready.clear()
            text, self._pending = "".join(self._pending), []
            if text:
                self.seq += 1
                await publish_event(self.js, self.correlation_id, JobEvent(self.seq, text))
            if not self._pending:
                self._idle.set()

    async def event(self, event: JobEvent) -> None:
        """Publish `event` (its seq is this publisher's next) after every token before it."""
        await self.flush()
        self.seq += 1
        await publish_event(self.js, self.correlation_id, dataclasses.replace(event, seq=self.seq))

    async def flush(self) -> None:
        waiter = asyncio.ensure_future(self._idle.wait())
        done, _ = await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            self._task.result()  # re-raise a failed publish

    async def close(self) -> None:
        # A cancellation can be lost in a publish's own wait (Python 3.11's `asyncio.wait_for` swallows one that
        # lands as the reply arrives), and the loop would wait for tokens forever: the flag ends it either way.
        self._closed = True
        self._ready.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Worker:
    """Runs up to `settings.worker_concurrency` jobs at once."""

    def __init__(self, nc: NATS, turn_deps: TurnDeps, job_deps: JobDeps, settings: Settings) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.turn_deps = turn_deps
        self.job_deps = job_deps
        self.settings = settings
        self._slots = asyncio.Semaphore(settings.worker_concurrency)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()
        self._stopping = asyncio.Event()
        self._subs: list[JetStreamContext.PullSubscription] = []
        self._core_subs: list[Subscription] = []
        self._dispatcher: asyncio.Task[None] | None = None
        # The priority that had jobs last time (index into _subs); len(_subs) when none had any.
        self._found_at = len(PRIORITIES)

    async def start(self) -> None:
        for _, durable in PRIORITIES.values():
            self._subs.append(await self.js.pull_subscribe_bind(durable, stream=JOBS_STREAM))
        self._core_subs.append(await self.nc.subscribe(CANCEL_SUBJECT_PREFIX + ">", cb=self._on_cancel))
        # One worker of the group takes each advisory: a job whose last try died with its worker.
        self._core_subs.append(
            await self.nc.subscribe(MAX_DELIVERIES_ADVISORY, queue="chat-workers", cb=self._on_max_deliveries)
        )
        self._dispatcher = asyncio.create_task(self._dispatch())

    async def stop(self, grace: float) -> None:
        """Stop pulling; let running jobs finish within `grace`; hand the rest back for redelivery."""
        self._stopping.set()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for sub in self._core_subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        running = list(self._running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def busy(self) -> int:
        return len(self._running)

    async def _dispatch(self) -> None:
        while not self._stopping.is_set():
            await self._slots.acquire()
            taken = 1
            # Every slot free at this moment is filled from one fetch: a backlog drains as fast as jobs run.
            while not self._slots.locked():
                await self._slots.acquire()
                taken += 1
            try:
                msgs = await self._next_jobs(taken)
            except BaseException:
                for _ in range(taken):
                    self._slots.release()
                raise
            for _ in range(taken - len(msgs)):
                self._slots.release()
            for msg in msgs:
                task = asyncio.create_task(self._run(msg))
                task.add_done_callback(lambda _: self._slots.release())

    async def _next_jobs(self, wanted: int) -> list[Msg]:
        """Up to `wanted` jobs of the highest priority that has any: streaming, interactive, then batch."""
        while True:
            # Batches while jobs are waiting; one at a time when idle (a waiting single pull costs nothing,
            # a waiting batch pull returns at once and would spin).
            backlog = self._found_at < len(self._subs)
            batch = wanted if backlog else 1
            for index, sub in enumerate(self._subs):
                # Empty priorities above one that had work are asked briefly, so a backlog below them is not
                # slowed by a wait per turn; when nothing had work, each waits for jobs a while.
                timeout = BUSY_FETCH_TIMEOUT if backlog and index < self._found_at else IDLE_FETCH_TIMEOUT
                try:
                    msgs = await sub.fetch(batch, timeout=timeout)
                except TimeoutError:
                    continue
                except nats.errors.Error:
                    # Disconnected: the client reconnects on its own; try again shortly.
                    await asyncio.sleep(0.5)
                    continue
                if msgs:
                    self._found_at = index
                    return msgs
            self._found_at = len(self._subs)

    async def _on_cancel(self, msg: Msg) -> None:
        correlation_id = msg.subject[len(CANCEL_SUBJECT_PREFIX) :]
        task = self._running.get(correlation_id)
        if task is not None:
            self._cancel_requested.add(correlation_id)
            task.cancel()

    async def _run(self, msg: Msg) -> None:
        job = Job.decode(msg.data)
        attempt = msg.metadata.num_delivered
        log_correlation_id.set(job.correlation_id)
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        task = asyncio.current_task()
        assert task is not None  # a job runs in a task of its own
        self._running[job.correlation_id] = task
        consumer = msg.metadata.consumer or ""
        with processing(msg.subject, msg.headers, job.correlation_id, consumer, attempt) as span:
            try:
                await self._process(job, attempt)
                await msg.ack()
                span.set_attribute(OUTCOME, "done")
            except asyncio.CancelledError:
                if job.correlation_id in self._cancel_requested:
                    span.set_attribute(OUTCOME, "cancelled")
                    await self._finish_cancelled(job)
                    await msg.ack()
                else:
                    span.set_attribute(OUTCOME, "handed back")
                    # Shutting down: hand the job back at once rather than after ack_wait.
                    with contextlib.suppress(Exception):
                        await msg.nak()
                    raise
            except Exception as exc:
                log.warning("job failed", extra={"attempt": attempt, "error": repr(exc)})
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, repr(exc)))
                if attempt >= self.settings.jobs_max_deliver or _permanent(exc):
                    span.set_attribute(OUTCOME, "dead-lettered")
                    await self._dead_letter(job, repr(exc))
                    await msg.term()
                else:
                    span.set_attribute(OUTCOME, "retried")
                    backoff = self.settings.jobs_backoff_seconds
                    await msg.nak(delay=backoff[min(attempt - 1, len(backoff) - 1)] if backoff else None)
            finally:
                heartbeat.cancel()
                self._running.pop(job.correlation_id, None)
                self._cancel_requested.discard(job.correlation_id)

    async def _heartbeat(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.settings.jobs_heartbeat_seconds)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _process(self, job: Job, attempt: int) -> None:
        result = await find_result(self.job_deps, job.correlation_id, job.user_id)
        if result is not None and result.status in TERMINAL:
            # Finished (or cancelled) by an earlier try: nothing to run again, but that try may have died
            # between storing the result and publishing the stream's last event.
            await self._end_events(job, result)
            return
        started = time.perf_counter()
        publisher = EventPublisher(
            self.js, job.correlation_id, await last_event_seq(self.js, job.correlation_id)
        )
        try:
            if publisher.seq:
                await publisher.event(RESTART)
            await put_result(
                self.job_deps,
                job.correlation_id,
                job.user_id,
                types_pb2.JOB_STATUS_RUNNING,
                conversation_id=job.conversation_id,
            )
            turn = TurnInput(**queued_fields(job), request_id=job.correlation_id)
            streamed: list[str] = []
            final: TurnResult | None = None
            async for chunk, outcome in stream_turn(self.turn_deps, turn):
                if outcome is None:
                    streamed.append(chunk.text)
                    publisher.token(chunk.text)
                else:
                    final = outcome
            assert final is not None
            if "".join(streamed) != final.response:
                # An earlier try stored its answer before dying: that answer is the answer.
                await publisher.event(RESTART)
                await publisher.event(JobEvent(0, final.response))
            processing_time = time.perf_counter() - started
            await put_result(
                self.job_deps,
                job.correlation_id,
                job.user_id,
                types_pb2.JOB_STATUS_SUCCEEDED,
                response=final.response,
                conversation_id=final.conversation_id,
                processing_time=processing_time,
                finish_reason=final.finish_reason,
                usage=final.usage,
            )
            await publisher.event(
                _done(final.conversation_id, final.finish_reason, final.usage, processing_time)
            )
        finally:
            await publisher.close()

    async def _end_events(self, job: Job, result: store_pb2.JobResult) -> None:
        """End the event stream of a job whose stored result is final, if it has not ended: the stored answer
        (after a restart marker, replacing what an earlier try streamed) and the done event, or the error, so
        that a reader of `/stream/{id}` is not left waiting for an end that was never published."""
        last = await last_event(self.js, job.correlation_id)
        if last is not None and last.final:
            return
        publisher = EventPublisher(self.js, job.correlation_id, last.seq if last is not None else 0)
        try:
            if result.status != types_pb2.JOB_STATUS_SUCCEEDED:
                cancelled = result.status == types_pb2.JOB_STATUS_CANCELLED
                await publisher.event(
                    JobEvent(0, error="cancelled" if cancelled else "failed: " + result.error[:200])
                )
                return
            if publisher.seq:
                await publisher.event(RESTART)
            await publisher.event(JobEvent(0, result.response))
            await publisher.event(
                _done(result.conversation_id, result.finish_reason, result.usage, result.processing_time)
            )
        finally:
            await publisher.close()

    async def _finish_cancelled(self, job: Job) -> None:
        with contextlib.suppress(Exception):
            seq = await last_event_seq(self.js, job.correlation_id)
            await publish_event(self.js, job.correlation_id, JobEvent(seq + 1, error="cancelled"))

    async def _dead_letter(self, job: Job, error: str) -> None:
        """Park the job in the dead-letter stream, mark it failed, and end its event stream; unless a try's
        answer was stored after all (its write landed though the try failed waiting for the reply): then that
        answer is the job's, and only its stream is ended."""
        result = None
        with contextlib.suppress(Exception):  # the store unreachable: nothing can say the answer is in
            result = await find_result(self.job_deps, job.correlation_id, job.user_id)
        if result is not None and result.status == types_pb2.JOB_STATUS_SUCCEEDED:
            await self._end_events(job, result)
            return
        await self.js.publish(
            DLQ_SUBJECT_PREFIX + job.correlation_id,
            job.encode(),
            headers={"Chatterbot-Error": error[:500].replace("\n", " ")},
        )
        await put_result(
            self.job_deps,
            job.correlation_id,
            job.user_id,
            types_pb2.JOB_STATUS_FAILED,
            conversation_id=job.conversation_id,
            error=error[:500],
        )
        seq = await last_event_seq(self.js, job.correlation_id)
        await publish_event(self.js, job.correlation_id, JobEvent(seq + 1, error="failed: " + error[:200]))

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """The last try of a job died with its worker: dead-letter the job from here."""
        try:
            advisory = orjson.loads(msg.data)
            stored = await self.js.get_msg(JOBS_STREAM, advisory["stream_seq"])
            job = Job.decode(stored.data or b"")
            result = await find_result(self.job_deps, job.correlation_id, job.user_id)
            if result is None or result.status not in TERMINAL:
                await self._dead_letter(job, "worker lost on the last try")
            await self.js.delete_msg(JOBS_STREAM, advisory["stream_seq"])
        except Exception:
            log.exception("could not dead-letter a job after its last delivery")
