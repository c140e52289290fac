"""Engines behind InferenceService.Generate, chosen by `CHATTERBOT_INFERENCE_ENGINE`."""

from __future__ import annotations

from chatterbot.settings import Settings
from inference_svc.engines.base import Engine


def create_engine(settings: Settings) -> Engine:
    """The engine the settings ask for."""
    if settings.inference_engine == "sim":
        from inference_svc.engines.sim import SimEngine

        return SimEngine.from_settings(settings)
    raise ValueError(f"unknown inference engine {settings.inference_engine!r} (expected: sim)")
