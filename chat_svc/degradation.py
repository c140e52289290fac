"""The degradation ladder: how chat_svc gives way as inference fills up, one rung at a time.

Rungs, each including the ones before: shrink the context budget → route turns to the light model →
answer only deterministic repeats from the result cache → shed new turns (UNAVAILABLE, retry-after). The rung
follows the primary model's waiting queue (read from InferenceService.ListModels every `poll` seconds) and the
inference breaker: an open breaker sheds at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import prometheus_client

from chatterbot.breaker import CircuitOpenError
from chatterbot.settings import Settings
from chatterbot.v1 import chat_pb2, inference_pb2

if TYPE_CHECKING:
    from chat_svc.clients import InferenceClient

log = logging.getLogger(__name__)

RUNG_GAUGE = prometheus_client.Gauge(
    "chatterbot_degradation_rung", "Rung of the degradation ladder (0 none … 4 shed)"
)


class Rung(enum.IntEnum):
    NONE = 0
    REDUCED_CONTEXT = 1
    LIGHT_MODEL = 2
    CACHE_ONLY = 3
    SHED = 4

    def to_proto(self) -> chat_pb2.DegradationRung:
        return _RUNG_VALUES[self]


_RUNG_VALUES = {
    Rung.NONE: chat_pb2.DEGRADATION_RUNG_NONE,
    Rung.REDUCED_CONTEXT: chat_pb2.DEGRADATION_RUNG_REDUCED_CONTEXT,
    Rung.LIGHT_MODEL: chat_pb2.DEGRADATION_RUNG_LIGHT_MODEL,
    Rung.CACHE_ONLY: chat_pb2.DEGRADATION_RUNG_CACHE_ONLY,
    Rung.SHED: chat_pb2.DEGRADATION_RUNG_SHED,
}


class Shed(Exception):
    """The ladder's top rung: this turn is refused; `retry_after` seconds is a fair wait."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Thresholds:
    reduced_context: int
    light_model: int
    cache_only: int
    shed: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(
            settings.degrade_reduced_context_waiting,
            settings.degrade_light_model_waiting,
            settings.degrade_cache_only_waiting,
            settings.degrade_shed_waiting,
        )

    def rung_for(self, waiting: int) -> Rung:
        for rung, threshold in (
            (Rung.SHED, self.shed),
            (Rung.CACHE_ONLY, self.cache_only),
            (Rung.LIGHT_MODEL, self.light_model),
            (Rung.REDUCED_CONTEXT, self.reduced_context),
        ):
            if waiting >= threshold:
                return rung
        return Rung.NONE


class DegradationLadder:
    """Keeps the current rung from a background poll; reading it costs nothing on the request path."""

    def __init__(self, inference: InferenceClient, settings: Settings) -> None:
        self.inference = inference
        self.thresholds = Thresholds.from_settings(settings)
        self.poll_seconds = settings.degrade_poll_seconds
        self.retry_after = max(1.0, settings.breaker_reset_seconds)
        self.waiting = 0
        self.light_model = ""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self.poll()
            RUNG_GAUGE.set(self.status()[0])
            await asyncio.sleep(self.poll_seconds)

    async def poll(self) -> None:
        try:
            response: inference_pb2.ListModelsResponse = await self.inference.call(
                self.inference.stub.ListModels, inference_pb2.ListModelsRequest(), timeout=1.0, retry=False
            )
        except (CircuitOpenError, grpc.aio.AioRpcError):
            return  # the breaker tells the story; keep the last figures
        primary = next((m for m in response.models if m.is_default), None)
        self.waiting = primary.waiting if primary else 0
        self.light_model = next(
            (
                m.id
                for m in response.models
                if not m.is_default and m.state == inference_pb2.MODEL_STATE_READY
            ),
            "",
        )

    def status(self) -> tuple[Rung, str]:
        """The rung and why."""
        if self.inference.breaker.state == "open":
            return Rung.SHED, "inference is unavailable (circuit open)"
        rung = self.thresholds.rung_for(self.waiting)
        if rung == Rung.LIGHT_MODEL and not self.light_model:
            rung = Rung.REDUCED_CONTEXT  # no light model to route to: stay a rung lower
        if rung == Rung.NONE:
            return rung, ""
        return rung, f"{self.waiting} sequences waiting for inference"

    @property
    def rung(self) -> Rung:
        return self.status()[0]
