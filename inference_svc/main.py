"""`chatterbot serve inference`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as redis

from chatterbot.grpc_server import GrpcApp, run_service
from chatterbot.settings import Settings
from chatterbot.v1 import inference_pb2, inference_pb2_grpc
from inference_svc.generation import Generator
from inference_svc.models import ModelRegistry
from inference_svc.result_cache import ResultCache
from inference_svc.servicer import InferenceServicer, engine_status


@asynccontextmanager
async def app(settings: Settings) -> AsyncIterator[GrpcApp]:
    models = ModelRegistry.from_settings(settings)
    # The result cache is optional: without Redis every request reaches the engine.
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=1.0) if settings.redis_url else None
    generator = Generator(
        models, ResultCache(client, settings.result_cache_ttl_seconds), settings.inference_max_waiting
    )
    await models.start()

    async def engine_ready() -> bool:
        return models.primary_ready()

    try:
        yield GrpcApp(
            name="inference",
            servicers=[
                (inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(generator))
            ],
            service_names=[inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name],
            probes={"engine": engine_ready},
            error_translators=[engine_status],
        )
    finally:
        await models.stop()
        if client is not None:
            await client.aclose()


def main() -> None:
    run_service("inference", app)


if __name__ == "__main__":
    main()
