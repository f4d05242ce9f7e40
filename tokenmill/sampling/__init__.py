"""Logits processors and the sampler: penalties, top-k/top-p/min-p filters, seeded sampling, logprobs.

The runner builds one SamplingRow per sequence and calls Sampler(logits, rows) once per step.
"""

from tokenmill.sampling.logprobs import prompt_logprobs, sample_logprobs
from tokenmill.sampling.sampler import Sampler, SamplerOutput, SamplingRow, make_generator

__all__ = ["Sampler", "SamplerOutput", "SamplingRow", "make_generator", "prompt_logprobs", "sample_logprobs"]
