"""The Sampler: one batched step from [N, V] logits to one token id per row, plus optional logprobs.

Order (vLLM-like): min_tokens → repetition → presence/frequency → greedy argmax, or temperature → top-k → top-p
→ min-p → exponential-race sample. Processors live in penalties.py and filters.py, logprobs in logprobs.py.
On CUDA, rows that only use temperature (no seed, no filter: the common case) are drawn by one fused Triton
kernel (kernels/gumbel_sample.py) from the same distribution.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.gumbel_sample import gumbel_sample
from tokenmill.outputs import Logprob
from tokenmill.sampling.filters import apply_min_p, apply_top_k_top_p
from tokenmill.sampling.logprobs import sample_logprobs
from tokenmill.sampling.penalties import apply_min_tokens, apply_penalties, history_processors
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.bitmask import GrammarBitmask
from tokenmill.transfer import to_device


@dataclass
class SamplingRow:
    """One row of logits: a sequence being sampled this step."""

    params: SamplingParams
    # Lists, or array('q') which the penalties read with a memcpy instead of converting every int per step.
    prompt_token_ids: list[int] | array
    # Tokens generated so far. Only the penalties read the ids; a caller that knows no penalty applies may
    # pass () with num_output_tokens set, sparing a copy of every history on every step.
    output_token_ids: list[int] | array | tuple[()]
    generator: torch.Generator | None = None  # per-request seeded generator; None: the shared default RNG
    num_output_tokens: int | None = None  # None: len(output_token_ids)
    grammar: Any = None  # a structured.RequestGrammar: tokens it forbids get -inf before sampling


    @property
    def output_len(self) -> int:
        return len(self.output_token_ids) if self.num_output_tokens is None else self.num_output_tokens


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one sampled id per row
    logprobs: list[dict[int, Logprob] | None]  # per row, when its params.logprobs is not None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``, or None for unseeded requests."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return to_device(rows, torch.long, device)


def exponential_noise(
    shape: tuple[int, int], generators: Sequence[torch.Generator | None], device: torch.device
) -> torch.Tensor:
    """Exponential(1) noise per row: seeded rows draw a full row from their own generator (so their samples
    do not depend on the rest of the batch); unseeded rows share one draw from the default RNG."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        return noise.exponential_()
    if unseeded:
        noise[_index(unseeded, device)] = torch.empty(len(unseeded), shape[1], device=device).exponential_()
    for i, generator in enumerate(generators):
        if generator is not None:
            if generator.device.type != noise.device.type:
                raise ValueError(
                    f"row {i}'s generator is on {generator.device} but logits are on {device}; "
                    "make it with make_generator(seed, logits.device)"
                )
            noise[i].exponential_(generator=generator)
    return noise


def filtered_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Random rows (temperature > 0): logits / temperature, then top-k/top-p, then min-p (dropped: -inf)."""
    params = [row.params for row in rows]
    temperature = to_device([p.temperature for p in params], logits.dtype, logits.device)
    logits = logits / temperature.unsqueeze(1)
    apply_top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
    apply_min_p(logits, [p.min_p for p in params])
    return logits


def fused_sampling_applies(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> bool:
    """Every row draws from the default RNG with temperature alone, and the fused kernel can run here."""
    if not (HAS_TRITON and logits.is_cuda and logits.stride(1) == 1):
        return False
    vocab = logits.shape[1]
    return all(
        row.generator is None and not 0 < row.params.top_k < vocab and row.params.top_p >= 1.0
        and row.params.min_p <= 0.0
        for row in rows
    )


def sample_from_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The exponential race argmax(p / E), E ~ Exponential(1): an exact draw from p that lets each row use
    its own generator; the fused Gumbel-max kernel (the same draw) where ``fused_sampling_applies``."""
    if fused_sampling_applies(logits, rows):
        temps = {row.params.temperature for row in rows}
        # One temperature for the batch (the usual case) goes as a kernel argument, not a host-to-device copy.
        temperature = next(iter(temps)) if len(temps) == 1 else to_device(
            [row.params.temperature for row in rows], torch.float32, logits.device)
        # From torch's CPU generator: no device sync, and torch.manual_seed still makes runs repeatable.
        seed = int(torch.randint(2**31 - 1, (1,)).item())
        return gumbel_sample(logits, temperature, seed)
    probs = filtered_logits(logits.to(torch.float32), rows).softmax(dim=-1)
    noise = exponential_noise(tuple(probs.shape), [row.generator for row in rows], probs.device)
    return (probs / noise).argmax(dim=-1)


class Sampler:
    """Turns a batch of logits into next tokens; stateless apart from the model's EOS ids and the grammar
    bitmask's reusable buffers."""

    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = set(eos_token_ids)
        self.grammar_bitmask = GrammarBitmask()

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        token_ids, logprobs = self.sample(logits, rows)
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def sample(
        self, logits: torch.Tensor, rows: list[SamplingRow], logits_writable: bool = False,
        verify: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[dict[int, Logprob] | None]]:
        """Token ids as a device tensor (no host sync unless logprobs are asked for), and per-row logprobs.

        ``logits_writable``: the caller never reads ``logits`` again, so processors may change it in place.
        ``verify(processed_logits, token_ids) -> token_ids``: speculative decoding's rejection sampling against a
        draft distribution (spec_decode/rejection.py) replaces some rows' draws before logprobs are taken.
        """
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [len(rows)={len(rows)}, vocab]; got shape {tuple(logits.shape)}"
            )
        raw_logits = logits
        wants_logprobs = any(row.params.logprobs is not None for row in rows)
        logits = self.grammar_bitmask.apply(logits, [row.grammar for row in rows],
                                            copy=not logits_writable or wants_logprobs)
        min_tokens, penalized = history_processors(rows)
        if min_tokens or penalized:
            # These processors work in place: on a copy unless the caller's logits are scratch and no row wants
            # logprobs (which read the raw values). Penalties compute in float32; min_tokens alone only writes
            # -inf, which the model's dtype holds, so it skips the float32 copy (a 1024 x 128k bf16 batch: 0.5 GB
            # written per step; the sampled ids are the same, every kernel after this reads float32 values).
            wants_raw = (not logits_writable or wants_logprobs) and logits is raw_logits
            if penalized:
                logits = logits.to(torch.float32, copy=wants_raw)
            elif wants_raw:
                logits = logits.clone()
            if min_tokens:
                apply_min_tokens(logits, rows, self.eos_token_ids)
            if penalized:
                apply_penalties(logits, rows)

        device = logits.device
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        if len(greedy) == len(rows):
            token_ids = logits.argmax(dim=-1)
        else:
            random = [i for i, row in enumerate(rows) if not row.params.greedy]
            if not greedy:
                token_ids = sample_from_logits(logits, rows)
            else:
                token_ids = torch.empty(len(rows), dtype=torch.long, device=device)
                greedy_t = _index(greedy, device)
                token_ids[greedy_t] = logits[greedy_t].argmax(dim=-1)
                random_t = _index(random, device)
                token_ids[random_t] = sample_from_logits(logits[random_t], [rows[i] for i in random])

        if verify is not None:
            token_ids = verify(logits, token_ids)
        num_logprobs = [row.params.logprobs for row in rows]
        return token_ids, sample_logprobs(raw_logits, token_ids, num_logprobs)
