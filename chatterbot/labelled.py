"""Labelled Prometheus series looked up once per label values.

`metric.labels(...)` validates its arguments and takes the metric's lock on every call; on the request path
that is called a dozen times a turn. The label values used there come from small fixed sets (methods,
targets, status codes, routes, models), so each series is looked up once and kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from prometheus_client.metrics import MetricWrapperBase

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


__all__ = ["series"]
