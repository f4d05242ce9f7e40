"""Hypothesis strategies for request bodies drawn from the server's own OpenAPI schema, with text from
Unicode's odd corners (lone surrogates, NUL, BOM, noncharacters, bidi overrides, combining marks, ZWJ
sequences, the last code point) mixed into every string, key and enum value. Shared by the fuzz test and
benchmarks/reliability_fuzz.py.

Numbers are drawn around the boundaries that matter (0, 1, negatives, huge) so accepted requests stay short on
CPU; bodies are sent as ASCII-escaped JSON so a lone surrogate travels as ``\\udcff``.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

ODD_TEXT = [
    "\udcff", "\ud800", "\udfff", "\ud83d", "a\udc00b", "\udc00\ud800",  # lone and reversed surrogates
    "\x00", "\ufeff", "\ufffe", "\uffff", "\ufffd", "\U0010ffff", "\U000e0001",  # NUL, BOM, noncharacters
    "\u202e", "\u2066", "\u200b", "\u200d", "e\u0301\u0301\u0301", "\U0001f468\u200d\U0001f469",
    "\u0085", "\u2028", "\r\n", "\x1b[31m", "東京", "🚀", "Ελληνικά", "{{ x }}", "{% raw %}", "<|im_end|>",
]

_any_char = st.characters(codec=None, categories=["L", "M", "N", "P", "S", "Z", "C"])  # "C" has surrogates
ODD_STRINGS = st.one_of(
    st.sampled_from(ODD_TEXT),
    st.lists(st.one_of(st.sampled_from(ODD_TEXT), st.text(_any_char, max_size=4)), max_size=6).map("".join),
)


def rarely(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], one_in: int) -> st.SearchStrategy[Any]:
    """``rare`` once in ``one_in`` draws (st.one_of would weight by its flattened branch count instead)."""
    return st.integers(0, one_in - 1).flatmap(lambda i: rare if i == 0 else common)


# Half well-formed text, so many bodies get past validation and reach the tokenizer, template and engine.
STRINGS = rarely(st.text(max_size=12), st.one_of(st.sampled_from(ODD_TEXT), ODD_STRINGS), 2)
INTEGERS = st.one_of(st.integers(-2, 12), st.sampled_from([0, -1, 20, 21, 256, 2**31, 2**63, 2**70, -(2**70)]))
NUMBERS = st.one_of(
    # No subnormals: an in-process CPU engine earlier in the same pytest process turns on flush-to-zero
    # (ModelRunner), and hypothesis refuses to draw subnormal floats then.
    st.floats(-2.0, 3.0, allow_nan=False, allow_subnormal=False), st.sampled_from([0.0, 1e-9, 1.0, 2.0, -0.0, 1e300, -1e300]), INTEGERS,
)


class SchemaStrategies:
    """Strategies for the JSON bodies an OpenAPI document's components describe."""

    def __init__(self, openapi: dict[str, Any], hints: dict[str, Any] | None = None, max_optional: int = 4) -> None:
        self.openapi = openapi
        self.hints = hints or {}  # field name -> a value the server accepts (e.g. the served model name)
        self.max_optional = max_optional  # optional fields per object: few, so most bodies are nearly valid

    def request_body(self, path: str) -> st.SearchStrategy[dict[str, Any]]:
        schema = self.openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        return self.of(schema, depth=0)

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            node: Any = self.openapi
            for part in schema["$ref"].lstrip("#/").split("/"):
                node = node[part]
            schema = node
        return schema

    def of(self, schema: dict[str, Any], depth: int) -> st.SearchStrategy[Any]:
        schema = self._resolve(schema)
        typed = self._of_type(schema, depth)
        if depth == 0:
            return typed
        # Now and then a value of the wrong type (one draw in eight): the validator must answer 400, not crash.
        wrong = st.one_of(st.none(), st.booleans(), INTEGERS, ODD_STRINGS, st.just([]), st.just({}))
        return rarely(typed, wrong, 8)

    def _field(self, name: str, schema: dict[str, Any], depth: int) -> st.SearchStrategy[Any]:
        drawn = self.of(schema, depth + 1)
        return rarely(st.just(self.hints[name]), drawn, 4) if name in self.hints else drawn

    def _of_type(self, schema: dict[str, Any], depth: int) -> st.SearchStrategy[Any]:
        if "anyOf" in schema or "oneOf" in schema:
            return st.one_of([self.of(option, depth) for option in schema.get("anyOf", schema.get("oneOf"))])
        if "enum" in schema:
            return rarely(st.sampled_from(schema["enum"]), ODD_STRINGS, 4)
        if "const" in schema:
            return st.just(schema["const"])
        kind = schema.get("type")
        if kind == "string":
            return STRINGS
        if kind == "integer":
            return INTEGERS
        if kind == "number":
            return NUMBERS
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "array":
            items = schema.get("items", {})
            return st.lists(self.of(items, depth + 1) if depth < 4 else st.none(), max_size=3)
        if kind == "object" or "properties" in schema:
            return self._object(schema, depth)
        return st.one_of(st.none(), ODD_STRINGS, INTEGERS)  # {} : anything

    def _object(self, schema: dict[str, Any], depth: int) -> st.SearchStrategy[dict[str, Any]]:
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        values = {name: self._field(name, sub, depth) for name, sub in properties.items()}
        required_fields = {name: values[name] for name in properties if name in required}
        optional_names = sorted(set(properties) - required)
        optional = st.lists(st.sampled_from(optional_names), max_size=self.max_optional, unique=True).flatmap(
            lambda names: st.fixed_dictionaries({name: values[name] for name in names})
        ) if optional_names else st.just({})
        unknown = st.dictionaries(STRINGS, st.one_of(st.none(), STRINGS, INTEGERS), min_size=1, max_size=2)
        extra = rarely(st.just({}), unknown, 4)
        return st.builds(
            lambda base, optional, unknown: {**unknown, **optional, **base},
            st.fixed_dictionaries(required_fields),
            optional,
            extra if schema.get("additionalProperties", True) is not False else st.just({}),
        )


def encode(body: Any) -> bytes:
    """ASCII-escaped JSON: lone surrogates travel as ``\\uXXXX`` escapes, as a JavaScript client would send them."""
    return json.dumps(body, ensure_ascii=True).encode()
