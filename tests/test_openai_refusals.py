"""What `POST /v1/chat/completions` does not honour it refuses, never ignores: through the mesh, with the official
`openai` SDK. A parameter of OpenAI's API the server cannot honour (`n` above 1, audio, the deprecated functions
API, ...) is a 400 whose `param` names it, whole or streamed, unless its value asks for nothing; so is one the
engine cannot honour (`logit_bias` on the simulated engine); a parameter OpenAI's API does not have is a 400 too;
and a refused request generates and stores nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from edge.openai_protocol import REFUSED
from tests.test_openai_api import SIM_MODEL, sdk, stored

HELLO = [{"role": "user", "content": "Hello"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Lisbon"}'},
}

# One value of each refused parameter that asks for what the server cannot do, by the `param` it is refused as.
REFUSED_REQUESTS: dict[str, dict[str, Any]] = {
    "functions": {"functions": [WEATHER["function"]]},
    "function_call": {"function_call": {"name": "get_weather"}},
    "n": {"n": 2},
    "modalities": {"modalities": ["text", "audio"]},
    "audio": {"audio": {"voice": "alloy", "format": "wav"}},
    "prediction": {"prediction": {"type": "content", "content": "Hello"}},
    "web_search_options": {"web_search_options": {}},
    "reasoning_effort": {"reasoning_effort": "high"},
    "verbosity": {"verbosity": "low"},
    "service_tier": {"service_tier": "flex"},
    "store": {"store": True},
    "metadata": {"metadata": {"team": "search"}},
    "moderation": {"moderation": {"model": "omni-moderation-latest"}},
    "prompt_cache_key": {"prompt_cache_key": "tenant-7"},
    "prompt_cache_options": {"prompt_cache_options": {"mode": "explicit"}},
    "prompt_cache_retention": {"prompt_cache_retention": "24h"},
    "safety_identifier": {"safety_identifier": "hashed-user-7"},
    "stream_options.include_obfuscation": {"stream_options": {"include_obfuscation": True}},
    "messages.0.role": {
        "messages": [{"role": "function", "name": "get_weather", "content": "sunny"}, *HELLO]
    },
    "messages.1.function_call": {
        "messages": [*HELLO, {"role": "assistant", "function_call": TOOL_CALL["function"]}, *HELLO]
    },
    "messages.1.audio": {"messages": [*HELLO, {"role": "assistant", "audio": {"id": "audio_1"}}, *HELLO]},
    "messages.1.refusal": {"messages": [*HELLO, {"role": "assistant", "refusal": "I cannot."}, *HELLO]},
}

# Values that ask for nothing the server does not do (OpenAI's defaults, mostly): accepted.
ASKING_NOTHING: dict[str, Any] = {
    "tools": [],
    "tool_choice": "none",
    "parallel_tool_calls": True,
    "function_call": "none",
    "response_format": {"type": "text"},
    "logprobs": False,
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "n": 1,
    "modalities": ["text"],
    "verbosity": "medium",
    "service_tier": "auto",
    "store": False,
    "metadata": {},
}


@pytest.fixture
def client(mesh) -> Iterator[openai.OpenAI]:
    with sdk(mesh) as c:
        yield c


def new_user() -> str:
    return f"user-refused-{uuid.uuid4().hex[:12]}"


def refused(client: openai.OpenAI, stream: bool, **kwargs: Any) -> openai.BadRequestError:
    """The error of a completion request the server must refuse; the request is sent as the SDK sends it."""
    kwargs.setdefault("messages", HELLO)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=SIM_MODEL, stream=stream, **kwargs)
    return caught.value


def assert_refused_as(error: openai.BadRequestError, param: str) -> None:
    assert error.status_code == 400
    assert error.param == param, error.body
    assert error.type == "invalid_request_error" and error.code == "400"
    # Still a problem body (RFC 9457), whose detail is the message the SDK shows.
    assert error.response.headers["content-type"] == "application/problem+json"
    problem = error.response.json()
    assert problem["status"] == 400 and problem["detail"] == error.body["message"]


def listed_as(param: str) -> str:
    """The name REFUSED lists a param under: `messages.*.role` for `messages.2.role`."""
    return ".".join("*" if part.isdigit() else part for part in param.split("."))


def test_every_refused_parameter_is_tested():
    assert {listed_as(param) for param in REFUSED_REQUESTS} == set(REFUSED)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("param", list(REFUSED_REQUESTS))
def test_a_parameter_the_server_cannot_honour_is_a_400_naming_it(client, pg, param, stream):
    user = new_user()
    error = refused(client, stream, user=user, **REFUSED_REQUESTS[param])
    assert_refused_as(error, param)
    # The first refused parameter leads the message (a tool message's `tool_call_id` follows its role).
    assert error.body["message"].startswith(f"{param}: {REFUSED[listed_as(param)].reason}")
    assert stored(pg, user) == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_deprecated_functions_api_is_refused_naming_each_parameter(client, stream):
    error = refused(client, stream, functions=[WEATHER["function"]], function_call="auto", n=3)
    assert_refused_as(error, "n")
    # Every refused parameter is named in the message, the first in `param`.
    functions = "the deprecated functions API is not served: send `tools` and `tool_choice`"
    assert error.body["message"] == (
        "n: this server generates one choice per request: send n requests for n choices; "
        f"functions: {functions}; function_call: {functions}"
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_parameter_the_engine_cannot_honour_is_a_400_naming_it(client, pg, stream):
    # The simulated engine has no token vocabulary to bias.
    user = new_user()
    error = refused(client, stream, user=user, logit_bias={"50256": -100})
    assert_refused_as(error, "logit_bias")
    assert error.body["message"].startswith("logit_bias: ")
    assert stored(pg, user) == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_parameter_openai_does_not_have_is_a_400_naming_it(client, pg, stream):
    user = new_user()
    error = refused(client, stream, user=user, extra_body={"foo": 1})
    assert_refused_as(error, "foo")
    assert error.body["message"] == "Unrecognized request argument supplied: foo"
    assert stored(pg, user) == []

    nested = refused(client, stream, stream_options={"include_usage": True, "bar": 2})
    assert_refused_as(nested, "stream_options.bar")
    part = refused(
        client, stream, messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "lang": "en"}]}]
    )
    assert_refused_as(part, "messages.0.content.0.lang")


def test_stream_options_without_a_stream_are_refused(client):
    error = refused(client, False, stream_options={"include_usage": True})
    assert_refused_as(error, "stream_options")
    assert error.body["message"] == "stream_options: only allowed when stream is true"


def test_a_refusal_outranks_invalid_input_elsewhere(client):
    assert_refused_as(refused(client, False, temperature=3, n=2), "n")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_values_that_ask_for_nothing_are_accepted(client, pg, stream):
    user = new_user()
    reply = client.chat.completions.create(
        model=SIM_MODEL,
        messages=[
            {"role": "user", "content": "What is the weather?", "name": "ana"},
            # An answer the SDK handed back, resent as it came: `refusal` and `tool_calls` null.
            {"role": "assistant", "content": "Sunny.", "refusal": None, "tool_calls": None},
            {"role": "user", "content": "And tomorrow?"},
        ],
        max_tokens=10,
        user=user,
        stream=stream,
        stream_options={"include_usage": True, "include_obfuscation": False} if stream else None,
        **ASKING_NOTHING,
    )
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    else:
        text = reply.choices[0].message.content
    # The name is not sent to the model, the messages are.
    assert text.startswith(f"[simulated {SIM_MODEL}: 4 messages")
    assert [role for _, role, _ in stored(pg, user)] == ["user", "assistant"]
