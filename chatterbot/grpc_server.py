"""The one gRPC server bootstrap every service runs on.

A service describes itself as a `GrpcApp` (its servicers and the dependencies it needs) from an async context
manager that owns its clients and pools; `run_grpc_app` does the rest: grpc.aio server, `grpc.health.v1`
health driven by dependency probes, server reflection, Prometheus metrics, JSON logs, and a graceful
shutdown on SIGTERM/SIGINT that stops taking calls and drains the ones in flight.

Its port takes mutual TLS when CHATTERBOT_GRPC_TLS_* are set (chatterbot.tls); chat_svc also listens on
CHATTERBOT_PARTNER_GRPC_PORT for partners, with server TLS. Connections end after
CHATTERBOT_GRPC_MAX_CONNECTION_AGE_SECONDS, so clients spread over replicas as they come and go.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import grpc
import prometheus_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from chatterbot import local, tls
from chatterbot.guarded_client import MAX_MESSAGE_BYTES, server_keepalive_options
from chatterbot.labelled import series
from chatterbot.logs import configure_logging
from chatterbot.settings import Settings
from chatterbot.status import GuardInterceptor, StatusInterceptor, Translator
from chatterbot.tracing import setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)

# Health names besides "" and the service names: "liveness" is SERVING while the process runs (for liveness
# probes, which must not restart a pod because a database is down); "dependency.<name>" tracks each probe.
LIVENESS = "liveness"
DEPENDENCY_PREFIX = "dependency."
# The service partners call; with CHATTERBOT_PARTNER_GRPC_PORT set it also listens there.
PARTNER_SERVICE = "chat"

SERVER_HANDLED = prometheus_client.Counter(
    "chatterbot_grpc_server_handled_total", "RPCs completed by this server", ["method", "code"]
)
SERVER_LATENCY = prometheus_client.Histogram(
    "chatterbot_grpc_server_handling_seconds",
    "Time to complete an RPC (a whole stream for streaming RPCs)",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SERVER_IN_FLIGHT = prometheus_client.Gauge("chatterbot_grpc_server_in_flight", "RPCs in progress", ["method"])
_handled, _latency, _in_flight = series(SERVER_HANDLED), series(SERVER_LATENCY), series(SERVER_IN_FLIGHT)

Probe = Callable[[], Awaitable[bool]]


@dataclass
class GrpcApp:
    """What a service contributes to the bootstrap."""

    name: str
    # (add_XServicer_to_server, servicer) pairs.
    servicers: list[tuple[Callable[[Any, grpc.aio.Server], None], Any]]
    # Full names of the services, for health and reflection ("chatterbot.v1.ChatService").
    service_names: list[str]
    # Dependency probes; the service reports NOT_SERVING while any of them fails, except the optional ones,
    # which are only reported under their own health name (the service still works without them).
    probes: dict[str, Probe] = field(default_factory=dict)
    optional_probes: frozenset[str] = frozenset()
    probe_interval: float = 2.0
    # Run after the metrics and status interceptors (authentication, for example).
    interceptors: list[grpc.aio.ServerInterceptor] = field(default_factory=list)
    # How this service's own libraries' exceptions become gRPC status (chatterbot.status); StatusError and
    # failed calls to other services are known to every service.
    error_translators: list[Translator] = field(default_factory=list)


class MetricsInterceptor(GuardInterceptor):
    """Counts and times every RPC by method and status code."""

    def guard(self, method: str, context: grpc.aio.ServicerContext) -> _Measured:
        return _Measured(method, context)


class _Measured:
    """One call's metrics; outside the status interceptor, so it sees the code that call ended with."""

    __slots__ = ("context", "method", "start")

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method, self.context = method, context
        self.start = 0.0

    async def __aenter__(self) -> None:
        self.start = time.perf_counter()
        _in_flight(self.method).inc()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _in_flight(self.method).dec()
        _latency(self.method).observe(time.perf_counter() - self.start)
        code: object
        if exc_type is None:
            code = self.context.code() or grpc.StatusCode.OK
        elif issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
            code = grpc.StatusCode.CANCELLED
        else:
            code = self.context.code() or grpc.StatusCode.UNKNOWN
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        _handled(self.method, name).inc()


class _Health:
    """Keeps grpc.health.v1 statuses in step with the dependency probes."""

    def __init__(self, app: GrpcApp) -> None:
        self.app = app
        self.servicer = health_aio.HealthServicer()
        self.ready_names = ["", *app.service_names]

    async def set_all(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.ready_names:
            await self.servicer.set(name, status)

    async def probe_once(self) -> bool:
        results = await asyncio.gather(*(_run_probe(p) for p in self.app.probes.values()))
        for dep, ok in zip(self.app.probes, results, strict=False):
            await self.servicer.set(
                DEPENDENCY_PREFIX + dep,
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING,
            )
        ready = all(
            ok
            for dep, ok in zip(self.app.probes, results, strict=True)
            if dep not in self.app.optional_probes
        )
        await self.set_all(ready)
        return ready

    async def run(self) -> None:
        was_ready: bool | None = None
        while True:
            ready = await self.probe_once()
            if ready != was_ready:
                log.info("health changed", extra={"ready": ready})
                was_ready = ready
            await asyncio.sleep(self.app.probe_interval)


async def _run_probe(probe: Probe) -> bool:
    try:
        return bool(await asyncio.wait_for(probe(), timeout=2.0))
    except Exception:  # a probe that raises means the dependency is down
        return False


def start_metrics_server(port: int, host: str = "0.0.0.0") -> None:
    """Serve Prometheus metrics of this process on `port` (0 disables it)."""
    if port:
        prometheus_client.start_http_server(port, addr=host)


def server_interceptors(app: GrpcApp) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors every call to `app` runs through, outermost first: metrics (so it counts the code a
    call really ended with), status (every exception becomes a gRPC status, `app.error_translators` first),
    then the app's own. The same chain serves network and in-process calls."""
    return [MetricsInterceptor(), StatusInterceptor(app.error_translators), *app.interceptors]


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """Options of every gRPC server: message sizes, the keepalive pings clients may send, and connection age."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *server_keepalive_options(settings),
    ]
    if settings.grpc_max_connection_age_seconds:
        # Each connection ends (GOAWAY, ±10% jitter) after the age, so clients reconnect and re-resolve: new
        # replicas get calls, and one behind SO_REUSEPORT or a Service's address gets its share. The grace
        # lets the calls still open finish: a generation stream may run up to its whole deadline.
        grace = max(settings.stream_deadline_seconds, settings.deadline_seconds)
        options += [
            ("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(grace * 1000)),
        ]
    return options


def build_server(app: GrpcApp, settings: Settings | None = None) -> grpc.aio.Server:
    """A grpc.aio server carrying `app`'s servicers behind `server_interceptors(app)`, not yet listening;
    `settings` (default: every setting's default) give its `server_options`."""
    server = grpc.aio.server(
        interceptors=server_interceptors(app),
        options=server_options(settings or Settings.model_construct()),
    )
    for add, servicer in app.servicers:
        add(servicer, server)
    return server


def build_local_server(app: GrpcApp) -> local.LocalServer:
    """`app`'s servicers for callers in this process (chatterbot.local), behind the same interceptors."""
    server = local.LocalServer(server_interceptors(app))
    for add, servicer in app.servicers:
        # It has what generated `add_XServicer_to_server` functions call on a server.
        add(servicer, cast(grpc.aio.Server, server))
    return server


@asynccontextmanager
async def serving(settings: Settings, app: GrpcApp, *, port: int) -> AsyncIterator[None]:
    """`app` served on `port` with health and reflection while inside; on leaving, NOT_SERVING first, then
    the calls in flight drain for up to the grace period."""
    server = build_server(app, settings)
    health = _Health(app)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        [
            *app.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"{settings.bind_host}:{port}"
    mesh_tls = _listen(server, app, address, tls.mesh_server_credentials(settings))
    listening: dict[str, object] = {"address": address, "tls": "mutual" if mesh_tls else "off"}
    if app.name == PARTNER_SERVICE and settings.partner_grpc_port:
        # The same server: the same servicers, interceptors (API keys), health and reflection.
        partner = f"{settings.bind_host}:{settings.partner_grpc_port}"
        partner_tls = _listen(server, app, partner, tls.partner_server_credentials(settings))
        listening |= {"partner_address": partner, "partner_tls": "server" if partner_tls else "off"}
    await health.servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    await health.probe_once()
    await server.start()
    log.info("serving", extra={"service": app.name, **listening})
    prober = asyncio.create_task(health.run())
    try:
        yield
    finally:
        log.info(
            "shutting down: draining in-flight calls",
            extra={"service": app.name, "grace_seconds": settings.shutdown_grace_seconds},
        )
        prober.cancel()
        # NOT_SERVING first so load balancers and the edge stop sending new calls.
        await health.servicer.enter_graceful_shutdown()
        await server.stop(settings.shutdown_grace_seconds)
        log.info("stopped", extra={"service": app.name})


def _listen(
    server: grpc.aio.Server, app: GrpcApp, address: str, credentials: grpc.ServerCredentials | None
) -> bool:
    """Listen on `address`, with TLS when `credentials` are given (then True)."""
    bound = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    if bound == 0:
        raise RuntimeError(f"{app.name}: cannot listen on {address}")
    return credentials is not None


async def serve_grpc_app(
    settings: Settings, factory: Callable[[Settings], AbstractAsyncContextManager[GrpcApp]], *, port: int
) -> None:
    """Run one service until SIGTERM/SIGINT, then drain in-flight calls for up to the grace period."""
    stop = stop_on_signals()
    async with factory(settings) as app, serving(settings, app, port=port):
        try:
            await stop.wait()
        finally:
            exit_if_shutdown_hangs(2 * settings.shutdown_grace_seconds + 10)


def stop_on_signals() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def exit_if_shutdown_hangs(seconds: float) -> None:
    """A process asked to stop must stop, even if a client library hangs in its close (nobody may be left to
    send SIGKILL when the parent itself is gone)."""

    def force_exit() -> None:
        log.error("shutdown did not finish in time; exiting", extra={"seconds": seconds})
        os._exit(1)

    timer = threading.Timer(seconds, force_exit)
    timer.daemon = True
    timer.start()


def tune_gc() -> None:
    """For a long-running server: what start-up made (modules, settings, stubs) leaves the cyclic collector's
    view, and young collections run every 10,000 allocations instead of 700. A process holding thousands of
    streams otherwise spends much of its time re-scanning the same long-lived objects."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def event_loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes this process's event loop: uvloop's (its I/O and scheduling are in C) or asyncio's own."""
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_service(name: str, factory: Callable[[Settings], AbstractAsyncContextManager[GrpcApp]]) -> None:
    """Entry point of `chatterbot serve <name>` for a gRPC service."""
    from chatterbot.settings import get_settings

    settings = get_settings()
    configure_logging(name, settings.log_level, settings.log_json)
    setup_tracing(name, settings)
    start_metrics_server(settings.metrics_port)
    tune_gc()
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(settings)) as runner:
            runner.run(serve_grpc_app(settings, factory, port=settings.service_port(name)))
    finally:
        shutdown_tracing()
