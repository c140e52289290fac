"""`chatterbot serve edge`: the FastAPI app on uvicorn."""

from __future__ import annotations

import uvicorn

from chatterbot.grpc_server import start_metrics_server
from chatterbot.logs import configure_logging
from chatterbot.settings import get_settings
from edge.app import create_app


def main() -> None:
    settings = get_settings()
    configure_logging("edge", settings.log_level, settings.log_json)
    start_metrics_server(settings.metrics_port)
    uvicorn.run(
        create_app(settings),
        host=settings.bind_host,
        port=settings.edge_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        loop="asyncio",
        http="httptools",
    )


if __name__ == "__main__":
    main()
