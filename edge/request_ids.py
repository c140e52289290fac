"""`X-Request-ID` on every response: the id the edge's logs carry for the request (a chat turn's request id).

A page shows it with an error so that an operator can find the request in the logs. It is never taken from
the client: a turn's request id also makes the turn idempotent.
"""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatterbot.logs import correlation_id

HEADER = b"x-request-id"


class RequestIds:
    """ASGI middleware: a fresh log correlation id per request, sent back as `X-Request-ID`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        correlation_id.set(uuid.uuid4().hex)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Read when the response starts: a chat route has replaced it with its turn's request id.
                message["headers"] = [*message.get("headers", ()), (HEADER, correlation_id.get().encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
