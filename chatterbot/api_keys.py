"""API key checks shared by the edge and the gRPC surface of chat_svc."""

from __future__ import annotations

import hmac

# The gRPC metadata key (the HTTP header is X-API-Key).
API_KEY_METADATA = "x-api-key"


def key_matches(candidate: str, keys: list[str]) -> bool:
    """Constant-time membership test."""
    return any(hmac.compare_digest(candidate.encode(), key.encode()) for key in keys)
