"""An asyncio circuit breaker for coroutines and async streams, with pybreaker holding the state.

pybreaker 1.4 only guards synchronous callables (its `call_async` needs tornado, and its open state
calls the function synchronously once the timeout elapsed), so `AsyncCircuitBreaker` keeps a
`pybreaker.CircuitBreaker` as the state holder (storage, fail counter, `fail_max`, `reset_timeout`,
listeners, `open()/half_open()/close()`) and drives the transitions itself around awaits:

- closed: calls pass; `fail_max` consecutive system errors open the circuit.
- open: calls fail at once with `CircuitOpenError` (nothing is called) until `reset_timeout` elapsed.
- half-open: exactly one trial call at a time is admitted, the others fail as if open; a trial that
  succeeds closes the circuit, one that fails opens it again for a fresh `reset_timeout`.

Errors that pybreaker's `exclude` list (or the `is_failure` predicate) marks as business errors count
as successes, as in pybreaker. A caller that gives up (cancellation, closing a stream early) is neither.
The breaker is meant for one event loop; it takes no locks of its own because admission never awaits.
"""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from datetime import UTC, datetime
from typing import Any, TypeVar

import pybreaker
from prometheus_client import Counter, Gauge

T = TypeVar("T")

STATE_CLOSED = pybreaker.STATE_CLOSED
STATE_OPEN = pybreaker.STATE_OPEN
STATE_HALF_OPEN = pybreaker.STATE_HALF_OPEN

_STATE_VALUES = {STATE_CLOSED: 0, STATE_HALF_OPEN: 1, STATE_OPEN: 2}

BREAKER_STATE = Gauge(
    "chatterbot_breaker_state",
    "Circuit breaker state per target: 0 closed, 1 half-open, 2 open",
    ["target"],
)
BREAKER_TRANSITIONS = Counter(
    "chatterbot_breaker_transitions_total",
    "Circuit breaker state changes per target, by the state entered",
    ["target", "to"],
)


class CircuitOpenError(pybreaker.CircuitBreakerError):
    """The circuit to `target` is open (or busy with its trial call); try again in `retry_after` seconds."""

    def __init__(self, target: str, retry_after: float) -> None:
        super().__init__(f"circuit to {target} is open; retry after {retry_after:.3f}s")
        self.target = target
        self.retry_after = retry_after


class _MetricsListener(pybreaker.CircuitBreakerListener):
    """Mirrors every state change of one breaker into the Prometheus gauge and counter."""

    def __init__(self, target: str) -> None:
        self._target = target

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        BREAKER_STATE.labels(self._target).set(_STATE_VALUES[new_state.name])
        BREAKER_TRANSITIONS.labels(self._target, new_state.name).inc()


class AsyncCircuitBreaker:
    """Circuit breaker for coroutines (`call`) and async streams (`stream`) over a pybreaker state holder."""

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout: float = 60.0,
        is_failure: Callable[[BaseException], bool] | None = None,
        exclude: Iterable[type[BaseException] | Callable[[BaseException], bool]] = (),
        listeners: Sequence[pybreaker.CircuitBreakerListener] = (),
        state_storage: pybreaker.CircuitBreakerStorage | None = None,
    ) -> None:
        """Create a closed breaker for target `name`.

        `is_failure(exc)` says whether an error is a failure of the target; errors it rejects, like
        those in `exclude`, count as successes. Without either, every `Exception` is a failure.
        """
        excluded = list(exclude)
        if is_failure is not None:
            excluded.append(lambda exc: not is_failure(exc))
        # Kept here because pybreaker offers the fail counter and `opened_at` only through its storage.
        self._storage = state_storage or pybreaker.CircuitMemoryStorage(STATE_CLOSED)
        self.circuit = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            exclude=excluded,
            listeners=[_MetricsListener(name), *listeners],
            state_storage=self._storage,
            name=name,
        )
        self._trial_in_flight = False
        BREAKER_STATE.labels(name).set(_STATE_VALUES[self.circuit.current_state])

    @property
    def name(self) -> str:
        """The target this breaker guards."""
        return self.circuit.name or ""

    @property
    def state(self) -> str:
        """One of "closed", "open", "half-open"; an open breaker stays "open" until a call after its timeout."""
        return self.circuit.current_state

    @property
    def fail_counter(self) -> int:
        """Consecutive failures counted so far."""
        return self.circuit.fail_counter

    @property
    def retry_after(self) -> float:
        """Seconds until an open breaker admits its trial call; 0 when a call would be admitted now."""
        state = self.circuit.current_state
        if state == STATE_OPEN:
            return self._open_time_left()
        if state == STATE_HALF_OPEN and self._trial_in_flight:
            # The running trial decides; if it fails, the next one is a full reset_timeout away.
            return float(self.circuit.reset_timeout)
        return 0.0

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Await `fn(*args, **kwargs)` if the breaker admits it, and count its outcome."""
        trial = self._admit(fn, args, kwargs)
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            self._on_failure(trial, exc)
            raise
        except BaseException:
            self._on_abandon(trial)
            raise
        self._on_success(trial)
        return result

    def stream(
        self, fn: Callable[..., AsyncIterable[T]], *args: Any, **kwargs: Any
    ) -> AsyncGenerator[T, None]:
        """Iterate `fn(*args, **kwargs)` under the breaker.

        The breaker admits the call when iteration starts, before `fn` is called. An error while opening
        or iterating counts as a failure, reaching the end as a success, and a consumer that stops early
        (`aclose()`, cancellation) as neither; the inner stream is closed in every case.
        """
        return self._guarded_stream(fn, args, kwargs)

    async def _guarded_stream(
        self, fn: Callable[..., AsyncIterable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncGenerator[T, None]:
        trial = self._admit(fn, args, kwargs)
        iterator: AsyncIterator[T] | None = None
        try:
            iterator = aiter(fn(*args, **kwargs))
            while True:
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    break
                yield item
        except Exception as exc:
            self._on_failure(trial, exc)
            raise
        except BaseException:
            # GeneratorExit (the consumer closed us) or cancellation: the target did nothing wrong.
            self._on_abandon(trial)
            raise
        else:
            self._on_success(trial)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    def _open_time_left(self) -> float:
        opened_at = self._storage.opened_at
        if opened_at is None:
            return 0.0
        elapsed = (datetime.now(UTC) - opened_at).total_seconds()
        return max(0.0, self.circuit.reset_timeout - elapsed)

    def _admit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Admit a call or raise CircuitOpenError; return whether the call is the half-open trial."""
        state = self.circuit.current_state
        if state == STATE_OPEN:
            time_left = self._open_time_left()
            if time_left > 0:
                raise CircuitOpenError(self.name, time_left)
            self.circuit.half_open()
            state = STATE_HALF_OPEN
        trial = state == STATE_HALF_OPEN
        if trial:
            if self._trial_in_flight:
                raise CircuitOpenError(self.name, self.retry_after)
            self._trial_in_flight = True
        for listener in self.circuit.listeners:
            listener.before_call(self.circuit, fn, *args, **kwargs)
        return trial

    def _on_success(self, trial: bool) -> None:
        for listener in self.circuit.listeners:
            listener.success(self.circuit)
        if trial:
            self._trial_in_flight = False
            self._storage.increment_success_counter()
            if self._storage.success_counter >= self.circuit.success_threshold:
                self.circuit.close()
        elif self.circuit.current_state == STATE_CLOSED:
            self._storage.reset_counter()
        # A call admitted while closed that ends after the circuit opened says nothing about the trial.

    def _on_failure(self, trial: bool, exc: BaseException) -> None:
        if not self.circuit.is_system_error(exc):
            self._on_success(trial)
            return
        counted = trial or self.circuit.current_state == STATE_CLOSED
        if counted:
            self._storage.increment_counter()
        for listener in self.circuit.listeners:
            listener.failure(self.circuit, exc)
        if trial:
            self._trial_in_flight = False
            self.circuit.open()
        elif counted and self._storage.counter >= self.circuit.fail_max:
            self.circuit.open()
        # Late failures of calls admitted before the circuit opened must not push the trial further out.

    def _on_abandon(self, trial: bool) -> None:
        if trial:
            # Nothing was learnt about the target: let the next caller make the trial.
            self._trial_in_flight = False


__all__ = ["BREAKER_STATE", "BREAKER_TRANSITIONS", "AsyncCircuitBreaker", "CircuitOpenError"]
