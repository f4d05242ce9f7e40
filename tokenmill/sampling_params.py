"""SamplingParams: what to generate and how, validated at construction (vLLM's names and meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.structured.params import StructuredOutputsParams


def _check_number(name: str, value: object, *, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number; got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {value!r}")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled token is always included)
    prompt_logprobs: int | None = None  # vLLM's field; rejected with a ValueError until the engine honours it
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Output must match a JSON schema / regex / choice / grammar (a dict of the same fields is accepted).
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        for name in ("n", "top_k", "min_tokens"):
            _check_number(name, getattr(self, name), integer=True)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name))
        if self.n < 1:
            raise ValueError(f"n must be >= 1; got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy); got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1; got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1]; got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10]; got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2]; got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2]; got {self.frequency_penalty}")
        if self.max_tokens is not None:
            _check_number("max_tokens", self.max_tokens, integer=True)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1; got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0; got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.seed is not None:
            _check_number("seed", self.seed, integer=True)
            if not -(2**63) <= self.seed < 2**63:  # torch generators take 64-bit seeds (n > 1 adds the index)
                raise ValueError(f"seed must be a 64-bit signed integer; got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, integer=True)
                if not 0 <= value <= 20:
                    raise ValueError(f"{name} must be in [0, 20]; got {value}")
        if self.prompt_logprobs is not None:
            # Scoring every prompt position needs its logits through chunked prefill and past the prefix cache.
            raise ValueError("prompt_logprobs is not supported yet; leave it unset (logprobs of generated tokens "
                             "are: set logprobs)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list of non-negative integers")
        if self.temperature < 1e-5:  # greedy: the other sampling knobs have no effect
            self.top_p, self.top_k, self.min_p = 1.0, -1, 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
