"""AsyncCircuitBreaker: closed → open → half-open → closed for coroutines and async streams."""

from __future__ import annotations

import asyncio
import itertools
import time

import pybreaker
import pytest
from prometheus_client import REGISTRY

from chatterbot.breaker import AsyncCircuitBreaker, CircuitOpenError

RESET = 0.2
_names = itertools.count()


class TargetDown(Exception):
    pass


class BadRequest(Exception):
    pass


class Recorder(pybreaker.CircuitBreakerListener):
    """Keeps the states a breaker went through."""

    def __init__(self) -> None:
        self.states: list[str] = []

    def state_change(self, cb, old_state, new_state) -> None:
        self.states.append(new_state.name)


class Target:
    """A fake dependency whose calls can be counted, made to fail, or held open."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def __call__(self, value: str = "ok") -> str:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise TargetDown("down")
        return value

    async def items(self, count: int, fail_after: int | None = None):
        self.calls += 1
        for i in range(count):
            if fail_after is not None and i == fail_after:
                raise TargetDown("broke mid-stream")
            yield i


def make_breaker(**kwargs) -> tuple[AsyncCircuitBreaker, Recorder]:
    recorder = Recorder()
    kwargs.setdefault("fail_max", 3)
    kwargs.setdefault("reset_timeout", RESET)
    breaker = AsyncCircuitBreaker(f"test-breaker-{next(_names)}", listeners=[recorder], **kwargs)
    return breaker, recorder


async def trip(breaker: AsyncCircuitBreaker, target: Target) -> None:
    target.fail = True
    for _ in range(breaker.circuit.fail_max):
        with pytest.raises(TargetDown):
            await breaker.call(target)


async def test_opens_after_fail_max_failures_and_then_fails_fast_without_calling():
    breaker, recorder = make_breaker()
    target = Target()
    target.fail = True
    for expected in (1, 2):
        with pytest.raises(TargetDown):
            await breaker.call(target)
        assert breaker.state == "closed" and breaker.fail_counter == expected

    # The failure that trips the breaker still reaches the caller as itself.
    with pytest.raises(TargetDown):
        await breaker.call(target)
    assert breaker.state == "open"
    assert recorder.states == ["open"]

    started = time.perf_counter()
    with pytest.raises(CircuitOpenError) as err:
        await breaker.call(target)
    assert time.perf_counter() - started < 0.25  # no call made: far below any deadline
    assert isinstance(err.value, pybreaker.CircuitBreakerError)
    assert err.value.target == breaker.name
    assert 0 < err.value.retry_after <= RESET
    assert 0 < breaker.retry_after <= RESET
    assert target.calls == 3


async def test_success_resets_the_failure_count():
    breaker, _ = make_breaker()
    target = Target()
    target.fail = True
    for _ in range(2):
        with pytest.raises(TargetDown):
            await breaker.call(target)
    target.fail = False
    assert await breaker.call(target, "fine") == "fine"
    assert breaker.fail_counter == 0 and breaker.state == "closed"


async def test_half_open_admits_exactly_one_concurrent_trial_and_its_success_closes():
    breaker, recorder = make_breaker()
    target = Target()
    await trip(breaker, target)
    await asyncio.sleep(RESET + 0.02)
    assert breaker.retry_after == 0

    target.fail = False
    target.gate = asyncio.Event()
    calls_before = target.calls
    trial = asyncio.create_task(breaker.call(target, "trial"))
    await asyncio.sleep(0.01)
    assert breaker.state == "half-open"

    # Everyone else is refused while the trial runs, and nothing else reaches the target.
    others = await asyncio.gather(*(breaker.call(target) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(result, CircuitOpenError) and result.retry_after > 0 for result in others)
    assert target.calls == calls_before + 1

    target.gate.set()
    assert await trial == "trial"
    assert breaker.state == "closed" and breaker.fail_counter == 0
    assert recorder.states == ["open", "half-open", "closed"]
    assert await breaker.call(target, "again") == "again"


async def test_failed_trial_reopens_with_a_fresh_timeout():
    breaker, recorder = make_breaker()
    target = Target()
    await trip(breaker, target)
    await asyncio.sleep(RESET + 0.02)

    with pytest.raises(TargetDown):
        await breaker.call(target)
    assert breaker.state == "open"
    assert recorder.states == ["open", "half-open", "open"]
    assert breaker.retry_after > RESET / 2
    with pytest.raises(CircuitOpenError):
        await breaker.call(target)


async def test_cancelled_trial_counts_as_neither_and_frees_the_trial_slot():
    breaker, _ = make_breaker()
    target = Target()
    await trip(breaker, target)
    await asyncio.sleep(RESET + 0.02)

    target.fail = False
    target.gate = asyncio.Event()
    trial = asyncio.create_task(breaker.call(target))
    await asyncio.sleep(0.01)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert breaker.state == "half-open"

    target.gate.set()
    assert await breaker.call(target, "next trial") == "next trial"
    assert breaker.state == "closed"


async def test_excluded_errors_count_as_success_and_never_open_it():
    target = Target()

    async def bad_request() -> None:
        raise BadRequest("your fault")

    for breaker, _ in (
        make_breaker(exclude=[BadRequest]),
        make_breaker(is_failure=lambda exc: not isinstance(exc, BadRequest)),
    ):
        target.fail = True
        with pytest.raises(TargetDown):
            await breaker.call(target)
        assert breaker.fail_counter == 1
        for _ in range(5):
            with pytest.raises(BadRequest):
                await breaker.call(bad_request)
        assert breaker.state == "closed" and breaker.fail_counter == 0


async def test_stream_failure_mid_iteration_counts_as_failure():
    breaker, _ = make_breaker(fail_max=2)
    target = Target()
    for _attempt in range(2):
        received = []
        with pytest.raises(TargetDown):
            async for item in breaker.stream(target.items, 5, fail_after=2):
                received.append(item)
        assert received == [0, 1]
    assert breaker.state == "open"

    # An open breaker refuses before the stream is even opened.
    with pytest.raises(CircuitOpenError):
        async for _ in breaker.stream(target.items, 5):
            pass
    assert target.calls == 2


async def test_stream_clean_end_counts_as_success():
    breaker, _ = make_breaker()
    target = Target()
    target.fail = True
    with pytest.raises(TargetDown):
        await breaker.call(target)
    assert [item async for item in breaker.stream(target.items, 3)] == [0, 1, 2]
    assert breaker.fail_counter == 0


async def test_stream_closed_early_counts_as_neither_and_closes_the_inner_stream():
    breaker, _ = make_breaker()
    target = Target()
    inner_closed = asyncio.Event()

    async def endless():
        try:
            while True:
                yield "token"
                await asyncio.sleep(0)
        finally:
            inner_closed.set()

    target.fail = True
    with pytest.raises(TargetDown):
        await breaker.call(target)
    assert breaker.fail_counter == 1

    stream = breaker.stream(endless)
    assert await anext(stream) == "token"
    await stream.aclose()
    assert inner_closed.is_set()
    assert breaker.fail_counter == 1 and breaker.state == "closed"


async def test_stream_trial_closed_early_frees_the_trial_slot():
    breaker, _ = make_breaker()
    target = Target()
    await trip(breaker, target)
    await asyncio.sleep(RESET + 0.02)

    stream = breaker.stream(target.items, 10)
    assert await anext(stream) == 0
    assert breaker.state == "half-open"
    with pytest.raises(CircuitOpenError):
        await breaker.call(target)
    await stream.aclose()

    assert [item async for item in breaker.stream(target.items, 2)] == [0, 1]
    assert breaker.state == "closed"


async def test_state_is_exported_to_prometheus():
    breaker, _ = make_breaker(fail_max=1)
    target = Target()

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("chatterbot_breaker_state", {"target": breaker.name})

    def transitions(to: str) -> float | None:
        return REGISTRY.get_sample_value(
            "chatterbot_breaker_transitions_total", {"target": breaker.name, "to": to}
        )

    assert gauge() == 0
    await trip(breaker, target)
    assert gauge() == 2 and transitions("open") == 1
    await asyncio.sleep(RESET + 0.02)
    target.fail = False
    target.gate = asyncio.Event()
    trial = asyncio.create_task(breaker.call(target))
    await asyncio.sleep(0.01)
    assert gauge() == 1 and transitions("half-open") == 1
    target.gate.set()
    await trial
    assert gauge() == 0 and transitions("closed") == 1
