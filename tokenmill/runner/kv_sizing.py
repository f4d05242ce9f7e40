"""How many KV blocks fit: an explicit count, a CPU memory budget, or a fraction of free GPU memory."""

from __future__ import annotations

import logging

import torch

from tokenmill.attention.kv_cache import KVCache
from tokenmill.config import CacheConfig, KVCacheSpec

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_GIB = 1.0


def num_kv_blocks(
    cache: CacheConfig,
    spec: KVCacheSpec,
    device: str,
    num_layers: int,
    max_model_len: int,
    max_num_seqs: int,
) -> int:
    per_block = KVCache.bytes_per_block(spec, num_layers)
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    if device.startswith("cuda"):
        # Measured after weights are loaded and a warm-up forward ran: give the rest (times the
        # utilization fraction of the whole card) to KV blocks.
        free, total = torch.cuda.mem_get_info(torch.device(device))
        used_by_others = total - free
        budget = cache.gpu_memory_utilization * total - used_by_others
        budget -= torch.cuda.max_memory_allocated(torch.device(device)) - torch.cuda.memory_allocated(
            torch.device(device)
        )
    else:
        budget = (cache.kv_cache_memory_gib or DEFAULT_CPU_KV_GIB) * 1024**3
    blocks = int(budget // per_block)
    # No point in more blocks than every sequence at full length can use.
    useful = max_num_seqs * spec.blocks_for_tokens(max_model_len) + 1
    blocks = min(blocks, useful)
    if blocks < 2:
        raise ValueError(
            f"the KV cache budget ({budget / 1024**3:.3f} GiB) holds only {blocks} blocks of "
            f"{per_block} bytes; raise --kv-cache-memory / --gpu-memory-utilization or lower --block-size"
        )
    return blocks
