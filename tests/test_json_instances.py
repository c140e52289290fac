"""engines.json_instances: every document it builds validates (checked by `jsonschema`, formats included) over
OpenAI's documented schemas and the keywords tool schemas use; what it cannot honour is refused."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from inference_svc.engines.json_instances import MAX_REF_DEPTH, UnsupportedSchema, instance

DRAFT_4 = "http://json-schema.org/draft-04/schema#"
DRAFT_7 = "http://json-schema.org/draft-07/schema#"


def validate(schema: Any, document: Any) -> None:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(document)


def strict_object(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    """An object in OpenAI's strict mode: every property required, no others."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
        **more,
    }


# OpenAI's function-calling and structured-outputs guides.
OPENAI_EXAMPLES: dict[str, Any] = {
    "get_weather": strict_object(
        {
            "location": {"type": "string", "description": "City and country e.g. Bogotá, Colombia"},
            "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        }
    ),
    "send_email": strict_object(
        {
            "to": {"type": "string", "description": "The recipient email address."},
            "subject": {"type": "string"},
            "body": {"type": "string"},
        }
    ),
    "math_reasoning": strict_object(
        {
            "steps": {
                "type": "array",
                "items": strict_object({"explanation": {"type": "string"}, "output": {"type": "string"}}),
            },
            "final_answer": {"type": "string"},
        }
    ),
    "research_paper": strict_object(
        {
            "title": {"type": "string"},
            "authors": {"type": "array", "items": {"type": "string"}},
            "abstract": {"type": "string"},
            "keywords": {"type": "array", "items": {"type": "string"}},
        }
    ),
    "moderation": strict_object(
        {
            "is_violating": {"type": "boolean"},
            "category": {"type": ["string", "null"], "enum": ["violence", "sexual", "self_harm", None]},
            "explanation_if_violating": {"type": ["string", "null"]},
        }
    ),
    "ui_recursive": strict_object(
        {
            "type": {"type": "string", "enum": ["div", "button", "header", "section", "field", "form"]},
            "label": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#"}},
            "attributes": {
                "type": "array",
                "items": strict_object({"name": {"type": "string"}, "value": {"type": "string"}}),
            },
        }
    ),
    "linked_list": strict_object(
        {"linked_list": {"$ref": "#/$defs/linked_list_node"}},
        **{
            "$defs": {
                "linked_list_node": strict_object(
                    {
                        "value": {"type": "number"},
                        "next": {"anyOf": [{"$ref": "#/$defs/linked_list_node"}, {"type": "null"}]},
                    }
                )
            }
        },
    ),
    "definitions": strict_object(
        {"steps": {"type": "array", "items": {"$ref": "#/$defs/step"}}, "final_answer": {"type": "string"}},
        **{
            "$defs": {
                "step": strict_object({"explanation": {"type": "string"}, "output": {"type": "string"}})
            }
        },
    ),
    "any_of_item": strict_object(
        {
            "item": {
                "anyOf": [
                    strict_object({"name": {"type": "string"}, "age": {"type": "number"}}),
                    strict_object({"number": {"type": "string"}, "street": {"type": "string"}}),
                ]
            }
        }
    ),
    "supported_properties": strict_object(
        {
            "name": {"type": "string", "description": "The name of the user"},
            "email": {"type": "string", "format": "email"},
            "weight": {"type": "number", "minimum": 0.5, "maximum": 700},
            "birthday": {"type": "string", "format": "date"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        }
    ),
}

# The keywords tool schemas use, one construct each.
CONSTRUCTS: dict[str, Any] = {
    "empty": {},
    "true": True,
    "null": {"type": "null"},
    "boolean": {"type": "boolean"},
    "type_list": {"type": ["integer", "string"]},
    "const": {"const": {"kind": "fixed"}},
    "enum": {"enum": [3, "a"]},
    "default": {"type": "integer", "default": 42},
    "string_min": {"type": "string", "minLength": 23},
    "string_max": {"type": "string", "maxLength": 4},
    "string_range": {"type": "string", "minLength": 2, "maxLength": 30},
    "date_time": {"type": "string", "format": "date-time"},
    "uri": {"type": "string", "format": "uri"},
    "uuid": {"type": "string", "format": "uuid"},
    "ipv4": {"type": "string", "format": "ipv4"},
    "ipv6": {"type": "string", "format": "ipv6"},
    "hostname": {"type": "string", "format": "hostname"},
    "time": {"type": "string", "format": "time"},
    "duration": {"type": "string", "format": "duration"},
    "unknown_format": {"type": "string", "format": "phone-number"},
    "integer_minimum": {"type": "integer", "minimum": 18},
    "integer_maximum": {"type": "integer", "maximum": -7},
    "integer_exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 2},
    "integer_multiple": {"type": "integer", "minimum": 10, "multipleOf": 4},
    "integer_fraction_multiple": {"type": "integer", "minimum": 1, "multipleOf": 2.5},
    "number_exclusive": {"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 2},
    "number_tight": {"type": "number", "exclusiveMinimum": 0.25, "maximum": 0.5},
    "number_multiple": {"type": "number", "minimum": 0.25, "multipleOf": 0.1},
    "number_negative": {"type": "number", "maximum": -0.5, "exclusiveMaximum": -1.5},
    "draft4_exclusive": {"$schema": DRAFT_4, "type": "integer", "minimum": 5, "exclusiveMinimum": True},
    "array_min": {"type": "array", "items": {"type": "integer"}, "minItems": 3},
    "array_none_allowed": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
    "array_no_items": {"type": "array"},
    "prefix_items": {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"type": "string", "format": "date"}],
        "items": False,
    },
    "draft7_tuple": {
        "$schema": DRAFT_7,
        "type": "array",
        "items": [{"type": "boolean"}, {"type": "string"}],
        "additionalItems": False,
        "minItems": 2,
    },
    "unique_one": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    "definitions_ref": {
        "$schema": DRAFT_7,
        "type": "object",
        "properties": {"point": {"$ref": "#/definitions/point"}},
        "required": ["point"],
        "definitions": {"point": strict_object({"x": {"type": "number"}, "y": {"type": "number"}})},
    },
    "ref_with_siblings": {
        "$defs": {"name": {"type": "string"}},
        "type": "object",
        "properties": {"name": {"$ref": "#/$defs/name", "minLength": 12}},
        "required": ["name"],
    },
    "escaped_pointer": {
        "$defs": {"a/b": {"type": "integer", "minimum": 3}},
        "type": "object",
        "properties": {"v": {"$ref": "#/$defs/a~1b"}},
        "required": ["v"],
    },
    "all_of_merge": {
        "allOf": [
            {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1}}, "required": ["id"]},
            {"properties": {"id": {"maximum": 9}, "name": {"type": "string"}}, "required": ["name"]},
        ]
    },
    "all_of_refs": {
        "$defs": {
            "base": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]},
            "extra": {"type": "object", "properties": {"tags": {"type": "array"}}, "required": ["tags"]},
        },
        "allOf": [{"$ref": "#/$defs/base"}, {"$ref": "#/$defs/extra"}],
    },
    "all_of_numbers": {"allOf": [{"type": "number", "minimum": 3}, {"type": "integer", "maximum": 10}]},
    "one_of_discriminated": {
        "oneOf": [
            strict_object({"kind": {"const": "circle"}, "radius": {"type": "number", "exclusiveMinimum": 0}}),
            strict_object({"kind": {"const": "square"}, "side": {"type": "number"}}),
        ]
    },
    "any_of_skips_what_cannot_be_built": {
        "anyOf": [{"type": "string", "pattern": "^x"}, {"type": "integer"}]
    },
    "any_of_with_siblings": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
        "additionalProperties": False,
        "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
    },
    "required_from_additional_properties": {
        "type": "object",
        "required": ["extra"],
        "additionalProperties": {"type": "integer", "minimum": 2},
    },
    "max_properties": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "string"}, "c": {"type": "string"}},
        "required": ["c"],
        "maxProperties": 2,
    },
    "optional_unbuildable_property": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}, "name": {"type": "string"}},
        "required": ["name"],
    },
    "optional_recursion": {
        "$defs": {"tree": {"type": "object", "properties": {"child": {"$ref": "#/$defs/tree"}}}},
        "$ref": "#/$defs/tree",
    },
    "implied_object": {"properties": {"n": {"type": "integer"}}, "required": ["n"]},
    "implied_number": {"minimum": 4},
    "nullable_openapi": {"type": "string", "nullable": True},
    "integer_format_annotation": {"type": "integer", "format": "int64"},
}


@pytest.mark.parametrize(
    "schema", [*OPENAI_EXAMPLES.values(), *CONSTRUCTS.values()], ids=[*OPENAI_EXAMPLES, *CONSTRUCTS]
)
def test_the_document_validates_and_is_the_same_every_time(schema: Any) -> None:
    document = instance(schema)
    validate(schema, document)
    assert instance(schema) == document


def test_documents_are_small_and_say_they_are_simulated() -> None:
    assert instance(OPENAI_EXAMPLES["get_weather"]) == {"location": "simulated", "units": "celsius"}
    assert instance(OPENAI_EXAMPLES["moderation"]) == {
        "is_violating": False,
        "category": "violence",
        "explanation_if_violating": "simulated",
    }
    assert instance(CONSTRUCTS["string_min"]) == "simulatedsimulatedsimul"
    assert instance(CONSTRUCTS["string_max"]) == "simu"
    assert instance(CONSTRUCTS["unknown_format"]) == "simulated"
    assert instance(CONSTRUCTS["default"]) == 42
    assert instance({"type": "array", "items": {"type": "integer"}}) == [0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("integer_minimum", 18),
        ("integer_maximum", -7),
        ("integer_exclusive", 1),
        ("integer_multiple", 12),
        ("integer_fraction_multiple", 5),
        ("number_exclusive", 1.5),
        ("number_tight", 0.375),
        ("number_negative", -2.5),
        ("draft4_exclusive", 6),
        ("all_of_numbers", 3),
    ],
)
def test_numbers_are_the_nearest_to_zero_that_the_bounds_allow(name: str, expected: float) -> None:
    assert instance(CONSTRUCTS[name]) == expected


def test_recursion_ends_where_the_schema_lets_it() -> None:
    linked = instance(OPENAI_EXAMPLES["linked_list"])["linked_list"]
    depth = 0
    while linked is not None:
        depth, linked = depth + 1, linked["next"]
    assert depth == MAX_REF_DEPTH  # each node is an expansion of the node's $ref; then next is null

    def height(tree: dict[str, Any]) -> int:
        return 1 + max((height(child) for child in tree["children"]), default=0)

    assert height(instance(OPENAI_EXAMPLES["ui_recursive"])) == MAX_REF_DEPTH + 1  # the root is no $ref
    assert instance(CONSTRUCTS["optional_recursion"]) == {"child": {}}


def test_all_of_merges_its_branches_into_one_object() -> None:
    assert instance(CONSTRUCTS["all_of_merge"]) == {"id": 1, "name": "simulated"}
    assert instance(CONSTRUCTS["all_of_refs"]) == {"id": "simulated", "tags": []}


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "string", "pattern": "^@[a-z]+$"}, "pattern"),
        ({"not": {"type": "string"}}, "not"),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains"),
        ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
        (False, "allows no value"),
        ({"type": "object", "required": ["x"], "additionalProperties": False}, "additionalProperties"),
        ({"type": "integer", "minimum": 3, "maximum": 2}, "bounds"),
        ({"type": "integer", "minimum": 1, "maximum": 3, "multipleOf": 5}, "multipleOf"),
        ({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1}, "bounds"),
        ({"type": "string", "minLength": 5, "maxLength": 4}, "length"),
        ({"type": "string", "format": "email", "maxLength": 5}, "email"),
        ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems"),
        ({"type": "array", "items": {"type": "string"}, "minItems": 2, "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "minItems": 100_000}, "values"),
        ({"type": "string", "minLength": 1_000_000}, "length"),
        ({"type": "object", "minProperties": 1}, "minProperties"),
        ({"$ref": "https://example.com/schema.json"}, "inside the schema"),
        ({"$ref": "#/$defs/missing"}, "points at nothing"),
        (
            {"$defs": {"n": strict_object({"next": {"$ref": "#/$defs/n"}})}, "$ref": "#/$defs/n"},
            "nests in itself",
        ),
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "common type"),
        (
            {
                "allOf": [
                    strict_object({"a": {"type": "string"}}),
                    {"properties": {"b": {"type": "string"}}, "required": ["b"]},
                ]
            },
            "closes the object",
        ),
        ({"anyOf": []}, "anyOf lists nothing"),
        ({"type": "whole-number"}, "not a JSON Schema type"),
        ({"type": "object", "properties": ["a"]}, "malformed"),
        ({"type": "number", "minimum": "zero"}, "malformed"),
        ({"enum": []}, "enum"),
    ],
)
def test_what_cannot_be_honoured_is_refused(schema: Any, reason: str) -> None:
    with pytest.raises(UnsupportedSchema, match=reason):
        instance(schema)
