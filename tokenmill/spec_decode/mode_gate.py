"""Whether an engine that overlaps its steps (async scheduling, CUDA) should stop overlapping so that drafts can be
proposed: speculation needs each step's ids before the next step is scheduled, and that wait is a cost the
policy's step-cost model cannot see. Measured on an H100 (Llama-3-8B shape, batch 256, issue 23): the engine gave up
overlap for every step once the measured costs said verification could pay, and ran at 0.77x plain decoding while
the drafts it verified were being rejected.

So the choice is made from realized throughput, per batch-size bucket: decode tokens per second of the recent steps
in each mode (overlapped plain vs synchronous speculative, each step's time being the interval between two
landings). The better mode is kept, compared every step against the other's last measurement (so speculation stops
as soon as its own throughput falls below what plain decoding measured); the other is re-tried for ``probe_steps``
steps after ``first_interval`` steps, the interval doubling (to ``max_interval``) each time the probe loses, so a
change of workload is noticed while a losing mode costs a few percent at most.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenmill.spec_decode.step_cost import bucket_of


@dataclass
class _Bucket:
    samples: dict[bool, deque] = field(default_factory=dict)  # mode -> (tokens, seconds) of recent steps
    mode: bool = True  # the mode steps run in now (True: speculative, synchronous)
    best: bool = True  # the mode that measured better at the last comparison
    since_probe: int = 0  # steps in the best mode since the last probe
    probe_left: int = 0  # steps left of the probe in progress
    interval: int = 0  # steps in the best mode before the next probe


class ModeGate:
    def __init__(self, window: int = 16, probe_steps: int = 4, first_interval: int = 32,
                 max_interval: int = 1024) -> None:
        if not 1 <= probe_steps <= window or first_interval < 1 or max_interval < first_interval:
            raise ValueError("ModeGate needs 1 <= probe_steps <= window and 1 <= first_interval <= max_interval")
        self.window, self.probe_steps = window, probe_steps
        self.first_interval, self.max_interval = first_interval, max_interval
        self.buckets: dict[int, _Bucket] = {}

    def rate(self, batch: int, speculative: bool) -> float | None:
        """Decode tokens per second of the recent steps in that mode (None: none measured)."""
        bucket = self.buckets.get(bucket_of(batch))
        samples = bucket.samples.get(speculative) if bucket is not None else None
        if not samples:
            return None
        seconds = sum(s for _, s in samples)
        return sum(t for t, _ in samples) / seconds if seconds > 0 else None

    def choose(self, batch: int) -> bool:
        """The mode of the next step at this batch size: True to speculate (and wait for each step's ids)."""
        b = self.buckets.setdefault(bucket_of(batch), _Bucket(interval=self.first_interval))
        if b.probe_left:  # measuring one mode: the first time, or a re-try of the losing one
            b.probe_left -= 1
            if b.probe_left:
                return b.mode
            winner = self._better(batch)
            b.interval = self.first_interval if winner != b.best else min(2 * b.interval, self.max_interval)
            b.best, b.mode, b.since_probe = winner, winner, 0
            return winner
        for mode in (True, False):  # each mode is measured once before any comparison, speculation first
            if not b.samples.get(mode):
                return self._probe(b, mode)
        winner = self._better(batch)  # the running mode's rate is fresh; the other's is from its last probe
        if winner != b.best:
            b.best, b.since_probe, b.interval = winner, 0, self.first_interval
        b.since_probe += 1
        if b.since_probe >= b.interval:  # the workload may have changed: measure the losing mode afresh
            b.samples[not b.best].clear()
            return self._probe(b, not b.best)
        return b.best

    def _probe(self, b: _Bucket, mode: bool) -> bool:
        b.mode, b.probe_left = mode, self.probe_steps
        return mode

    def _better(self, batch: int) -> bool:
        speculative, plain = self.rate(batch, True), self.rate(batch, False)
        if speculative is None or plain is None:
            return plain is None
        return speculative >= plain

    def record(self, batch: int, speculative: bool, tokens: int, seconds: float) -> None:
        """A decode-only step ran in that mode, gained ``tokens`` and took ``seconds`` (landing to landing)."""
        if tokens < 1 or not seconds > 0:
            return
        b = self.buckets.setdefault(bucket_of(batch), _Bucket(interval=self.first_interval))
        b.samples.setdefault(speculative, deque(maxlen=self.window)).append((tokens, seconds))
