"""`chatterbot serve inference`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from chatterbot.grpc_server import GrpcApp, Probe, run_service
from chatterbot.redis_client import redis_client
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
    client = redis_client(settings, timeout=1.0) if settings.redis_configured() else None
    generator = Generator(
        models, ResultCache(client, settings.result_cache_ttl_seconds), settings.inference_max_waiting
    )
    await models.start()

    async def engine_ready() -> bool:
        return models.primary_ready()

    probes: dict[str, Probe] = {"engine": engine_ready}
    if client is not None:
        # Reported under its own health name only: without the cache, requests still reach the engine.
        cache = client

        async def redis_up() -> bool:
            return bool(await cache.ping())

        probes["redis"] = redis_up

    try:
        yield GrpcApp(
            name="inference",
            servicers=[
                (inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(generator))
            ],
            service_names=[inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name],
            probes=probes,
            optional_probes=frozenset({"redis"}),
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
