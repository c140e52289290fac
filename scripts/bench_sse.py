"""Whether one edge process holds 10,000 concurrent SSE streams, and what each stream costs it.

DESIGN.md's target: one edge process holds 10,000 concurrent SSE streams (a bare Starlette SSE server holds
10,000 in under 300 MB). Starts its own mesh (embedded servers, sim engine slowed to `--itl-ms` a token so
that every answer streams for the whole run), queues `--jobs` turns with POST /stream-chat, then opens
`--streams` GET /stream/{correlation_id} connections spread evenly over those jobs, `--ramp` new ones a
second. The clients are bare asyncio sockets that count events, so the client stays cheap next to the edge.
Measures:
  rss       the edge process's resident memory with the mesh up and no stream, with every stream open, at
            the end of the hold and after closing; the growth over the streams then open is one stream's cost;
  opened    streams answered 200, and how long opening all of them took;
  live      streams that received at least one token event during the last `--hold` seconds;
  events/s  token events received per second over the hold, against what the engine produces;
  loop      the edge's event loop while streams open and over the hold: the share of a core it ran, and the
            share it waited, runnable, for a core (100% running is all one Python process can do);
  errors    by kind: refused connections, HTTP statuses, no answer, streams ended or broken early.
All streams are closed at the end and the jobs cancelled; the edge's in-flight gauge must come back to 0.

    python scripts/bench_sse.py --streams 10000 --jobs 100 --ramp 250 --hold 20
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from chatterbot.settings import Settings
from ops.launcher import Mesh

KEY = "bench-service-key"
MAX_TOKENS = 1024  # the most the API allows: every answer runs to it
OPEN_TIMEOUT_SECONDS = 60
TOKEN_MARK = b'data: {"token"'
ERROR_MARK = b"event: error"
DONE_MARK = b"data: [DONE]"


def raise_fd_limit() -> int:
    """The soft open-files limit raised to the hard one; children started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def loop_seconds(pid: int) -> tuple[float, float]:
    """Seconds the process's main thread (the event loop) ran, and waited runnable for a free core."""
    ran, waited, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(ran) / 1e9, int(waited) / 1e9


def share(before: tuple[float, float], after: tuple[float, float], seconds: float) -> tuple[float, float]:
    return (after[0] - before[0]) / seconds, (after[1] - before[1]) / seconds


@dataclass(slots=True)
class Stream:
    correlation_id: str
    status: int = 0
    events: int = 0
    ended: bool = False
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.StreamWriter | None = None


class Viewers:
    """SSE viewers on raw sockets: a minimal GET, the status line, then only counted bytes."""

    def __init__(self, edge_url: str) -> None:
        url = urlsplit(edge_url)
        self.host, self.port = url.hostname, url.port
        self.streams: list[Stream] = []
        self.tasks: list[asyncio.Task] = []
        self.errors: Counter[str] = Counter()
        self.closing = False

    def request(self, correlation_id: str) -> bytes:
        return (
            f"GET /stream/{correlation_id} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"X-API-Key: {KEY}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()

    def open(self, correlation_id: str) -> Stream:
        stream = Stream(correlation_id)
        self.streams.append(stream)
        self.tasks.append(asyncio.create_task(self._run(stream)))
        return stream

    async def _run(self, stream: Stream) -> None:
        reader = None
        try:
            reader = await asyncio.wait_for(self._connect(stream), OPEN_TIMEOUT_SECONDS)
        except TimeoutError:
            self.errors[f"no answer in {OPEN_TIMEOUT_SECONDS} s"] += 1
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.errors[f"open: {type(exc).__name__}"] += 1
        finally:
            stream.opened.set()
        try:
            if reader is not None:
                await self._read(stream, reader)
        except OSError as exc:
            if not self.closing:
                self.errors[f"read: {type(exc).__name__}"] += 1
        finally:
            stream.ended = True
            self._close(stream)

    async def _connect(self, stream: Stream) -> asyncio.StreamReader | None:
        """The stream's reader once the edge answered 200; None (the error counted) otherwise."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        stream.writer = writer
        writer.write(self.request(stream.correlation_id))
        head = await reader.readuntil(b"\r\n\r\n")
        stream.status = int(head.split(b" ", 2)[1])
        if stream.status != 200:
            self.errors[f"http {stream.status}"] += 1
            return None
        return reader

    async def _read(self, stream: Stream, reader: asyncio.StreamReader) -> None:
        tail = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                if not self.closing:
                    self.errors["closed by the edge"] += 1
                return
            data = tail + chunk
            stream.events += data.count(TOKEN_MARK)
            if ERROR_MARK in data:
                self.errors["error event"] += 1
                return
            if DONE_MARK in data:
                self.errors["job finished while watched"] += 1
                return
            tail = data[-(len(TOKEN_MARK) - 1) :]

    def _close(self, stream: Stream) -> None:
        if stream.writer is not None:
            stream.writer.close()
            stream.writer = None

    async def close_all(self) -> None:
        self.closing = True
        for stream in self.streams:
            self._close(stream)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def edge_in_flight(http: httpx.AsyncClient, metrics_url: str) -> float | None:
    try:
        text = (await http.get(metrics_url)).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("chatterbot_edge_in_flight "):
            return float(line.split()[1])
    return None


async def bench(mesh: Mesh, args: argparse.Namespace) -> dict:
    edge = mesh.services["edge"]
    pid = edge.pid
    assert pid is not None
    metrics_url = f"http://127.0.0.1:{edge.env['CHATTERBOT_METRICS_PORT']}/metrics"
    out: dict = {}
    async with httpx.AsyncClient(base_url=mesh.edge_url, headers={"X-API-Key": KEY}, timeout=30) as http:

        async def submit(i: int) -> str:
            r = await http.post(
                "/stream-chat",
                json={
                    "message": f"bench sse {i}: tell me a long story",
                    "user_id": f"bench-sse-{i}",
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0.7,
                },
            )
            r.raise_for_status()
            return r.json()["correlation_id"]

        await asyncio.sleep(2)  # let the edge settle after start-up before the baseline
        out["rss_baseline"] = rss_mb(pid)
        cids = list(await asyncio.gather(*(submit(i) for i in range(args.jobs))))
        viewers = Viewers(mesh.edge_url)
        try:
            loop = asyncio.get_running_loop()
            started, sched = loop.time(), loop_seconds(pid)
            for i in range(args.streams):
                delay = started + i / args.ramp - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                viewers.open(cids[i % len(cids)])
            await asyncio.gather(*(s.opened.wait() for s in viewers.streams))
            out["open_seconds"] = loop.time() - started
            out["loop_open"] = share(sched, loop_seconds(pid), out["open_seconds"])
            out["answered"] = sum(s.status == 200 for s in viewers.streams)
            await asyncio.sleep(2)
            out["rss_open"] = rss_mb(pid)
            out["open_at_rss"] = sum(s.status == 200 and not s.ended for s in viewers.streams)
            out["in_flight_open"] = await edge_in_flight(http, metrics_url)

            before = [s.events for s in viewers.streams]
            out["open_at_hold"] = sum(not s.ended for s in viewers.streams)
            sched, hold_started = loop_seconds(pid), time.perf_counter()
            await asyncio.sleep(args.hold)
            held = time.perf_counter() - hold_started
            out["loop_hold"] = share(sched, loop_seconds(pid), held)
            deltas = [s.events - b for s, b in zip(viewers.streams, before, strict=True)]
            out["live"] = sum(d > 0 for d in deltas)
            out["events_per_s"] = sum(deltas) / held
            out["rss_hold"] = rss_mb(pid)
        finally:
            await viewers.close_all()
            await asyncio.gather(*(http.delete(f"/stream/{cid}") for cid in cids), return_exceptions=True)
        out["errors"] = viewers.errors
        deadline = time.monotonic() + 15
        out["in_flight_closed"] = await edge_in_flight(http, metrics_url)
        while out["in_flight_closed"] and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            out["in_flight_closed"] = await edge_in_flight(http, metrics_url)
        out["rss_closed"] = rss_mb(pid)
    return out


def gauge(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--ramp", type=float, default=250, help="new streams a second")
    parser.add_argument("--hold", type=float, default=20, help="seconds all streams are watched for tokens")
    parser.add_argument("--itl-ms", type=float, default=500, help="the sim engine's time between tokens")
    parser.add_argument(
        "--data-dir", type=Path, help="keep the mesh's data and logs here (default: a temp dir)"
    )
    args = parser.parse_args()
    # Before the mesh starts, so the edge inherits it.
    fd_limit = raise_fd_limit()
    if fd_limit < args.streams + 1000:
        print(f"open-files limit {fd_limit} is too low for {args.streams} streams", file=sys.stderr)
        return 2
    run_seconds = args.streams / args.ramp + args.hold + 30
    if MAX_TOKENS * args.itl_ms / 1000 < run_seconds:
        print(
            f"answers last {MAX_TOKENS * args.itl_ms / 1000:.0f} s but the run takes about {run_seconds:.0f} s: "
            "raise --itl-ms or --ramp",
            file=sys.stderr,
        )
        return 2
    settings = Settings(
        _env_file=None,
        api_keys=[KEY],
        admin_keys=["bench-admin-key"],
        log_level="WARNING",
        sim_ttft_ms=0,
        sim_prefill_ms_per_token=0,
        sim_itl_ms=args.itl_ms,
        sim_itl_at_max_ms=args.itl_ms,
        sim_mean_output_tokens=100_000,
        sim_max_num_seqs=max(256, args.jobs),
        worker_concurrency=args.jobs,
        result_cache_ttl_seconds=0,
        stream_deadline_seconds=3600,
        shutdown_grace_seconds=3,
    )
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(settings, args.data_dir or Path(tmp), prefer_configured_ports=False)
        mesh.start()
        try:
            r = asyncio.run(bench(mesh, args))
        finally:
            mesh.stop()
    n = args.streams
    grown = r["rss_open"] - r["rss_baseline"]
    per_stream_kb = grown * 1024 / r["open_at_rss"] if r["open_at_rss"] else float("nan")
    engine_rate = r["open_at_hold"] * 1000 / args.itl_ms
    errors = ", ".join(f"{kind}: {count}" for kind, count in r["errors"].most_common()) or "none"
    print(
        f"$ python scripts/bench_sse.py --streams {n} --jobs {args.jobs} --ramp {args.ramp:g} "
        f"--hold {args.hold:g} --itl-ms {args.itl_ms:g}"
    )
    print(f"{'edge rss, baseline':<28} {r['rss_baseline']:>9.1f} MB")
    # Streams that failed leave memory the allocator keeps: a cost per stream is honest only with ~all open.
    mostly_open = r["open_at_rss"] >= 0.99 * n
    cost = f"{per_stream_kb:.1f} KB a stream" if mostly_open else "no cost a stream: over 1% failed or ended"
    print(
        f"{'edge rss, all streams open':<28} {r['rss_open']:>9.1f} MB  (+{grown:.1f} MB for "
        f"{r['open_at_rss']} open; {cost})"
    )
    print(f"{'edge rss, end of hold':<28} {r['rss_hold']:>9.1f} MB")
    print(f"{'edge rss, streams closed':<28} {r['rss_closed']:>9.1f} MB")
    print(
        f"{'streams answered 200':<28} {r['answered']:>9} of {n}, all answered or failed after "
        f"{r['open_seconds']:.1f} s ({r['answered'] / r['open_seconds']:.0f} answered/s)"
    )
    print(f"{'streams live in hold':<28} {r['live']:>9} of {n}")
    print(
        f"{'token events/s in hold':<28} {r['events_per_s']:>9.0f} (the engine makes ~{engine_rate:.0f} for the "
        f"{r['open_at_hold']} streams open)"
    )
    for phase in ("open", "hold"):
        ran, waited = r[f"loop_{phase}"]
        print(
            f"{'edge event loop, ' + phase:<28} {ran * 100:>8.0f}% of a core running, {waited * 100:.0f}% "
            "waiting for a core"
        )
    print(
        f"{'edge in flight, open/closed':<28} {gauge(r['in_flight_open']):>9} / {gauge(r['in_flight_closed'])}"
    )
    print(f"{'errors':<28} {errors}")
    held = r["answered"] == n and r["live"] == n
    at_10k = (
        f", {per_stream_kb * 10_000 / 1024 + r['rss_baseline']:.0f} MB at that rate for 10,000"
        if mostly_open
        else ""
    )
    print(
        f"{n} streams held by one edge: {'yes' if held else 'no'}; {r['rss_open']:.0f} MB with "
        f"{r['open_at_rss']} open{at_10k} (a bare Starlette SSE server: under 300 MB for 10,000)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
