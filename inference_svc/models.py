"""The models one inference_svc serves: a primary and, optionally, a light fallback model."""

from __future__ import annotations

import asyncio
import logging

from chatterbot.settings import Settings
from inference_svc.engines import create_engine
from inference_svc.engines.base import Engine, EngineState, ModelInfo, UnknownModel

log = logging.getLogger(__name__)


class ModelRegistry:
    """Engines by model id; an empty model id means the primary model."""

    def __init__(self, engines: list[Engine]) -> None:
        if not engines:
            raise ValueError("at least one model is needed")
        self.engines: dict[str, Engine] = {}
        for engine in engines:
            for info in engine.models():
                self.engines[info.id] = engine
        self.primary = engines[0]
        self.default_model = engines[0].models()[0].id

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        engines = [create_engine(settings.inference_engine, settings, settings.model_name, is_default=True)]
        if settings.light_model_engine and settings.light_model_name:
            engines.append(
                create_engine(
                    settings.light_model_engine, settings, settings.light_model_name, is_default=False
                )
            )
        return cls(engines)

    def resolve(self, model: str) -> tuple[str, Engine]:
        """The model id and engine a request goes to."""
        model = model or self.default_model
        engine = self.engines.get(model)
        if engine is None:
            raise UnknownModel(model)
        return model, engine

    def unique_engines(self) -> list[Engine]:
        return list(dict.fromkeys(self.engines.values()))

    async def start(self) -> None:
        """Start every engine; a light model that fails to start is reported, not fatal."""
        results = await asyncio.gather(*(e.start() for e in self.unique_engines()), return_exceptions=True)
        for engine, result in zip(self.unique_engines(), results, strict=True):
            if isinstance(result, BaseException):
                if engine is self.primary:
                    raise result
                log.error("model failed to start", extra={"engine": engine.name, "error": repr(result)})

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.unique_engines()), return_exceptions=True)

    def models(self) -> list[ModelInfo]:
        return [info for engine in self.unique_engines() for info in engine.models()]

    def primary_ready(self) -> bool:
        return self.primary.state() is EngineState.READY
