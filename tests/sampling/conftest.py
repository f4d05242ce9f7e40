"""Fixtures for the sampler tests: the device to run on (CPU always, CUDA when present) and a row builder."""

from __future__ import annotations

import pytest
import torch

from tokenmill.sampling import SamplingRow, make_generator
from tokenmill.sampling_params import SamplingParams


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device(request.param)


def make_row(
    device: torch.device | str = "cpu",
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    **params,
) -> SamplingRow:
    """A SamplingRow whose generator is seeded from params['seed'] (when given) on ``device``."""
    sampling_params = SamplingParams(**params)
    return SamplingRow(
        params=sampling_params,
        prompt_token_ids=list(prompt or []),
        output_token_ids=list(output or []),
        generator=make_generator(sampling_params.seed, device),
    )
