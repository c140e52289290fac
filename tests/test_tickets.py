"""Stream tickets: signed for one correlation id and one key, good until they expire. (On a mesh, through an
EventSource's eyes: tests/test_browser.py.)"""

from __future__ import annotations

import pytest

from edge.problems import ProblemError
from edge.tickets import StreamTickets

CID = "6f1c0d2e.dXNlci0xMjM"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tickets(clock: Clock) -> StreamTickets:
    return StreamTickets(b"secret", 300, clock=clock)


def refused(tickets: StreamTickets, ticket: str, correlation_id: str = CID) -> str:
    with pytest.raises(ProblemError) as raised:
        tickets.check(ticket, correlation_id)
    assert raised.value.status == 401
    return raised.value.detail or ""


def test_a_ticket_opens_its_stream_again_and_again_until_it_expires(tickets: StreamTickets, clock: Clock):
    ticket = tickets.issue(CID, "key-1")
    for _ in range(3):  # an EventSource reopens the same URL after a drop
        opened = tickets.check(ticket, CID)
        assert (opened.correlation_id, opened.key_id) == (CID, "key-1")
    clock.now += 299
    tickets.check(ticket, CID)
    clock.now += 1
    assert "expired" in refused(tickets, ticket)


def test_a_ticket_opens_no_other_stream(tickets: StreamTickets):
    assert "not valid for this stream" in refused(tickets, tickets.issue(CID, "key-1"), "another.dXNlci0xMjM")


def test_a_ticket_cannot_be_altered_or_forged(tickets: StreamTickets):
    expires, key, signature = tickets.issue(CID, "key-1").split(".")
    later = f"{int(expires) + 3600}.{key}.{signature}"
    other_key = tickets.issue(CID, "key-2").split(".")[1]
    altered = (later, f"{expires}.{other_key}.{signature}", f"{expires}.{key}.{signature[::-1]}")
    for bad in (*altered, "x", "1.2.3.4", ""):
        refused(tickets, bad)
    forged = StreamTickets(b"another secret", 300).issue(CID, "key-1")
    refused(tickets, forged)


def test_the_endpoint_is_the_stream_path_with_its_ticket(tickets: StreamTickets):
    endpoint = tickets.endpoint(CID, "key-1")
    path, _, ticket = endpoint.partition("?ticket=")
    assert path == f"/stream/{CID}"
    assert tickets.check(ticket, CID).key_id == "key-1"
