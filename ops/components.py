"""Several components in one process: `chatterbot serve edge,chat,context,store` (or `all`).

Each component starts as it does alone (its own clients, pools and gRPC server on its own port, so other
processes and partners still reach it), in dependency order, and is registered in process first
(chatterbot.local): a component calling another one of this process goes through the same guarded client,
stub and messages, with no socket between them. Several such processes share every port (SO_REUSEPORT; gRPC
servers set it by default), so one per core spreads the load over the cores. SIGTERM or SIGINT stops the
components in reverse order: the edge first (its streams drain), the store last.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from chatterbot import local
from chatterbot.grpc_server import (
    build_local_server,
    event_loop_factory,
    exit_if_shutdown_hangs,
    serving,
    start_metrics_server,
    stop_on_signals,
    tune_gc,
)
from chatterbot.logs import configure_logging
from chatterbot.settings import Settings, get_settings
from chatterbot.tracing import setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)

# Dependencies first; each entry is the module whose `app(settings)` makes the component (the edge's is its
# FastAPI app). The edge comes last so that a ready edge means a ready process.
COMPONENTS: dict[str, str] = {
    "store": "store_svc.main",
    "context": "context_svc.main",
    "inference": "inference_svc.main",
    "chat": "chat_svc.main",
    "worker": "chat_svc.worker_main",
    "edge": "edge.main",
}
EDGE_BACKLOG = 4096


def parse_targets(text: str) -> list[str]:
    """The components named by `text` ("all", or a comma-separated list), in start order."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    if "all" in names:
        return list(COMPONENTS)
    unknown = names - set(COMPONENTS)
    if unknown or not names:
        raise ValueError(
            f"unknown component(s): {', '.join(sorted(unknown)) or '(none given)'}; "
            f"choose from {', '.join(COMPONENTS)} or all"
        )
    return [name for name in COMPONENTS if name in names]


def run(names: list[str], ready_file: Path | None = None) -> None:
    """Entry point of `chatterbot serve <several>`: run them until SIGTERM/SIGINT."""
    settings = get_settings()
    process_name = "+".join(names) if len(names) < len(COMPONENTS) else "all"
    configure_logging(process_name, settings.log_level, settings.log_json)
    setup_tracing(process_name, settings)
    start_metrics_server(settings.metrics_port)
    tune_gc()
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(settings)) as runner:
            runner.run(serve_components(settings, names, ready_file))
    finally:
        shutdown_tracing()


async def serve_components(settings: Settings, names: list[str], ready_file: Path | None = None) -> None:
    stop = stop_on_signals()
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        for name in names:
            log.info("starting component", extra={"component": name})
            if name == "edge":
                await stack.enter_async_context(_edge(settings))
                continue
            module = importlib.import_module(COMPONENTS[name])
            app = await stack.enter_async_context(module.app(settings))
            if app.servicers:
                local.register(name, build_local_server(app))
                stack.callback(local.unregister, name)
            await stack.enter_async_context(serving(settings, app, port=settings.service_port(name)))
        if ready_file is not None:
            ready_file.write_text(",".join(names))
            stack.callback(ready_file.unlink, missing_ok=True)
        log.info("components serving", extra={"components": names})
        try:
            await stop.wait()
        finally:
            exit_if_shutdown_hangs(2 * settings.shutdown_grace_seconds + 10)


@contextlib.asynccontextmanager
async def _edge(settings: Settings) -> AsyncIterator[None]:
    """The edge on uvicorn in this event loop, on a port other processes may share."""
    from edge.app import create_app
    from edge.main import DrainingServer, uvicorn_config

    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings, backlog=EDGE_BACKLOG), app, own_signals=False)
    sock = reuse_port_socket(settings.bind_host, settings.edge_port)
    serve = asyncio.create_task(server.serve(sockets=[sock]), name="edge")
    while not server.started:
        if serve.done():
            serve.result()  # raises what stopped it
            raise RuntimeError("the edge stopped while starting")
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        server.shut_down()
        await serve
        sock.close()


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) that other processes may bind too; the kernel spreads connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
    # it a response written in two parts waits for the client's delayed ACK (40 ms) between them.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
