"""A small, deterministic JSON Schema instance generator: the simulated engine's stand-in for guided decoding.

`instance(schema)` returns a document valid against `schema` (JSON Schema 2020-12, and the draft 4-7
spellings tool schemas still use), the same one every time, built small from the first value the schema
allows: `const`, the first of `enum`, `default`, else a value of the first listed type that can be built
(null last; the type implied by the keywords when none is listed):
- strings are "simulated", repeated or cut to their length bounds, or an example of a known `format`;
- numbers are the one nearest 0 within the bounds (exclusive ones too) that is a `multipleOf`;
- booleans are false; arrays hold their `prefixItems`, or else one item, and at least `minItems`;
- objects hold every listed property (an optional one is left out when it cannot be built, which is what
  ends a recursive schema), and an `additionalProperties` value for each required name not listed.

`$ref` resolves inside the document (`#`, `#/$defs/...`, `#/definitions/...`, any local pointer), and may
nest in itself `MAX_REF_DEPTH` times; `allOf` merges its branches into one schema; `anyOf` and `oneOf`
take the first branch that can be built (`oneOf` branches are taken to exclude each other, as the
discriminated unions of tool schemas do). A keyword it cannot honour (`pattern`, `not`, `if`, ...) or a
schema nothing satisfies raises `UnsupportedSchema` rather than give a document that does not validate.
A `format` it does not know is an annotation, as JSON Schema 2020-12 has it by default: a plain string.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable
from fractions import Fraction
from functools import partial
from typing import Any


class UnsupportedSchema(ValueError):
    """The schema asks for what this generator cannot build, or allows no document at all."""


# Keywords whose constraints are not honoured: a schema that uses them is refused, not half-met.
REFUSED = frozenset(
    {
        "pattern",
        "patternProperties",
        "propertyNames",
        "not",
        "if",
        "then",
        "else",
        "contains",
        "minContains",
        "maxContains",
        "dependencies",
        "dependentRequired",
        "dependentSchemas",
        "unevaluatedItems",
        "unevaluatedProperties",
        "$dynamicRef",
        "$recursiveRef",
    }
)
FORMATS = {
    "date": "2000-01-01",
    "date-time": "2000-01-01T00:00:00Z",
    "time": "00:00:00Z",
    "duration": "P1D",
    "email": "simulated@example.com",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uri": "https://example.com/simulated",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
TEXT = "simulated"
MAX_REF_DEPTH = 2
# Bounds the work (and the answer) of a schema asking for huge or exponentially nested documents.
MAX_VALUES = 10_000
MAX_STRING_LENGTH = 10_000

# How branches merged by allOf combine where they both set a keyword (equal values always combine).
_LOWER_BOUNDS = frozenset({"minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"})
_UPPER_BOUNDS = frozenset({"maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"})
_SUBSCHEMAS = frozenset({"items", "additionalProperties", "additionalItems"})
_ANNOTATIONS = frozenset(
    {"title", "description", "examples", "default", "$comment", "$schema", "$id", "$defs", "definitions"}
)
_IMPLIED_TYPES = (
    ("object", {"properties", "required", "additionalProperties", "minProperties", "maxProperties"}),
    ("array", {"items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems"}),
    ("string", {"minLength", "maxLength", "format"}),
    ("number", {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
)


def instance(schema: Any) -> Any:
    """A document valid against `schema`; raises UnsupportedSchema."""
    try:
        return _Builder(schema).value(schema, ())
    except UnsupportedSchema:
        raise
    except (
        TypeError,
        ValueError,
        AttributeError,
        KeyError,
        IndexError,
        ZeroDivisionError,
        RecursionError,
    ) as exc:
        raise UnsupportedSchema(f"the schema is malformed ({type(exc).__name__}: {exc})") from None


def _schema(schema: Any) -> dict[str, Any]:
    """A schema as an object: `true` is `{}`; `false` allows nothing."""
    if schema is True:
        return {}
    if schema is False:
        raise UnsupportedSchema("the schema false allows no value")
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"a schema is an object or a boolean, not {schema!r}")
    return schema


def _without(schema: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k not in keys}


class _Builder:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.values = 0

    def value(self, schema: Any, refs: tuple[str, ...]) -> Any:
        """A value of `schema`; `refs` are the `$ref`s expanded on the way here."""
        schema, refs = self._flat(schema, refs)
        self.values += 1
        if self.values > MAX_VALUES:
            raise UnsupportedSchema(f"the document would hold more than {MAX_VALUES} values")
        refused = sorted(REFUSED & schema.keys())
        if refused:
            raise UnsupportedSchema(f"{refused[0]} is not supported")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                rest = _without(schema, key)
                return _first((partial(self._branch, rest, b, refs) for b in schema[key]), key)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            if not schema["enum"]:
                raise UnsupportedSchema("enum lists no value")
            return schema["enum"][0]
        if "default" in schema:
            return schema["default"]
        types = schema.get("type") or next(
            (t for t, keys in _IMPLIED_TYPES if keys & schema.keys()), "string"
        )
        # A listed null comes last: a document that shows a value says more.
        kinds = [types] if isinstance(types, str) else sorted(types, key=lambda kind: kind == "null")
        return _first((partial(self._typed, kind, schema, refs) for kind in kinds), "type")

    def _branch(self, rest: dict[str, Any], branch: Any, refs: tuple[str, ...]) -> Any:
        """A value of one anyOf/oneOf branch with the schema around it."""
        return self.value(_merge([rest, branch]), refs)

    def _flat(self, schema: Any, refs: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
        """`schema` with its `$ref` and `allOf` merged into one schema, and the refs expanded for it."""
        schema = _schema(schema)
        parts = [_without(schema, "$ref", "allOf")]
        if "$ref" in schema:
            ref = schema["$ref"]
            if refs.count(ref) >= MAX_REF_DEPTH:
                raise UnsupportedSchema(f"{ref} nests in itself more than {MAX_REF_DEPTH} times")
            part, refs = self._flat(self._resolve(ref), (*refs, ref))
            parts.append(part)
        for branch in schema.get("allOf", ()):
            part, refs = self._flat(branch, refs)
            parts.append(part)
        return (_merge(parts) if len(parts) > 1 else parts[0]), refs

    def _resolve(self, ref: Any) -> Any:
        """The subschema a local `$ref` points at (a JSON pointer into the root schema)."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchema(f"$ref {ref!r} is not a reference inside the schema")
        target = self.root
        for token in ref[1:].split("/")[1:]:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and token.isdigit() and int(token) < len(target):
                target = target[int(token)]
            elif isinstance(target, dict) and token in target:
                target = target[token]
            else:
                raise UnsupportedSchema(f"$ref {ref} points at nothing")
        return target

    def _typed(self, kind: str, schema: dict[str, Any], refs: tuple[str, ...]) -> Any:
        if kind == "object":
            return self._object(schema, refs)
        if kind == "array":
            return self._array(schema, refs)
        if kind == "string":
            return _string(schema)
        if kind in ("integer", "number"):
            return _number(schema, kind == "integer")
        if kind == "boolean":
            return False
        if kind == "null":
            return None
        raise UnsupportedSchema(f"type {kind!r} is not a JSON Schema type")

    def _object(self, schema: dict[str, Any], refs: tuple[str, ...]) -> dict[str, Any]:
        properties: dict[str, Any] = schema.get("properties", {})
        required: list[str] = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        doc: dict[str, Any] = {}
        for name in [*properties, *(r for r in required if r not in properties)]:
            if name in properties:
                subschema = properties[name]
            elif extra is False:
                raise UnsupportedSchema(f"{name!r} is required, but additionalProperties is false")
            else:
                subschema = extra
            if name in required:
                doc[name] = self.value(subschema, refs)
            else:
                with contextlib.suppress(UnsupportedSchema):
                    doc[name] = self.value(subschema, refs)
        optional = [name for name in doc if name not in required]
        while optional and len(doc) > schema.get("maxProperties", math.inf):
            del doc[optional.pop()]
        if not schema.get("minProperties", 0) <= len(doc) <= schema.get("maxProperties", math.inf):
            raise UnsupportedSchema("minProperties/maxProperties cannot be met with the listed properties")
        return doc

    def _array(self, schema: dict[str, Any], refs: tuple[str, ...]) -> list[Any]:
        prefix: list[Any] = schema.get("prefixItems", [])
        items = schema.get("items", True)
        if isinstance(items, list):  # the tuple form of drafts 4 to 2019-09
            prefix, items = items, schema.get("additionalItems", True)
        low, high = schema.get("minItems", 0), schema.get("maxItems", math.inf)
        wanted = min(max(low, len(prefix) or int("items" in schema)), high)
        if wanted < low:
            raise UnsupportedSchema("minItems is above maxItems")
        doc: list[Any] = []
        for i in range(wanted):
            subschema = prefix[i] if i < len(prefix) else items
            if i < low:
                doc.append(self.value(subschema, refs))
                continue
            try:
                doc.append(self.value(subschema, refs))
            except UnsupportedSchema:
                break
        if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in doc}) < len(doc):
            doc = doc[:low]
            if len({json.dumps(v, sort_keys=True) for v in doc}) < len(doc):
                raise UnsupportedSchema("uniqueItems with more than one item of the same schema")
        return doc


def _first(attempts: Iterable[Callable[[], Any]], what: str) -> Any:
    """The value of the first attempt that can be built; else the first attempt's reason."""
    errors: list[UnsupportedSchema] = []
    for attempt in attempts:
        try:
            return attempt()
        except UnsupportedSchema as exc:
            errors.append(exc)
    raise errors[0] if errors else UnsupportedSchema(f"{what} lists nothing")


def _merge(schemas: list[Any]) -> dict[str, Any]:
    """One schema that requires what each of `schemas` does (allOf), or UnsupportedSchema where they clash."""
    parts = [_schema(s) for s in schemas]
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key not in merged or merged[key] == value or key in _ANNOTATIONS:
                merged[key] = value
            elif key == "properties":
                both = merged[key]
                merged[key] = {
                    **both,
                    **{n: {"allOf": [both[n], s]} if n in both else s for n, s in value.items()},
                }
            elif key == "required":
                merged[key] = [*merged[key], *(n for n in value if n not in merged[key])]
            elif key == "type":
                merged[key] = _common_types(merged[key], value)
            elif key == "enum":
                merged[key] = [v for v in merged[key] if v in value]
            elif key in _SUBSCHEMAS:
                merged[key] = False if False in (merged[key], value) else {"allOf": [merged[key], value]}
            elif key in _LOWER_BOUNDS | _UPPER_BOUNDS and _numbers(merged[key], value):
                merged[key] = (max if key in _LOWER_BOUNDS else min)(merged[key], value)
            else:
                raise UnsupportedSchema(f"allOf branches disagree on {key}")
    # A branch that closes the object allows no property that another branch names.
    names = {n for p in parts for n in (*p.get("properties", {}), *p.get("required", ()))}
    for part in parts:
        if part.get("additionalProperties", True) not in (True, {}) and names - set(
            part.get("properties", {})
        ):
            raise UnsupportedSchema("an allOf branch closes the object to the properties of another")
    return merged


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _common_types(a: str | list[str], b: str | list[str]) -> list[str]:
    """The types both allow (an integer is a number)."""
    a, b = ([a] if isinstance(a, str) else a), ([b] if isinstance(b, str) else b)
    both = [t for t in a if t in b or (t == "integer" and "number" in b)]
    both += [t for t in b if t == "integer" and "number" in a and t not in both]
    if not both:
        raise UnsupportedSchema(f"allOf branches allow no common type ({a} and {b})")
    return both


def _string(schema: dict[str, Any]) -> str:
    low, high = schema.get("minLength", 0), schema.get("maxLength", math.inf)
    example = FORMATS.get(schema.get("format", ""))
    if example is not None:
        if not low <= len(example) <= high:
            raise UnsupportedSchema(f"no {schema['format']} of length {low} to {high} is known")
        return example
    length = min(max(low, len(TEXT)), high)
    if length < low or length > MAX_STRING_LENGTH:
        raise UnsupportedSchema(f"no string of length {low} to {high} is built")
    return (TEXT * (length // len(TEXT) + 1))[: int(length)]


def _bound(schema: dict[str, Any], lower: bool) -> tuple[Fraction | None, bool]:
    """The tighter of the inclusive and exclusive bound on one side, and whether it is exclusive."""
    inclusive, exclusive = ("minimum", "exclusiveMinimum") if lower else ("maximum", "exclusiveMaximum")
    value, other = schema.get(inclusive), schema.get(exclusive)
    if isinstance(other, bool):  # draft 4: a flag on the inclusive bound
        return (None, False) if value is None else (Fraction(str(value)), other)
    candidates = [
        (Fraction(str(v)), is_open) for v, is_open in ((value, False), (other, True)) if v is not None
    ]
    if not candidates:
        return None, False
    # The tighter bound; at a tie, the exclusive one.
    return max(candidates, key=lambda c: (c[0] if lower else -c[0], c[1]))


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    low, low_open = _bound(schema, lower=True)
    high, high_open = _bound(schema, lower=False)
    given = schema.get("multipleOf")
    step = Fraction(str(given)) if given is not None else (Fraction(1) if integer else None)
    if step is not None and integer:
        step = Fraction(step.numerator)  # the least integer multiple of p/q (lowest terms) is p
    if step is not None and step <= 0:
        raise UnsupportedSchema("multipleOf must be above 0")

    def allowed(v: Fraction) -> bool:
        if (low is not None and (v < low or (v == low and low_open))) or (
            high is not None and (v > high or (v == high and high_open))
        ):
            return False
        # Validators divide as floats (as jsonschema does): the quotient must come out whole there too.
        return step is None or ((v / step).denominator == 1 and (float(v) / float(given or 1)).is_integer())

    candidates = [Fraction(0)]
    if step is None:
        ends = [b for b in (low, high) if b is not None]
        candidates += (
            ends
            + [b + d for b in ends for d in (1, -1)]
            + ([(ends[0] + ends[1]) / 2] if len(ends) == 2 else [])
        )
    else:
        if low is not None:
            candidates += [step * (math.ceil(low / step) + k) for k in range(3)]
        if high is not None:
            candidates += [step * (math.floor(high / step) - k) for k in range(3)]
    for v in sorted(candidates, key=abs):
        if allowed(v):
            return int(v) if v.denominator == 1 else float(v)
    raise UnsupportedSchema("no number meets the bounds and multipleOf")
