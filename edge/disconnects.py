"""Whole (non-streamed) answers stop when their client goes away, as streams do.

Starlette runs a route to its end even after the client has hung up; for a chat turn that would keep a
generation running for nobody. `unless_disconnected` races the call against the client's disconnect and
cancels the call (the gRPC call, and with it the generation in the engine) when the client leaves first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import Receive

T = TypeVar("T")

# nginx's status for a request its client closed; recorded in metrics, never seen by the client.
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    """The client hung up before its answer was ready."""


async def _disconnect(receive: Receive) -> None:
    # The body is read already; what is left to receive is the disconnect (or the end of the response).
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, call: Awaitable[T]) -> T:
    """The result of `call`, awaited in this task; raises `ClientDisconnected` if the client leaves first, once
    `call` is cancelled and its cleanup has run.

    One task of its own waits for the disconnect and cancels this one: the call itself runs where it was
    awaited, with no task to hand its result over and no wait on two of them."""
    task = asyncio.current_task()
    assert task is not None
    left = False

    async def watch() -> None:
        nonlocal left
        await _disconnect(receive)
        left = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await call
    except asyncio.CancelledError:
        if not left:
            raise
        # This cancellation was the watcher's, not a caller's: it ends here, as ClientDisconnected.
        task.uncancel()
        raise ClientDisconnected() from None
    finally:
        watcher.cancel()


async def unless_disconnected(request: Request, call: Awaitable[T]) -> T:
    """The result of `call`; raises `ClientDisconnected` (and cancels `call`) if the client leaves first."""
    return await until_disconnected(request.receive, call)


def install_disconnect_handler(app: FastAPI) -> None:
    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
