"""`chatterbot serve edge`: the FastAPI app on uvicorn."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from chatterbot.grpc_server import start_metrics_server, tune_gc
from chatterbot.logs import configure_logging
from chatterbot.settings import Settings, get_settings
from chatterbot.tracing import setup_tracing, shutdown_tracing
from edge.app import create_app


class DrainingServer(uvicorn.Server):
    """uvicorn, draining the app's queued streams the moment shutdown begins, before connections close.

    With `own_signals=False` it leaves signals to the process it runs in, which stops it with `shut_down()`.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, *, own_signals: bool = True) -> None:
        super().__init__(config)
        self.app = app
        self.own_signals = own_signals

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._drain()
        super().handle_exit(sig, frame)

    def shut_down(self) -> None:
        """Begin a graceful shutdown, as SIGTERM would (call it in the server's event loop)."""
        self._drain()
        self.should_exit = True

    def _drain(self) -> None:
        state = self.app.state
        if getattr(state, "fanout", None) is not None:
            state.loop.call_soon_threadsafe(state.fanout.drain)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if self.own_signals:
            with super().capture_signals():
                yield
        else:
            yield


def main() -> None:
    settings = get_settings()
    configure_logging("edge", settings.log_level, settings.log_json)
    setup_tracing("edge", settings)
    start_metrics_server(settings.metrics_port)
    app = create_app(settings)
    tune_gc()
    DrainingServer(uvicorn_config(app, settings), app).run()
    shutdown_tracing()


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """How the edge runs on uvicorn."""
    options: dict[str, Any] = {
        "host": settings.bind_host,
        "port": settings.edge_port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": int(settings.shutdown_grace_seconds),
        # Longer than a proxy's idle timeout, so the proxy (or a pooled client) never reuses a connection
        # the edge is closing at that moment.
        "timeout_keep_alive": int(settings.edge_keepalive_seconds),
        "loop": settings.event_loop,
        "http": "httptools",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


if __name__ == "__main__":
    main()
