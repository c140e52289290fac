"""Clients for tests: reading a queued stream and polling a queued result as a user would, and making API
keys with the `chatterbot keys` CLI as an operator would."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from ops.launcher import Mesh

REPO_ROOT = Path(__file__).resolve().parent.parent


def wait_done(edge: httpx.Client, correlation_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = edge.get(f"/check-response/{correlation_id}")
        assert r.status_code == 200, r.text
        body = r.json()
        if body.get("status") != "pending" or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def read_stream(
    edge: httpx.Client, correlation_id: str, last_event_id: str | None = None, stop_after: int | None = None
) -> list[tuple[str, str, str]]:
    """(id, event, data) of each SSE event, up to stop_after events (then the connection is dropped)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events = []
    with edge.stream("GET", f"/stream/{correlation_id}", headers=headers, timeout=30) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for event in sse(r.iter_lines()):
            events.append(event)
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


def sse(lines: Iterable[str]) -> Iterator[tuple[str, str, str]]:
    """(id, event, data) of each event of a text/event-stream's lines."""
    current = {"id": "", "event": "message", "data": ""}
    for line in lines:
        if line.startswith("id:"):
            current["id"] = line[3:].strip()
        elif line.startswith("event:"):
            current["event"] = line[6:].strip()
        elif line.startswith("data:"):
            current["data"] = line[5:].strip()
        elif line == "" and current["data"]:
            yield current["id"], current["event"], current["data"]
            current = {"id": "", "event": "message", "data": ""}


def tokens_after_last_restart(events: list[tuple[str, str, str]]) -> str:
    text: list[str] = []
    for _, kind, data in events:
        if kind != "message" or data == "[DONE]":
            continue
        body = orjson.loads(data)
        if body.get("restart"):
            text = []
        text.append(body["token"])
    return "".join(text)


@dataclass(frozen=True)
class NewKey:
    key: str
    key_id: str


def keys_cli(mesh: Mesh, *args: str) -> subprocess.CompletedProcess:
    """`chatterbot keys ...` with the mesh's settings, as an operator would run it."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("chatterbot")), "keys", *args],
        env=mesh.services["chat"].env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def create_key(mesh: Mesh, *args: str) -> NewKey:
    """A new key from `chatterbot keys create ARGS`: the key (stdout) and its id (stderr)."""
    out = keys_cli(mesh, "create", *args)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    key_id = re.search(r"^key (\w+):", out.stderr, re.M)
    assert key.startswith("cb_") and key_id, (out.stdout, out.stderr)
    return NewKey(key, key_id.group(1))


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def chat_body(user: str, **extra) -> dict:
    return {"message": "Hello", "user_id": user, "max_tokens": 10, **extra}
