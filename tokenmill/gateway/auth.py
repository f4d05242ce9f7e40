"""Gateway API keys (separate from backend keys) and a per-key token-bucket rate limit.

``KeyAuth.check(authorization_header)`` → an ``AuthResult`` that the app turns into 401 or 429.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.gateway.config import KeyConfig


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; a request takes one token or is refused."""

    def __init__(self, rate: float, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = float(capacity)
        self._clock = clock
        self._updated = clock()

    def take(self) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(frozen=True)
class AuthResult:
    status: int  # 200, 401 or 429
    key_name: str | None = None
    message: str = ""
    retry_after_s: int = 0


class KeyAuth:
    def __init__(self, keys: list[KeyConfig], clock: Callable[[], float] = time.monotonic) -> None:
        self._keys = [(k.name, k.resolved_key().encode()) for k in keys]
        missing = [k.name for k in keys if not k.resolved_key()]
        if missing:
            raise ValueError(
                f"gateway keys {missing} are empty: set 'key' or the environment variable in 'key_env'"
            )
        self._buckets = {
            k.name: TokenBucket(k.rate_limit_rps, k.burst or max(1, math.ceil(k.rate_limit_rps)), clock)
            for k in keys
            if k.rate_limit_rps is not None
        }

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _match(self, presented: bytes) -> str | None:
        found = None
        for name, key in self._keys:
            # Compare against every key so the time taken does not reveal which one (or whether one) matched.
            if hmac.compare_digest(presented, key):
                found = name
        return found

    def check(self, authorization: str | None) -> AuthResult:
        if not self.enabled:
            return AuthResult(200)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return AuthResult(401, message="Missing gateway API key: send 'Authorization: Bearer <key>'.")
        name = self._match(token.strip().encode())
        if name is None:
            return AuthResult(401, message="Invalid gateway API key.")
        bucket = self._buckets.get(name)
        if bucket is not None:
            wait = bucket.take()
            if wait > 0:
                return AuthResult(
                    429, name, f"Rate limit of {bucket.rate:g} requests/s for key {name!r} exceeded; retry later.",
                    retry_after_s=max(1, math.ceil(wait)),
                )  # fmt: skip
        return AuthResult(200, name)
