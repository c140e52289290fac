"""Engines behind InferenceService.Generate, chosen by settings."""

from __future__ import annotations

from chatterbot.settings import Settings
from inference_svc.engines.base import Engine

ENGINE_KINDS = ("sim", "vllm", "openai")


def create_engine(kind: str, settings: Settings, model: str, *, is_default: bool) -> Engine:
    """An engine of `kind` serving `model`; vLLM and httpx are imported only by the engines that need them."""
    if kind == "sim":
        from inference_svc.engines.sim import SimEngine

        return SimEngine.from_settings(settings, model, is_default=is_default)
    if kind == "vllm":
        from inference_svc.engines.vllm import VllmEngine

        return VllmEngine.from_settings(settings, model, is_default=is_default)
    if kind == "openai":
        from inference_svc.engines.openai import OpenAIEngine

        return OpenAIEngine.from_settings(settings, model, is_default=is_default)
    raise ValueError(f"unknown inference engine {kind!r} (expected one of {', '.join(ENGINE_KINDS)})")
