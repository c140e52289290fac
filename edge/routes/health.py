"""Health routes: `/health` (the seed's, whole mesh), `/livez` and `/readyz` (cheap, for probes), `/metrics`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import prometheus_client
from fastapi import APIRouter, Request, Response

from edge.problems import problem_response
from edge.protocol import Degradation, HealthResponse, ProbeStatus

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> HealthResponse:
    """Every service and server of the mesh, `up` or `down`; `degraded` when any is down."""
    mesh = request.app.state.health
    components, (rung, reason) = await asyncio.gather(mesh.components(), mesh.degradation())
    down = sorted(name for name, state in components.items() if state == "down")
    reasons = [f"down: {', '.join(down)}"] if down else []
    if rung not in ("none", "unknown"):
        reasons.append(f"{rung}: {reason}")
    now = datetime.now(UTC)
    return HealthResponse(
        status="degraded" if reasons else "healthy",
        components=components,
        timestamp=now.timestamp(),
        time=now.isoformat(),
        degradation=Degradation(rung=rung, reason=reason),
        reasons=reasons,
    )


@router.get("/livez", response_model=ProbeStatus, include_in_schema=True)
async def livez() -> ProbeStatus:
    """The edge process answers."""
    return ProbeStatus(status="ok")


@router.get(
    "/readyz", response_model=ProbeStatus, responses={503: {"description": "chat_svc is not reachable"}}
)
async def readyz(request: Request) -> ProbeStatus | Response:
    """The edge can serve chats: chat_svc answers its health check."""
    if await request.app.state.health.chat_ready():
        return ProbeStatus(status="ready")
    return problem_response(503, "chat_svc is not ready", {"Retry-After": "1"})


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST)
