"""`chatterbot serve inference`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from chatterbot.grpc_server import GrpcApp, run_service
from chatterbot.settings import Settings
from chatterbot.v1 import inference_pb2, inference_pb2_grpc
from inference_svc.engines import create_engine
from inference_svc.engines.base import EngineState
from inference_svc.servicer import InferenceServicer


@asynccontextmanager
async def app(settings: Settings) -> AsyncIterator[GrpcApp]:
    engine = create_engine(settings)
    await engine.start()

    async def engine_ready() -> bool:
        return engine.state() is EngineState.READY

    try:
        yield GrpcApp(
            name="inference",
            servicers=[(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(engine))],
            service_names=[inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name],
            probes={"engine": engine_ready},
        )
    finally:
        await engine.stop()


def main() -> None:
    run_service("inference", app)


if __name__ == "__main__":
    main()
