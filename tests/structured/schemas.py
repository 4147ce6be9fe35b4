"""Varied JSON Schemas for constrained decoding: nested objects, bounded arrays, enums, ranges, optional fields,
``$ref``/``$defs``, unions, patterns and formats, and free text that random weights rarely end."""

from __future__ import annotations

from typing import Any

from llamascope.structured.spec import ANY_OBJECT

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat receipt": {
        "type": "object",
        "properties": {
            "merchant": {"type": "string", "maxLength": 12},
            "total": {"type": "number", "minimum": 0, "maximum": 1000},
            "currency": {"enum": ["CNY", "USD", "EUR"]},
            "paid": {"type": "boolean"},
        },
        "required": ["merchant", "total", "currency", "paid"],
        "additionalProperties": False,
    },
    "nested objects": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "address": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Hangzhou", "Beijing"]},
                    "zip": {"type": "string", "pattern": "^[0-9]{6}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["person", "address"],
        "additionalProperties": False,
    },
    "array with bounds": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 6},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "enums and const": {
        "type": "object",
        "properties": {"status": {"enum": ["ok", "error", None, 1]}, "kind": {"const": "receipt"}},
        "required": ["status", "kind"],
        "additionalProperties": False,
    },
    "numbers with ranges": {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "offset": {"type": "integer", "minimum": -5, "maximum": 5},
            "step": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 50},
        },
        "required": ["ratio", "offset", "step"],
        "additionalProperties": False,
    },
    "optional fields": {
        "type": "object",
        "properties": {
            "a": {"type": "string", "maxLength": 5},
            "b": {"type": "integer", "minimum": 0, "maximum": 9},
            "c": {"type": "boolean"},
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "$ref and $defs": {
        "$defs": {
            "line": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 4},
                    "cents": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["label", "cents"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "first": {"$ref": "#/$defs/line"},
            "rest": {"type": "array", "items": {"$ref": "#/$defs/line"}, "maxItems": 2},
        },
        "required": ["first", "rest"],
        "additionalProperties": False,
    },
    "unions": {
        "type": "object",
        "properties": {
            "value": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 9},
                    {"type": "string", "maxLength": 4},
                    {"type": "null"},
                ]
            }
        },
        "required": ["value"],
        "additionalProperties": False,
    },
    "nested arrays": {
        "type": "object",
        "properties": {
            "grid": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 2,
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                },
            }
        },
        "required": ["grid"],
        "additionalProperties": False,
    },
    "patterns and formats": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "day": {"type": "string", "format": "date"},
        },
        "required": ["code", "day"],
        "additionalProperties": False,
    },
    "free text (mostly cut)": {
        "type": "object",
        "properties": {"note": {"type": "string"}},
        "required": ["note"],
    },
    "json_object": ANY_OBJECT,
}
