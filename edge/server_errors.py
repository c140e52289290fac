"""Unhandled errors as a 500 problem response, sent inside CORSMiddleware so that a page can read it.

Starlette answers an unhandled exception in its outermost layer, outside every middleware the app adds, so that
answer would carry no CORS headers and a browser would report a network error instead of the 500. This layer
answers first and re-raises: the server still logs the exception.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.problems import problem_response


class ServerErrorsAsProblems:
    """ASGI middleware: an exception raised before the response began becomes a 500 problem response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if not started:
                response = problem_response(500, "the edge failed to answer; the error is logged")
                await response(scope, receive, send)
            raise
