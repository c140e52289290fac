"""Health routes: `/health` (the seed's, whole mesh), `/livez` and `/readyz` (cheap, for probes), `/metrics`."""

from __future__ import annotations

from datetime import UTC, datetime

import prometheus_client
from fastapi import APIRouter, Request, Response

from edge.problems import problem_response
from edge.protocol import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> HealthResponse:
    """Every service and server of the mesh, `up` or `down`; `degraded` when any is down."""
    components = await request.app.state.health.components()
    status = "healthy" if all(v == "up" for v in components.values()) else "degraded"
    return HealthResponse(status=status, components=components, timestamp=datetime.now(UTC).isoformat())


@router.get("/livez", include_in_schema=True)
async def livez() -> dict[str, str]:
    """The edge process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "chat_svc is not reachable"}})
async def readyz(request: Request):
    """The edge can serve chats: chat_svc answers its health check."""
    if await request.app.state.health.chat_ready():
        return {"status": "ready"}
    return problem_response(503, "chat_svc is not ready", {"Retry-After": "1"})


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST)
