"""`chatterbot serve edge`: the FastAPI app on uvicorn."""

from __future__ import annotations

import uvicorn

from chatterbot.grpc_server import start_metrics_server
from chatterbot.logs import configure_logging
from chatterbot.settings import get_settings
from chatterbot.tracing import setup_tracing, shutdown_tracing
from edge.app import create_app


def main() -> None:
    settings = get_settings()
    configure_logging("edge", settings.log_level, settings.log_json)
    setup_tracing("edge", settings)
    start_metrics_server(settings.metrics_port)
    uvicorn.run(
        create_app(settings),
        host=settings.bind_host,
        port=settings.edge_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        # Longer than a proxy's idle timeout, so the proxy (or a pooled client) never reuses a connection
        # the edge is closing at that moment.
        timeout_keep_alive=int(settings.edge_keepalive_seconds),
        loop="asyncio",
        http="httptools",
    )
    shutdown_tracing()


if __name__ == "__main__":
    main()
