"""`chatterbot bench`: what the mesh costs and holds, measured on this machine against a mesh of its own.

Each benchmark starts a whole mesh (`ops.launcher.Mesh`, embedded NATS, PostgreSQL and Valkey) in a temp data
dir, so it needs nothing running and leaves nothing behind; all traffic stays on 127.0.0.1.

  gateway  The OpenAI route against an instant upstream, the way `shared/bench/litellm/run.sh` measures a
           gateway: the bundled fake upstream (`ops.fake_upstream`, 16 tokens an answer, no sleeps) is driven
           directly, then through the mesh (engine `openai` pointed at it, history and context persisted as
           always), with POST /v1/chat/completions non-stream and stream (16 chunks), at `--connections` and
           at 1 connection, the same body every time. Per phase: req/s, p50/p90/p99 latency, errors by kind,
           and the CPU time each process spent per request (psutil, each process with its children: the
           services, PostgreSQL, Valkey, NATS, the upstream, the load generator); at 1 connection the latency
           the mesh adds over calling the upstream directly. The load comes from `wrk` when it is on PATH,
           else from a lean HTTP/1.1 keep-alive client on raw asyncio streams in a process of its own, so it
           costs little of the cores it measures; the output says which.
  sse      Whether one edge holds `--streams` concurrent queued streams (POST /stream-chat, then
           GET /stream/{id}), and what each costs it in memory and event-loop time.
  jobs     JetStream jobs accepted per second through POST /async-chat with the workers stopped, then that
           backlog drained by the workers, counted in the store's shards: none lost, none stored twice.

`--json` prints the results as one JSON object instead of tables. A progress bar goes to stderr (rich when it
is installed and stderr is a terminal, else a plain line; `--no-progress` silences it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import psutil

if TYPE_CHECKING:
    from chatterbot.settings import Settings
    from ops.launcher import Mesh

KEY = "bench-service-key"
ADMIN_KEY = "bench-admin-key"
ANSWER_TOKENS = 16  # the fake upstream's answer, and max_tokens of every benchmark turn
REQUEST_TIMEOUT_SECONDS = 10.0  # what the reference harness gives wrk (WRK_TIMEOUT)
# The reference harness's request: one user message, no `user`, so every turn lands in one stored conversation.
PROMPT = "Tell me a story"


# --- measuring --------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values` by rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) each process and its children have spent so far."""
    spent: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            process = psutil.Process(pid)
            family = [process, *process.children(recursive=True)]
            total = 0.0
            for p in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = p.cpu_times()
                    total += times.user + times.system
            spent[name] = total
        except psutil.NoSuchProcess:
            spent[name] = 0.0
    return spent


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    served = max(1, requests)
    return {name: (after[name] - before.get(name, 0.0)) * 1000 / served for name in after}


def mesh_pids(mesh: Mesh) -> dict[str, int]:
    """The mesh's processes by name: service processes (edge, chat, ... or mesh-0, mesh-1), then nats,
    postgres, redis."""
    processes = {**mesh.children, **mesh.servers}
    return {name: process.pid for name, process in processes.items() if process.pid}


def raise_fd_limit() -> int:
    """The soft open-files limit raised to the hard one; children started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- progress on stderr -----------------------------------------------------------------------------------


class Progress(Protocol):
    def begin(self, label: str, total: float | None = None) -> None:
        """A new step; `total` None when its length is unknown."""

    def update(self, completed: float) -> None: ...

    def close(self) -> None: ...


class QuietProgress:
    def begin(self, label: str, total: float | None = None) -> None:
        pass

    def update(self, completed: float) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgress:
    """One stderr line a step; on a terminal, redrawn in place with the step's percentage."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.label = ""
        self.total: float | None = None
        self.open = False

    def begin(self, label: str, total: float | None = None) -> None:
        self._end_line()
        self.label, self.total, self.open = label, total, True
        sys.stderr.write(f"{label} ..." if self.tty else f"{label}\n")
        sys.stderr.flush()
        self.open = self.tty

    def update(self, completed: float) -> None:
        if self.tty and self.total:
            sys.stderr.write(f"\r{self.label} {min(100.0, 100 * completed / self.total):3.0f}%")
            sys.stderr.flush()

    def _end_line(self) -> None:
        if self.open:
            sys.stderr.write("\n")
            self.open = False

    def close(self) -> None:
        self._end_line()


class RichProgress:
    """rich's progress bars, one a step, kept on screen as a log of the run."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self._task: TaskID | None = None
        self._progress.start()

    def begin(self, label: str, total: float | None = None) -> None:
        self._finish_task()
        self._task = self._progress.add_task(label, total=total)

    def update(self, completed: float) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=completed)

    def _finish_task(self) -> None:
        if self._task is not None:
            task = self._progress.tasks[-1]
            self._progress.update(self._task, total=task.total or 1, completed=task.total or 1)
            self._task = None

    def close(self) -> None:
        self._finish_task()
        self._progress.stop()


def make_progress(enabled: bool) -> Progress:
    if not enabled:
        return QuietProgress()
    if sys.stderr.isatty():
        try:
            return RichProgress()
        except ImportError:
            pass
    return LineProgress()


async def tick(progress: Progress, started: float, every: float = 0.2) -> None:
    """Advance a time-based step (its total in seconds) until cancelled."""
    while True:
        progress.update(time.perf_counter() - started)
        await asyncio.sleep(every)


# --- a lean HTTP/1.1 client on raw asyncio streams --------------------------------------------------------


class HttpError(Exception):
    """The server broke the HTTP exchange (closed early, sent something unparseable)."""


@dataclass(slots=True)
class RawResponse:
    status: int
    body: bytes  # the whole body, or for a chunked one its last two chunks (enough to find `[DONE]`)
    keep_alive: bool


def http_request(method: str, host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """One request's bytes, ready to write as many times as it is sent."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    """Read one response: Content-Length, chunked, or until the server closes."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise HttpError("closed before the response") from exc
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise HttpError(f"bad status line {lines[0][:80]!r}") from exc
    length, chunked, keep_alive = -1, False, True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep_alive = b"close" not in value.lower()
    try:
        if chunked:
            last = b""
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers are sent by the servers measured
                    break
                last, body = body, (await reader.readexactly(size + 2))[:-2]
            return RawResponse(status, last + body, keep_alive)
        if length >= 0:
            return RawResponse(status, await reader.readexactly(length), keep_alive)
        return RawResponse(status, await reader.read(), False)
    except asyncio.IncompleteReadError as exc:
        raise HttpError("closed mid-body") from exc


class Connection:
    """One keep-alive connection, reopened whenever the last exchange did not leave it reusable."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: bytes) -> RawResponse:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request)
        response = await read_response(self.reader)
        if not response.keep_alive:
            self.close()
        return response

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --- the load generator: a fixed request for a fixed time, in a process of its own ------------------------


@dataclass
class LoadSpec:
    url: str
    body: str
    headers: dict[str, str]
    connections: int
    duration: float
    warmup: float
    stream: bool
    timeout: float = REQUEST_TIMEOUT_SECONDS


@dataclass
class LoadResult:
    requests: int = 0  # answered 2xx (and for a stream: ended with [DONE]) within the measured window
    duration_s: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # by kind: non2xx, incomplete, socket, timeout
    client_cpu_s: float = 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


async def run_load(spec: LoadSpec, on_measuring: Callable[[], None] = lambda: None) -> LoadResult:
    """Keep `spec.connections` connections busy with the request: `warmup` seconds unrecorded, then
    `duration` recorded; requests started in the recorded window count, however late they end."""
    url = urlsplit(spec.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    headers = {"Content-Type": "application/json", "Accept": "*/*", **spec.headers}
    request = http_request("POST", host, port, url.path, headers, spec.body.encode())
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
    clock = time.perf_counter
    measure_from = clock() + spec.warmup
    stop_at = measure_from + spec.duration
    last_end = measure_from

    async def drive() -> None:
        nonlocal last_end
        connection = Connection(host, port)
        try:
            while (started := clock()) < stop_at:
                kind = ""
                try:
                    response = await asyncio.wait_for(connection.exchange(request), spec.timeout)
                    if not 200 <= response.status < 300:
                        kind = "non2xx"
                    elif spec.stream and b"data: [DONE]" not in response.body:
                        kind = "incomplete"
                except TimeoutError:
                    kind = "timeout"
                    connection.close()
                except (OSError, HttpError, ValueError):
                    kind = "socket"
                    connection.close()
                    await asyncio.sleep(0.01)  # a refused connect must not spin
                ended = clock()
                if started < measure_from:
                    continue
                last_end = max(last_end, ended)
                if kind:
                    errors[kind] += 1
                else:
                    latencies.append(ended - started)
        finally:
            connection.close()

    async def mark() -> None:
        await asyncio.sleep(spec.warmup)
        on_measuring()

    usage = resource.getrusage(resource.RUSAGE_SELF)
    marker = asyncio.create_task(mark())
    await asyncio.gather(*(drive() for _ in range(spec.connections)))
    await marker
    after = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = max(1e-9, last_end - measure_from)
    return LoadResult(
        requests=len(latencies),
        duration_s=elapsed,
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p90_ms=percentile(latencies, 0.90) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        max_ms=max(latencies, default=0.0) * 1000,
        errors=dict(errors),
        # The whole run, warm-up included: scaled to the measured window by the caller if it cares.
        client_cpu_s=(after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime),
    )


MEASURING = "measuring"


def loadgen_main(argv: list[str]) -> int:
    """`python -m ops.bench _loadgen SPEC_JSON`: run the load, print MEASURING when recording starts, then
    the LoadResult as one JSON line."""
    spec = LoadSpec(**json.loads(argv[0]))

    def measuring() -> None:
        print(MEASURING, flush=True)

    try:
        import uvloop

        result = uvloop.run(run_load(spec, measuring))
    except ImportError:
        result = asyncio.run(run_load(spec, measuring))
    print(json.dumps(asdict(result)), flush=True)
    return 0


class LoadGenerator(Protocol):
    name: str

    async def run(self, spec: LoadSpec, measured: Callable[[bool], None]) -> LoadResult:
        """Run `spec`; call `measured(True)` as recording starts and `measured(False)` as it ends."""
        ...


class AsyncioLoad:
    """The lean asyncio client (uvloop when installed), in a child process so it has its own interpreter."""

    name = "asyncio client (own process, raw HTTP/1.1 keep-alive)"

    async def run(self, spec: LoadSpec, measured: Callable[[bool], None]) -> LoadResult:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.bench", "_loadgen", json.dumps(asdict(spec)),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        result: LoadResult | None = None
        try:
            async for line in process.stdout:
                if line.strip() == MEASURING.encode():
                    measured(True)
                elif line.startswith(b"{"):
                    measured(False)
                    result = LoadResult(**json.loads(line))
        finally:
            if process.returncode is None and result is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await process.wait()
        if result is None:
            raise RuntimeError(f"the load generator exited with {process.returncode} and no result")
        return result


# wrk's side of the same measurement: the body and headers from the environment, one JSON line at the end.
_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nBENCH {"requests": %d, "duration_s": %.6f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, ' ..
    '"max_ms": %.3f, "non2xx": %d, "socket": %d, "timeout": %d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, e.status, e.connect + e.read + e.write, e.timeout))
end
"""


class WrkLoad:
    """wrk with one thread, as the reference harness runs it: a warm-up run, then the measured one."""

    def __init__(self, wrk: str) -> None:
        self.wrk = wrk
        self.name = f"wrk ({wrk}, 1 thread)"

    async def _wrk(self, spec: LoadSpec, seconds: float, script: Path) -> dict[str, Any]:
        env = {
            **os.environ,
            "BENCH_BODY": spec.body,
            "BENCH_KEY": spec.headers["Authorization"].removeprefix("Bearer "),
        }
        process = await asyncio.create_subprocess_exec(
            self.wrk, "-t1", f"-c{spec.connections}", f"-d{max(1, round(seconds))}s",
            f"--timeout={spec.timeout:g}s", "--latency", "-s", str(script), spec.url,
            stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        out, _ = await process.communicate()
        for line in out.decode().splitlines():
            if line.startswith("BENCH "):
                result: dict[str, Any] = json.loads(line[len("BENCH ") :])
                return result
        raise RuntimeError(f"wrk exited with {process.returncode} and no result: {out.decode()[-400:]}")

    async def run(self, spec: LoadSpec, measured: Callable[[bool], None]) -> LoadResult:
        with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
            script.write(_WRK_SCRIPT)
            script.flush()
            if spec.warmup > 0:
                await self._wrk(spec, spec.warmup, Path(script.name))
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            measured(True)
            raw = await self._wrk(spec, spec.duration, Path(script.name))
            measured(False)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # wrk counts a non-2xx answer among its requests; here requests are the answered ones.
        errors = {kind: raw[kind] for kind in ("non2xx", "socket", "timeout") if raw[kind]}
        requests = raw["requests"] - raw["non2xx"]
        return LoadResult(
            requests=requests,
            duration_s=raw["duration_s"],
            rps=requests / raw["duration_s"],
            p50_ms=raw["p50_ms"],
            p90_ms=raw["p90_ms"],
            p99_ms=raw["p99_ms"],
            max_ms=raw["max_ms"],
            errors=errors,
            client_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        )


def pick_load_generator(choice: str) -> LoadGenerator:
    wrk = shutil.which("wrk")
    if choice == "wrk" and not wrk:
        raise SystemExit("--load wrk: wrk is not on PATH (Debian: apt-get install wrk)")
    if wrk and choice in ("auto", "wrk"):
        return WrkLoad(wrk)
    return AsyncioLoad()


# --- gateway ----------------------------------------------------------------------------------------------


@dataclass
class Phase:
    target: str  # direct | mesh
    mode: str  # non-stream | stream
    connections: int

    @property
    def label(self) -> str:
        return f"{self.target} {self.mode} c={self.connections}"


def gateway_phases(target: str, connections: int) -> list[Phase]:
    """The reference harness's four: non-stream and stream at `connections`, then both at 1."""
    counts = [connections] if connections == 1 else [connections, 1]
    return [Phase(target, mode, c) for c in counts for mode in ("non-stream", "stream")]


def chat_body(stream: bool) -> str:
    body: dict[str, Any] = {
        "model": "fake",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": ANSWER_TOKENS,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":"))


def smoke_check(base_url: str) -> int:
    """One non-stream and one stream completion must come back whole before anything is measured; returns
    how many content chunks the stream came in (a mesh may coalesce tokens that arrive together)."""
    import httpx

    from ops.fake_upstream import TOKENS

    url = f"{base_url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    answer = "".join(TOKENS)
    with httpx.Client(timeout=30) as http:
        r = http.post(url, content=chat_body(False), headers=headers)
        if r.status_code != 200 or r.json()["choices"][0]["message"]["content"] != answer:
            raise RuntimeError(f"non-stream smoke check of {url}: HTTP {r.status_code}: {r.text[:400]}")
        r = http.post(url, content=chat_body(True), headers=headers)
        events = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
        chunks = [
            choice["delta"]["content"]
            for event in events
            if event != "[DONE]"
            for choice in json.loads(event).get("choices", [])
            if choice.get("delta", {}).get("content")
        ]
        if r.status_code != 200 or events[-1:] != ["[DONE]"] or "".join(chunks) != answer:
            raise RuntimeError(f"stream smoke check of {url}: HTTP {r.status_code}: {r.text[:600]}")
    return len(chunks)


async def measure_phase(
    load: LoadGenerator,
    phase: Phase,
    url: str,
    pids: dict[str, int],
    duration: float,
    warmup: float,
    progress: Progress,
) -> dict[str, Any]:
    spec = LoadSpec(
        url=f"{url}/v1/chat/completions",
        body=chat_body(phase.mode == "stream"),
        headers={"Authorization": f"Bearer {KEY}"},
        connections=phase.connections,
        duration=duration,
        warmup=warmup,
        stream=phase.mode == "stream",
    )
    cpu: dict[str, dict[str, float]] = {}

    def measured(starting: bool) -> None:
        cpu["before" if starting else "after"] = cpu_seconds(pids)

    progress.begin(phase.label, duration + warmup)
    ticker = asyncio.create_task(tick(progress, time.perf_counter()))
    try:
        result = await load.run(spec, measured)
    finally:
        ticker.cancel()
    by_process = cpu_ms_per_request(cpu["before"], cpu["after"], result.requests)
    upstream = by_process.pop("upstream", 0.0)
    return {
        "target": phase.target,
        "mode": phase.mode,
        "connections": phase.connections,
        **{k: v for k, v in asdict(result).items() if k != "client_cpu_s"},
        "error_count": result.error_count,
        "cpu_ms_per_request": {
            "mesh": sum(by_process.values()),
            "upstream": upstream,
            "client": result.client_cpu_s * 1000 / max(1, result.requests),
            "by_process": by_process,
        },
    }


# What `--mode` measures: `chatterbot up`'s processes running every component, a process per service, or both.
MESH_MODES = {"combined": ("combined",), "split": ("split",), "both": ("combined", "split")}


def gateway_settings(upstream_base_url: str) -> Settings:
    """The mesh of `chatterbot up` on the openai engine, as the side-by-side harness configures it."""
    from chatterbot.settings import Settings

    return Settings(
        _env_file=None,
        api_keys=[KEY],
        admin_keys=[ADMIN_KEY],
        log_level="WARNING",
        inference_engine="openai",
        openai_base_url=upstream_base_url,
        openai_api_key="bench",
        model_name="fake",
        shutdown_grace_seconds=3,
    )


@contextlib.contextmanager
def started_mesh(
    settings: Settings, data_dir: Path, progress: Progress, mode: str = "split"
) -> Iterator[Mesh]:
    from ops.launcher import Mesh

    progress.begin(f"starting the mesh ({mode})")
    mesh = Mesh(settings, data_dir, prefer_configured_ports=False, mode=mode)
    mesh.start()
    try:
        yield mesh
    finally:
        progress.begin("stopping the mesh")
        mesh.stop()


def bench_gateway(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    from ops.fake_upstream import FakeUpstreamServer

    load = pick_load_generator(args.load)
    phases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chatterbot-bench-") as tmp:
        progress.begin("starting the fake upstream")
        upstream = FakeUpstreamServer("upstream", Path(tmp) / "upstream")
        upstream.start()
        try:
            chunks = {"direct": smoke_check(upstream.url)}
            assert upstream.pid is not None
            pids = {"upstream": upstream.pid}
            for phase in gateway_phases("direct", args.connections):
                phases.append(
                    asyncio.run(
                        measure_phase(load, phase, upstream.url, pids, args.duration, args.warmup, progress)
                    )
                )
            for mode in MESH_MODES[args.mode]:
                with started_mesh(
                    gateway_settings(upstream.base_url), Path(tmp) / mode, progress, mode
                ) as mesh:
                    chunks[mode] = smoke_check(mesh.edge_url)
                    pids = {**mesh_pids(mesh), "upstream": upstream.pid}
                    for phase in gateway_phases(mode, args.connections):
                        phases.append(
                            asyncio.run(
                                measure_phase(
                                    load, phase, mesh.edge_url, pids, args.duration, args.warmup, progress
                                )
                            )
                        )
        finally:
            upstream.stop()
    return {
        "benchmark": "gateway",
        "load_generator": load.name,
        "cpus": os.cpu_count(),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "answer_tokens": ANSWER_TOKENS,
        "stream_content_chunks": chunks,
        "phases": phases,
        "added": added_latency(phases),
    }


def added_latency(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mesh minus direct for each mode and connection count measured both ways."""
    direct = {(p["mode"], p["connections"]): p for p in phases if p["target"] == "direct"}
    added = []
    for p in phases:
        d = direct.get((p["mode"], p["connections"]))
        if p["target"] == "direct" or d is None:
            continue
        added.append(
            {
                "target": p["target"],
                "mode": p["mode"],
                "connections": p["connections"],
                "p50_ms": p["p50_ms"] - d["p50_ms"],
                "p99_ms": p["p99_ms"] - d["p99_ms"],
                "rps_share_of_direct": p["rps"] / d["rps"] if d["rps"] else 0.0,
            }
        )
    return added


def print_gateway(r: dict[str, Any]) -> None:
    print(
        f"chatterbot bench gateway: {r['duration_s']:g} s a phase after {r['warmup_s']:g} s of warm-up, "
        f"{r['answer_tokens']}-token answers from the instant fake upstream; {r['cpus']} CPUs"
    )
    print(f"load generator: {r['load_generator']}")
    chunks = r["stream_content_chunks"]
    meshes = ", ".join(f"{chunks[name]} {name}" for name in chunks if name != "direct")
    print(
        f"a streamed answer: {chunks.get('direct')} content chunks direct, {meshes} through the mesh "
        "(it sends tokens that arrive together as one chunk)"
    )
    print("targets: direct = the upstream alone; combined = `chatterbot up`; split = a process per service")
    print(
        f"{'target':<8} {'mode':<11} {'conns':>5} {'requests':>9} {'errors':>6} {'req/s':>8} {'p50 ms':>8} "
        f"{'p90 ms':>8} {'p99 ms':>8}   cpu ms/req: {'mesh':>6} {'upstr':>6} {'client':>6}"
    )
    for p in r["phases"]:
        cpu = p["cpu_ms_per_request"]
        mesh_cpu = f"{cpu['mesh']:6.2f}" if p["target"] != "direct" else f"{'-':>6}"
        print(
            f"{p['target']:<8} {p['mode']:<11} {p['connections']:>5} {p['requests']:>9} {p['error_count']:>6} "
            f"{p['rps']:>8.1f} {p['p50_ms']:>8.2f} {p['p90_ms']:>8.2f} {p['p99_ms']:>8.2f}   "
            f"{'':>11} {mesh_cpu} {cpu['upstream']:6.2f} {cpu['client']:6.2f}"
        )
    errors = [
        f"{p['target']} {p['mode']} c={p['connections']}: {p['errors']}" for p in r["phases"] if p["errors"]
    ]
    if errors:
        print("errors: " + "; ".join(errors))
    print("added by the mesh (mesh minus direct):")
    for a in r["added"]:
        print(
            f"  {a['target']:<8} {a['mode']:<11} c={a['connections']:<3} p50 +{a['p50_ms']:.2f} ms, p99 +{a['p99_ms']:.2f} ms, "
            f"{100 * a['rps_share_of_direct']:.1f}% of direct req/s"
        )
    print("mesh CPU ms per request by process:")
    for p in r["phases"]:
        if p["target"] != "direct":
            shares = p["cpu_ms_per_request"]["by_process"]
            print(
                f"  {p['target']:<8} {p['mode']:<11} c={p['connections']:<3} "
                + "  ".join(f"{name} {ms:.2f}" for name, ms in shares.items())
            )


# --- sse: one edge holding many queued streams ------------------------------------------------------------

TOKEN_MARK = b'data: {"token"'
ERROR_MARK = b"event: error"
DONE_MARK = b"data: [DONE]"
SSE_MAX_TOKENS = 1024  # the most the API allows: every answer runs to it
SSE_OPEN_TIMEOUT_SECONDS = 60


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / (1024 * 1024)


def loop_seconds(pid: int) -> tuple[float, float]:
    """Seconds the process's main thread (the event loop) ran, and waited runnable for a free core."""
    ran, waited, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(ran) / 1e9, int(waited) / 1e9


def loop_share(before: tuple[float, float], after: tuple[float, float], seconds: float) -> dict[str, float]:
    return {
        "running": (after[0] - before[0]) / seconds,
        "waiting_for_core": (after[1] - before[1]) / seconds,
    }


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
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.streams: list[Stream] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.errors: Counter[str] = Counter()
        self.closing = False

    def open(self, correlation_id: str) -> Stream:
        stream = Stream(correlation_id)
        self.streams.append(stream)
        self.tasks.append(asyncio.create_task(self._run(stream)))
        return stream

    async def _run(self, stream: Stream) -> None:
        reader = None
        try:
            reader = await asyncio.wait_for(self._connect(stream), SSE_OPEN_TIMEOUT_SECONDS)
        except TimeoutError:
            self.errors[f"no answer in {SSE_OPEN_TIMEOUT_SECONDS} s"] += 1
        except (OSError, asyncio.IncompleteReadError, HttpError) as exc:
            self.errors[f"open: {type(exc).__name__}"] += 1
        finally:
            stream.opened.set()
        try:
            if reader is not None:
                await self._read(reader, stream)
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
        writer.write(
            http_request(
                "GET",
                self.host,
                self.port,
                f"/stream/{stream.correlation_id}",
                {"X-API-Key": KEY, "Accept": "text/event-stream"},
                b"",
            )
        )
        head = await reader.readuntil(b"\r\n\r\n")
        stream.status = int(head.split(b" ", 2)[1])
        if stream.status != 200:
            self.errors[f"http {stream.status}"] += 1
            return None
        return reader

    async def _read(self, reader: asyncio.StreamReader, stream: Stream) -> None:
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


def sse_settings(args: argparse.Namespace) -> Settings:
    """A sim engine slowed to `--itl-ms` a token, so every answer streams for the whole run."""
    from chatterbot.settings import Settings

    return Settings(
        _env_file=None,
        api_keys=[KEY],
        admin_keys=[ADMIN_KEY],
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


async def edge_in_flight(metrics_url: str) -> float | None:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(metrics_url)).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("chatterbot_edge_in_flight "):
            return float(line.split()[1])
    return None


async def hold_streams(mesh: Mesh, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    import httpx

    edge = mesh.children["edge"]
    pid = edge.pid
    assert pid is not None
    metrics_url = f"http://127.0.0.1:{edge.env['CHATTERBOT_METRICS_PORT']}/metrics"
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=mesh.edge_url, headers={"X-API-Key": KEY}, timeout=30) as http:

        async def submit(i: int) -> str:
            r = await http.post(
                "/stream-chat",
                json={
                    "message": f"bench sse {i}: tell me a long story",
                    "user_id": f"bench-sse-{i}",
                    "max_tokens": SSE_MAX_TOKENS,
                    "temperature": 0.7,
                },
            )
            r.raise_for_status()
            correlation_id: str = r.json()["correlation_id"]
            return correlation_id

        progress.begin("letting the edge settle", 2)
        await asyncio.sleep(2)  # the edge's memory after start-up, before the baseline
        out["rss_baseline_mb"] = rss_mb(pid)
        progress.begin(f"queueing {args.jobs} jobs", None)
        cids = list(await asyncio.gather(*(submit(i) for i in range(args.jobs))))
        viewers = Viewers(mesh.edge_url)
        try:
            loop = asyncio.get_running_loop()
            started, sched = loop.time(), loop_seconds(pid)
            progress.begin(f"opening {args.streams} streams", args.streams)
            for i in range(args.streams):
                delay = started + i / args.ramp - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    progress.update(i)
                viewers.open(cids[i % len(cids)])
            await asyncio.gather(*(s.opened.wait() for s in viewers.streams))
            out["open_seconds"] = loop.time() - started
            out["loop_open"] = loop_share(sched, loop_seconds(pid), out["open_seconds"])
            out["answered"] = sum(s.status == 200 for s in viewers.streams)
            await asyncio.sleep(2)
            out["rss_open_mb"] = rss_mb(pid)
            out["open_at_rss"] = sum(s.status == 200 and not s.ended for s in viewers.streams)
            out["in_flight_open"] = await edge_in_flight(metrics_url)

            before = [s.events for s in viewers.streams]
            out["open_at_hold"] = sum(not s.ended for s in viewers.streams)
            progress.begin(f"holding {args.streams} streams", args.hold)
            sched, hold_started = loop_seconds(pid), time.perf_counter()
            ticker = asyncio.create_task(tick(progress, hold_started))
            await asyncio.sleep(args.hold)
            ticker.cancel()
            held = time.perf_counter() - hold_started
            out["loop_hold"] = loop_share(sched, loop_seconds(pid), held)
            deltas = [s.events - b for s, b in zip(viewers.streams, before, strict=True)]
            out["live"] = sum(d > 0 for d in deltas)
            out["events_per_s"] = sum(deltas) / held
            out["rss_hold_mb"] = rss_mb(pid)
        finally:
            progress.begin("closing the streams")
            await viewers.close_all()
            await asyncio.gather(*(http.delete(f"/stream/{cid}") for cid in cids), return_exceptions=True)
        out["errors"] = dict(viewers.errors)
        deadline = time.monotonic() + 15
        out["in_flight_closed"] = await edge_in_flight(metrics_url)
        while out["in_flight_closed"] and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            out["in_flight_closed"] = await edge_in_flight(metrics_url)
        out["rss_closed_mb"] = rss_mb(pid)
    return out


def bench_sse(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    # Before the mesh starts, so the edge inherits it.
    fd_limit = raise_fd_limit()
    if fd_limit < args.streams + 1000:
        raise SystemExit(f"open-files limit {fd_limit} is too low for {args.streams} streams")
    run_seconds = args.streams / args.ramp + args.hold + 30
    if SSE_MAX_TOKENS * args.itl_ms / 1000 < run_seconds:
        raise SystemExit(
            f"answers last {SSE_MAX_TOKENS * args.itl_ms / 1000:.0f} s but the run takes about "
            f"{run_seconds:.0f} s: raise --itl-ms or --ramp"
        )
    with tempfile.TemporaryDirectory(prefix="chatterbot-bench-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        with started_mesh(sse_settings(args), data_dir, progress) as mesh:
            r = asyncio.run(hold_streams(mesh, args, progress))
    n = args.streams
    grown = r["rss_open_mb"] - r["rss_baseline_mb"]
    # Streams that failed leave memory the allocator keeps: a cost per stream is honest only with ~all open.
    mostly_open = r["open_at_rss"] >= 0.99 * n
    r.update(
        benchmark="sse",
        streams=n,
        jobs=args.jobs,
        ramp=args.ramp,
        hold_s=args.hold,
        itl_ms=args.itl_ms,
        kb_per_stream=grown * 1024 / r["open_at_rss"] if mostly_open and r["open_at_rss"] else None,
        engine_events_per_s=r["open_at_hold"] * 1000 / args.itl_ms,
        held=r["answered"] == n and r["live"] == n,
    )
    return r


def _gauge(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def print_sse(r: dict[str, Any]) -> None:
    n = r["streams"]
    print(
        f"chatterbot bench sse: {n} streams over {r['jobs']} queued jobs, {r['ramp']:g} opened a second, "
        f"held {r['hold_s']:g} s, a token every {r['itl_ms']:g} ms"
    )
    grown = r["rss_open_mb"] - r["rss_baseline_mb"]
    cost = (
        f"{r['kb_per_stream']:.1f} KB a stream"
        if r["kb_per_stream"] is not None
        else "no cost a stream: over 1% failed or ended"
    )
    rows = [
        ("edge rss, baseline", f"{r['rss_baseline_mb']:9.1f} MB"),
        (
            "edge rss, all streams open",
            f"{r['rss_open_mb']:9.1f} MB  (+{grown:.1f} MB for {r['open_at_rss']} open; {cost})",
        ),
        ("edge rss, end of hold", f"{r['rss_hold_mb']:9.1f} MB"),
        ("edge rss, streams closed", f"{r['rss_closed_mb']:9.1f} MB"),
        (
            "streams answered 200",
            f"{r['answered']:9} of {n} in {r['open_seconds']:.1f} s "
            f"({r['answered'] / max(r['open_seconds'], 1e-9):.0f}/s)",
        ),
        ("streams live in hold", f"{r['live']:9} of {n}"),
        (
            "token events/s in hold",
            f"{r['events_per_s']:9.0f} (the engine makes ~{r['engine_events_per_s']:.0f} for the "
            f"{r['open_at_hold']} streams open)",
        ),
    ]
    for phase in ("open", "hold"):
        share = r[f"loop_{phase}"]
        rows.append(
            (
                f"edge event loop, {phase}",
                f"{share['running'] * 100:8.0f}% of a core running, "
                f"{share['waiting_for_core'] * 100:.0f}% waiting for a core",
            )
        )
    rows.append(
        ("edge in flight, open/closed", f"{_gauge(r['in_flight_open']):>9} / {_gauge(r['in_flight_closed'])}")
    )
    errors = ", ".join(f"{kind}: {count}" for kind, count in r["errors"].items()) or "none"
    rows.append(("errors", errors))
    for name, value in rows:
        print(f"{name:<28} {value}")
    print(f"{n} streams held by one edge: {'yes' if r['held'] else 'no'}")


# --- jobs: a JetStream backlog, accepted and drained ------------------------------------------------------


def jobs_settings(args: argparse.Namespace) -> Settings:
    """The sim engine at zero latency, so only queueing and the turn's own work are measured."""
    from chatterbot.settings import Settings

    return Settings(
        _env_file=None,
        api_keys=[KEY],
        admin_keys=[ADMIN_KEY],
        log_level="WARNING",
        sim_ttft_ms=0,
        sim_prefill_ms_per_token=0,
        sim_itl_ms=0,
        sim_itl_at_max_ms=0,
        sim_mean_output_tokens=100_000,
        sim_max_num_seqs=256,
        worker_concurrency=args.worker_concurrency,
        result_cache_ttl_seconds=0,
        shutdown_grace_seconds=3,
    )


@dataclass
class Submitted:
    cids: list[str]  # the correlation ids answered, in the order they came
    latencies: list[float]
    errors: dict[str, int]  # failed submissions by kind
    error_samples: dict[str, str]  # the first answer of each kind of failure
    seconds: float


async def submit_jobs(edge_url: str, n: int, connections: int, users: int, progress: Progress) -> Submitted:
    """POST /async-chat `n` times over `connections` keep-alive connections."""
    url = urlsplit(edge_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    headers = {"Content-Type": "application/json", "X-API-Key": KEY}
    cids: list[str] = []
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    queue = iter(range(n))
    progress.begin(f"submitting {n} jobs (workers stopped)", n)

    async def submitter() -> None:
        connection = Connection(host, port)
        try:
            for i in queue:
                body = json.dumps(
                    {
                        "message": f"bench job {i}",
                        "user_id": f"bench-jobs-{i % users}",
                        "max_tokens": ANSWER_TOKENS,
                    }
                ).encode()
                started = time.perf_counter()
                try:
                    response = await asyncio.wait_for(
                        connection.exchange(http_request("POST", host, port, "/async-chat", headers, body)),
                        REQUEST_TIMEOUT_SECONDS,
                    )
                except TimeoutError:
                    errors["timeout"] += 1
                    connection.close()
                    continue
                except (OSError, HttpError):
                    errors["socket"] += 1
                    connection.close()
                    continue
                if response.status != 200:
                    kind = f"http {response.status}"
                    errors[kind] += 1
                    samples.setdefault(kind, response.body[:300].decode(errors="replace"))
                    continue
                latencies.append(time.perf_counter() - started)
                cids.append(json.loads(response.body)["correlation_id"])
                if len(cids) % 100 == 0:
                    progress.update(len(cids))
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(connections)))
    return Submitted(cids, latencies, dict(errors), samples, time.perf_counter() - started)


class ShardCounts:
    """Autocommit psycopg connections to each of the store's shards; counts summed over all of them."""

    def __init__(self, dsns: list[str]) -> None:
        import psycopg

        self.connections = [psycopg.connect(dsn, autocommit=True) for dsn in dsns]

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return [row for conn in self.connections for row in conn.execute(sql, params).fetchall()]

    def count(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        return sum(int(row[0]) for row in self.rows(sql, params))

    def close(self) -> None:
        for conn in self.connections:
            conn.close()


def wait_drained(
    shards: ShardCounts, n: int, stall_seconds: float, progress: Progress
) -> tuple[float, int, int]:
    """Poll the store until `n` job results are terminal or none finished for `stall_seconds`: the seconds
    it took from the first poll, and the terminal count at the first poll and at the end."""
    from chatterbot.v1 import types_pb2

    terminal = (types_pb2.JOB_STATUS_SUCCEEDED, types_pb2.JOB_STATUS_FAILED, types_pb2.JOB_STATUS_CANCELLED)
    sql = "SELECT count(*) FROM job_results WHERE status = ANY(%s)"
    progress.begin(f"draining {n} jobs", n)
    started = time.perf_counter()
    first = done = shards.count(sql, (list(terminal),))
    last_progress = started
    while done < n:
        time.sleep(0.5)
        now_done = shards.count(sql, (list(terminal),))
        if now_done > done:
            last_progress = time.perf_counter()
        elif time.perf_counter() - last_progress > stall_seconds:
            break
        done = now_done
        progress.update(done)
    return time.perf_counter() - started, first, done


def audit_jobs(shards: ShardCounts, cids: list[str]) -> dict[str, int]:
    """What the store holds for the submitted jobs: lost (no stored answer or no succeeded result), doubled
    (an answer stored more than once), strays (rows of jobs nobody submitted) and failed results."""
    from chatterbot.v1 import types_pb2

    submitted = set(cids)
    results = Counter[str]()
    statuses: dict[str, int] = {}
    for cid, status in shards.rows("SELECT correlation_id, status FROM job_results"):
        results[cid] += 1
        statuses[cid] = status
    answers = Counter[str](
        {
            request_id: int(count)
            for request_id, count in shards.rows(
                "SELECT request_id, count(*) FROM messages WHERE role = 'assistant' GROUP BY request_id"
            )
        }
    )
    succeeded = {cid for cid, status in statuses.items() if status == types_pb2.JOB_STATUS_SUCCEEDED}
    return {
        "submitted": len(cids),
        "distinct_ids": len(submitted),
        "succeeded": len(succeeded & submitted),
        "failed": sum(1 for cid in submitted if statuses.get(cid) == types_pb2.JOB_STATUS_FAILED),
        "answers_stored": sum(min(1, answers[cid]) for cid in submitted),
        "lost": sum(1 for cid in submitted if cid not in succeeded or not answers[cid]),
        "doubled": sum(max(0, answers[cid] - 1) + max(0, results[cid] - 1) for cid in submitted)
        + (len(cids) - len(submitted)),
        "strays": sum(1 for cid in answers if cid not in submitted)
        + sum(1 for cid in results if cid not in submitted),
    }


async def queue_stats(edge_url: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=edge_url, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as http:
        r = await http.get("/debug/queue-stats")
        r.raise_for_status()
        jetstream: dict[str, Any] = r.json()["jetstream"]
        return jetstream


def bench_jobs(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    n = args.jobs
    with (
        tempfile.TemporaryDirectory(prefix="chatterbot-bench-") as tmp,
        started_mesh(jobs_settings(args), Path(tmp), progress) as mesh,
    ):
        worker = mesh.children["worker"]
        # Stopped, so the submissions are measured alone and queue up as a real backlog.
        progress.begin("stopping the workers")
        worker.stop()
        pids = mesh_pids(mesh)
        before = cpu_seconds(pids)
        submitted = asyncio.run(submit_jobs(mesh.edge_url, n, args.connections, args.users, progress))
        cids, latencies, submit_seconds = submitted.cids, submitted.latencies, submitted.seconds
        submit_cpu = cpu_ms_per_request(before, cpu_seconds(pids), len(cids))
        backlog = asyncio.run(queue_stats(mesh.edge_url))
        shards = ShardCounts(mesh.services["store"].env["CHATTERBOT_POSTGRES_SHARDS"].split(","))
        try:
            progress.begin("starting the workers")
            worker.start(timeout=60)
            pids = mesh_pids(mesh)
            before = cpu_seconds(pids)
            drain_seconds, done_at_start, done = wait_drained(shards, len(cids), args.stall_seconds, progress)
            drain_cpu = cpu_ms_per_request(before, cpu_seconds(pids), done - done_at_start)
            progress.begin("counting the store")
            audit = audit_jobs(shards, cids)
        finally:
            shards.close()
        after = asyncio.run(queue_stats(mesh.edge_url))
    return {
        "benchmark": "jobs",
        "jobs": n,
        "connections": args.connections,
        "users": args.users,
        "worker_concurrency": args.worker_concurrency,
        "submit": {
            "accepted": len(cids),
            "errors": submitted.errors,
            "error_samples": submitted.error_samples,
            "seconds": submit_seconds,
            "accepted_per_s": len(cids) / submit_seconds if submit_seconds else 0.0,
            "p50_ms": percentile(latencies, 0.50) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "mean_ms": statistics.fmean(latencies) * 1000 if latencies else 0.0,
            "cpu_ms_per_job": submit_cpu,
        },
        "backlog": {name: c["pending"] for name, c in backlog["consumers"].items()},
        "drain": {
            "seconds": drain_seconds,
            "done_when_workers_ready": done_at_start,
            "done": done,
            "drained_per_s": (done - done_at_start) / drain_seconds if drain_seconds else 0.0,
            "cpu_ms_per_job": drain_cpu,
        },
        "audit": audit,
        "queue_after": after,
    }


def print_jobs(r: dict[str, Any]) -> None:
    s, d, a = r["submit"], r["drain"], r["audit"]
    print(
        f"chatterbot bench jobs: {r['jobs']} jobs through POST /async-chat over {r['connections']} connections "
        f"({r['users']} users), sim engine at zero latency, {ANSWER_TOKENS} tokens an answer, "
        f"workers running {r['worker_concurrency']} jobs at once"
    )
    print(
        f"{'phase':<8} {'jobs':>8} {'errors':>7} {'seconds':>8} {'jobs/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms/job':>11}"
    )
    print(
        f"{'accept':<8} {s['accepted']:>8} {sum(s['errors'].values()):>7} {s['seconds']:>8.1f} "
        f"{s['accepted_per_s']:>8.1f} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} {sum(s['cpu_ms_per_job'].values()):>11.2f}"
    )
    drained = d["done"] - d["done_when_workers_ready"]
    print(
        f"{'drain':<8} {drained:>8} {a['failed']:>7} {d['seconds']:>8.1f} {d['drained_per_s']:>8.1f} "
        f"{'-':>8} {'-':>8} {sum(d['cpu_ms_per_job'].values()):>11.2f}"
    )
    if s["errors"]:
        print("submit errors: " + ", ".join(f"{k}: {v}" for k, v in s["errors"].items()))
        for kind, sample in s["error_samples"].items():
            print(f"  first {kind}: {sample}")
    print(
        "backlog queued (JetStream pending by priority): "
        + ", ".join(f"{k} {v}" for k, v in r["backlog"].items())
    )
    for name in ("accept", "drain"):
        shares = (s if name == "accept" else d)["cpu_ms_per_job"]
        print(f"  cpu ms/job, {name:<6} " + "  ".join(f"{p} {ms:.2f}" for p, ms in shares.items()))
    print(
        f"store: {a['succeeded']} of {a['submitted']} succeeded, {a['answers_stored']} answers stored; "
        f"lost {a['lost']}, doubled {a['doubled']}, strays {a['strays']}, failed {a['failed']}"
    )
    q = r["queue_after"]
    redelivered = sum(c["redelivered"] for c in q["consumers"].values())
    pending = sum(c["pending"] + c["ack_pending"] for c in q["consumers"].values())
    print(f"JetStream after: {pending} pending, {redelivered} redelivered, {q['dlq_size']} dead-lettered")


# --- the command ------------------------------------------------------------------------------------------


def _run(
    bench: Callable[[argparse.Namespace, Progress], dict[str, Any]],
    show: Callable[[dict[str, Any]], None],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        progress = make_progress(not args.no_progress)
        try:
            result = bench(args, progress)
        finally:
            progress.close()
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            show(result)
        return 0 if passed(result) else 1

    return run


def passed(result: dict[str, Any]) -> bool:
    """Whether a run is clean: no errors, nothing lost or doubled, every stream held."""
    if result["benchmark"] == "gateway":
        return all(p["error_count"] == 0 and p["requests"] > 0 for p in result["phases"])
    if result["benchmark"] == "jobs":
        a = result["audit"]
        return not result["submit"]["errors"] and a["lost"] == a["doubled"] == a["strays"] == 0
    return bool(result["held"])


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `bench` and its subcommands on the `chatterbot` command's subparsers; each sets `func`
    (args -> exit status: 0 when the run was clean)."""
    bench = sub.add_parser(
        "bench",
        help="benchmark a mesh of its own: gateway overhead, SSE streams, JetStream jobs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    gateway = kinds.add_parser(
        "gateway", help="POST /v1/chat/completions through the mesh against an instant upstream, and direct"
    )
    gateway.add_argument("--duration", type=float, default=10, help="seconds measured a phase (default 10)")
    gateway.add_argument(
        "--warmup", type=float, default=2, help="seconds of unmeasured load first (default 2)"
    )
    gateway.add_argument(
        "--connections", type=int, default=50, help="the loaded phases' connections (default 50)"
    )
    gateway.add_argument(
        "--mode",
        choices=tuple(MESH_MODES),
        default="combined",
        help="the mesh as `chatterbot up` runs it (combined, the default), a process per service (split), "
        "or both, one after the other",
    )
    gateway.add_argument(
        "--load",
        choices=("auto", "wrk", "asyncio"),
        default="auto",
        help="load generator (auto: wrk if on PATH)",
    )
    _common(gateway)
    gateway.set_defaults(func=_run(bench_gateway, print_gateway))

    sse = kinds.add_parser("sse", help="one edge holding many concurrent queued SSE streams")
    sse.add_argument("--streams", type=int, default=10_000)
    sse.add_argument("--jobs", type=int, default=100, help="queued jobs the streams are spread over")
    sse.add_argument("--ramp", type=float, default=250, help="new streams a second")
    sse.add_argument("--hold", type=float, default=20, help="seconds all streams are watched for tokens")
    sse.add_argument("--itl-ms", type=float, default=500, help="the sim engine's time between tokens")
    sse.add_argument("--data-dir", type=Path, help="keep the mesh's data and logs here (default: a temp dir)")
    _common(sse)
    sse.set_defaults(func=_run(bench_sse, print_sse))

    jobs = kinds.add_parser(
        "jobs", help="JetStream jobs accepted per second, and a backlog drained exactly once"
    )
    jobs.add_argument("--jobs", type=int, default=100_000, help="the backlog (default 100000)")
    jobs.add_argument("--connections", type=int, default=50, help="concurrent submitters")
    jobs.add_argument("--users", type=int, default=1000, help="users the jobs are spread over")
    jobs.add_argument("--worker-concurrency", type=int, default=32, help="jobs the worker runs at once")
    jobs.add_argument(
        "--stall-seconds", type=float, default=60, help="give up when no job finished for this long"
    )
    _common(jobs)
    jobs.set_defaults(func=_run(bench_jobs, print_jobs))
    return bench


def main(argv: list[str] | None = None) -> int:
    """`chatterbot bench ...` on its own: `python -m ops.bench gateway --duration 5`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_loadgen"]:
        return loadgen_main(argv[1:])
    parser = argparse.ArgumentParser(prog="chatterbot")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
