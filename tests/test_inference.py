"""inference_svc: the sim engine's timing model, FIFO slots, backpressure, abort, result cache, several models."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncGenerator

import grpc
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from chatterbot.settings import Settings
from chatterbot.status import StatusInterceptor
from chatterbot.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from inference_svc import metrics
from inference_svc.engines.base import (
    Delta,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    GenerationRequest,
    InvalidRequest,
    Message,
    Overloaded,
    UnknownModel,
    UpstreamRejected,
)
from inference_svc.engines.sim import SimEngine
from inference_svc.generation import Generator, coalesce, measured
from inference_svc.models import ModelRegistry
from inference_svc.result_cache import ResultCache, cache_key
from inference_svc.servicer import InferenceServicer, engine_status
from ops.embedded import free_port


def sim_settings(**overrides) -> Settings:
    values = {
        "sim_ttft_ms": 5,
        "sim_prefill_ms_per_token": 0,
        "sim_itl_ms": 1,
        "sim_itl_at_max_ms": 1,
        "sim_mean_output_tokens": 10_000,
        "result_cache_ttl_seconds": 60,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def request(text: str = "hello", max_tokens: int = 20, **kw) -> GenerationRequest:
    return GenerationRequest(
        request_id=kw.pop("request_id", text), messages=[Message("user", text)], max_tokens=max_tokens, **kw
    )


class Service:
    """inference_svc's servicer on a real gRPC server in this event loop, with its error translator."""

    def __init__(self, settings: Settings, redis_client=None) -> None:
        self.models = ModelRegistry.from_settings(settings)
        self.generator = Generator(
            self.models,
            ResultCache(redis_client, settings.result_cache_ttl_seconds),
            settings.inference_max_waiting,
        )
        self.server = grpc.aio.server(interceptors=[StatusInterceptor([engine_status])])
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.generator), self.server
        )
        self.address = f"127.0.0.1:{free_port()}"
        self.server.add_insecure_port(self.address)

    async def __aenter__(self):
        await self.models.start()
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop(0)
        await self.models.stop()

    @property
    def engine(self) -> SimEngine:
        return self.models.primary


def generate_request(
    text: str, max_tokens: int = 20, temperature: float = 0.7, seed: int | None = None, model: str = ""
) -> inference_pb2.GenerateRequest:
    sampling = types_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    return inference_pb2.GenerateRequest(
        model=model,
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
        sampling=sampling,
    )


async def collect(engine: SimEngine, req: GenerationRequest):
    return [d async for d in engine.generate(req)]


async def test_sim_stream_is_ordered_complete_and_deterministic():
    engine = SimEngine.from_settings(sim_settings())
    await engine.start()
    first = await collect(engine, request("same prompt", max_tokens=30, seed=3))
    again = await collect(engine, request("same prompt", max_tokens=30, seed=3))
    other = await collect(engine, request("same prompt", max_tokens=30, seed=4))
    text = "".join(d.text for d in first)
    assert text.startswith("[simulated chatterbot-sim-7b-awq: 1 messages")
    assert text == "".join(d.text for d in again) != "".join(d.text for d in other)
    assert [d.finish_reason for d in first[:-1]] == [None] * (len(first) - 1)
    assert first[-1].finish_reason == "length" and first[-1].completion_tokens == 30 == len(first)
    assert first[-1].prompt_tokens > 0


async def test_sim_answers_stop_on_their_own_around_the_mean_length():
    engine = SimEngine.from_settings(
        sim_settings(sim_mean_output_tokens=40, sim_itl_ms=0, sim_itl_at_max_ms=0, sim_ttft_ms=0)
    )
    await engine.start()
    lengths, reasons = [], []
    for i in range(60):
        deltas = await collect(engine, request(f"prompt {i}", max_tokens=1000))
        lengths.append(len(deltas))
        reasons.append(deltas[-1].finish_reason)
    assert set(reasons) == {"stop"}
    assert 25 < statistics.mean(lengths) < 75  # label (~8) + exponential with mean 40, loose for 60 samples


async def test_sim_runs_at_most_max_num_seqs_and_queues_the_rest_fifo():
    engine = SimEngine.from_settings(sim_settings(sim_max_num_seqs=2, sim_itl_ms=5, sim_itl_at_max_ms=5))
    await engine.start()
    first_token_order: list[int] = []

    async def run(i: int):
        async for d in engine.generate(request(f"p{i}", max_tokens=10, request_id=str(i))):
            if d.text.startswith("[simulated"):
                first_token_order.append(i)

    tasks = [asyncio.create_task(run(i)) for i in range(5)]
    await asyncio.sleep(0.02)
    assert engine.load().running == 2 and engine.load().waiting == 3
    await asyncio.gather(*tasks)
    assert first_token_order[:2] == sorted(first_token_order[:2]) and first_token_order[2:] == [2, 3, 4]
    assert engine.load().running == 0 and engine.load().waiting == 0


@pytest.mark.parametrize("concurrency", [1, 8], ids=["one-sequence", "max_num_seqs"])
async def test_sim_timing_follows_its_model(concurrency):
    """TTFT and inter-token latency within a loose tolerance of the model, at 1 and at max_num_seqs."""
    settings = sim_settings(
        sim_ttft_ms=60, sim_prefill_ms_per_token=0, sim_itl_ms=10, sim_itl_at_max_ms=30, sim_max_num_seqs=8
    )
    engine = SimEngine.from_settings(settings)
    await engine.start()
    expected_itl = engine.timing.itl(concurrency)
    ttfts, itls = [], []

    async def run(i: int):
        started = time.perf_counter()
        previous = None
        async for _ in engine.generate(request(f"timing {i}", max_tokens=40, request_id=f"t{i}")):
            now = time.perf_counter()
            if previous is None:
                ttfts.append(now - started)
            else:
                itls.append(now - previous)
            previous = now

    await asyncio.gather(*(run(i) for i in range(concurrency)))
    assert 0.06 * 0.8 < statistics.median(ttfts) < 0.06 * 1.6
    assert expected_itl * 0.8 < statistics.median(itls) < expected_itl * 1.5


async def test_cancelled_call_aborts_the_generation_in_the_engine():
    async with Service(sim_settings(sim_itl_ms=20, sim_itl_at_max_ms=20)) as svc:
        aborts_before = metrics.ABORTS.labels(svc.engine.model)._value.get()
        call = svc.stub.Generate(generate_request("long answer", max_tokens=500))
        await call.read()
        await call.read()
        assert svc.engine.load().running == 1
        call.cancel()
        for _ in range(100):
            if svc.engine.load().running == 0:
                break
            await asyncio.sleep(0.01)
        assert svc.engine.load().running == 0
        assert metrics.ABORTS.labels(svc.engine.model)._value.get() == aborts_before + 1


async def test_generate_fails_fast_with_resource_exhausted_past_the_queue_bound():
    settings = sim_settings(sim_max_num_seqs=1, inference_max_waiting=2, sim_itl_ms=20, sim_itl_at_max_ms=20)
    async with Service(settings) as svc:
        calls = [svc.stub.Generate(generate_request(f"q{i}", max_tokens=50)) for i in range(3)]
        for _ in range(100):
            if svc.engine.load().waiting == 2:
                break
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await svc.stub.Generate(generate_request("one too many")).read()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.perf_counter() - started < 0.5
        assert dict(refused.value.trailing_metadata())["retry-after"] == "1"
        for call in calls:
            call.cancel()


@pytest.fixture
async def valkey_client(servers):
    client = aioredis.Redis.from_url(servers.valkey.url)
    yield client
    await client.aclose()


async def test_cache_hit_returns_identical_text_and_skips_the_engine(valkey_client):
    async with Service(sim_settings(model_name="cache-test-model"), valkey_client) as svc:
        model = svc.engine.model

        async def answer(req) -> tuple[str, list]:
            chunks = [c async for c in svc.stub.Generate(req)]
            return "".join(c.text for c in chunks), chunks

        tokens = metrics.TOKENS.labels(model)._value.get()
        hits, misses = (
            metrics.CACHE_HITS.labels(model)._value.get(),
            metrics.CACHE_MISSES.labels(model)._value.get(),
        )
        first, _ = await answer(generate_request("deterministic", max_tokens=64, temperature=0.0))
        generated = metrics.TOKENS.labels(model)._value.get() - tokens
        assert generated == 64
        again, chunks = await answer(generate_request("deterministic", max_tokens=64, temperature=0.0))
        assert again == first
        assert metrics.TOKENS.labels(model)._value.get() - tokens == generated  # the engine was not asked
        assert metrics.CACHE_HITS.labels(model)._value.get() == hits + 1
        assert metrics.CACHE_MISSES.labels(model)._value.get() == misses + 1
        assert (
            chunks[-1].usage.completion_tokens == 64
            and chunks[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH
        )
        # Replayed in chunks of several tokens, not one message per token (the reader may merge them further).
        replay = [
            d
            async for _, d in svc.generator.generate(
                request("deterministic", max_tokens=64, temperature=0.0, request_id="r")
            )
        ]
        assert 1 < len(replay) < 64 and sum(d.token_count for d in replay) == 64
        assert "".join(d.text for d in replay) == first

        seeded, _ = await answer(generate_request("seeded", max_tokens=16, temperature=0.9, seed=11))
        assert (
            seeded == (await answer(generate_request("seeded", max_tokens=16, temperature=0.9, seed=11)))[0]
        )
        assert metrics.CACHE_HITS.labels(model)._value.get() == hits + 3

        keys_before = len(await valkey_client.keys("gen:*"))
        tokens = metrics.TOKENS.labels(model)._value.get()
        await answer(generate_request("sampled", max_tokens=16, temperature=0.7))
        await answer(generate_request("sampled", max_tokens=16, temperature=0.7))
        assert metrics.TOKENS.labels(model)._value.get() - tokens == 32  # sampled: generated both times
        assert len(await valkey_client.keys("gen:*")) == keys_before


async def test_a_whole_answer_comes_as_one_message_with_the_streamed_text():
    async with Service(sim_settings(result_cache_ttl_seconds=0)) as svc:
        streamed = [
            c async for c in svc.stub.Generate(generate_request("all at once", max_tokens=40, seed=5))
        ]
        req = generate_request("all at once", max_tokens=40, seed=5)
        req.whole = True
        [answer] = [c async for c in svc.stub.Generate(req)]
        assert len(streamed) > 1
        assert answer.text == "".join(c.text for c in streamed)
        assert answer.token_count == 40 and answer.finish_reason == types_pb2.FINISH_REASON_LENGTH
        assert answer.usage == streamed[-1].usage and answer.model == streamed[-1].model


async def test_cache_keys_expire_after_the_configured_ttl(valkey_client):
    async with Service(sim_settings(result_cache_ttl_seconds=30), valkey_client) as svc:
        [c async for c in svc.stub.Generate(generate_request("ttl check", temperature=0.0))]
        key = cache_key(svc.engine.model, request("ttl check", temperature=0.0))
        assert 0 < await valkey_client.ttl(key) <= 30


async def test_one_service_serves_a_primary_and_a_light_model():
    settings = sim_settings(light_model_engine="sim", light_model_name="chatterbot-sim-1b")
    async with Service(settings) as svc:
        models = (await svc.stub.ListModels(inference_pb2.ListModelsRequest())).models
        assert [(m.id, m.is_default, m.state) for m in models] == [
            ("chatterbot-sim-7b-awq", True, inference_pb2.MODEL_STATE_READY),
            ("chatterbot-sim-1b", False, inference_pb2.MODEL_STATE_READY),
        ]
        chunks = [c async for c in svc.stub.Generate(generate_request("hi", model="chatterbot-sim-1b"))]
        assert {c.model for c in chunks} == {"chatterbot-sim-1b"}
        assert "".join(c.text for c in chunks).startswith("[simulated chatterbot-sim-1b")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await svc.stub.Generate(generate_request("hi", model="nope")).read()
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_reader_that_falls_behind_gets_coalesced_deltas():
    """When the gRPC write blocks (flow control), deltas ready meanwhile go out as one message."""
    engine = SimEngine.from_settings(sim_settings())
    await engine.start()
    generator = Generator(ModelRegistry([engine]), ResultCache(None, 0), max_waiting=10)
    stream = coalesce(generator.generate(request("coalesce me", max_tokens=200)))
    _, first = await anext(stream)
    await asyncio.sleep(0.5)  # a blocked write: the engine keeps going
    rest = [delta async for _, delta in stream]
    assert first.token_count == 1
    assert sum(d.token_count for d in rest) == 199
    assert len(rest) < 50
    assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 200


# --- engine metrics, measured once in generation.py for every engine ---


def sample(name: str, model: str) -> float:
    """One sample of the engine metrics for `model`, as Prometheus would scrape it (0 before the first)."""
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


TTFT_COUNT = "chatterbot_engine_time_to_first_token_seconds_count"
ITL_COUNT = "chatterbot_engine_inter_token_latency_seconds_count"
ITL_SUM = "chatterbot_engine_inter_token_latency_seconds_sum"
TOKENS = "chatterbot_engine_generated_tokens_total"
PROMPT_TOKENS = "chatterbot_engine_prompt_tokens_total"
ABORTS = "chatterbot_engine_aborted_requests_total"


async def test_a_generation_is_measured_once_ttft_tokens_and_prompt():
    engine = SimEngine.from_settings(sim_settings(model_name="metrics-model"))
    await engine.start()
    generator = Generator(ModelRegistry([engine]), ResultCache(None, 0), max_waiting=10)
    names = (TTFT_COUNT, ITL_COUNT, TOKENS, PROMPT_TOKENS, ABORTS)
    before = {name: sample(name, "metrics-model") for name in names}

    deltas = [d async for _, d in generator.generate(request("measure me", max_tokens=25))]

    last = deltas[-1]
    assert last.completion_tokens == 25
    after = {name: sample(name, "metrics-model") - before[name] for name in names}
    assert after == {
        TTFT_COUNT: 1,
        ITL_COUNT: 24,  # one token a delta: a gap between each pair
        TOKENS: last.completion_tokens,
        PROMPT_TOKENS: last.prompt_tokens,
        ABORTS: 0,
    }


async def test_a_cancelled_stream_counts_one_abort():
    async with Service(sim_settings(model_name="abort-model", sim_itl_ms=20, sim_itl_at_max_ms=20)) as svc:
        aborts, ttft = sample(ABORTS, "abort-model"), sample(TTFT_COUNT, "abort-model")
        call = svc.stub.Generate(generate_request("cancel me", max_tokens=500))
        await call.read()
        call.cancel()
        for _ in range(100):
            if svc.engine.load().running == 0:
                break
            await asyncio.sleep(0.01)
        assert sample(ABORTS, "abort-model") == aborts + 1
        assert sample(TTFT_COUNT, "abort-model") == ttft + 1


async def test_a_refused_request_is_not_an_abort():
    engine = SimEngine.from_settings(sim_settings(model_name="refused-model", sim_max_model_len=16))
    await engine.start()
    generator = Generator(ModelRegistry([engine]), ResultCache(None, 0), max_waiting=10)
    aborts = sample(ABORTS, "refused-model")
    with pytest.raises(InvalidRequest):
        [d async for d in generator.generate(request("far too long for the window " * 10))]
    assert sample(ABORTS, "refused-model") == aborts


async def test_a_delta_of_several_tokens_observes_one_latency_per_token():
    """As vLLM counts tokens that come out of one step together: n observations of gap / n."""

    async def engine() -> AsyncGenerator[Delta, None]:
        yield Delta("first", 1)
        await asyncio.sleep(0.2)
        yield Delta(" four more tokens", 4)
        yield Delta("", 0, "stop", prompt_tokens=3, completion_tokens=5)

    count, total = sample(ITL_COUNT, "packed-model"), sample(ITL_SUM, "packed-model")
    tokens = sample(TOKENS, "packed-model")
    assert len([d async for d in measured("packed-model", engine())]) == 3
    assert sample(ITL_COUNT, "packed-model") == count + 4
    assert 0.19 < sample(ITL_SUM, "packed-model") - total < 0.3  # four quarters of the gap
    assert sample(TOKENS, "packed-model") == tokens + 5


async def test_an_abort_the_engine_reports_counts_once():
    async def engine() -> AsyncGenerator[Delta, None]:
        yield Delta("partial", 1)
        yield Delta("", 0, "abort", prompt_tokens=2, completion_tokens=1)

    aborts = sample(ABORTS, "aborted-model")
    assert [d.finish_reason async for d in measured("aborted-model", engine())] == [None, "abort"]
    assert sample(ABORTS, "aborted-model") == aborts + 1


# --- errors as gRPC status ---


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UnknownModel("nope"), grpc.StatusCode.NOT_FOUND),
        (InvalidRequest("too long"), grpc.StatusCode.INVALID_ARGUMENT),
        (Overloaded("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EngineUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (EngineTimeout("slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (UpstreamRejected("bad key"), grpc.StatusCode.FAILED_PRECONDITION),
        (EngineError("odd"), grpc.StatusCode.INTERNAL),
    ],
)
def test_engine_errors_translate_to_their_status(error, code):
    status = engine_status(error)
    assert status is not None
    assert (status.code, status.details) == (code, str(error))
    assert status.metadata == ((("retry-after", "1"),) if isinstance(error, Overloaded) else ())


def test_other_errors_are_left_to_other_translators():
    assert engine_status(ValueError("not an engine error")) is None
    assert engine_status(UnknownModel()).details == "UnknownModel"  # never an empty message


async def test_an_invalid_request_is_invalid_argument():
    async with Service(sim_settings()) as svc:
        bad = generate_request("hi")
        bad.messages[0].role = types_pb2.ROLE_UNSPECIFIED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await svc.stub.Generate(bad).read()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "messages[0].role must be system, user, assistant or tool"
        too_many = generate_request("hi", max_tokens=40_000)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await svc.stub.Generate(too_many).read()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
