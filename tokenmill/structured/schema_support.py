"""JSON-schema keywords the grammar engine cannot enforce: a request using one gets a 400, never a silently
unconstrained answer.

xgrammar (0.2.x) compiles these without error but does not constrain them (checked by feeding violating
instances to a matcher: tests/structured/test_schema_support.py keeps that honest).
"""

from __future__ import annotations

from typing import Any

UNENFORCED_KEYWORDS = (
    "not", "if", "then", "else", "allOf", "uniqueItems", "dependentRequired", "dependentSchemas",
    "unevaluatedProperties", "unevaluatedItems", "minContains", "maxContains", "$dynamicRef",
)
# Keywords whose value is a map of name → subschema, or a list of subschemas, or one subschema.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "contains", "propertyNames", "additionalItems")


def unenforced_features(schema: Any, path: str = "#") -> list[str]:
    """JSON pointers of the unenforceable keywords in ``schema`` (walks subschemas only, so a property
    that happens to be called "not" is fine)."""
    found: list[str] = []
    if not isinstance(schema, dict):
        return found
    for keyword in UNENFORCED_KEYWORDS:
        if keyword in schema and not (keyword == "uniqueItems" and schema[keyword] is False):
            found.append(f"{path}/{keyword}")
    for keyword in _SCHEMA_MAPS:
        value = schema.get(keyword)
        if isinstance(value, dict):
            for name, sub in value.items():
                found += unenforced_features(sub, f"{path}/{keyword}/{name}")
    for keyword in _SCHEMA_LISTS:
        value = schema.get(keyword)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                found += unenforced_features(sub, f"{path}/{keyword}/{i}")
    for keyword in _SCHEMA_VALUES:
        value = schema.get(keyword)
        if isinstance(value, dict):
            found += unenforced_features(value, f"{path}/{keyword}")
        elif isinstance(value, list):  # draft-4 tuple form of items
            for i, sub in enumerate(value):
                found += unenforced_features(sub, f"{path}/{keyword}/{i}")
    return found
