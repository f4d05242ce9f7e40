"""The gateway's configuration: pools, aliases, virtual models, health, autoscaling and keys, read from YAML.

``load_config(path)`` returns a validated ``GatewayConfig`` or raises ``GatewayConfigError`` whose message names
every bad field; ``gateway.py`` builds the runtime objects from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The command a managed pool runs for each replica; {placeholders} are filled per replica.
DEFAULT_REPLICA_COMMAND = [
    "{python}", "-m", "tokenmill", "serve", "{model}",
    "--host", "{host}", "--port", "{port}", "--served-model-name", "{name}",
]  # fmt: skip


class GatewayConfigError(ValueError):
    """A gateway config that cannot be used; the message lists each bad field."""


class _Strict(BaseModel):
    # A typo in a YAML key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class AutoscaleConfig(_Strict):
    """Replica count between min and max, driven by (waiting + running) per replica read from /metrics."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_load_per_replica: float = Field(default=4.0, gt=0)
    interval_s: float = Field(default=5.0, gt=0)
    scale_up_cooldown_s: float = Field(default=10.0, ge=0)
    scale_down_cooldown_s: float = Field(default=60.0, ge=0)
    # With min_replicas == 0: stop the last replica after this long without a request.
    idle_timeout_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _check_range(self) -> AutoscaleConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


class PoolConfig(_Strict):
    """One model behind the gateway: managed replica processes or external URLs."""

    name: str = Field(min_length=1)
    kind: Literal["managed", "external"]
    # managed
    model: str | None = None
    replicas: int = Field(default=1, ge=0)
    command: list[str] = Field(default_factory=lambda: list(DEFAULT_REPLICA_COMMAND))
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout_s: float = Field(default=120.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    # A replica that exits this many times in a row before becoming ready is marked failed, not restarted.
    max_start_failures: int = Field(default=5, ge=1)
    autoscale: AutoscaleConfig | None = None
    # external
    urls: list[str] = Field(default_factory=list)
    # both
    backend_model: str | None = None  # the name the backend knows the model by (default: name)
    api_key: str | None = None  # sent to the backend; never the client's gateway key
    api_key_env: str | None = None
    balancer: Literal["least_outstanding", "power_of_two", "affinity"] = "least_outstanding"
    affinity_prefix_chars: int = Field(default=256, ge=1)
    fallback: str | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> PoolConfig:
        if self.kind == "managed":
            if not self.model:
                raise ValueError(f"pool {self.name!r}: a managed pool needs 'model' (a path or model id)")
            if self.urls:
                raise ValueError(
                    f"pool {self.name!r}: 'urls' is for external pools; a managed pool starts its own"
                )
            if self.autoscale is not None:
                low, high = self.autoscale.min_replicas, self.autoscale.max_replicas
                if not low <= self.replicas <= high:
                    raise ValueError(
                        f"pool {self.name!r}: replicas ({self.replicas}) must be between "
                        f"autoscale.min_replicas ({low}) and autoscale.max_replicas ({high})"
                    )
        else:
            if not self.urls:
                raise ValueError(f"pool {self.name!r}: an external pool needs at least one URL in 'urls'")
            bad = [u for u in self.urls if not u.startswith(("http://", "https://"))]
            if bad:
                raise ValueError(f"pool {self.name!r}: urls must start with http:// or https://; got {bad}")
            if self.autoscale is not None:
                raise ValueError(f"pool {self.name!r}: autoscale applies only to managed pools")
        if self.fallback == self.name:
            raise ValueError(f"pool {self.name!r}: fallback must name another model, not itself")
        return self

    @property
    def served_name(self) -> str:
        return self.backend_model or self.name

    def resolved_api_key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or self.api_key
        return self.api_key


class VirtualModelConfig(_Strict):
    """A model name that picks ``fast`` or ``strong`` per request by a complexity score."""

    name: str = Field(min_length=1)
    fast: str
    strong: str
    threshold: float = 0.5
    scorer: str = "heuristic"  # or "package.module:factory" returning an object with score(body) -> float
    scorer_options: dict[str, Any] = Field(default_factory=dict)


class HealthConfig(_Strict):
    interval_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)
    failure_threshold: int = Field(default=3, ge=1)  # consecutive failures before ejection
    readmit_successes: int = Field(default=1, ge=1)  # consecutive passing checks to re-admit


class KeyConfig(_Strict):
    name: str = Field(min_length=1)
    key: str | None = None
    key_env: str | None = None
    rate_limit_rps: float | None = Field(default=None, gt=0)  # None: unlimited
    burst: int | None = Field(default=None, ge=1)  # bucket size; default max(1, rate)

    @model_validator(mode="after")
    def _check_key(self) -> KeyConfig:
        if not self.key and not self.key_env:
            raise ValueError(f"key {self.name!r}: give 'key' or 'key_env'")
        return self

    def resolved_key(self) -> str:
        value = os.environ.get(self.key_env, "") if self.key_env else ""
        return value or self.key or ""


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=9000, ge=0, le=65535)
    request_timeout_s: float = Field(default=300.0, gt=0)
    connect_timeout_s: float = Field(default=3.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)  # replicas tried before the first byte reaches the client
    cold_start_timeout_s: float = Field(default=180.0, gt=0)
    max_connections: int = Field(default=512, ge=1)
    log_dir: str | None = None  # replica stdout/stderr; default a temporary directory
    health: HealthConfig = Field(default_factory=HealthConfig)
    keys: list[KeyConfig] = Field(default_factory=list)
    models: list[PoolConfig] = Field(min_length=1)
    aliases: dict[str, str] = Field(default_factory=dict)
    virtual_models: list[VirtualModelConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_names(self) -> GatewayConfig:
        pools = [p.name for p in self.models]
        dupes = sorted({n for n in pools if pools.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        names = set(pools)
        virtual = [v.name for v in self.virtual_models]
        clash = sorted(
            (names & set(self.aliases)) | (names & set(virtual)) | (set(self.aliases) & set(virtual))
        )
        if clash:
            raise ValueError(f"a name may be a model, an alias or a virtual model, not two of them: {clash}")
        for alias, target in self.aliases.items():
            if target not in names:
                raise ValueError(
                    f"aliases.{alias} points at {target!r}, which is not a model; models: {sorted(names)}"
                )
        for pool in self.models:
            if pool.fallback is not None and pool.fallback not in names:
                raise ValueError(
                    f"pool {pool.name!r}: fallback {pool.fallback!r} is not a model; models: {sorted(names)}"
                )
        for vm in self.virtual_models:
            for role in ("fast", "strong"):
                target = getattr(vm, role)
                if target not in names:
                    raise ValueError(
                        f"virtual model {vm.name!r}: {role} {target!r} is not a model; models: {sorted(names)}"
                    )
        return self

    def pool(self, name: str) -> PoolConfig:
        return next(p for p in self.models if p.name == name)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config") -> GatewayConfig:
    if not isinstance(data, dict):
        raise GatewayConfigError(f"{source}: the top level must be a mapping with at least 'models'")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as err:
        raise GatewayConfigError(f"{source} is not a valid gateway config:\n{_format_errors(err)}") from None


def load_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise GatewayConfigError(f"cannot read gateway config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise GatewayConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_config(data, source=str(path))
