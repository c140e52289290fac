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

T = TypeVar("T")

# nginx's status for a request its client closed; recorded in metrics, never seen by the client.
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    """The client hung up before its answer was ready."""


async def _disconnect(request: Request) -> None:
    # The body is read already; what is left to receive is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, call: Awaitable[T]) -> T:
    """The result of `call`; raises `ClientDisconnected` (and cancels `call`) if the client leaves first."""
    work = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    raise ClientDisconnected()


def install_disconnect_handler(app: FastAPI) -> None:
    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
