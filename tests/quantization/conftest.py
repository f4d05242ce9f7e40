"""Shared fixtures: one tiny random Llama directory per test session (tests/tiny_models.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tiny_models

from tiny_models import make_tiny_model_dir, round_weights_to_bf16  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=3)


@pytest.fixture(scope="session")
def tiny_llama_bf16_exact(tmp_path_factory) -> Path:
    """The tiny Llama with bf16-representable weights: a bf16 and an fp32 load quantize the same values."""
    return round_weights_to_bf16(make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama_bf16"), "llama", seed=3))


@pytest.fixture(scope="session")
def tiny_llama_256(tmp_path_factory) -> Path:
    """The tiny Llama with every linear's input a multiple of 256 (the K-quant block): hidden 256, MLP 512."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama_256"), "llama", seed=4, hidden_size=256, head_dim=64,
                               intermediate_size=512)
