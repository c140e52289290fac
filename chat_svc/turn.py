"""One chat turn: context → prompt → generation → history → context.

Plain async functions over the guarded clients; the servicer only translates the wire. A whole-prompt turn
(`TurnInput.messages`, the OpenAI API) reads no context; one that names no conversation is stored in the
conversation its prompt continues (`chat_svc.continuation`, picked by the store) and writes no context either.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from chat_svc.continuation import continues_digest, head_digest, new_inputs
from chat_svc.degradation import DegradationLadder, Rung, Shed
from chatterbot.breaker import CircuitOpenError
from chatterbot.jetstream import QueuedTurn
from chatterbot.tokens import TokenCounter, approx_token_count
from chatterbot.v1 import context_pb2, inference_pb2, store_pb2, types_pb2

if TYPE_CHECKING:
    from chat_svc.clients import ContextClient, InferenceClient, StoreClient

log = logging.getLogger(__name__)

_DEGRADABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True, kw_only=True)
class TurnInput(QueuedTurn):
    """A turn to run: what a queued job carries (`QueuedTurn`), and what only a direct call can."""

    request_id: str = ""
    # The whole prompt, as an OpenAI-style request sends it; empty: built from stored context and `message`.
    messages: list[types_pb2.ChatMessage] = field(default_factory=list)
    # Tools, structured output, penalties, log probabilities, for the engine.
    options: types_pb2.GenerationOptions | None = None

    @property
    def tool_results(self) -> list[types_pb2.ChatMessage]:
        """A tool turn's own messages: the results of the calls of the prompt's last answer; else none."""
        if not self.messages or self.messages[-1].role != types_pb2.ROLE_TOOL:
            return []
        return self.messages[-new_inputs(self.messages) :]


@dataclass
class TurnResult:
    response: str
    conversation_id: str
    request_id: str
    processing_time: float
    finish_reason: types_pb2.FinishReason = types_pb2.FINISH_REASON_UNSPECIFIED
    usage: types_pb2.Usage = field(default_factory=types_pb2.Usage)
    model: str = ""
    # The tools the model called (finish_reason TOOL_CALLS).
    tool_calls: list[types_pb2.ToolCall] = field(default_factory=list)
    logprobs: list[types_pb2.TokenLogprob] = field(default_factory=list)


@dataclass
class TurnDeps:
    """The downstream clients and knobs a turn needs."""

    context: ContextClient
    inference: InferenceClient
    store: StoreClient
    system_prompt: str
    context_token_budget: int
    # Direct turns follow the degradation ladder; queued ones (workers) have none: the queue absorbs load.
    ladder: DegradationLadder | None = None
    reduced_context_token_budget: int = 768
    # Counts a user's turn once, for history and context alike (the configured tokenizer, built at start-up).
    count_tokens: TokenCounter = approx_token_count


@dataclass
class _Prepared:
    turn: TurnInput
    # "" for a whole-prompt turn that names none: the store picks it (`by_digest`).
    conversation_id: str
    request_id: str
    generate: inference_pb2.GenerateRequest
    started: float
    # The head this turn's prompt continues (chat_svc.continuation); "" when it continues none.
    continues: str = ""

    @property
    def by_digest(self) -> bool:
        """A whole-prompt turn that names no conversation: its prompt's digests say which one it is."""
        return bool(self.turn.messages) and not self.turn.conversation_id


async def _prepare(deps: TurnDeps, turn: TurnInput, whole: bool) -> _Prepared:
    started = time.perf_counter()
    ladder = deps.ladder
    rung, reason = ladder.status() if ladder is not None else (Rung.NONE, "")
    if ladder is not None and rung >= Rung.SHED:
        raise Shed(reason, ladder.retry_after)
    budget = deps.reduced_context_token_budget if rung >= Rung.REDUCED_CONTEXT else deps.context_token_budget
    model = turn.model or (ladder.light_model if ladder is not None and rung >= Rung.LIGHT_MODEL else "")
    conversation_id = turn.conversation_id or ("" if turn.messages else uuid.uuid4().hex)
    request_id = turn.request_id or uuid.uuid4().hex
    if turn.messages:
        # The request carries its whole prompt; stored context would only repeat it.
        messages = list(turn.messages)
        if all(m.role != types_pb2.ROLE_SYSTEM for m in messages):
            messages.insert(0, types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content=deps.system_prompt))
    else:
        messages = [types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content=deps.system_prompt)]
        messages += [types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content=c) for c in turn.context]
        if turn.conversation_id:
            history = await _recent_turns(deps, turn.user_id, conversation_id, budget)
            messages += [types_pb2.ChatMessage(role=t.role, content=t.content) for t in history]
        messages.append(types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=turn.message))
    sampling = types_pb2.SamplingParams(
        max_tokens=turn.max_tokens, temperature=turn.temperature, top_p=turn.top_p, stop=turn.stop
    )
    if turn.seed is not None:
        sampling.seed = turn.seed
    generate = inference_pb2.GenerateRequest(
        request_id=request_id,
        model=model,
        messages=messages,
        sampling=sampling,
        cache_only=rung >= Rung.CACHE_ONLY,
        whole=whole,
        options=turn.options,
    )
    p = _Prepared(turn, conversation_id, request_id, generate, started)
    if p.by_digest:
        p.continues = continues_digest(turn.messages)
    return p


async def _recent_turns(
    deps: TurnDeps, user_id: str, conversation_id: str, budget: int
) -> list[context_pb2.Turn]:
    try:
        response: context_pb2.GetContextResponse = await deps.context.call(
            deps.context.stub.GetContext,
            context_pb2.GetContextRequest(
                user_id=user_id, conversation_id=conversation_id, token_budget=budget
            ),
        )
    except (CircuitOpenError, grpc.aio.AioRpcError) as exc:
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in _DEGRADABLE:
            raise
        # Context makes answers better, not possible: answer without it rather than not at all.
        log.warning("context unavailable, answering without it", extra={"conversation_id": conversation_id})
        return []
    return list(response.turns)


def tool_calls(pieces: list[types_pb2.ToolCallDelta]) -> list[types_pb2.ToolCall]:
    """The whole calls of an answer from the pieces it streamed (ids and names first, arguments appended)."""
    calls: dict[int, types_pb2.ToolCall] = {}
    for piece in pieces:
        call = calls.setdefault(piece.index, types_pb2.ToolCall())
        call.id = call.id or piece.id
        call.name = call.name or piece.name
        call.arguments += piece.arguments
    return [calls[i] for i in sorted(calls)]


async def _finish(
    deps: TurnDeps,
    p: _Prepared,
    text: str,
    last: inference_pb2.GenerateResponse,
    calls: list[types_pb2.ToolCall],
    logprobs: list[types_pb2.TokenLogprob],
) -> TurnResult:
    """Store the exchange (idempotent on the request id), then remember it as context where a later turn
    reads it."""
    processing_time = time.perf_counter() - p.started
    results = p.turn.tool_results
    # Counted once, with the configured tokenizer: history and context keep the same count.
    user_tokens = 0 if results else deps.count_tokens(p.turn.message)
    head = head_digest(p.turn.messages, text, calls) if p.by_digest else ""
    request = store_pb2.AppendExchangeRequest(
        user_id=p.turn.user_id,
        conversation_id=p.conversation_id,
        request_id=p.request_id,
        assistant_message=store_pb2.ExchangeMessage(
            content=text, token_count=last.usage.completion_tokens, tool_calls=calls
        ),
        model=last.model,
        processing_time=processing_time,
        continues_digest=p.continues,
        head_digest=head,
    )
    if results:
        request.tool_results.extend(
            store_pb2.ExchangeMessage(
                content=m.content, token_count=deps.count_tokens(m.content), tool_call_id=m.tool_call_id
            )
            for m in results
        )
    else:
        request.user_message.CopyFrom(
            store_pb2.ExchangeMessage(content=p.turn.message, token_count=user_tokens)
        )
    stored: store_pb2.AppendExchangeResponse = await deps.store.call(deps.store.stub.AppendExchange, request)
    if stored.created:
        # Only this exchange's messages in the conversation: history holds nothing before them.
        first_exchange = stored.conversation.message_count == len(results or [p.turn.message]) + 1
        if not p.by_digest and not results and not calls:
            await _remember(deps, p, text, last.usage.completion_tokens, user_tokens, first_exchange)
        elif not first_exchange:
            # Its client resends the prompt and reads no context: only a /chat turn naming the conversation
            # may, and the context cached for it (if any) now lacks this exchange. (Tool calls and their
            # results are not context: a prompt built from it carries roles and contents only.)
            await _forget(deps, p.turn.user_id, stored.conversation.conversation_id)
    else:
        # A repeated request id: the first answer is the answer.
        text = stored.assistant_message.content
        calls = list(stored.assistant_message.tool_calls)
        processing_time = stored.assistant_message.processing_time
    return TurnResult(
        response=text,
        conversation_id=stored.conversation.conversation_id or p.conversation_id,
        request_id=p.request_id,
        processing_time=processing_time,
        finish_reason=last.finish_reason,
        usage=last.usage,
        model=last.model,
        tool_calls=calls,
        logprobs=logprobs,
    )


async def _remember(
    deps: TurnDeps, p: _Prepared, text: str, answer_tokens: int, user_tokens: int, first_exchange: bool
) -> None:
    # History is already safe in PostgreSQL; a context write that fails only costs the next turn some
    # cached context, so it must not fail this turn.
    try:
        await deps.context.call(
            deps.context.stub.AppendTurns,
            context_pb2.AppendTurnsRequest(
                user_id=p.turn.user_id,
                conversation_id=p.conversation_id,
                new_conversation=first_exchange,
                turns=[
                    context_pb2.Turn(
                        role=types_pb2.ROLE_USER,
                        content=p.turn.message,
                        token_count=user_tokens,
                        request_id=p.request_id,
                    ),
                    context_pb2.Turn(
                        role=types_pb2.ROLE_ASSISTANT,
                        content=text,
                        token_count=answer_tokens,
                        request_id=p.request_id,
                    ),
                ],
            ),
        )
    except Exception:
        log.warning("context append failed", exc_info=True, extra={"conversation_id": p.conversation_id})


async def _forget(deps: TurnDeps, user_id: str, conversation_id: str) -> None:
    # One DEL and no conversation lock; the next reader rebuilds the context from history. A failure only
    # leaves that reader older context, so it must not fail this turn.
    try:
        await deps.context.call(
            deps.context.stub.ClearContext,
            context_pb2.ClearContextRequest(user_id=user_id, conversation_id=conversation_id),
        )
    except Exception:
        log.warning("context clear failed", exc_info=True, extra={"conversation_id": conversation_id})


_NOTHING = inference_pb2.GenerateResponse()


async def stream_turn(
    deps: TurnDeps, turn: TurnInput, *, whole: bool = False
) -> AsyncGenerator[tuple[inference_pb2.GenerateResponse, TurnResult | None], None]:
    """Yield (the engine's delta, None) as the answer is generated (deltas with text, tool-call pieces or
    log probabilities), then (an empty delta, result) once it is stored.

    `whole`: the answer arrives as one delta when it is done (for callers that do not stream it)."""
    p = await _prepare(deps, turn, whole)
    parts: list[str] = []
    pieces: list[types_pb2.ToolCallDelta] = []
    logprobs: list[types_pb2.TokenLogprob] = []
    last = inference_pb2.GenerateResponse()
    chunks: AsyncIterator[inference_pb2.GenerateResponse] = deps.inference.stream(
        deps.inference.stub.Generate, p.generate
    )
    async for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
        if chunk.tool_calls:
            pieces.extend(chunk.tool_calls)
        if chunk.logprobs:
            logprobs.extend(chunk.logprobs)
        if chunk.text or chunk.tool_calls or chunk.logprobs:
            yield chunk, None
    yield _NOTHING, await _finish(deps, p, "".join(parts), last, tool_calls(pieces), logprobs)


async def run_turn(deps: TurnDeps, turn: TurnInput) -> TurnResult:
    """Run a whole turn and return the stored answer."""
    # Closed here, not left to the garbage collector (whose finalizer closes it in a task of its own).
    async with aclosing(stream_turn(deps, turn, whole=True)) as chunks:
        async for _, result in chunks:
            if result is not None:
                return result
    raise RuntimeError("stream_turn ended without a result")
