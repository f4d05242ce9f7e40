"""Complexity scorers for virtual models: a request body → a score; the router compares it to a threshold.

``HeuristicScorer`` mixes prompt length, conversation depth and keywords; ``load_scorer`` also accepts
``package.module:factory`` so a user can plug in their own (a classifier, a small model, ...).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

DEFAULT_KEYWORDS = (
    "prove", "proof", "step by step", "analyze", "analyse", "derive", "explain why", "compare",
    "algorithm", "refactor", "debug", "optimize", "theorem", "design", "architecture",
)  # fmt: skip


class ComplexityScorer(Protocol):
    def score(self, body: dict[str, Any]) -> float: ...


def request_text(body: dict[str, Any]) -> str:
    """All prompt text of a completions or chat body (string or text-part message content)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(p for p in prompt if isinstance(p, str))
    parts: list[str] = []
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "\n".join(parts)


def conversation_depth(body: dict[str, Any]) -> int:
    """Number of user and assistant turns; a completions prompt counts as one."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 1
    return sum(1 for m in messages if isinstance(m, dict) and m.get("role") in ("user", "assistant"))


@dataclass
class HeuristicScorer:
    """score = w_length·min(chars/length_scale, 1) + w_depth·min(turns/depth_scale, 1) + w_keywords·[any keyword].

    With the defaults a keyword alone, a 2,000-character prompt, or a long conversation plus some length
    reaches 0.5.
    """

    length_scale_chars: int = 2000
    depth_scale: int = 10
    keywords: list[str] = field(default_factory=lambda: list(DEFAULT_KEYWORDS))
    w_length: float = 0.5
    w_depth: float = 0.3
    w_keywords: float = 0.5

    def __post_init__(self) -> None:
        if self.length_scale_chars < 1:
            raise ValueError(f"scorer_options.length_scale_chars must be >= 1; got {self.length_scale_chars}")
        if self.depth_scale < 1:
            raise ValueError(f"scorer_options.depth_scale must be >= 1; got {self.depth_scale}")
        self._keywords = [k.lower() for k in self.keywords]

    def score(self, body: dict[str, Any]) -> float:
        text = request_text(body)
        lowered = text.lower()
        length = min(len(text) / self.length_scale_chars, 1.0)
        depth = min(conversation_depth(body) / self.depth_scale, 1.0)
        keyword = 1.0 if any(k in lowered for k in self._keywords) else 0.0
        return self.w_length * length + self.w_depth * depth + self.w_keywords * keyword


class _FunctionScorer:
    def __init__(self, fn: Callable[[dict[str, Any]], float]) -> None:
        self._fn = fn

    def score(self, body: dict[str, Any]) -> float:
        return float(self._fn(body))


def load_scorer(spec: str, options: dict[str, Any]) -> ComplexityScorer:
    """``heuristic`` or ``package.module:name``: a scorer object, a class or factory called with the options,
    or (with no options) a plain function body → score."""
    if spec == "heuristic":
        try:
            return HeuristicScorer(**options)
        except TypeError as err:
            raise ValueError(f"scorer_options for the heuristic scorer: {err}") from None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"scorer must be 'heuristic' or 'package.module:name'; got {spec!r}")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"scorer {spec!r} cannot be loaded: {err}") from None
    if not isinstance(target, type) and hasattr(target, "score"):
        return target  # a ready scorer object
    if isinstance(target, type) or options:
        made = target(**options)
        if not hasattr(made, "score"):
            raise ValueError(
                f"scorer {spec!r} returned {type(made).__name__}, which has no score(body) method"
            )
        return made
    return _FunctionScorer(target)
