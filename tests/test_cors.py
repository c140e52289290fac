"""CORS at the edge: which origins may call it, what their preflights allow, and that errors carry the headers a
page needs to read them. An edge app in process, on the session's NATS and Valkey, with chat_svc unreachable.
(A page on another origin chatting through a real mesh: tests/test_browser.py.)"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.testclient import TestClient

from chatterbot.settings import Settings
from edge.app import create_app
from edge.cors import ALLOW_HEADERS, LOOPBACK_ORIGINS, cors_options, origin_pattern

APP_ORIGIN = "https://app.example.com"
KEY = f"cors-test-{uuid.uuid4().hex}"
LIMITED_KEY = f"cors-limited-{uuid.uuid4().hex}"
# What a page must read from an error to say what happened and when to retry.
READABLE = {"retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "x-request-id"}


def unused_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def edge_settings(**overrides) -> Settings:
    return Settings(
        _env_file=None, **{"chat_addr": unused_address(), "store_addr": unused_address(), **overrides}
    )


@pytest.fixture(scope="module")
def edge(servers) -> Iterator[TestClient]:
    settings = edge_settings(
        nats_url=servers.nats.url,
        redis_url=servers.valkey.url,
        api_keys=[KEY, LIMITED_KEY],
        rate_limit_static_keys=True,
        rate_limits="/whoami=1/minute",
        cors_origins=[APP_ORIGIN, *LOOPBACK_ORIGINS],
        retry_attempts=1,
        deadline_seconds=2,
    )
    app = create_app(settings)

    @app.get("/crash", include_in_schema=False)
    async def crash() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def preflight(client: TestClient | FastAPI, origin: str, method: str = "POST", path: str = "/async-chat"):
    if isinstance(client, FastAPI):
        client = TestClient(client)  # no lifespan: a preflight is answered by the middleware alone
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": ", ".join(h.lower() for h in ALLOW_HEADERS),
        },
    )


def test_a_preflight_from_an_allowed_origin_allows_what_clients_send(edge: TestClient):
    r = preflight(edge, APP_ORIGIN, "DELETE", "/stream/abc")
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"x-api-key", "authorization", "content-type", "last-event-id", "idempotency-key"} <= allowed
    assert {"GET", "POST", "PUT", "DELETE"} <= set(r.headers["access-control-allow-methods"].split(", "))
    assert "access-control-allow-credentials" not in r.headers


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:5173", True),
        ("http://127.0.0.1:8501", True),
        ("http://localhost", True),
        ("https://localhost:5173", False),
        ("http://localhost.evil.example:5173", False),
        ("http://127.0.0.1.evil.example", False),
        ("https://app.example.com.evil.example", False),
        ("null", False),
    ],
)
def test_only_the_configured_origins_are_allowed(edge: TestClient, origin: str, allowed: bool):
    r = preflight(edge, origin)
    assert (r.headers.get("access-control-allow-origin") == origin) is allowed
    assert (r.status_code == 200) is allowed


def test_a_simple_request_from_another_origin_gets_no_cors_headers(edge: TestClient):
    r = edge.get("/livez", headers={"Origin": "https://elsewhere.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = edge.get("/livez", headers={"Origin": APP_ORIGIN})
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN


def chat_body() -> dict:
    return {"message": "Hello", "user_id": "user-cors", "max_tokens": 10}


@pytest.mark.parametrize(
    ("name", "status"),
    [("no key", 401), ("unknown key", 403), ("over a limit", 429), ("chat_svc away", 503), ("a bug", 500)],
)
def test_errors_carry_the_cors_headers_so_a_page_can_read_them(edge: TestClient, name: str, status: int):
    origin = {"Origin": APP_ORIGIN}
    if name == "no key":
        r = edge.get("/whoami", headers=origin)
    elif name == "unknown key":
        r = edge.get("/whoami", headers={**origin, "X-API-Key": "not-a-key"})
    elif name == "over a limit":
        for _ in range(2):
            r = edge.get("/whoami", headers={**origin, "X-API-Key": LIMITED_KEY})
    elif name == "chat_svc away":
        r = edge.post("/chat", json=chat_body(), headers={**origin, "X-API-Key": KEY})
    else:
        r = edge.get("/crash", headers=origin)
    assert r.status_code == status, r.text
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert exposed >= READABLE
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == status
    assert r.headers["x-request-id"]
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1


def test_no_origin_is_allowed_unless_configured():
    r = preflight(create_app(edge_settings()), APP_ORIGIN)
    assert "access-control-allow-origin" not in r.headers
    assert cors_options(edge_settings()) is None


def test_any_origin_may_be_allowed_but_then_without_credentials():
    r = preflight(create_app(edge_settings(cors_origins="*")), "https://anywhere.example")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    with pytest.raises(ValidationError, match="cannot be combined"):
        Settings(_env_file=None, cors_origins="*", cors_allow_credentials=True)
    named = create_app(edge_settings(cors_origins=APP_ORIGIN, cors_allow_credentials=True))
    assert preflight(named, APP_ORIGIN).headers["access-control-allow-credentials"] == "true"


def test_origin_patterns():
    assert origin_pattern("https://*.example.com") == r"https://[A-Za-z0-9-]+\.example\.com"
    with pytest.raises(ValueError, match="scheme://host"):
        origin_pattern("localhost:*")


def test_chatterbot_up_allows_loopback_origins_unless_told_otherwise(mesh):
    r = httpx.options(
        f"{mesh.edge_url}/async-chat",
        headers={"Origin": "http://localhost:8501", "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:8501"
