"""Model name → pool: direct names, aliases, and virtual models that pick fast or strong by complexity score.

The app asks ``Router.resolve(body)`` for a ``Route``; fallbacks are looked up with ``Router.fallback_of``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.gateway.complexity import ComplexityScorer, load_scorer
from tokenmill.gateway.config import GatewayConfig, VirtualModelConfig


class UnknownModelError(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"The model {name!r} does not exist; this gateway serves: {', '.join(known)}")
        self.name = name


@dataclass(frozen=True)
class Route:
    requested: str  # the client's "model"
    model: str  # the pool that serves it
    reason: str  # direct | alias | <virtual>:fast | <virtual>:strong | fallback
    score: float | None = None


@dataclass
class _Virtual:
    config: VirtualModelConfig
    scorer: ComplexityScorer


class Router:
    def __init__(self, config: GatewayConfig) -> None:
        self.models = [p.name for p in config.models]
        self.aliases = dict(config.aliases)
        self._fallbacks = {p.name: p.fallback for p in config.models if p.fallback}
        self.virtual = {
            vm.name: _Virtual(vm, load_scorer(vm.scorer, vm.scorer_options)) for vm in config.virtual_models
        }

    def names(self) -> list[str]:
        return [*self.models, *self.aliases, *self.virtual]

    def resolve(self, body: dict[str, Any]) -> Route:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise UnknownModelError(str(name), self.names())
        if name in self.models:
            return Route(name, name, "direct")
        if name in self.aliases:
            return Route(name, self.aliases[name], "alias")
        virtual = self.virtual.get(name)
        if virtual is None:
            raise UnknownModelError(name, self.names())
        score = virtual.scorer.score(body)
        if score >= virtual.config.threshold:
            return Route(name, virtual.config.strong, f"{name}:strong", score)
        return Route(name, virtual.config.fast, f"{name}:fast", score)

    def pools_of(self, name: str) -> list[str] | None:
        """The pools a routed name can send requests to (None for an unknown name)."""
        if name in self.models:
            return [name]
        if name in self.aliases:
            return [self.aliases[name]]
        if name in self.virtual:
            config = self.virtual[name].config
            return list(dict.fromkeys([config.fast, config.strong]))
        return None

    def fallback_of(self, model: str) -> str | None:
        return self._fallbacks.get(model)

    def model_cards(self, created: int) -> list[dict[str, Any]]:
        """/v1/models entries: every pool, alias and virtual model, with what it points at."""
        cards = [
            {
                "id": m,
                "object": "model",
                "created": created,
                "owned_by": "tokenmill-gateway",
                "tokenmill": {"kind": "model", "fallback": self._fallbacks.get(m)},
            }
            for m in self.models
        ]
        cards += [
            {
                "id": a,
                "object": "model",
                "created": created,
                "owned_by": "tokenmill-gateway",
                "tokenmill": {"kind": "alias", "target": t},
            }
            for a, t in self.aliases.items()
        ]
        cards += [
            {
                "id": n,
                "object": "model",
                "created": created,
                "owned_by": "tokenmill-gateway",
                "tokenmill": {
                    "kind": "virtual",
                    "fast": v.config.fast,
                    "strong": v.config.strong,
                    "threshold": v.config.threshold,
                },
            }
            for n, v in self.virtual.items()
        ]
        return cards  # fmt: skip
