"""Whether a schema is a JSON Schema of its dialect: the meta-schema check of ``structured.spec.check_schema`` and
``llamascope chat --schema``, in Rust (jsonschema_rs) but for the dialect's name and the patterns."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# Keywords whose values are data, not schemas: a "$ref" or "pattern" key inside them is none.
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
# Keywords whose value maps names (a property's, a definition's) to schemas: a property named "minimum" is no bound.
NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def meta_problem(schema: Mapping[str, Any]) -> str:
    """Why ``schema`` is not a JSON Schema of its dialect, or "" if it is one. The server's check and
    ``llamascope chat --schema``'s.

    jsonschema_rs (Rust) checks it against the meta-schema, where jsonschema's pure-Python check held the GIL, and
    with it every other request of the server, for seconds on a large schema (an ``anyOf`` of 3,000 objects:
    2.6 s against 8 ms; bench/schema_stall.py). jsonschema only names the dialect (a dictionary lookup), and
    checks draft 3, which jsonschema_rs does not know."""
    # why: jsonschema and llguidance are 0.1-0.2 s of imports; a gateway whose requests never ask for an
    # answer's shape starts without them
    import jsonschema
    import jsonschema_rs

    if "$schema" in schema and not isinstance(schema["$schema"], str):
        # validator_for looks it up as a dialect's URI first: a number raised AttributeError, a list TypeError (500s)
        return "$schema is not a string"
    dialect = jsonschema.validators.validator_for(schema, default=None)
    if dialect is jsonschema.Draft3Validator:
        try:
            dialect.check_schema(schema)
        except jsonschema.SchemaError as e:
            return e.message
        except OverflowError as e:
            # its "regex" format compiles each pattern with re, which raises this (not re.error, all jsonschema
            # catches) for a repetition past 2**32 - 1: "^a{4294967296}$" was a 500
            return _pattern_problem(schema) or f"a pattern in it cannot be compiled: {e}"
        return _pattern_problem(schema)
    if "$schema" in schema:
        # jsonschema_rs is given the dialect's URI as its meta-schema spells it: it fetches any other (a
        # ReferencingError, a 500). An unknown dialect is read as the latest, as jsonschema does; and a known one
        # written otherwise ("HTTP://json-schema.org/draft-07/schema#": jsonschema reads the scheme in any case) was
        # a fetch from json-schema.org.
        meta_schema = (dialect or jsonschema.Draft202012Validator).META_SCHEMA
        schema = {**schema, "$schema": meta_schema.get("$id", meta_schema.get("id"))}
    try:
        jsonschema_rs.meta.validate(dict(schema))  # a shallow copy: it takes a dict
    except jsonschema_rs.ValidationError as e:
        where = "".join(f"[{json.dumps(step)}]" for step in e.instance_path)
        return f"{e.message} at schema{where}" if where else e.message
    return _pattern_problem(schema)


def _pattern_problem(schema: Mapping[str, Any]) -> str:
    """Why a ``pattern`` or a ``patternProperties`` name in ``schema`` (checked against its meta-schema) is not a
    regular expression, or "" if all are. The meta-schemas say "format": "regex", which jsonschema_rs does not
    assert; jsonschema compiled them with ``re``, as here. Walked with a stack."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, Mapping):
            continue
        named = node.get("patternProperties")
        patterns = list(named) if isinstance(named, Mapping) else []
        if isinstance(node.get("pattern"), str):
            patterns.append(node["pattern"])
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, OverflowError) as e:
                # OverflowError, not re.error, for a repetition past 2**32 - 1: "^a{4294967296}$" was a 500
                return f"the pattern {pattern!r} is not a regular expression: {e}"
        for key, value in node.items():
            if key in NAMED and isinstance(value, Mapping):
                stack.extend(value.values())
            elif key not in DATA_KEYWORDS:
                stack.append(value)
    return ""
