"""Tools, structured output, penalties and log probabilities on their way through the mesh's own layers: the
GenerationOptions an InferenceService request carries into the engine seam, the deltas back, the tool calls a
turn assembles, the digests a tool turn continues, and the rules of a tool turn in chat_svc."""

from __future__ import annotations

import grpc
import orjson
import pytest

from chat_svc.continuation import continues_digest, head_digest, new_inputs
from chat_svc.servicer import InvalidTurn, to_turn_input
from chat_svc.turn import tool_calls
from chatterbot import wire
from chatterbot.v1 import chat_pb2, inference_pb2, types_pb2
from inference_svc.engines.base import Delta, TokenLogprob, ToolCallDelta, TopLogprob, Unsupported
from inference_svc.generation import merged
from inference_svc.servicer import engine_status, to_generate_response, to_generation_request

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def generate(**options: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        request_id="r1",
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="hi")],
        options=types_pb2.GenerationOptions(**options),
    )


def tool(name: str = "get_weather", schema: dict | None = None) -> types_pb2.Tool:
    return types_pb2.Tool(
        name=name, description="d", parameters_json=orjson.dumps(schema or WEATHER).decode()
    )


def test_options_reach_the_engine_seam_as_typed_fields() -> None:
    request = to_generation_request(
        generate(
            tools=[tool()],
            tool_choice=types_pb2.ToolChoice(
                mode=types_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="get_weather"
            ),
            parallel_tool_calls=False,
            response_format=types_pb2.ResponseFormat(
                type=types_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="w", schema_json=orjson.dumps(WEATHER)
            ),
            presence_penalty=0.5,
            frequency_penalty=-1.0,
            logit_bias={42: 5.0},
            logprobs=True,
            top_logprobs=3,
        )
    )
    assert [(t.name, t.parameters) for t in request.tools] == [("get_weather", WEATHER)]
    assert request.tool_choice == "get_weather" == request.effective_tool_choice
    assert request.parallel_tool_calls is False
    assert request.response_format is not None
    assert (request.response_format.type, request.response_format.schema) == ("json_schema", WEATHER)
    assert (request.presence_penalty, request.frequency_penalty) == (0.5, -1.0)
    assert request.logit_bias == {42: 5.0}
    assert (request.logprobs, request.top_logprobs) == (True, 3)


def test_no_options_ask_for_nothing() -> None:
    request = to_generation_request(generate())
    assert request.tools == () and request.effective_tool_choice == "none"
    assert request.parallel_tool_calls is None and request.response_format is None
    assert not request.logit_bias and not request.logprobs
    with_tools = to_generation_request(generate(tools=[tool()]))
    assert with_tools.tool_choice == "" and with_tools.effective_tool_choice == "auto"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tools": [types_pb2.Tool(name="")]}, "name is required"),
        ({"tools": [tool(), tool()]}, "twice"),
        ({"tools": [types_pb2.Tool(name="f", parameters_json="{")]}, "not JSON"),
        ({"tools": [types_pb2.Tool(name="f", parameters_json="[]")]}, "JSON object"),
        (
            {
                "tools": [tool()],
                "tool_choice": types_pb2.ToolChoice(
                    mode=types_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="x"
                ),
            },
            "not one of options.tools",
        ),
        ({"tool_choice": types_pb2.ToolChoice(mode=types_pb2.TOOL_CHOICE_MODE_REQUIRED)}, "tools is empty"),
        (
            {
                "tools": [tool("auto")],
                "tool_choice": types_pb2.ToolChoice(
                    mode=types_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="auto"
                ),
            },
            "cannot force a function named 'auto'",
        ),
        (
            {"response_format": types_pb2.ResponseFormat(type=types_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)},
            "needs a schema",
        ),
        ({"presence_penalty": 2.5}, "between -2 and 2"),
        ({"frequency_penalty": -3}, "between -2 and 2"),
        ({"logit_bias": {1: 101.0}}, "between -100 and 100"),
        ({"logit_bias": {-1: 1.0}}, "token ids"),
        ({"logprobs": True, "top_logprobs": 21}, "at most 20"),
        ({"top_logprobs": 2}, "needs options.logprobs"),
    ],
)
def test_malformed_options_are_invalid(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_generation_request(generate(**options))


def test_tool_messages_reach_the_engine_with_their_calls() -> None:
    call = types_pb2.ToolCall(id="c1", name="get_weather", arguments='{"city":"Oslo"}')
    request = to_generation_request(
        inference_pb2.GenerateRequest(
            messages=[
                types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="weather?"),
                types_pb2.ChatMessage(role=types_pb2.ROLE_ASSISTANT, tool_calls=[call]),
                types_pb2.ChatMessage(role=types_pb2.ROLE_TOOL, content="12C", tool_call_id="c1", name="w"),
            ]
        )
    )
    assistant, result = request.messages[1:]
    assert [(c.id, c.name, c.arguments) for c in assistant.tool_calls] == [
        ("c1", "get_weather", '{"city":"Oslo"}')
    ]
    assert (result.role, result.content, result.tool_call_id, result.name) == ("tool", "12C", "c1", "w")


def test_an_unsupported_parameter_is_invalid_argument_naming_it() -> None:
    status = engine_status(Unsupported("logit_bias", "the engine has no vocabulary"))
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (wire.PARAM_TRAILER, "logit_bias") in status.metadata
    assert status.details == "logit_bias: the engine has no vocabulary"


def test_merged_deltas_join_each_call_and_every_logprob() -> None:
    lp = [TokenLogprob("a", -0.5, b"a", (TopLogprob("a", -0.5, b"a"),)), TokenLogprob("b", -1.0, b"b")]
    deltas = [
        Delta("", 1, tool_calls=(ToolCallDelta(0, "c1", "f", '{"x"'),)),
        Delta(
            "",
            1,
            tool_calls=(ToolCallDelta(0, arguments=": 1}"), ToolCallDelta(1, "c2", "g", "{}")),
            logprobs=(lp[0],),
        ),
        Delta("", 0, "tool_calls", 5, 2, logprobs=(lp[1],)),
    ]
    whole = merged(*deltas)
    assert whole.tool_calls == (ToolCallDelta(0, "c1", "f", '{"x": 1}'), ToolCallDelta(1, "c2", "g", "{}"))
    assert whole.logprobs == tuple(lp)
    assert (whole.token_count, whole.finish_reason, whole.prompt_tokens, whole.completion_tokens) == (
        2,
        "tool_calls",
        5,
        2,
    )
    wire_delta = to_generate_response("m", whole)
    assert wire_delta.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS
    assert [(c.index, c.id, c.name, c.arguments) for c in wire_delta.tool_calls] == [
        (0, "c1", "f", '{"x": 1}'),
        (1, "c2", "g", "{}"),
    ]
    assert [(t.token, t.logprob, t.bytes) for t in wire_delta.logprobs] == [
        ("a", -0.5, b"a"),
        ("b", -1.0, b"b"),
    ]
    assert wire_delta.logprobs[0].top_logprobs[0].token == "a"


def test_a_turn_assembles_the_calls_it_streamed() -> None:
    pieces = [
        types_pb2.ToolCallDelta(index=1, id="c2", name="g", arguments="{"),
        types_pb2.ToolCallDelta(index=0, id="c1", name="f", arguments='{"a":'),
        types_pb2.ToolCallDelta(index=0, arguments=" 1}"),
        types_pb2.ToolCallDelta(index=1, arguments="}"),
    ]
    assert [(c.id, c.name, c.arguments) for c in tool_calls(pieces)] == [
        ("c1", "f", '{"a": 1}'),
        ("c2", "g", "{}"),
    ]


def _m(role: int, content: str = "", **fields: object) -> types_pb2.ChatMessage:
    return types_pb2.ChatMessage(role=role, content=content, **fields)


CALL = types_pb2.ToolCall(id="c1", name="get_weather", arguments='{"city":"Oslo"}')
ASKED = [_m(types_pb2.ROLE_SYSTEM, "be brief"), _m(types_pb2.ROLE_USER, "weather in Oslo?")]
CALLED = [*ASKED, _m(types_pb2.ROLE_ASSISTANT, tool_calls=[CALL])]
ANSWERED = [*CALLED, _m(types_pb2.ROLE_TOOL, "12C", tool_call_id="c1")]


def test_plain_conversations_keep_the_digests_they_had() -> None:
    # [role, content] pairs, as they were digested before tool turns: stored heads still match.
    import hashlib

    prompt = [_m(types_pb2.ROLE_USER, "a"), _m(types_pb2.ROLE_ASSISTANT, "b"), _m(types_pb2.ROLE_USER, "c")]
    expected = hashlib.sha256(orjson.dumps([["user", "a"], ["assistant", "b"]])).hexdigest()[:32]
    assert continues_digest(prompt) == expected
    assert head_digest(prompt[:1], "b") == expected


def test_a_tool_turn_continues_the_head_its_call_left() -> None:
    # The call's turn stores the user message and the call; the next request resends both and adds the result.
    assert continues_digest(ASKED) == ""
    head = head_digest(ASKED, "", [CALL])
    assert continues_digest(ANSWERED) == head
    assert (
        new_inputs(ANSWERED) == 1
        and new_inputs([*ANSWERED, _m(types_pb2.ROLE_TOOL, "x", tool_call_id="c2")]) == 2
    )
    # The final answer's head is what the user's next message continues.
    final = head_digest(ANSWERED, "It is 12C in Oslo.")
    assert (
        continues_digest(
            [*ANSWERED, _m(types_pb2.ROLE_ASSISTANT, "It is 12C in Oslo."), _m(types_pb2.ROLE_USER, "thanks")]
        )
        == final
    )
    # Another call (different arguments) is another conversation.
    other = types_pb2.ToolCall(id="c1", name="get_weather", arguments='{"city":"Rome"}')
    assert head_digest(ASKED, "", [other]) != head


def turn(messages: list[types_pb2.ChatMessage], message: str = "") -> chat_pb2.ChatTurn:
    return chat_pb2.ChatTurn(user_id="user-1", message=message, messages=messages, max_tokens=16)


def test_a_tool_turn_is_a_turn_with_no_message() -> None:
    checked = to_turn_input(turn(ANSWERED), 4000)
    assert checked.message == "" and [m.content for m in checked.tool_results] == ["12C"]
    plain = to_turn_input(turn(ASKED, "weather in Oslo?"), 4000)
    assert plain.tool_results == [] and plain.options is None
    with_options = turn(ASKED, "weather in Oslo?")
    with_options.options.logprobs = True
    assert to_turn_input(with_options, 4000).options == types_pb2.GenerationOptions(logprobs=True)


@pytest.mark.parametrize(
    ("messages", "message", "error"),
    [
        (ANSWERED, "12C", "must be empty"),
        ([*ASKED, _m(types_pb2.ROLE_TOOL, "12C", tool_call_id="c1")], "", "not a call of the assistant"),
        ([*CALLED, _m(types_pb2.ROLE_TOOL, "12C", tool_call_id="c9")], "", "not a call of the assistant"),
        (
            [*CALLED, _m(types_pb2.ROLE_USER, "more"), _m(types_pb2.ROLE_TOOL, "12C", tool_call_id="c1")],
            "",
            "not a call of the assistant",
        ),
        ([*ASKED, _m(types_pb2.ROLE_USER, "x", tool_calls=[CALL])], "x", "only assistant messages"),
        (
            [*ASKED, _m(types_pb2.ROLE_ASSISTANT, tool_calls=[CALL, CALL]), _m(types_pb2.ROLE_USER, "x")],
            "x",
            "ids of their own",
        ),
        (CALLED, "x", "must be a user message or a tool result"),
    ],
)
def test_tool_turns_that_break_the_rules_are_refused(
    messages: list[types_pb2.ChatMessage], message: str, error: str
) -> None:
    with pytest.raises(InvalidTurn, match=error):
        to_turn_input(turn(messages, message), 4000)
