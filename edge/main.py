"""`chatterbot serve edge`: the FastAPI app on uvicorn."""

from __future__ import annotations

from types import FrameType

import uvicorn
from fastapi import FastAPI

from chatterbot.grpc_server import start_metrics_server, tune_gc
from chatterbot.logs import configure_logging
from chatterbot.settings import get_settings
from chatterbot.tracing import setup_tracing, shutdown_tracing
from edge.app import create_app


class DrainingServer(uvicorn.Server):
    """uvicorn, draining the app's queued streams the moment shutdown begins, before connections close."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self.app.state
        if getattr(state, "fanout", None) is not None:
            state.loop.call_soon_threadsafe(state.fanout.drain)
        super().handle_exit(sig, frame)


def main() -> None:
    settings = get_settings()
    configure_logging("edge", settings.log_level, settings.log_json)
    setup_tracing("edge", settings)
    start_metrics_server(settings.metrics_port)
    app = create_app(settings)
    tune_gc()
    config = uvicorn.Config(
        app,
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
    DrainingServer(config, app).run()
    shutdown_tracing()


if __name__ == "__main__":
    main()
