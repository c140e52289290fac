"""Labelled Prometheus series looked up once per label values, and a histogram observed many times at once.

`metric.labels(...)` validates its arguments and takes the metric's lock on every call; on the request path
that is called a dozen times a turn. The label values used there come from small fixed sets (methods,
targets, status codes, routes, models), so each series is looked up once and kept.

`observe_many(histogram, value, n)` records what `n` calls of `histogram.observe(value)` record (the sum grows
by n times the value, the first bucket whose bound holds the value by n) with one bisection and two increments, where
the client would search the buckets and take two locks n times: a delta of many tokens observes one
inter-token latency per token.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TypeVar

from prometheus_client.metrics import Histogram, MetricWrapperBase

MetricT = TypeVar("MetricT", bound=MetricWrapperBase)


def series(metric: MetricT) -> Callable[..., MetricT]:
    """A function of label values that answers `metric.labels(*values)`, looked up once per values."""
    found: dict[tuple[str, ...], MetricT] = {}

    def labelled(*values: str) -> MetricT:
        child = found.get(values)
        if child is None:
            child = found[values] = metric.labels(*values)
        return child

    return labelled


def observe_many(histogram: Histogram, value: float, n: int) -> None:
    """`histogram.observe(value)` n times over (`histogram` is a child: a series, or a metric without labels)."""
    if n <= 0:
        return
    if n == 1:
        histogram.observe(value)
        return
    # The client's own state: the running sum, and one counter per bucket with `_upper_bounds` ending in +Inf.
    histogram._raise_if_not_observable()
    histogram._sum.inc(value * n)
    histogram._buckets[bisect.bisect_left(histogram._upper_bounds, value)].inc(n)


__all__ = ["observe_many", "series"]
