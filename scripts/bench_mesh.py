"""What the mesh adds over calling the engine directly, and what the full chat path serves.

Starts its own mesh (embedded servers, sim engine with zero latency so only the mesh is measured), then runs
the same small turn three ways for `--seconds` each at `--concurrency`:
  engine  InferenceService.Generate straight to inference_svc (the floor);
  chat    POST /chat through edge → chat_svc → context → inference → store → context;
  openai  POST /v1/chat/completions, the same path through the OpenAI-compatible route.
Prints throughput and latency percentiles, the mesh's added p50 latency over the engine, and the CPU time the
mesh's processes (services, PostgreSQL, Valkey, NATS; not the load generator) spent per request, in all and by
process: what bounds throughput once the cores are busy, and steadier than latency on a shared machine.
`--itl-ms` gives the engine a time per token, so the cost of streaming tokens through the mesh shows.
The measuring (percentiles, CPU time per process, the mesh's start and stop, progress on stderr) is
`chatterbot bench`'s, from `ops.bench`; what is this script's own is the three paths and the sim engine.

    python scripts/bench_mesh.py --seconds 10 --concurrency 16
    python scripts/bench_mesh.py --seconds 10 --concurrency 1 --max-tokens 64 --itl-ms 1
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx

from chatterbot.settings import Settings
from chatterbot.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from ops.bench import (
    ADMIN_KEY,
    KEY,
    Progress,
    cpu_ms_per_request,
    cpu_seconds,
    make_progress,
    mesh_pids,
    percentile,
    started_mesh,
    tick,
)
from ops.launcher import Mesh

Call = Callable[[int, int], Awaitable[None]]  # (worker, its n-th request)


async def run(
    name: str, call: Call, seconds: float, concurrency: int, pids: dict[str, int], progress: Progress
) -> dict[str, Any]:
    """`concurrency` workers calling `call` back to back for `seconds`: requests, latency and CPU."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal errors
        n = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await call(i, n)
                latencies.append(time.perf_counter() - started)
            except Exception:
                errors += 1
            n += 1

    progress.begin(f"{name} c={concurrency}", seconds)
    cpu_before = cpu_seconds(pids)
    started = time.perf_counter()
    ticker = asyncio.create_task(tick(progress, started))
    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        ticker.cancel()
    elapsed = time.perf_counter() - started
    cpu_ms = cpu_ms_per_request(cpu_before, cpu_seconds(pids), len(latencies))
    return {
        "name": name,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "cpu_ms": cpu_ms,
    }


async def bench(
    mesh: Mesh, seconds: float, concurrency: int, max_tokens: int, progress: Progress
) -> list[dict[str, Any]]:
    pids = mesh_pids(mesh)
    channel = grpc.aio.insecure_channel(mesh.services["inference"].url)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    http = httpx.AsyncClient(base_url=mesh.edge_url, headers={"X-API-Key": KEY}, timeout=30, limits=limits)

    async def engine(i: int, n: int) -> None:
        request = inference_pb2.GenerateRequest(
            messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=f"bench {i} {n}")],
            sampling=types_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.7),
        )
        async for _ in stub.Generate(request, timeout=30):
            pass

    async def chat(i: int, n: int) -> None:
        r = await http.post(
            "/chat",
            json={
                "message": f"bench {i} {n}",
                "user_id": f"bench-user-{i}",
                "max_tokens": max(10, max_tokens),
            },
        )
        r.raise_for_status()

    async def openai(i: int, n: int) -> None:
        r = await http.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": f"bench {i} {n}"}],
                "user": f"bench-user-{i}",
                "max_tokens": max_tokens,
            },
        )
        r.raise_for_status()

    try:
        await run("warm-up", chat, 1.0, concurrency, {}, progress)
        return [
            await run(name, call, seconds, concurrency, pids, progress)
            for name, call in (("engine", engine), ("chat", chat), ("openai", openai))
        ]
    finally:
        await http.aclose()
        await channel.close()


def sim_settings(itl_ms: float) -> Settings:
    """A mesh on the sim engine with no time to first token and `itl_ms` a token, answering in full."""
    return Settings(
        _env_file=None,
        api_keys=[KEY],
        admin_keys=[ADMIN_KEY],
        log_level="WARNING",
        sim_ttft_ms=0,
        sim_prefill_ms_per_token=0,
        sim_itl_ms=itl_ms,
        sim_itl_at_max_ms=itl_ms,
        sim_mean_output_tokens=100_000,
        sim_max_num_seqs=256,
        result_cache_ttl_seconds=0,
    )


def print_results(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    print(
        f"$ python scripts/bench_mesh.py --seconds {args.seconds:g} --concurrency {args.concurrency} "
        f"--max-tokens {args.max_tokens} --itl-ms {args.itl_ms:g}"
    )
    print(
        f"{'path':<8} {'requests':>9} {'errors':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms/req':>11}"
    )
    for r in results:
        print(
            f"{r['name']:<8} {r['requests']:>9} {r['errors']:>7} {r['rps']:>8.1f} {r['p50_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f} {sum(r['cpu_ms'].values()):>11.2f}"
        )
    print("CPU ms per request by process:")
    for r in results:
        print(
            f"  {r['name']:<7} " + "  ".join(f"{p} {ms:.2f}" for p, ms in r["cpu_ms"].items() if ms >= 0.005)
        )
    engine = results[0]
    for r in results[1:]:
        print(
            f"{r['name']}: adds {r['p50_ms'] - engine['p50_ms']:.2f} ms at p50 over the engine; "
            f"{r['rps'] / engine['rps']:.2f}x its throughput"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--itl-ms", type=float, default=0.0, help="the engine's time per token (default 0)")
    args = parser.parse_args()
    progress = make_progress(True)
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            started_mesh(sim_settings(args.itl_ms), Path(tmp), progress) as mesh,
        ):
            results = asyncio.run(bench(mesh, args.seconds, args.concurrency, args.max_tokens, progress))
    finally:
        progress.close()
    print_results(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
