"""JSON of a response model rendered once and filled per event: how stream chunks stay cheap.

A stream sends the same body many times over with only one string changed (a token). Rendering a pydantic
model per token would cost several microseconds each; instead the model is rendered once, with a marker in
place of that string, and each event is the rendered text around the string's own JSON.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from pydantic import BaseModel

# A private-use character (both serializers leave it raw), so the marker cannot meet a real body's text.
MARKER = "\ue000chatterbot-template\ue000"


class JSONTemplate:
    """The JSON of `build(MARKER)` with the marker's string replaced per call: `template(text)`.

    `build` makes the model with the marker where the varying string goes; `exclude_unset` leaves out the
    fields it did not set, as `model_dump_json` would.
    """

    __slots__ = ("_prefix", "_suffix")

    def __init__(self, build: Callable[[str], BaseModel], *, exclude_unset: bool = False) -> None:
        rendered = build(MARKER).model_dump_json(exclude_unset=exclude_unset)
        marker = orjson.dumps(MARKER).decode()
        if rendered.count(marker) != 1:
            raise ValueError("the marker must appear exactly once in the rendered model")
        self._prefix, _, self._suffix = rendered.partition(marker)

    def __call__(self, text: str) -> str:
        return self._prefix + orjson.dumps(text).decode() + self._suffix
