"""Pick a replica for a request: least outstanding (default), power of two choices, or consistent-hash affinity.

A balancer only reads ``Replica.outstanding`` and ``Replica.available``; pools hand it their replica list.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from typing import Protocol

from tokenmill.gateway.replica import Replica


class Balancer(Protocol):
    def choose(self, replicas: Sequence[Replica], key: str | None = None) -> Replica | None:
        """Return an available replica, or None when none is available."""
        ...


class LeastOutstanding:
    """The available replica with the fewest in-flight requests; ties broken at random to spread load."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, replicas: Sequence[Replica], key: str | None = None) -> Replica | None:
        ready = [r for r in replicas if r.available]
        if not ready:
            return None
        fewest = min(r.outstanding for r in ready)
        return self._rng.choice([r for r in ready if r.outstanding == fewest])


class PowerOfTwo:
    """Two random available replicas, keep the less loaded (Mitzenmacher): near least-loaded at O(1) cost."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, replicas: Sequence[Replica], key: str | None = None) -> Replica | None:
        ready = [r for r in replicas if r.available]
        if len(ready) <= 1:
            return ready[0] if ready else None
        a, b = self._rng.sample(ready, 2)
        return a if a.outstanding <= b.outstanding else b


def _hash(text: str) -> int:
    # A stable hash: Python's hash() is salted per process, so a restart would reshuffle every key.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class ConsistentHash:
    """Same key → same replica (keeps its prefix cache warm); a lost replica moves only its own keys.

    Each replica slot owns ``vnodes`` points on a hash ring; a key goes to the first available slot clockwise.
    Requests without a key fall back to least outstanding.
    """

    def __init__(self, vnodes: int = 64, rng: random.Random | None = None) -> None:
        self.vnodes = vnodes
        self._fallback = LeastOutstanding(rng)
        self._ring_slots: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def _build(self, slots: tuple[str, ...]) -> None:
        ring = sorted((_hash(f"{slot}#{i}"), slot) for slot in slots for i in range(self.vnodes))
        self._points = [p for p, _ in ring]
        self._owners = [s for _, s in ring]
        self._ring_slots = slots

    def choose(self, replicas: Sequence[Replica], key: str | None = None) -> Replica | None:
        if key is None:
            return self._fallback.choose(replicas)
        slots = tuple(sorted(r.slot for r in replicas))
        if slots != self._ring_slots:
            self._build(slots)
        by_slot = {r.slot: r for r in replicas if r.available}
        if not by_slot:
            return None
        start = bisect.bisect(self._points, _hash(key))
        for i in range(len(self._points)):
            owner = self._owners[(start + i) % len(self._points)]
            if owner in by_slot:
                return by_slot[owner]
        return None


def make_balancer(name: str) -> Balancer:
    if name == "least_outstanding":
        return LeastOutstanding()
    if name == "power_of_two":
        return PowerOfTwo()
    if name == "affinity":
        return ConsistentHash()
    raise ValueError(f"balancer must be least_outstanding, power_of_two or affinity; got {name!r}")


def affinity_key(body: dict, session_id: str | None, prefix_chars: int) -> str | None:
    """The session id when the client sent one, else the first ``prefix_chars`` of the prompt."""
    if session_id:
        return f"session:{session_id}"
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else None
    if prompt is None and isinstance(body.get("messages"), list):
        # Chat prefixes: system prompt and earlier turns come first, so their concatenation is the shared prefix.
        prompt = "\n".join(str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict))
    if prompt is None:
        return None
    return f"prefix:{str(prompt)[:prefix_chars]}"
