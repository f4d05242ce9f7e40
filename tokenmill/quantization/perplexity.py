"""``tokenmill eval perplexity``: sliding-window perplexity of a model as tokenmill serves it (dense, GPTQ, AWQ
or GGUF weights, through the same loader and layers), on held-out text.

Windows of ``window`` tokens advance by ``stride``; each window scores only its tokens not scored before, so
every token after the first window sees at least ``window - stride`` tokens of context (the method
transformers' perplexity guide describes). Each window is one prefill through a fresh paged KV cache.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.quantization.calibration import HELDOUT_TEXT, read_text


@dataclass
class PerplexityConfig:
    model: str | None = None  # None: the embedded SmolLM2 GGUF
    data: str | None = None  # None: the bundled held-out text
    max_tokens: int | None = None
    window: int = 512
    stride: int = 256
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.window < 2 or not 1 <= self.stride <= self.window:
            raise ValueError(f"need --window >= 2 and 1 <= --stride <= --window; got {self.window}, {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"--max-tokens must be >= 2; got {self.max_tokens}")


def window_spans(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window; positions 1..num_tokens-1 are scored once each."""
    spans, begin, scored_to = [], 0, 1
    while True:
        end = min(begin + window, num_tokens)
        spans.append((begin, end, scored_to))
        if end == num_tokens:
            return spans
        scored_to, begin = end, begin + stride


def window_logits(model: torch.nn.Module, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Logits [len(ids), vocab] (fp32) of one prefill of ``ids`` through a fresh paged cache."""
    from tokenmill.attention.kv_cache import KVCache
    from tokenmill.config import KVCacheSpec

    n = ids.shape[0]
    spec = KVCacheSpec(block_size, model.num_kv_heads, model.head_dim, next(model.parameters()).dtype)
    num_blocks = spec.blocks_for_tokens(n)
    caches = KVCache(spec, model.num_layers, num_blocks, ids.device)
    meta = model.attn_backend.build_metadata([n], [n], [list(range(num_blocks))], block_size, ids.device)
    positions = torch.arange(n, device=ids.device)
    return model.compute_logits(model(ids, positions, caches, meta)).float()


def evaluate_perplexity(config: PerplexityConfig) -> dict:
    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.config import ModelConfig
    from tokenmill.model import load_model

    loaded = load_model(ModelConfig(model=config.model, dtype=config.dtype, device=config.device),
                        TorchAttentionBackend())
    if loaded.tokenizer is None:
        raise ValueError(f"model {loaded.source!r} has no tokenizer; perplexity needs one to encode the text")
    ids = loaded.tokenizer.encode(read_text(config.data, HELDOUT_TEXT), add_special_tokens=False)
    if config.max_tokens is not None:
        ids = ids[: config.max_tokens]
    if len(ids) < 2:
        raise ValueError("the text encodes to fewer than 2 tokens; perplexity needs more")
    window = min(config.window, loaded.max_model_len)
    tokens = torch.tensor(ids, device=next(loaded.model.parameters()).device)
    nll, count, started = 0.0, 0, time.perf_counter()
    with torch.no_grad():
        for begin, end, first in window_spans(len(ids), window, config.stride):
            logits = window_logits(loaded.model, tokens[begin:end], config.block_size)
            # logits at position p predict token p + 1
            pred = logits[first - 1 - begin : end - 1 - begin]
            nll += F.cross_entropy(pred, tokens[first:end], reduction="sum").item()
            count += end - first
    return {
        "model": loaded.source,
        "data": str(config.data or HELDOUT_TEXT.name),
        "num_tokens": count,
        "window": window,
        "stride": config.stride,
        "dtype": config.dtype,
        "nll_per_token": nll / count,
        "perplexity": math.exp(nll / count),
        "seconds": round(time.perf_counter() - started, 2),
    }
