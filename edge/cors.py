"""Cross-origin browsers: Starlette's CORSMiddleware, configured from `CHATTERBOT_CORS_ORIGINS`.

Origins are exact (`https://app.example.com`), `*` for any, or patterns: `:*` stands for any port (or none),
`*.` for one DNS label (`https://*.example.com`). Preflights allow the headers clients send (the key, JSON,
`Last-Event-ID` to resume a stream, `Idempotency-Key`); responses expose the ones a page must read to wait
and retry. The middleware wraps every other one, so errors (401, 429, 503, a 500) carry the headers too.
"""

from __future__ import annotations

import re
from typing import Any

from chatterbot.settings import Settings

ALLOW_METHODS = ("GET", "POST", "PUT", "DELETE")
ALLOW_HEADERS = ("X-API-Key", "Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key")
EXPOSE_HEADERS = (
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "X-RateLimit-Limit-Tokens",
    "X-RateLimit-Remaining-Tokens",
    "X-RateLimit-Reset-Tokens",
    "X-Request-ID",
    "X-Conversation-Id",
    "Idempotent-Replayed",
)
# Browsers cache a preflight at most this long (Chromium caps it at two hours).
PREFLIGHT_MAX_AGE_SECONDS = 600

LOOPBACK_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*")


def origin_pattern(origin: str) -> str:
    """The regular expression of an origin pattern: `:*` any port or none, `*.` one DNS label."""
    scheme, sep, rest = origin.partition("://")
    if not sep or not rest:
        raise ValueError(f"CORS origin {origin!r} is not scheme://host[:port]")
    host, _, port = rest.partition(":")
    host_re = re.escape(host).replace(r"\*", "[A-Za-z0-9-]+")
    if port == "*":
        port_re = r"(:[0-9]+)?"
    elif port:
        port_re = ":" + re.escape(port)
    else:
        port_re = ""
    return f"{re.escape(scheme)}://{host_re}{port_re}"


def cors_options(settings: Settings) -> dict[str, Any] | None:
    """CORSMiddleware's arguments for these settings; None when no origin is allowed."""
    origins = settings.cors_origins
    if not origins:
        return None
    origins = [o.rstrip("/") for o in origins]
    patterns = {o: origin_pattern(o) for o in origins if o != "*"}  # checks every origin's shape
    exact = [o for o in origins if "*" not in o or o == "*"]
    wildcards = [pattern for o, pattern in patterns.items() if "*" in o]
    return {
        "allow_origins": exact,
        "allow_origin_regex": "|".join(f"(?:{p})" for p in wildcards) or None,
        "allow_credentials": settings.cors_allow_credentials,
        "allow_methods": list(ALLOW_METHODS),
        "allow_headers": list(ALLOW_HEADERS),
        "expose_headers": list(EXPOSE_HEADERS),
        "max_age": PREFLIGHT_MAX_AGE_SECONDS,
    }
