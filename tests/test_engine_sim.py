"""The sim engine's OpenAI surface, on the engine itself: tool calls, structured output, log probabilities,
penalties and the parameters it refuses; and through InferenceService's gRPC face, how a refusal reads."""

from __future__ import annotations

import datetime
import enum
import json
import math
import re
from collections import Counter
from typing import Any, Literal

import grpc
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from chatterbot.v1 import inference_pb2, types_pb2
from chatterbot.wire import PARAM_TRAILER
from inference_svc.engines.base import (
    Delta,
    GenerationRequest,
    InvalidRequest,
    Message,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolCallDelta,
    Unsupported,
)
from inference_svc.engines.sim import IMPOSSIBLE_LOGPROB, WORDS, SimEngine, SimTiming
from inference_svc.generation import merged
from tests.test_inference import Service, sim_settings

MODEL = "sim-model"
HELLO = [Message("user", "hello there")]
WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {
            "location": {"type": "string"},
            "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["location", "units"],
        "additionalProperties": False,
    },
)
EMAIL = Tool(
    "send_email",
    parameters={
        "type": "object",
        "properties": {"to": {"type": "string", "format": "email"}, "cc": {"type": "array", "items": {}}},
        "required": ["to"],
    },
)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 18},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "address": {"$ref": "#/$defs/address"},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        }
    },
}
LOG_UNIFORM = math.log(1 / len(WORDS))


@pytest.fixture
async def engine() -> SimEngine:
    sim = SimEngine(MODEL, SimTiming(0, 0, 0, 0, 4, 40))
    await sim.start()
    return sim


def request(messages: list[Message] = HELLO, **options: Any) -> GenerationRequest:
    options.setdefault("seed", 6)
    options.setdefault("max_tokens", 256)
    return GenerationRequest("r", messages, **options)


async def collect(engine: SimEngine, req: GenerationRequest) -> list[Delta]:
    return [d async for d in engine.generate(req)]


def text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def calls(deltas: list[Delta]) -> tuple[ToolCallDelta, ...]:
    return merged(*deltas).tool_calls


# --- text, as it was ---


async def test_plain_answers_are_the_words_they_always_were(engine: SimEngine) -> None:
    # Answers of the engine before tools, structured output and penalties: other tests and cached results
    # rely on them.
    label = f"[simulated {MODEL}: 1 messages, 3 prompt tokens]"
    answer = await collect(engine, request(max_tokens=30))
    assert text(answer) == (
        f"{label} model shard input queue message message message batch batch budget network page service"
        " stream token stream value cache shard prompt kernel service result"
    )
    assert (answer[-1].finish_reason, answer[-1].completion_tokens) == ("length", 30)
    stopped = await collect(engine, request([Message("user", "stop here")], seed=1, stop=["cache"]))
    assert text(stopped) == f"{label} cluster memory"
    assert stopped[-1].finish_reason == "stop"
    assert all(not d.tool_calls and not d.logprobs for d in answer + stopped)


# --- tools ---


async def test_offered_tools_are_answered_with_one_schema_valid_call_of_the_first(engine: SimEngine) -> None:
    deltas = await collect(engine, request(tools=(WEATHER, EMAIL)))

    first, *rest = deltas
    assert first.tool_calls == (ToolCallDelta(0, first.tool_calls[0].id, "get_weather", ""),)
    assert re.fullmatch(r"call_[0-9a-f]{24}", first.tool_calls[0].id)
    assert len(rest) >= 3  # the arguments come in pieces
    assert all(d.tool_calls == (ToolCallDelta(0, arguments=d.tool_calls[0].arguments),) for d in rest)
    assert all(d.text == "" and d.token_count == 1 for d in deltas)
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("tool_calls", len(deltas))
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)

    (call,) = calls(deltas)
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, WEATHER.parameters)
    assert arguments == {"location": "simulated", "units": "celsius", "days": 1}
    assert await collect(engine, request(tools=(WEATHER, EMAIL))) == deltas  # deterministic
    other = await collect(engine, request(tools=(WEATHER, EMAIL), seed=7))
    assert calls(other)[0].id != call.id and calls(other)[0].arguments == call.arguments


@pytest.mark.parametrize("choice", ["auto", "required", ""])
async def test_auto_and_required_call_the_first_function(engine: SimEngine, choice: str) -> None:
    deltas = await collect(engine, request(tools=(WEATHER, EMAIL), tool_choice=choice))
    assert calls(deltas)[0].name == "get_weather"


async def test_a_named_function_is_the_one_called(engine: SimEngine) -> None:
    deltas = await collect(engine, request(tools=(WEATHER, EMAIL), tool_choice="send_email"))
    (call,) = calls(deltas)
    assert call.name == "send_email"
    assert deltas[-1].finish_reason == "stop"  # a call forced by name finishes as vLLM finishes it
    arguments = json.loads(call.arguments)
    jsonschema.Draft202012Validator(
        EMAIL.parameters, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(arguments)
    assert arguments == {"to": "simulated@example.com", "cc": ["simulated"]}


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Place(BaseModel):
    city: str
    country: str | None = None


class Forecast(BaseModel):
    """The forecast for a place."""

    place: Place
    unit: Unit
    days: int = Field(ge=3, le=14)
    starting: datetime.date
    kind: Literal["daily", "hourly"]
    stops: list[Place]


async def test_a_pydantic_models_tool_as_the_sdk_builds_it_is_called_with_arguments_it_parses(
    engine: SimEngine,
) -> None:
    function = openai.pydantic_function_tool(Forecast)["function"]
    tool = Tool(function["name"], function.get("description", ""), dict(function["parameters"]), strict=True)
    (call,) = calls(await collect(engine, request(tools=(tool,))))
    forecast = Forecast.model_validate_json(call.arguments)
    assert (forecast.place.city, forecast.unit, forecast.days, forecast.kind) == (
        "simulated",
        Unit.CELSIUS,
        3,
        "daily",
    )


async def test_a_function_without_parameters_is_called_with_none(engine: SimEngine) -> None:
    deltas = await collect(engine, request(tools=(Tool("now"),)))
    assert calls(deltas)[0].arguments == "{}"


async def test_parallel_tool_calls_false_changes_nothing(engine: SimEngine) -> None:
    allowed = await collect(engine, request(tools=(WEATHER,)))
    assert await collect(engine, request(tools=(WEATHER,), parallel_tool_calls=False)) == allowed


async def test_tool_choice_none_or_no_tools_answer_in_text(engine: SimEngine) -> None:
    for deltas in (
        await collect(engine, request(tools=(WEATHER,), tool_choice="none")),
        await collect(engine, request()),
    ):
        assert text(deltas).startswith(f"[simulated {MODEL}: 1 messages")
        assert deltas[-1].finish_reason in ("stop", "length")
        assert not calls(deltas)


async def test_tool_results_are_answered_in_text_saying_how_many(engine: SimEngine) -> None:
    asked = await collect(engine, request(tools=(WEATHER,)))
    (call,) = calls(asked)
    prompt = [
        *HELLO,
        Message("assistant", "", (ToolCall(call.id, call.name, call.arguments),)),
        Message("tool", '{"temperature": 21}', tool_call_id=call.id),
        Message("tool", '{"temperature": 23}', tool_call_id=call.id, name="get_weather"),
    ]
    answer = await collect(engine, request(prompt, tools=(WEATHER,)))
    assert re.match(rf"\[simulated {MODEL}: 4 messages, \d+ prompt tokens, 2 tool results\] \w", text(answer))
    assert answer[-1].finish_reason in ("stop", "length") and not calls(answer)
    # The results are what the answer depends on, and what the prompt counts.
    other = [*prompt[:-1], Message("tool", '{"temperature": -5}', tool_call_id=call.id)]
    assert text(await collect(engine, request(other, tools=(WEATHER,)))) != text(answer)
    assert answer[-1].prompt_tokens > asked[-1].prompt_tokens
    # Required keeps calling: the agent's loop is the client's to end.
    again = await collect(engine, request(prompt, tools=(WEATHER,), tool_choice="required"))
    assert calls(again)[0].name == "get_weather"


async def test_a_call_cut_by_max_tokens_ends_with_length(engine: SimEngine) -> None:
    deltas = await collect(engine, request(tools=(WEATHER,), max_tokens=2))
    assert len(deltas) == 2 and deltas[-1].finish_reason == "length"
    assert calls(deltas)[0].name == "get_weather"


async def test_a_named_function_that_is_not_offered_is_refused(engine: SimEngine) -> None:
    with pytest.raises(InvalidRequest, match="not one of the tools"):
        await collect(engine, request(tools=(WEATHER,), tool_choice="send_email"))


# --- structured output ---


async def test_json_object_answers_an_object_holding_the_labelled_text(engine: SimEngine) -> None:
    plain = await collect(engine, request())
    deltas = await collect(engine, request(response_format=ResponseFormat("json_object")))
    assert json.loads(text(deltas)) == {"text": text(plain)}
    assert len(deltas) == len(plain) + 2  # the text's tokens, and the JSON around them
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == len(deltas)


async def test_json_object_cut_by_max_tokens_ends_with_length(engine: SimEngine) -> None:
    deltas = await collect(engine, request(response_format=ResponseFormat("json_object"), max_tokens=5))
    assert len(deltas) == 5 and deltas[-1].finish_reason == "length"
    assert text(deltas).startswith('{"text": "[simulated')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text(deltas))


async def test_json_schema_answers_a_valid_document_in_pieces(engine: SimEngine) -> None:
    deltas = await collect(engine, request(response_format=ResponseFormat("json_schema", PERSON, "person")))
    document = json.loads(text(deltas))
    jsonschema.validate(document, PERSON)
    assert document["address"] == {"city": "simulated", "zip": "simulated"}
    assert len(deltas) > 5 and all(d.token_count == 1 for d in deltas)
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == len(deltas)

    cut = await collect(engine, request(response_format=ResponseFormat("json_schema", PERSON), max_tokens=3))
    assert text(deltas).startswith(text(cut)) and cut[-1].finish_reason == "length"


async def test_tools_take_precedence_over_the_response_format_when_called(engine: SimEngine) -> None:
    form = ResponseFormat("json_schema", PERSON)
    called = await collect(engine, request(tools=(WEATHER,), response_format=form))
    assert calls(called)[0].name == "get_weather"
    answered = await collect(engine, request(tools=(WEATHER,), tool_choice="none", response_format=form))
    jsonschema.validate(json.loads(text(answered)), PERSON)


@pytest.mark.parametrize(
    ("options", "param"),
    [
        (
            {"response_format": ResponseFormat("json_schema", {"type": "string", "pattern": "^a"})},
            "response_format",
        ),
        ({"tools": (Tool("f", parameters={"type": "object", "not": {}}),)}, "tools"),
        ({"logit_bias": {42: 5.0}}, "logit_bias"),
    ],
)
async def test_what_the_sim_cannot_honour_is_refused_naming_the_parameter(
    engine: SimEngine, options: dict[str, Any], param: str
) -> None:
    with pytest.raises(Unsupported) as refused:
        await collect(engine, request(**options))
    assert refused.value.param == param
    assert engine.load().running == engine.load().waiting == 0


# --- log probabilities and penalties ---


async def test_logprobs_come_one_per_token_body_words_uniform_the_label_certain(engine: SimEngine) -> None:
    plain = await collect(engine, request(max_tokens=20))
    deltas = await collect(engine, request(max_tokens=20, logprobs=True, top_logprobs=3))
    assert [d.text for d in deltas] == [d.text for d in plain]

    label = len(f"[simulated {MODEL}: 1 messages, 3 prompt tokens]".split())
    for i, delta in enumerate(deltas):
        (lp,) = delta.logprobs
        assert (lp.token, lp.bytes) == (delta.text, delta.text.encode())
        assert lp.logprob == pytest.approx(0.0 if i < label else LOG_UNIFORM)
        assert lp.top_logprobs[0].token == delta.text and len(lp.top_logprobs) == 3
        others = [t.logprob for t in lp.top_logprobs[1:]]
        assert others == pytest.approx([IMPOSSIBLE_LOGPROB] * 2 if i < label else [LOG_UNIFORM] * 2)
        assert all(
            t.bytes == t.token.encode() and t.token.startswith(" ") == (i > 0) for t in lp.top_logprobs
        )

    none = await collect(engine, request(max_tokens=20, logprobs=True))
    assert all(len(d.logprobs) == 1 and d.logprobs[0].top_logprobs == () for d in none)


async def test_json_tokens_have_logprobs_too(engine: SimEngine) -> None:
    deltas = await collect(
        engine, request(logprobs=True, response_format=ResponseFormat("json_schema", PERSON))
    )
    assert all(d.logprobs[0].token == d.text and d.logprobs[0].logprob == 0.0 for d in deltas)


def penalized_logprob(previous: list[str], word: str, presence: float, frequency: float) -> float:
    """vLLM's definition, over the sim's word list."""
    seen = Counter(previous)
    logits = {w: -frequency * seen[w] - presence * (seen[w] > 0) for w in WORDS}
    return logits[word] - math.log(sum(math.exp(x) for x in logits.values()))


@pytest.mark.parametrize(("presence", "frequency"), [(0.0, 2.0), (1.5, 0.0), (0.5, 0.5), (-1.0, 0.0)])
async def test_penalties_change_the_words_and_the_logprobs_follow_them(
    engine: SimEngine, presence: float, frequency: float
) -> None:
    plain = await collect(engine, request(max_tokens=200))
    deltas = await collect(
        engine,
        request(max_tokens=200, logprobs=True, presence_penalty=presence, frequency_penalty=frequency),
    )
    words = text(deltas).split(" ")
    assert words != text(plain).split(" ")

    label = len(f"[simulated {MODEL}: 1 messages, 3 prompt tokens]".split())
    for i in range(label, len(words)):
        expected = penalized_logprob(words[:i], words[i], presence, frequency)
        assert deltas[i].logprobs[0].logprob == pytest.approx(expected)

    def repeats(answer: list[str]) -> int:
        return sum(n - 1 for n in Counter(answer[label:]).values())

    if presence + frequency > 0:
        assert repeats(words) < repeats(text(plain).split(" "))
    else:
        assert repeats(words) > repeats(text(plain).split(" "))


async def test_penalized_top_logprobs_rank_the_unrepeated_words_first(engine: SimEngine) -> None:
    deltas = await collect(
        engine, request(max_tokens=60, logprobs=True, top_logprobs=5, frequency_penalty=2.0)
    )
    words = text(deltas).split(" ")
    last = deltas[-1].logprobs[0].top_logprobs
    assert [t.logprob for t in last[1:]] == sorted((t.logprob for t in last[1:]), reverse=True)
    assert all(t.token.strip() not in words[:-1] for t in last[1:])  # the likeliest are the unseen ones


# --- through InferenceService ---


async def test_a_refused_parameter_is_invalid_argument_with_its_name_in_a_trailer() -> None:
    async with Service(sim_settings()) as service:
        generate = inference_pb2.GenerateRequest(
            messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="hi")],
            sampling=types_pb2.SamplingParams(max_tokens=8),
            options=types_pb2.GenerationOptions(logit_bias={42: 3.0}),
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in service.stub.Generate(generate):
                pass
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (PARAM_TRAILER, "logit_bias") in tuple(refused.value.trailing_metadata() or ())
