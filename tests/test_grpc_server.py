"""The shared gRPC bootstrap, seen from outside a real service process: health, reflection, graceful drain."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from chatterbot.settings import Settings
from chatterbot.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from ops.embedded import free_port
from ops.launcher import ServiceProcess


@pytest.fixture
def slow_inference(tmp_path):
    """inference_svc alone, generating one token every 20 ms."""
    port = free_port()
    settings = Settings(
        _env_file=None,
        inference_addr=f"127.0.0.1:{port}",
        sim_ttft_ms=10,
        sim_itl_ms=20,
        sim_mean_output_tokens=10_000,
        shutdown_grace_seconds=10,
    )
    service = ServiceProcess("inference", tmp_path, port, settings.to_env())
    service.start()
    try:
        yield service
    finally:
        service.stop()


def _generate_request(max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="count slowly")],
        sampling=types_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=7),
    )


def test_health_and_reflection_answer_without_proto_files(slow_inference):
    with grpc.insecure_channel(slow_inference.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "chatterbot.v1.InferenceService", "liveness", "dependency.engine"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"chatterbot.v1.InferenceService", "grpc.health.v1.Health"} <= services


def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(slow_inference):
    with grpc.insecure_channel(slow_inference.url) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        stream = stub.Generate(_generate_request(max_tokens=60), timeout=30)
        chunks = [next(stream)]
        started = time.monotonic()
        slow_inference._proc.send_signal(signal.SIGTERM)
        chunks.extend(stream)  # the in-flight stream runs to its end
        assert time.monotonic() - started > 0.5, "the stream should have outlived the signal"
        assert chunks[-1].finish_reason in (types_pb2.FINISH_REASON_STOP, types_pb2.FINISH_REASON_LENGTH)
        assert sum(c.token_count for c in chunks) == chunks[-1].usage.completion_tokens

    with grpc.insecure_channel(slow_inference.url) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(_generate_request(10), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert slow_inference._proc.wait(timeout=15) == 0


def test_generate_rejects_invalid_requests(slow_inference):
    with grpc.insecure_channel(slow_inference.url) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as empty:
            list(stub.Generate(inference_pb2.GenerateRequest(), timeout=5))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as unknown:
            request = _generate_request(10)
            request.model = "no-such-model"
            list(stub.Generate(request, timeout=5))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models
        assert [(m.engine, m.state, m.is_default) for m in models] == [
            ("sim", inference_pb2.MODEL_STATE_READY, True)
        ]
