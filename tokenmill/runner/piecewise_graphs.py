"""Piecewise CUDA graphs for the steps the decode graphs do not cover: prompts, chunks and mixed prompt + decode
steps (``--compilation-config '{"cudagraph_mode": "FULL_AND_PIECEWISE"}'``, vLLM's mode of that name).

Such a step's attention depends on every row's query length, so it cannot be one graph; everything between two
attention calls can (``model.forward_piece``: o_proj, norms, MLP, the next layer's q/k/v projection). Each piece
is captured per padded token count; at replay, attention runs eagerly between the pieces. Measured on an H100
(issue 19): an eager prompt-carrying step spent as long launching kernels on the host as the GPU spent running
them (~20 ms at <= 512 tokens), which is what sets the p99 inter-token latency of a loaded server.

Pieces talk through fixed buffers (ids, q/k/v, attention output, residual, final hidden states): a captured graph
reads and writes fixed addresses, and holding the pieces' own outputs alive instead would keep one set per piece
per size. Padding rows compute garbage that no attention call and no sampled row reads.
"""

from __future__ import annotations

import logging

import torch

from tokenmill.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

# Token counts above this run eagerly: their GPU time dwarfs the launches (and a graph per size costs memory).
PIECEWISE_MAX_TOKENS = 512


def token_ladder(max_tokens: int) -> list[int]:
    """Padded token counts to capture: 8, 16, 32, 64, then steps of 64 up to ``max_tokens`` (always included)."""
    sizes = [s for s in (8, 16, 32, 64) if s < max_tokens]
    sizes += list(range(128, max_tokens, 64))
    return sorted(set(sizes + [max_tokens]))


class PiecewiseGraphs:
    def __init__(self, model: torch.nn.Module, max_tokens: int, device: torch.device) -> None:
        if max_tokens < 1:
            raise ValueError(f"piecewise graphs need max_tokens >= 1; got {max_tokens}")
        self.inner = model.model  # the decoder stack, which defines forward_piece
        self.sizes = token_ladder(max_tokens)
        n = self.sizes[-1]
        attn = self.inner.layers[0].self_attn
        dtype = next(model.parameters()).dtype
        hidden_size = self.inner.norm.weight.shape[0]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.q = torch.zeros(n, attn.num_heads, attn.head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(n, attn.num_kv_heads, attn.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.attn_out = torch.zeros(n, attn.q_size, dtype=dtype, device=device)
        self.residual = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.replays = 0  # steps served through the pieces (the GPU tests check they were used)

    def _piece(self, index: int, size: int) -> None:
        """Piece ``index`` over the buffers' first ``size`` rows, results copied into the buffers."""
        attn_out = self.attn_out[:size] if index else None
        residual = self.residual[:size] if index else None
        out = self.inner.forward_piece(index, self.input_ids[:size], attn_out, residual)
        if len(out) == 1:
            self.hidden[:size].copy_(out[0])
            return
        for buffer, value in zip((self.q, self.k, self.v, self.residual), out, strict=True):
            buffer[:size].copy_(value)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: the smaller sizes reuse its pool memory
            graphs = []
            for index in range(self.inner.num_pieces):
                self._piece(index, size)  # compile Triton kernels and warm the allocator outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._piece(index, size)
                graphs.append(graph)
            self.graphs[size] = graphs
        torch.cuda.synchronize()
        logger.info("captured piecewise CUDA graphs (%d pieces) for token counts %s", self.inner.num_pieces,
                    self.sizes)

    def can_run(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden] (a view into a buffer: read it before the next step)."""
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        graphs = self.graphs.get(size)  # none before capture: the pieces run eagerly (CPU tests of the plumbing)

        def piece(index: int) -> None:
            if graphs is None:
                self._piece(index, size)
            else:
                graphs[index].replay()

        self.input_ids[:n].copy_(input_ids)
        piece(0)
        for index, (layer, kv_cache) in enumerate(zip(self.inner.layers, kv_caches, strict=True)):
            out = layer.self_attn.attend(positions, self.q[:n], self.k[:n], self.v[:n], kv_cache, meta)
            self.attn_out[:n].copy_(out)
            piece(index + 1)
        self.replays += 1
        return self.hidden[:n]
