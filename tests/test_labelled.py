"""`chatterbot.labelled`: series looked up once, and many observations recorded as the client records each."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from chatterbot.labelled import observe_many, series


def _samples(histogram: Histogram) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for metric in histogram.collect()
        for s in metric.samples
        if "created" not in s.name
    ]


@pytest.mark.parametrize("value", [0.0, 0.0004, 0.005, 0.0051, 0.1, 2.5, 99.0])
@pytest.mark.parametrize("n", [0, 1, 2, 15])
def test_observe_many_records_what_as_many_observations_record(value: float, n: int) -> None:
    registry = CollectorRegistry()
    buckets = (0.001, 0.005, 0.1, 2.5)
    one = Histogram("one", "d", ["model"], buckets=buckets, registry=registry)
    many = Histogram("many", "d", ["model"], buckets=buckets, registry=registry)
    child = one.labels("m")
    for _ in range(n):
        child.observe(value)
    observe_many(many.labels("m"), value, n)
    observe_many(many.labels("m"), value, 0)
    # Counts alike; the sum is n times the value where the client adds value n times (alike but for rounding).
    expected = [(name.replace("one", "many"), labels, pytest.approx(v)) for name, labels, v in _samples(one)]
    assert _samples(many) == expected


def test_a_series_is_looked_up_once_per_label_values() -> None:
    histogram = Histogram("h", "d", ["a", "b"], registry=CollectorRegistry())
    labelled = series(histogram)
    assert labelled("x", "y") is labelled("x", "y") is not labelled("x", "z")
    assert labelled("x", "y") is histogram.labels("x", "y")
