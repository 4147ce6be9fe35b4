"""``has_finite_value``: False only where no finite JSON value satisfies the schema."""

from __future__ import annotations

from typing import Any

import pytest

from llamascope.structured.finite import has_finite_value

NODE = {
    "type": "object",
    "properties": {"value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#"}}},
}
SELF = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
DEFS = {
    "o": {"type": "object", "properties": {"a": {"$ref": "#/$defs/o"}}, "required": ["a"]},
    "l": {"type": "array", "items": {"$ref": "#/$defs/l"}, "minItems": 1},
    "n": {"type": "null"},
}

FINITE: dict[str, Any] = {
    "anything": {},
    "a string": {"type": "string"},
    "a tree, children optional": NODE,
    "a tree, children required but may be empty": {**NODE, "required": ["children"]},
    "a list: an item, then null or the list again": {
        "type": "object",
        "properties": {"next": {"anyOf": [{"type": "null"}, {"$ref": "#"}]}},
        "required": ["next"],
    },
    "a branch that ends": {"$defs": DEFS, "anyOf": [{"$ref": "#/$defs/o"}, {"$ref": "#/$defs/n"}]},
    "a required property of several types": {
        "type": "object",
        "properties": {"a": {"type": ["object", "string"], "properties": {"b": {"$ref": "#"}}, "required": ["b"]}},
        "required": ["a"],
    },
    "a remote reference (not read)": {"$ref": "https://example.com/schema.json"},
    "a required property a pattern may give": {"type": "object", "patternProperties": {"^a": SELF}, "required": ["a"]},
    "an enum beside a reference to itself": {"$ref": "#", "enum": [1]},
    # A fragment that is no JSON pointer names an anchor, not the root: {"a": "x"} is a value of these two.
    "a required property by $anchor": {
        "type": "object",
        "properties": {"a": {"$ref": "#leaf"}},
        "required": ["a"],
        "$defs": {"leaf": {"$anchor": "leaf", "type": "string"}},
    },
    "a required property by a draft-07 id": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"a": {"$ref": "#leaf"}},
        "required": ["a"],
        "definitions": {"leaf": {"$id": "#leaf", "type": "string"}},
    },
    # Under its own $id, "#/$defs/s" is the subschema's s (a string), not the root's (a circle nothing uses).
    "a subschema with its own base URI": {
        "$ref": "#/$defs/t",
        "$defs": {
            "t": {
                "$id": "https://example.com/t.json",
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/s"}},
                "required": ["a"],
                "$defs": {"s": {"type": "string"}},
            },
            "s": {"$ref": "#/$defs/s"},
        },
    },
}
ENDLESS: dict[str, Any] = {
    "itself": {"$ref": "#"},
    "a required property holding the schema": SELF,
    "each branch holding the schema": {"$defs": DEFS, "anyOf": [{"$ref": "#/$defs/o"}, {"$ref": "#/$defs/l"}]},
    "references in a circle": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "a tuple whose second item holds the schema": {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"$ref": "#"}],
        "minItems": 2,
    },
    "allOf with an endless part": {"allOf": [{"type": "object"}, SELF]},
    "a required property nothing may be": {"type": "object", "required": ["a"], "additionalProperties": False},
}


@pytest.mark.parametrize("schema", FINITE.values(), ids=FINITE.keys())
def test_schemas_with_finite_values(schema: Any) -> None:
    assert has_finite_value(schema)


@pytest.mark.parametrize("schema", ENDLESS.values(), ids=ENDLESS.keys())
def test_schemas_without(schema: Any) -> None:
    assert not has_finite_value(schema)
