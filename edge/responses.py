"""JSON responses of response models, rendered without FastAPI validating them once more."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.responses import Response


class ModelResponse(Response):
    """A response model rendered as it is (FastAPI's `response_model` would validate it once more)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        if not isinstance(content, BaseModel):
            raise TypeError(f"ModelResponse renders pydantic models, not {type(content).__name__}")
        return content.model_dump_json().encode()
