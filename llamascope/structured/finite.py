"""Whether a JSON Schema admits any finite JSON value: a schema whose every value holds the schema again
(``{"anyOf": [{"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, {"type": "array",
"items": {"$ref": "#"}, "minItems": 1}]}``) has none, yet its grammar always allows a next token, so decoding
under it would only ever end at ``max_tokens``.

A value is finite iff it has a derivation of finite depth, and the shallowest one never passes the same
reference twice on its way down (it could be cut short there). So ``refs`` maps each local reference to
whether it is known to have a finite value, starting with none, and ``finite`` reads a reference it has not
yet shown finite as having none; ``has_finite_value`` evaluates every reference again until nothing changes
(a least fixed point, as for the productive symbols of a grammar). Hand-written: jsonschema validates values
and has no such analysis, and llguidance's compiler does not report it.

The answer errs one way only: False means no finite value exists; keywords not read here (``not``,
``if``/``then``/``else``, string and number bounds, ``minProperties``) never make it False. The constraints
that can force nesting are the ones read: ``required`` properties, ``minItems`` and ``prefixItems``, and the
combinators ``anyOf``, ``oneOf`` and ``allOf``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LEAF_TYPES = frozenset({"string", "number", "integer", "boolean", "null"})
MAX_PASSES = 64  # each pass adds a reference to those known finite, or ends: more than any schema sent holds


def has_finite_value(schema: Any) -> bool:
    """False only if no finite JSON value satisfies ``schema`` (a JSON Schema, already checked as one)."""
    refs = _local_refs(schema)
    if refs is None:
        return True  # references resolved against a subschema's own base URI: not read
    known: dict[str, bool] = dict.fromkeys(refs, False)
    for _ in range(MAX_PASSES):
        now = {ref: _finite(target, schema, known) for ref, target in refs.items()}
        if now == known:
            break
        known = now
    else:
        return True  # not settled: say nothing
    return _finite(schema, schema, known)


def _local_refs(root: Any) -> dict[str, Any] | None:
    """Every ``$ref`` in ``root`` that points inside it ("#", "#/$defs/x"), with what it points to; None where a
    subschema sets its own base URI (``$id``, draft 4's ``id``), against which "#" and "#/..." in it name that
    subschema, not the root (read as the root's, a finite schema could be found to have no value)."""
    found: dict[str, Any] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            if node is not root and (isinstance(node.get("$id"), str) or isinstance(node.get("id"), str)):
                return None
            ref = node.get("$ref")
            if isinstance(ref, str) and ref not in found:
                target = _resolve(root, ref)
                if target is not None:
                    found[ref] = target
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _resolve(root: Any, ref: str) -> Any:
    """What a local JSON Pointer reference names, or None (a remote or unreadable reference, or a plain-name
    fragment such as "#leaf", which names an ``$anchor``, not the root)."""
    if ref != "#" and not ref.startswith("#/"):
        return None
    node = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _finite(schema: Any, root: Any, known: Mapping[str, bool]) -> bool:
    if schema is True or schema is False:
        return schema
    if not isinstance(schema, Mapping):
        return True
    if "const" in schema or "enum" in schema:
        return True  # a literal from the schema itself: finite
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref in known and not known[ref]:
        return False  # a local reference not (yet) shown to have a finite value; a remote one is not read
    if not all(_finite(s, root, known) for s in _list(schema.get("allOf"))):
        return False
    for key in ("anyOf", "oneOf"):
        if key in schema and not any(_finite(s, root, known) for s in _list(schema[key])):
            return False
    types = schema.get("type")
    if types is None:
        return True  # any type: a string will do
    types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
    if types & LEAF_TYPES:
        return True
    return ("object" in types and _object_finite(schema, root, known)) or (
        "array" in types and _array_finite(schema, root, known)
    )


def _object_finite(schema: Mapping[str, Any], root: Any, known: Mapping[str, bool]) -> bool:
    properties = schema.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required = schema.get("required")
    for name in required if isinstance(required, list) else []:
        if name in properties:
            value = properties[name]
        elif "patternProperties" in schema:
            value = True  # a pattern may name it: not read
        else:
            value = schema.get("additionalProperties", True)
        if not _finite(value, root, known):
            return False
    return True


def _array_finite(schema: Mapping[str, Any], root: Any, known: Mapping[str, bool]) -> bool:
    least = schema.get("minItems", 0)
    least = least if isinstance(least, int) else 0
    prefix = _list(schema.get("prefixItems"))
    items = schema.get("items", True)
    if isinstance(items, list):  # draft 4-7: items as a tuple, additionalItems after it
        prefix, items = items, schema.get("additionalItems", True)
    needed = prefix[:least]
    if least > len(prefix):
        needed = [*needed, items]
    return all(_finite(s, root, known) for s in needed)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
