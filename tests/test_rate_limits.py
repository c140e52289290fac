"""Rate limits at the edge on the whole mesh: per key and route, per key across routes, tokens per minute,
failed authentications per address; counted in Redis so they hold across edge replicas, and failing open
when Redis is gone."""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from ops.embedded import free_port
from ops.launcher import Mesh, ServiceProcess
from tests.clients import chat_body, create_key, keys_cli, new_user
from tests.meshes import API_KEY


@pytest.fixture
def client(mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mesh.edge_url, timeout=30) as c:
        yield c


def as_key(key: str, **headers: str) -> dict[str, str]:
    return {"X-API-Key": key, **headers}


@contextmanager
def another_edge(mesh: Mesh, log_dir, **env: str) -> Iterator[httpx.Client]:
    """A second edge replica on the same mesh (and Redis, unless `env` says otherwise)."""
    port = free_port()
    edge = ServiceProcess(
        "edge",
        log_dir,
        port,
        {
            **mesh.services["edge"].env,
            "CHATTERBOT_EDGE_PORT": str(port),
            "CHATTERBOT_METRICS_PORT": str(free_port()),
            **env,
        },
    )
    edge.start(timeout=60)
    try:
        with httpx.Client(base_url=edge.url, timeout=30) as c:
            yield c
    finally:
        edge.stop()


def assert_quota(r: httpx.Response, limit: int, remaining: int) -> None:
    assert r.headers["RateLimit-Limit"] == str(limit), r.headers
    assert r.headers["RateLimit-Remaining"] == str(remaining), r.headers
    assert 0 <= int(r.headers["RateLimit-Reset"]) <= 60


def assert_rate_limited(r: httpx.Response, limit: int) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert_quota(r, limit, 0)


def test_requests_over_a_keys_rpm_get_429_with_retry_after_and_ratelimit_headers(mesh, client):
    user = new_user()
    key = as_key(create_key(mesh, "--user", user, "--rpm", "3").key)
    for remaining in (2, 1, 0):
        r = client.get(f"/conversations/{user}", headers=key)
        assert r.status_code == 200, r.text
        assert_quota(r, 3, remaining)
    assert_rate_limited(client.get(f"/conversations/{user}", headers=key), 3)
    # The key's rpm spans every route; another key of the same user has its own.
    assert_rate_limited(client.post("/chat", json=chat_body(user), headers=key), 3)
    other = as_key(create_key(mesh, "--user", user, "--rpm", "3").key)
    assert client.get(f"/conversations/{user}", headers=other).status_code == 200


def test_chat_takes_20_requests_a_minute_per_key_by_default(mesh, client):
    user = new_user()
    key = as_key(create_key(mesh, "--service").key)
    for remaining in range(19, -1, -1):
        r = client.post("/chat", json=chat_body(user), headers=key)
        assert r.status_code == 200, r.text
        assert_quota(r, 20, remaining)
    assert_rate_limited(client.post("/chat", json=chat_body(user), headers=key), 20)
    # Per route: the key's other routes are not limited (and this key has no rpm of its own) ...
    r = client.get(f"/conversations/{user}", headers=key)
    assert r.status_code == 200 and "RateLimit-Limit" not in r.headers
    # ... and per key: another key's /chat is untouched.
    assert (
        client.post(
            "/chat", json=chat_body(user), headers=as_key(create_key(mesh, "--service").key)
        ).status_code
        == 200
    )


def test_static_keys_are_exempt_from_rate_limits(client):
    r = client.post("/chat", json=chat_body(new_user()), headers=as_key(API_KEY))
    assert r.status_code == 200 and "RateLimit-Limit" not in r.headers


def test_a_keys_token_budget_counts_the_max_tokens_of_each_turn(mesh, client):
    user = new_user()
    key = as_key(create_key(mesh, "--user", user, "--tpm", "100").key)
    for left in (60, 20):
        r = client.post("/chat", json=chat_body(user, max_tokens=40), headers=key)
        assert r.status_code == 200, r.text
        assert r.headers["X-RateLimit-Limit-Tokens"] == "100"
        assert r.headers["X-RateLimit-Remaining-Tokens"] == str(left)
    over = client.post("/chat", json=chat_body(user, max_tokens=40), headers=key)
    assert over.status_code == 429 and 1 <= int(over.headers["Retry-After"]) <= 60
    # On a token 429 the RateLimit-* headers describe the token budget: 20 of 100 are left, not 40.
    assert_quota(over, 100, 20)
    assert "budget" in over.json()["detail"] and over.headers["X-RateLimit-Remaining-Tokens"] == "20"
    # Queued turns draw on the same budget; a turn that fits is still admitted.
    assert client.post("/async-chat", json=chat_body(user, max_tokens=40), headers=key).status_code == 429
    assert client.post("/async-chat", json=chat_body(user, max_tokens=20), headers=key).status_code == 200
    assert client.post("/chat", json=chat_body(user, max_tokens=10), headers=key).status_code == 429

    small = as_key(create_key(mesh, "--service", "--tpm", "100").key)
    too_big = client.post("/chat", json=chat_body(user, max_tokens=200), headers=small)
    assert too_big.status_code == 429 and "more than" in too_big.json()["detail"]


def test_failed_authentication_is_limited_per_client_address(mesh, client):
    # uvicorn takes the client address from X-Forwarded-For when the proxy (here: 127.0.0.1) is trusted.
    address = {"X-Forwarded-For": f"203.0.113.{random.randrange(1, 255)}"}
    elsewhere = {"X-Forwarded-For": f"198.51.100.{random.randrange(1, 255)}"}
    user = new_user()
    for _ in range(10):
        r = client.get(f"/conversations/{user}", headers=as_key(f"cb_{uuid.uuid4().hex}", **address))
        assert r.status_code == 403, r.text
    blocked = client.get(f"/conversations/{user}", headers=as_key(f"cb_{uuid.uuid4().hex}", **address))
    assert_rate_limited(blocked, 10)
    assert "failed authentications" in blocked.json()["detail"]

    # A key that would need a store lookup is held back from that address too; other addresses are not.
    fresh = create_key(mesh, "--user", user).key
    assert client.get(f"/conversations/{user}", headers=as_key(fresh, **address)).status_code == 429
    assert client.get(f"/conversations/{user}", headers=as_key(fresh, **elsewhere)).status_code == 200
    assert client.get(f"/conversations/{user}", headers=as_key("cb_nope", **elsewhere)).status_code == 403
    # Keys known without a lookup (static keys, keys cached already) still work from the blocked address.
    assert client.get(f"/conversations/{user}", headers=as_key(API_KEY, **address)).status_code == 200
    assert client.get(f"/conversations/{user}", headers=as_key(fresh, **address)).status_code == 200


def test_limits_hold_across_edge_replicas(mesh, client, tmp_path):
    user = new_user()
    key = as_key(create_key(mesh, "--user", user, "--rpm", "4").key)
    with another_edge(mesh, tmp_path) as replica:
        for edge, remaining in ((client, 3), (replica, 2), (client, 1), (replica, 0)):
            r = edge.get(f"/conversations/{user}", headers=key)
            assert r.status_code == 200, r.text
            assert_quota(r, 4, remaining)
        assert_rate_limited(client.get(f"/conversations/{user}", headers=key), 4)
        assert_rate_limited(replica.get(f"/conversations/{user}", headers=key), 4)


def test_rate_limits_fail_open_when_redis_is_unreachable(mesh, tmp_path):
    user = new_user()
    key = as_key(create_key(mesh, "--user", user, "--rpm", "1").key)
    nowhere = f"redis://127.0.0.1:{free_port()}"
    with another_edge(mesh, tmp_path, CHATTERBOT_REDIS_URL=nowhere) as edge:
        for _ in range(3):
            r = edge.get(f"/conversations/{user}", headers=key)
            assert r.status_code == 200, r.text
            assert "RateLimit-Limit" not in r.headers
        metrics = edge.get("/metrics").text
        skipped = re.search(r"^chatterbot_rate_limit_storage_errors_total (\S+)$", metrics, re.M)
        assert skipped and float(skipped.group(1)) >= 3


def test_a_key_with_high_limits_does_200_stream_chats_a_minute_without_429(mesh, client):
    user = new_user()
    key = as_key(create_key(mesh, "--service", "--rpm", "1000000", "--tpm", "1000000000").key)
    statuses = [
        client.post("/stream-chat", json=chat_body(user), headers=key).status_code for _ in range(200)
    ]
    assert statuses == [200] * 200
    # A key with no limits of its own is still held to the route default (20 a minute).
    default = as_key(create_key(mesh, "--service").key)
    for _ in range(20):
        assert client.post("/stream-chat", json=chat_body(user), headers=default).status_code == 200
    assert_rate_limited(client.post("/stream-chat", json=chat_body(user), headers=default), 20)


def test_a_keys_own_route_limit_replaces_the_route_default(mesh, client):
    user = new_user()
    key = as_key(create_key(mesh, "--service", "--limit", "/chat=25/minute").key)
    for remaining in range(24, -1, -1):
        r = client.post("/chat", json=chat_body(user), headers=key)
        assert r.status_code == 200, r.text
        assert_quota(r, 25, remaining)
    assert_rate_limited(client.post("/chat", json=chat_body(user), headers=key), 25)
    # Its other routes follow the key's own limits too: none on /async-chat, where the default is 20.
    for _ in range(21):
        r = client.post("/async-chat", json=chat_body(user), headers=key)
        assert r.status_code == 200 and "RateLimit-Limit" not in r.headers, r.text


def test_keys_update_changes_a_keys_limits_without_a_new_key(mesh, client):
    user = new_user()
    made = create_key(mesh, "--service", "--name", "updatable")
    key = as_key(made.key)
    assert client.post("/chat", json=chat_body(user), headers=key).headers["RateLimit-Limit"] == "20"
    out = keys_cli(mesh, "update", made.key_id, "--limit", "/chat=2/minute", "--rpm", "500")
    assert out.returncode == 0, out.stderr
    assert "/chat=2/minute" in out.stdout
    listing = keys_cli(mesh, "list")
    row = next(line for line in listing.stdout.splitlines() if line.startswith(made.key_id))
    assert row.split()[9] == "/chat=2/minute", row
    # Edges cache a key's record for CHATTERBOT_API_KEY_CACHE_SECONDS; past that the new limits hold.
    deadline = time.monotonic() + 15
    while client.post("/chat", json=chat_body(user), headers=key).headers.get("RateLimit-Limit") != "2":
        assert time.monotonic() < deadline, "the updated limit did not reach the edge"
        time.sleep(0.5)
    for _ in range(3):
        r = client.post("/chat", json=chat_body(user), headers=key)
    assert_rate_limited(r, 2)
    cleared = keys_cli(mesh, "update", made.key_id, "--clear-limits", "--rpm", "0")
    assert cleared.returncode == 0 and "default:/chat=20/minute" in cleared.stdout, cleared


def test_keys_update_refuses_a_malformed_limit(mesh):
    made = create_key(mesh, "--service")
    out = keys_cli(mesh, "update", made.key_id, "--limit", "/chat=lots")
    assert out.returncode == 2 and "is not a limit such as 600/minute" in out.stderr
    nothing = keys_cli(mesh, "update", made.key_id)
    assert nothing.returncode == 2 and "nothing to update" in nothing.stderr
