"""Health of the whole mesh as the edge sees it: every service and every server it relies on."""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable

import grpc
import nats
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatterbot.grpc_server import DEPENDENCY_PREFIX
from chatterbot.guarded_client import open_channel
from chatterbot.jetstream import nats_servers
from chatterbot.redis_client import redis_client
from chatterbot.settings import GRPC_PROCESSES, Settings
from chatterbot.v1 import chat_pb2, chat_pb2_grpc

CHECK_TIMEOUT = 1.0


class MeshHealth:
    """Checks run concurrently, each bounded by CHECK_TIMEOUT, so /health answers in about a second at worst."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Health has its own channels (mutual TLS when the mesh has it): the breaker-guarded data path must
        # not be disturbed by probes.
        self.channels = {s: open_channel(settings.service_addr(s), settings) for s in GRPC_PROCESSES}
        self.stubs = {s: health_pb2_grpc.HealthStub(c) for s, c in self.channels.items()}
        # The edge's Redis as its rate limits reach it: directly, or the master the sentinels name now.
        self.redis = (
            redis_client(settings, timeout=CHECK_TIMEOUT, retries=1) if settings.redis_configured() else None
        )

    async def _serving(self, service: str, name: str = "") -> bool:
        response = await self.stubs[service].Check(
            health_pb2.HealthCheckRequest(service=name), timeout=CHECK_TIMEOUT
        )
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def _redis(self) -> bool:
        return self.redis is not None and bool(await self.redis.ping())

    async def _nats(self) -> bool:
        if not self.settings.nats_url:
            return False
        nc = await nats.connect(
            nats_servers(self.settings.nats_url),
            connect_timeout=CHECK_TIMEOUT,
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )
        try:
            await nc.flush(timeout=math.ceil(CHECK_TIMEOUT))  # whole seconds, as nats-py types it
            return True
        finally:
            await nc.close()

    async def components(self) -> dict[str, str]:
        checks: dict[str, Callable[[], Awaitable[bool]]] = {
            s: functools.partial(self._serving, s) for s in GRPC_PROCESSES
        }
        checks["postgres"] = lambda: self._serving("store", DEPENDENCY_PREFIX + "postgres")
        checks["redis"] = self._redis
        checks["nats"] = self._nats
        results = await asyncio.gather(*(_bounded(check()) for check in checks.values()))
        return {name: "up" if ok else "down" for name, ok in zip(checks, results, strict=False)}

    async def degradation(self) -> tuple[str, str]:
        """chat_svc's rung of the degradation ladder and why; ("unknown", …) when it does not answer."""
        try:
            status = await chat_pb2_grpc.ChatServiceStub(self.channels["chat"]).GetStatus(
                chat_pb2.GetStatusRequest(), timeout=CHECK_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            return "unknown", f"chat_svc did not answer: {exc.code().name}"
        rung = chat_pb2.DegradationRung.Name(status.rung).removeprefix("DEGRADATION_RUNG_").lower()
        return rung, status.reason

    async def chat_ready(self) -> bool:
        return await _bounded(self._serving("chat"))

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        if self.redis is not None:
            await self.redis.aclose()


async def _bounded(check: Awaitable[bool]) -> bool:
    try:
        return await asyncio.wait_for(check, CHECK_TIMEOUT * 1.5)
    except Exception:  # any failure to answer is "down"
        return False
