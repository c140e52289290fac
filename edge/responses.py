"""JSON responses serialized with orjson (fast, and what the hot routes send)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class JSONBytesResponse(Response):
    """A JSON body rendered by orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
