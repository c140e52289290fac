"""Tools, structured output, log probabilities and penalties through `POST /v1/chat/completions`, driven by the
official `openai` SDK (its own helpers included: `parse`, `stream`, `pydantic_function_tool`), whole and streamed:
on the simulated engine, and on the openai engine in front of an upstream that speaks them (a second mesh whose
upstream is the first one's edge). Then the stored tool turns in `GET /history/...`, the rules of a tool turn and
of the tool parameters (a 422 naming the field), and a parameter the engine cannot honour (a 400 naming it) on
the in-process path of a combined mesh."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import httpx
import jsonschema
import openai
import orjson
import pydantic
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageToolCall

from chatterbot.local import rpc_error
from chatterbot.wire import PARAM_TRAILER
from edge.problems import problem_for_downstream
from ops.launcher import Mesh
from tests.meshes import API_KEY, Servers, own_mesh
from tests.test_combined_mesh import combined_mesh
from tests.test_openai_api import SIM_MODEL, sdk, stored

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_SCHEMA},
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "format": "date-time"}},
            "required": ["timezone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTION = {"role": "user", "content": "What is the weather in Lisbon, and what time is it there?"}
EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "attendees": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "day": {"type": "string", "enum": ["mon", "tue", "wed"]},
        "confirmed": {"type": "boolean"},
    },
    "required": ["title", "attendees", "day", "confirmed"],
    "additionalProperties": False,
}


def new_user() -> str:
    return f"user-tools-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def openai_mesh(mesh: Mesh, servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh on the openai engine whose upstream is the simulated mesh's OpenAI API (a real OpenAI-compatible
    server that speaks tools, structured output and log probabilities)."""
    with own_mesh(
        servers,
        tmp_path_factory,
        "openai-engine-mesh",
        own_nats=True,
        inference_engine="openai",
        openai_base_url=f"{mesh.edge_url}/v1",
        openai_api_key=API_KEY,
        model_name=SIM_MODEL,
    ) as m:
        yield m


@pytest.fixture(params=["sim", "openai"])
def served(request: pytest.FixtureRequest) -> Mesh:
    """The mesh under test: on the simulated engine, or on the openai engine in front of it."""
    return request.getfixturevalue("mesh" if request.param == "sim" else "openai_mesh")


@pytest.fixture
def client(served: Mesh) -> Iterator[openai.OpenAI]:
    with sdk(served) as c:
        yield c


@pytest.fixture
def sim_client(mesh: Mesh) -> Iterator[openai.OpenAI]:
    """For what the edge answers before any engine is asked."""
    with sdk(mesh) as c:
        yield c


@pytest.fixture
def http(served: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as c:
        yield c


# --- what a streamed answer adds up to ---


@dataclass
class Streamed:
    """A streamed answer put together as a client does, its chunks checked against OpenAI's shape on the way."""

    text: str = ""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finish_reason: str | None = None
    logprobs: list[Any] = field(default_factory=list)


def gathered(chunks: openai.Stream[ChatCompletionChunk]) -> Streamed:
    answer = Streamed()
    for chunk in chunks:
        [choice] = chunk.choices
        delta = choice.delta
        answer.text += delta.content or ""
        for piece in delta.tool_calls or ():
            call = answer.calls.get(piece.index)
            if call is None:
                # The first piece of a call names it; the later ones only add to its arguments.
                assert piece.id and piece.type == "function" and piece.function.name, piece
                answer.calls[piece.index] = {
                    "id": piece.id,
                    "name": piece.function.name,
                    "arguments": piece.function.arguments or "",
                }
            else:
                assert piece.id is None and piece.type is None and piece.function.name is None, piece
                call["arguments"] += piece.function.arguments or ""
        if choice.logprobs is not None:
            # Each chunk carries the log probabilities of its own tokens.
            assert "".join(t.token for t in choice.logprobs.content) == (delta.content or "")
            answer.logprobs.extend(choice.logprobs.content)
        if choice.finish_reason:
            assert answer.finish_reason is None and not delta.content and not delta.tool_calls
            answer.finish_reason = choice.finish_reason
    return answer


def assert_valid_call(call: ChatCompletionMessageToolCall | dict[str, str], name: str) -> dict[str, Any]:
    """The arguments of a call of `name`, which follow that function's schema."""
    if isinstance(call, dict):
        call_id, called, text = call["id"], call["name"], call["arguments"]
    else:
        call_id, called, text = call.id, call.function.name, call.function.arguments
        assert call.type == "function"
    assert call_id and called == name
    arguments = orjson.loads(text)
    jsonschema.validate(arguments, SCHEMAS[name])
    return arguments


def ask(client: openai.OpenAI, stream: bool, **kwargs: Any) -> ChatCompletion | Streamed:
    """The answer to a question (QUESTION unless `messages` says otherwise), whole or gathered from a stream."""
    kwargs = {"messages": [QUESTION], "max_completion_tokens": 300, **kwargs}
    if stream:
        return gathered(client.chat.completions.create(model=SIM_MODEL, stream=True, **kwargs))
    return client.chat.completions.create(model=SIM_MODEL, **kwargs)


# --- tool calls ---


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(
    ("tool_choice", "called"),
    [
        (None, "get_weather"),  # auto, the default with tools
        ("auto", "get_weather"),
        ("required", "get_weather"),
        ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
    ],
    ids=["default", "auto", "required", "named"],
)
def test_a_tools_request_is_answered_with_a_schema_valid_call(client, stream, tool_choice, called):
    choice = {} if tool_choice is None else {"tool_choice": tool_choice}
    # A call forced by name finishes as "stop", as OpenAI and vLLM finish it.
    finish = "stop" if isinstance(tool_choice, dict) else "tool_calls"
    answer = ask(client, stream, tools=TOOLS, parallel_tool_calls=False, user=new_user(), **choice)
    if stream:
        assert answer.finish_reason == finish and answer.text == ""
        [call] = answer.calls.values()
    else:
        [result] = answer.choices
        assert result.finish_reason == finish
        assert result.message.content is None and result.message.role == "assistant"
        [call] = result.message.tool_calls
    assert_valid_call(call, called)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tool_choice_none_answers_in_text(client, stream):
    answer = ask(client, stream, tools=TOOLS, tool_choice="none", max_completion_tokens=20, user=new_user())
    if stream:
        text, calls, finish = answer.text, answer.calls, answer.finish_reason
    else:
        message = answer.choices[0].message
        text, calls, finish = message.content, message.tool_calls, answer.choices[0].finish_reason
    assert text.startswith(f"[simulated {SIM_MODEL}") and not calls
    assert finish in ("stop", "length")


def history(http: httpx.Client, user: str) -> list[dict[str, Any]]:
    """The user's stored messages across conversations (each naming its conversation)."""
    r = http.get(f"/history/{user}")
    assert r.status_code == 200, r.text
    return r.json()["messages"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_agent_loop_calls_a_tool_and_answers_its_result_in_one_stored_conversation(client, http, stream):
    user = new_user()
    messages: list[Any] = [QUESTION]
    first = ask(client, stream, messages=messages, tools=TOOLS, user=user)
    if stream:
        [call] = first.calls.values()
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
                ],
            }
        )
    else:
        message = first.choices[0].message
        [tool_call] = message.tool_calls
        call_id, name, arguments = tool_call.id, tool_call.function.name, tool_call.function.arguments
        # As agents do: the SDK's own message goes back into the prompt.
        messages.append(message)
    city = assert_valid_call({"id": call_id, "name": name, "arguments": arguments}, "get_weather")["city"]
    result = f"Sunny and 24 degrees in {city}"
    messages.append({"role": "tool", "tool_call_id": call_id, "content": result})

    second = ask(client, stream, messages=messages, tools=TOOLS, user=user, max_completion_tokens=30)
    if stream:
        text, finish = second.text, second.finish_reason
        assert not second.calls
    else:
        text, finish = second.choices[0].message.content, second.choices[0].finish_reason
        assert second.choices[0].message.tool_calls is None
    # After the tool's result, the simulated model answers in text.
    assert text.startswith("[simulated") and finish in ("stop", "length")

    stored_messages = history(http, user)
    # One conversation: the tool turn continued the one the question opened.
    assert len({m["conversation_id"] for m in stored_messages}) == 1
    assert [m["role"] for m in stored_messages] == ["user", "assistant", "tool", "assistant"]
    asked, called, answered, final = stored_messages
    assert asked["content"] == QUESTION["content"]
    assert called["tool_calls"] == [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    ]
    assert (answered["tool_call_id"], answered["content"]) == (call_id, result)
    assert final["content"] == text and not final.get("tool_calls")


# --- the SDK's own helpers ---


class GetWeather(pydantic.BaseModel):
    """The weather in a city."""

    city: str
    unit: Literal["celsius", "fahrenheit"]


class CalendarEvent(pydantic.BaseModel):
    title: str
    attendees: list[str]
    day: Literal["mon", "tue", "wed"]
    confirmed: bool


# A request for a CalendarEvent; the seed fixes the answer's length, which ends before max_completion_tokens.
MEETING: dict[str, Any] = {
    "model": SIM_MODEL,
    "messages": [{"role": "user", "content": "Alice and Bob meet on Tuesday for the science fair"}],
    "response_format": CalendarEvent,
    "max_completion_tokens": 1024,
    "seed": 1,
}


def test_the_sdk_parses_structured_output_into_its_pydantic_model(client):
    completion = client.chat.completions.parse(**MEETING, user=new_user())
    message = completion.choices[0].message
    assert isinstance(message.parsed, CalendarEvent)
    assert message.parsed == CalendarEvent.model_validate_json(message.content)


def test_the_sdk_parses_the_arguments_of_a_strict_function_tool(client):
    completion = client.chat.completions.parse(
        model=SIM_MODEL,
        messages=[QUESTION],
        tools=[openai.pydantic_function_tool(GetWeather)],
        max_completion_tokens=300,
        user=new_user(),
    )
    [call] = completion.choices[0].message.tool_calls
    assert call.function.name == "GetWeather" and isinstance(call.function.parsed_arguments, GetWeather)


def test_the_sdk_stream_helper_assembles_tool_calls_and_parsed_content(client):
    with client.chat.completions.stream(
        model=SIM_MODEL,
        messages=[QUESTION],
        tools=[openai.pydantic_function_tool(GetWeather)],
        max_completion_tokens=300,
        user=new_user(),
    ) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    [event] = done
    assert event.name == "GetWeather" and isinstance(event.parsed_arguments, GetWeather)
    assert final.choices[0].finish_reason == "tool_calls"
    [call] = final.choices[0].message.tool_calls
    assert call.function.parsed_arguments == event.parsed_arguments

    with client.chat.completions.stream(**MEETING, user=new_user()) as stream:
        parsed = [e.parsed for e in stream if e.type == "content.done"]
    assert len(parsed) == 1 and isinstance(parsed[0], CalendarEvent)


# --- structured output ---


def content_of(answer: ChatCompletion | Streamed) -> tuple[str, str | None]:
    if isinstance(answer, Streamed):
        return answer.text, answer.finish_reason
    return answer.choices[0].message.content, answer.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_json_mode_answers_a_json_object(client, stream):
    # The seed fixes the answer's length: the document ends before max_completion_tokens would cut it.
    answer = ask(client, stream, response_format={"type": "json_object"}, max_completion_tokens=1024, seed=1)
    text, finish = content_of(answer)
    assert finish == "stop"
    assert isinstance(orjson.loads(text), dict)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_json_schema_answer_is_valid_against_the_schema(client, stream):
    answer = ask(
        client,
        stream,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "calendar_event", "schema": EVENT_SCHEMA, "strict": True},
        },
        max_completion_tokens=1024,
        seed=1,
    )
    text, finish = content_of(answer)
    assert finish == "stop"
    jsonschema.validate(orjson.loads(text), EVENT_SCHEMA)


# --- log probabilities and penalties ---


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_logprobs_cover_every_token_with_the_top_alternatives_asked_for(client, stream):
    answer = ask(client, stream, logprobs=True, top_logprobs=3, max_completion_tokens=12, seed=3)
    if stream:
        text, logprobs = answer.text, answer.logprobs
    else:
        [choice] = answer.choices
        assert choice.logprobs.refusal is None
        text, logprobs = choice.message.content, choice.logprobs.content
    assert logprobs and "".join(t.token for t in logprobs) == text
    for token in logprobs:
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 3
        assert all(top.logprob <= 0 and top.bytes == list(top.token.encode()) for top in token.top_logprobs)

    # Not asked for: none.
    plain = ask(client, stream, max_completion_tokens=12, seed=3)
    assert (plain.logprobs == []) if stream else (plain.choices[0].logprobs is None)
    # Without top_logprobs, none are listed.
    bare = ask(client, False, logprobs=True, max_completion_tokens=5)
    assert all(token.top_logprobs == [] for token in bare.choices[0].logprobs.content)


def test_penalties_reach_the_engine(client):
    def answer(**penalties: float) -> str:
        completion = client.chat.completions.create(
            model=SIM_MODEL, messages=[QUESTION], max_completion_tokens=60, seed=1, **penalties
        )
        return completion.choices[0].message.content

    plain = answer()
    assert answer(presence_penalty=0, frequency_penalty=0) == plain
    penalised = answer(presence_penalty=2, frequency_penalty=2)
    assert penalised != plain and penalised == answer(presence_penalty=2, frequency_penalty=2)


# --- what is refused ---


def unprocessable(client: openai.OpenAI, stream: bool, **kwargs: Any) -> openai.UnprocessableEntityError:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=SIM_MODEL, stream=stream, **kwargs)
    assert caught.value.type == "invalid_request_error"
    return caught.value


ASSISTANT_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    ],
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(
    ("kwargs", "param", "fragment"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}},
            "tool_choice.function.name",
            "'get_news' is not one of the functions of tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice", "must be 'none', 'auto', 'required'"),
        ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name", "names 'get_weather' twice"),
        (
            {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
            "tools.0.function.name",
            "should match pattern",
        ),
        (
            {
                "messages": [
                    QUESTION,
                    ASSISTANT_CALL,
                    {"role": "tool", "tool_call_id": "call_2", "content": "x"},
                ]
            },
            "messages.2.tool_call_id",
            "'call_2' is not the id of a tool call of the assistant message before it",
        ),
        (
            {"messages": [QUESTION, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]},
            "messages.1.tool_call_id",
            "not the id of a tool call",
        ),
        (
            {"messages": [QUESTION, ASSISTANT_CALL, {"role": "tool", "content": "x"}]},
            "messages.2.tool_call_id",
            "a tool message needs the id of the call it answers",
        ),
        (
            {"messages": [QUESTION, ASSISTANT_CALL]},
            "messages.1.role",
            "the last message must be a user message",
        ),
        (
            {"messages": [{**QUESTION, "tool_calls": ASSISTANT_CALL["tool_calls"]}]},
            "messages.0.tool_calls",
            "only",
        ),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
        ({"presence_penalty": 2.5}, "presence_penalty", "2"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias.not-a-token.[key]", "integer"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5", "100"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ],
)
def test_invalid_tool_and_option_input_is_a_422_naming_the_field(
    sim_client, pg, kwargs, param, fragment, stream
):
    user = new_user()
    error = unprocessable(sim_client, stream, user=user, **{"messages": [QUESTION], **kwargs})
    assert error.param == param, error.body
    assert fragment in error.message
    assert stored(pg, user) == []


# --- the openai engine passes a refusal of its upstream on; so does the in-process path ---


def test_a_parameter_the_upstream_refuses_is_a_400_naming_it(openai_mesh, pg):
    user = new_user()
    with sdk(openai_mesh) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=SIM_MODEL, messages=[QUESTION], logit_bias={"42": 5}, user=user)
    assert caught.value.param == "logit_bias", caught.value.body
    assert stored(pg, user) == []


@pytest.fixture(scope="module")
def combined(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """Processes each running every component, which call each other in process."""
    with combined_mesh(servers, tmp_path_factory, "combined-tools") as m:
        yield m


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_in_process_an_engine_refusal_is_a_400_naming_the_parameter_and_tools_work(combined, stream):
    with sdk(combined) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, stream, logit_bias={"42": 5})
        assert caught.value.param == "logit_bias", caught.value.body
        answer = ask(client, stream, tools=TOOLS, tool_choice="required", user=new_user())
    call = next(iter(answer.calls.values())) if stream else answer.choices[0].message.tool_calls[0]
    assert_valid_call(call, "get_weather")


@pytest.mark.parametrize(
    ("trailers", "status", "param"),
    [(((PARAM_TRAILER, "logit_bias"),), 400, "logit_bias"), ((), 422, None)],
    ids=["named", "unnamed"],
)
def test_an_invalid_argument_naming_its_param_is_a_400_and_others_a_422(trailers, status, param):
    # As chat_svc ends a call whose engine cannot honour a parameter (on the network and in process alike).
    problem = problem_for_downstream(
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "logit_bias: no vocabulary", trailers)
    )
    assert (problem.status, problem.detail) == (status, "logit_bias: no vocabulary")
    assert getattr(problem, "param", None) == param
