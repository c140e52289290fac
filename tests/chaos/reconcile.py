"""Every accepted request checked against PostgreSQL, and the figures per fault.

A request's outcome, from the shard of its user (the shard primaries' `messages` and `job_results`):
- `answered`: one user message with its text and one assistant message of its request id (sync: the
  `X-Request-ID` the client got; queued: the correlation id, which the worker uses as the request id);
- `twice`: more than one of either (the turn ran and was stored again);
- `failed`: no answer stored, and the failure is visible: a `failed` job result, a dead letter in
  `CHAT_DLQ` (`chatterbot dlq list` shows it), an error event or a 4xx the client got;
- `lost`: accepted, and neither answered nor visibly failed.

An answered request whose client never got the answer (its stream never reached `[DONE]`, its poll gave up)
is counted apart, as stored but not delivered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import nats.errors
import psycopg

from chat_svc.dlq import list_dead_letters
from chatterbot.jetstream import connect, disconnect
from chatterbot.settings import Settings
from chatterbot.v1 import types_pb2
from store_svc.sharding import shard_of
from tests.chaos.load import Record

OUTCOMES = ("answered", "twice", "failed", "lost")


@dataclass
class Outcome:
    record: Record
    outcome: str
    user_messages: int
    assistant_messages: int
    job_status: int | None
    dead_lettered: bool = False


@dataclass
class PhaseFigures:
    """What the report prints for one fault (or the baseline)."""

    phase: str
    submitted: int = 0
    accepted: int = 0
    answered: int = 0
    twice: int = 0
    failed: int = 0
    lost: int = 0
    server_errors: int = 0
    transport_errors: int = 0
    gave_up: int = 0
    restarts: int = 0
    stalls: int = 0
    # Stored once, yet the client never got it (a stream that never reached `[DONE]`, a poll that gave up).
    undelivered: int = 0
    recover_seconds: float | None = None
    note: str = ""
    lost_keys: list[str] = field(default_factory=list)
    twice_keys: list[str] = field(default_factory=list)


def dead_letters(settings: Settings) -> set[str]:
    """Correlation ids of the jobs in the dead-letter stream."""

    async def read() -> set[str]:
        nc = await connect(settings, "chaos-reconcile")
        try:
            # Right after the last fault the stream may be electing a leader (503, no responders): ask again.
            for attempt in range(30):
                try:
                    return {letter.correlation_id for letter in await list_dead_letters(nc.jetstream())}
                except (nats.errors.Error, TimeoutError):
                    if attempt == 29:
                        raise
                    await asyncio.sleep(1)
            raise AssertionError("unreachable")
        finally:
            await disconnect(nc)

    return asyncio.run(read())


def reconcile(
    records: list[Record], shard_dsns: list[str], dead: AbstractSet[str] = frozenset()
) -> list[Outcome]:
    """The outcome of every accepted request (`dead`: the correlation ids in the dead-letter stream)."""
    connections = [psycopg.connect(dsn, autocommit=True, connect_timeout=10) for dsn in shard_dsns]
    try:
        outcomes = []
        for record in records:
            if not record.accepted:
                continue
            conn = connections[shard_of(record.user, len(connections))]
            request_id = record.request_id or record.correlation_id
            users = conn.execute(
                "SELECT count(*) FROM messages WHERE user_id = %s AND role = 'user' AND content = %s",
                (record.user, record.message),
            ).fetchone()
            answers = conn.execute(
                "SELECT count(*) FROM messages WHERE user_id = %s AND role = 'assistant' AND request_id = %s",
                (record.user, request_id),
            ).fetchone()
            job = None
            if record.correlation_id:
                row = conn.execute(
                    "SELECT status FROM job_results WHERE user_id = %s AND correlation_id = %s",
                    (record.user, record.correlation_id),
                ).fetchone()
                job = row[0] if row else None
            n_user, n_answer = (users or (0,))[0], (answers or (0,))[0]
            if n_user > 1 or n_answer > 1:
                outcome = "twice"
            elif n_user == 1 and n_answer == 1:
                outcome = "answered"
            elif n_answer == 0 and (
                job == types_pb2.JOB_STATUS_FAILED or record.failed or record.correlation_id in dead
            ):
                outcome = "failed"
            else:
                outcome = "lost"
            outcomes.append(Outcome(record, outcome, n_user, n_answer, job, record.correlation_id in dead))
        return outcomes
    finally:
        for conn in connections:
            conn.close()


def figures(records: list[Record], outcomes: list[Outcome], phases: list[str]) -> dict[str, PhaseFigures]:
    """Figures per phase, in the order the phases ran."""
    table = {phase: PhaseFigures(phase) for phase in phases}
    for record in records:
        f = table.setdefault(record.phase, PhaseFigures(record.phase))
        f.submitted += 1
        f.accepted += record.accepted
        f.server_errors += record.server_errors
        f.transport_errors += record.transport_errors
        f.gave_up += record.gave_up
        f.restarts += record.restarts
        f.stalls += record.stalls
    for o in outcomes:
        f = table[o.record.phase]
        setattr(f, o.outcome, getattr(f, o.outcome) + 1)
        if o.outcome == "answered" and not o.record.answered:
            f.undelivered += 1
        if o.outcome == "lost":
            f.lost_keys.append(o.record.key)
        elif o.outcome == "twice":
            f.twice_keys.append(o.record.key)
    return table
