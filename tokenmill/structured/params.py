"""StructuredOutputsParams: what a request's output must match (vLLM's names), as plain picklable data.

Exactly one of ``json`` (a JSON schema), ``json_object`` (any JSON object), ``regex``, ``choice`` or ``grammar``
(EBNF/GBNF) is set. The record crosses process boundaries and keys the grammar cache, so it holds only
str/dict/list/bool values and is checked here, once, at construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # No whitespace between JSON tokens (vLLM's flag); otherwise at most a little is allowed (see compiler).
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        set_kinds = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, json_object, regex, choice or grammar; "
                f"got {set_kinds or 'none'}"
            )
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from exc
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema object; got {type(self.json).__name__}")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError("structured_outputs.regex must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("structured_outputs.grammar must be a non-empty EBNF grammar string")
        if self.choice is not None:
            if (not isinstance(self.choice, list | tuple) or not self.choice
                    or any(not isinstance(c, str) or not c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", list(self.choice))

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))

    def cache_key(self) -> str:
        """The spec as canonical JSON: equal specs (key order aside) share one compiled grammar."""
        return json.dumps([self.kind, getattr(self, self.kind), self.disable_any_whitespace], sort_keys=True)

    @classmethod
    def from_value(cls, value: StructuredOutputsParams | dict[str, Any]) -> StructuredOutputsParams:
        """Accept the record or its dict form (offline callers and the vLLM extra body pass dicts)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object; got {type(value).__name__}")
        unknown = sorted(set(value) - set(_KINDS) - {"disable_any_whitespace"})
        if unknown:
            raise ValueError(f"structured_outputs has unsupported fields {unknown}; use one of {list(_KINDS)}")
        return cls(**value)
