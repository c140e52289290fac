"""The edge application: wiring only; routes live in edge/routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from chatterbot.api_keys import KeyResolver, store_lookup
from chatterbot.events import EventFanout
from chatterbot.guarded_client import GuardedClient
from chatterbot.jetstream import connect, disconnect
from chatterbot.settings import Settings
from chatterbot.tracing import tracing_enabled
from chatterbot.v1 import store_pb2_grpc
from edge.auth import document_key_security
from edge.chat_client import new_chat_client
from edge.cors import cors_options
from edge.disconnects import install_disconnect_handler
from edge.health import MeshHealth
from edge.idempotency import IdempotencyStore
from edge.middleware import EdgeGuard
from edge.problems import install_problem_handlers
from edge.rate_limits import RateLimitHeaders, RateLimits
from edge.request_ids import RequestIds
from edge.routes import chat, health, history, jobs, openai, ui, whoami
from edge.server_errors import ServerErrorsAsProblems
from edge.tickets import StreamTickets, ticket_secret


def create_app(settings: Settings) -> FastAPI:
    """A new edge app; clients are created on startup and closed on shutdown, never at import."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.chat = new_chat_client(settings)
        # API keys made by `chatterbot keys` are looked up in store_svc (cached briefly); limits count in Redis.
        app.state.store = GuardedClient(
            "store", settings.store_addr, store_pb2_grpc.StoreServiceStub, settings
        )
        app.state.keys = KeyResolver.from_settings(settings, store_lookup(app.state.store))
        app.state.rate_limits = RateLimits(settings)
        app.state.idempotency = IdempotencyStore.from_settings(settings)
        app.state.health = MeshHealth(settings)
        app.state.tickets = StreamTickets(await ticket_secret(settings), settings.stream_ticket_seconds)
        # One NATS connection and one event subscription per edge process, shared by every SSE stream.
        app.state.nc = await connect(settings, "chatterbot-edge")
        app.state.fanout = EventFanout(app.state.nc, keepalive_seconds=settings.sse_keepalive_seconds)
        # edge.main drains the fan-out when shutdown begins: queued streams end so clients resume elsewhere.
        app.state.loop = asyncio.get_running_loop()
        await app.state.fanout.start()
        try:
            yield
        finally:
            await app.state.fanout.stop()
            await disconnect(app.state.nc)
            await app.state.chat.close()
            await app.state.store.close()
            await app.state.rate_limits.close()
            await app.state.idempotency.close()
            await app.state.health.close()

    app = FastAPI(
        title="ChatterBot",
        version="1.0.0",
        description="Chat backend for large language models.",
        lifespan=lifespan,
        # Spans come from the OpenTelemetry instrumentation below when tracing is on, metrics from Prometheus;
        # FastAPI's own telemetry would only look for providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.add_middleware(
        EdgeGuard, max_in_flight=settings.edge_max_in_flight, max_body_bytes=settings.max_body_bytes
    )
    app.add_middleware(RateLimitHeaders)
    # Outside the others (the last added is outermost), so that every answer, errors and 500s included,
    # carries its request id and, for an allowed origin, the CORS headers a page needs to read it.
    app.add_middleware(ServerErrorsAsProblems)
    app.add_middleware(RequestIds)
    cors = cors_options(settings)
    if cors is not None:
        app.add_middleware(CORSMiddleware, **cors)
    install_problem_handlers(app)
    install_disconnect_handler(app)
    # Routes are matched in order, router by router: the chat routes, which carry the traffic, come first.
    routers = (
        openai.router,
        chat.router,
        jobs.router,
        history.router,
        whoami.router,
        health.router,
        ui.router,
    )
    for router in routers:
        app.include_router(router)
    document_key_security(app, routers)
    app.mount("/static", ui.page_files(), name="static")
    if tracing_enabled():
        # Continues the caller's W3C trace (or starts one) for every request; gRPC calls carry it on.
        # No span per ASGI send/receive: a stream would open one per event.
        FastAPIInstrumentor.instrument_app(
            app, excluded_urls="livez,readyz,metrics", exclude_spans=["receive", "send"]
        )
    return app
