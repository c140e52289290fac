"""One run: load through the load balancer, the profile's faults one at a time with recovery between, then
the reconciliation and the report."""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

import httpx

from tests.chaos.cluster import API_KEY, Cluster
from tests.chaos.faults import FAULTS, PROFILES, Fault, wait_until
from tests.chaos.load import LoadClient
from tests.chaos.reconcile import PhaseFigures, dead_letters, figures, reconcile

logger = logging.getLogger(__name__)

CONCURRENCY = {"ci": 6, "full": 9}
BASELINE_SECONDS = 6.0
SETTLE_SECONDS = 4.0


@dataclass
class Report:
    profile: str
    phases: list[PhaseFigures]
    netem: bool
    duration_seconds: float
    notes: list[str] = field(default_factory=list)
    # Every request with what its client saw and its outcome in PostgreSQL: the evidence behind the table.
    requests: list[dict] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, int]:
        keys = (
            "submitted",
            "accepted",
            "answered",
            "twice",
            "failed",
            "lost",
            "server_errors",
            "stalls",
            "undelivered",
        )
        return {k: sum(getattr(p, k) for p in self.phases) for k in keys}

    def table(self) -> str:
        head = (
            "| fault | accepted | answered | answered twice | failed visibly | lost | 5xx seen | "
            "conn. errors | stream restarts | stream stalls | stored, not delivered | recovered in |"
        )
        rows = [head, "|---|" + "---:|" * 11]
        for p in self.phases:
            recover = f"{p.recover_seconds:.1f} s" if p.recover_seconds is not None else "-"
            rows.append(
                f"| {p.phase} | {p.accepted} | {p.answered} | {p.twice} | {p.failed} | {p.lost} | "
                f"{p.server_errors} | {p.transport_errors} | {p.restarts} | {p.stalls} | {p.undelivered} | {recover} |"
            )
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {**asdict(self), "totals": self.totals}


def _probe(base_url: str) -> bool:
    """A sync chat through the load balancer answers."""
    response = httpx.post(
        f"{base_url}/chat",
        json={"message": "probe", "user_id": "chaos-probe"},
        headers={"X-API-Key": API_KEY, "Idempotency-Key": uuid.uuid4().hex},
        timeout=10,
    )
    return response.status_code == 200


def _back(fault: Fault, cluster: Cluster) -> bool:
    """The faulted part is back, and a chat through the load balancer answers."""
    return fault.ready(cluster) and _probe(cluster.lb_url)


def run_scenario(
    cluster: Cluster, profile: str, stop: threading.Event, only: list[str] | None = None
) -> Report:
    """Load, the faults of `profile` (or the faults named in `only`), the reconciliation."""
    started = time.monotonic()
    from tests.chaos import netns

    names = only or PROFILES[profile]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown faults {unknown}; known: {list(FAULTS)}")
    phase = ["baseline"]
    load = LoadClient(cluster.lb_url, CONCURRENCY[profile], phase)
    load.start()
    recovered: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    try:
        stop.wait(BASELINE_SECONDS)
        for name in names:
            if stop.is_set():
                break
            fault = FAULTS[name]
            phase[0] = name
            logger.info("fault: %s", name)
            t0 = time.monotonic()
            fault.inject(cluster)
            stop.wait(fault.hold)
            fault.recover(cluster)
            ok = wait_until(functools.partial(_back, fault, cluster), timeout=120)
            recovered[name] = time.monotonic() - t0 if ok else None
            notes[name] = fault.note if ok else f"{fault.note} NOT RECOVERED within 120 s".strip()
            logger.info("fault %s: recovered in %s", name, recovered[name])
            stop.wait(SETTLE_SECONDS)
        phase[0] = "after"
        stop.wait(3)
    finally:
        load.stop()
    records = list(load.records)
    logger.info("load stopped: %d requests; reconciling", len(records))
    dead = dead_letters(cluster.settings)
    logger.info("%d dead letters", len(dead))
    outcomes = reconcile(records, [pg.dsn(pg.database) for pg in cluster.shards], dead)
    logger.info("reconciled")
    table = figures(records, outcomes, ["baseline", *names, "after"])
    for name, seconds in recovered.items():
        table[name].recover_seconds = seconds
        table[name].note = notes[name]
    report = Report(profile, list(table.values()), netns.netem_available(), time.monotonic() - started)
    outcome_of = {o.record.key: o for o in outcomes}
    for r in records:
        o = outcome_of.get(r.key)
        report.requests.append(
            {
                **asdict(r),
                "outcome": o.outcome if o else "not accepted",
                "stored": [o.user_messages, o.assistant_messages, o.job_status] if o else None,
                "dead_lettered": o.dead_lettered if o else False,
            }
        )
    unfinished = [r for r in records if not r.finished]
    if unfinished:
        report.notes.append(f"{len(unfinished)} requests still under way when the load stopped")
    return report
