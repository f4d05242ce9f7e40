"""Draft-model proposer: a second, small model in the engine's process (same tokenizer as the target) proposes k
tokens per decoding sequence, all sequences batched: one catch-up forward (each sequence's ids the draft has not
seen: the prompt at first, then the tokens the target accepted), then k - 1 one-token steps.

The draft keeps its own paged KV cache and block tables (``block_size`` of the target, its own free list; no prefix
sharing): per sequence, the ids whose KV it holds. Drafts the target rejected are forgotten by comparing those ids
with the accepted ones on the next call. On CUDA the k - 1 one-token steps replay CUDA graphs (runner/cuda_graphs.py,
captured at load over the draft's own KV cache) and the drafts stay on the device until all k are chosen: one host
read per call, not one per draft token. Greedy requests get the draft's argmax; sampled requests get draws from the
draft's own processed distribution q (temperature / top-k / top-p / min-p of the request), which goes to the
target's rejection sampler through ``draft_probs``. A sequence that finds no free draft block decodes plainly.

With a reduced draft vocabulary (spec_decode/draft_vocab.py: the draft directory's ``draft_vocab_size``, or the
speculative config's) the draft's output head holds only those N rows: the argmax / draw over N logits maps back to
a full token id, and a sampled row's q is zero outside the subset (rejection sampling stays exact).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.attention.backend import get_attention_backend
from tokenmill.attention.kv_cache import KVCache
from tokenmill.config import ModelConfig, SpeculativeConfig
from tokenmill.intmath import cdiv
from tokenmill.model.linear_method import DenseLinearMethod
from tokenmill.model.loader import LoadedModel, load_model
from tokenmill.runner.cuda_graphs import DecodeGraphs
from tokenmill.sampling.sampler import SamplingRow, exponential_noise, filtered_logits, make_generator
from tokenmill.spec_decode.decoder import DraftRequest
from tokenmill.spec_decode.draft_vocab import SubsetLMHead, load_draft_vocab

logger = logging.getLogger(__name__)

# The draft's KV cache: room for this many sequences at full length, within a memory cap (sequences past it decode
# without drafts). Small drafts hold little KV per token (SmolLM2-135M: 46 KB in fp32, 23 KB in bf16).
DRAFT_KV_MAX_SEQS = 64
MAX_QUERY_TOKENS = 8  # 1 + k, k <= 7 (SpeculativeConfig): at most this many held ids can be rejected drafts
DRAFT_KV_MAX_BYTES = {"cpu": 1 << 30, "cuda": 4 << 30}


def check_same_tokenizer(target: Any, draft: Any, target_vocab: int, draft_vocab: int) -> None:
    """Raise ValueError unless the draft reads and writes the target's token ids (same vocabulary mapping)."""
    if target is not None and draft is not None:
        target_map, draft_map = target.hf.get_vocab(), draft.hf.get_vocab()
        if target_map != draft_map:
            differing = len(set(target_map.items()) ^ set(draft_map.items()))
            raise ValueError(
                f"the draft model's tokenizer differs from the target's ({len(draft_map)} vs {len(target_map)} "
                f"tokens, {differing} entries differ); speculative decoding needs a draft trained with the target's "
                "tokenizer (tokenmill distill --target draft writes one)")
    elif min(target_vocab, draft_vocab) < 1 or (target is None) != (draft is None):
        raise ValueError("cannot check that the draft model shares the target's tokenizer: one of them has none")


@dataclass
class _DraftSequence:
    token_ids: list[int] = field(default_factory=list)  # ids whose KV the draft holds, position by position
    block_table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


class DraftModelProposer:
    def __init__(self, loaded: LoadedModel, device: str, block_size: int, num_blocks: int, target_vocab: int,
                 max_model_len: int, attention_backend: str = "auto", vocab_ids: torch.Tensor | None = None) -> None:
        """``vocab_ids``: the token ids the draft proposes from (a reduced vocabulary), None for all of them."""
        self.model = loaded.model
        self.device = torch.device(device)
        self.block_size = block_size
        self.target_vocab = target_vocab
        self.max_model_len = max_model_len
        self.backend = self.model.attn_backend
        spec_dtype = next(self.model.parameters()).dtype
        kv_spec = _kv_spec(self.model, block_size, spec_dtype)
        self.kv = KVCache(kv_spec, self.model.num_layers, num_blocks, self.device)
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: pop() takes the lowest id
        self.num_blocks = num_blocks
        self.sequences: dict[str, _DraftSequence] = {}
        self.graphs: DecodeGraphs | None = None
        # request id -> [k, target vocab] distribution its drafts were drawn from (sampled requests, this step).
        # The same dict object lives on as the runner's ``draft_probs``: cleared and refilled, never replaced.
        self.draft_probs: dict[str, torch.Tensor] = {}
        self.vocab_ids: torch.Tensor | None = None
        if vocab_ids is not None:
            self._use_subset_head(vocab_ids)

    def _use_subset_head(self, vocab_ids: torch.Tensor) -> None:
        """Swap the draft's output head for one over ``vocab_ids`` (this model instance only: the draft's own)."""
        head = self.model.lm_head
        if not isinstance(head.linear_method, DenseLinearMethod) or getattr(head, "gather", False):
            raise ValueError("a reduced draft vocabulary needs a dense, unsharded output head; this draft's head is "
                             f"{type(head.linear_method).__name__}")
        vocab_ids = vocab_ids[vocab_ids < min(self.target_vocab, head.weight.shape[0])]
        if vocab_ids.numel() == 0:
            raise ValueError("the reduced draft vocabulary holds no id of the target's vocabulary")
        self.model.lm_head = SubsetLMHead(head.weight, vocab_ids)
        self.vocab_ids = vocab_ids.to(self.device)

    @classmethod
    def for_target(cls, config: SpeculativeConfig, target: Any, device: str) -> DraftModelProposer:
        """Load ``config.model`` next to a loaded target engine (``LLMEngine``: tokenizer, model, configs)."""
        engine_config = target.config
        dtype = config.draft_dtype or engine_config.model.dtype
        draft_config = ModelConfig(model=config.model, dtype=dtype, device=device, seed=engine_config.model.seed)
        backend = get_attention_backend(engine_config.runner.attention_backend, device)
        loaded = load_model(draft_config, backend)
        check_same_tokenizer(target.tokenizer, loaded.tokenizer, target.model.vocab_size, loaded.model.vocab_size)
        block_size = engine_config.cache.block_size
        max_len = min(target.max_model_len, loaded.max_model_len)
        kv_spec = _kv_spec(loaded.model, block_size, draft_config.torch_dtype)
        bytes_per_block = kv_spec.bytes_per_block * loaded.model.num_layers
        want = min(engine_config.scheduler.max_num_seqs, DRAFT_KV_MAX_SEQS) * cdiv(max_len, block_size)
        cap = DRAFT_KV_MAX_BYTES["cuda" if device.startswith("cuda") else "cpu"] // bytes_per_block
        num_blocks = max(cdiv(max_len, block_size), min(want, cap))
        logger.info("draft model %s: %d KV blocks of %d tokens for proposals", loaded.name, num_blocks, block_size)
        vocab_ids = load_draft_vocab(config.model, loaded.model.vocab_size, config.draft_vocab_size)
        if vocab_ids is not None:
            logger.info("draft model %s proposes from its %d most frequent token ids", loaded.name, vocab_ids.numel())
        proposer = cls(loaded, device, block_size, num_blocks, target.model.vocab_size, max_len, vocab_ids=vocab_ids)
        if device.startswith("cuda") and not engine_config.runner.enforce_eager:  # as the target's decode steps
            proposer.capture_graphs(min(engine_config.scheduler.max_num_seqs, engine_config.runner.max_graph_batch_size))
        return proposer

    def capture_graphs(self, max_batch: int) -> None:
        """Graphs for the one-token draft steps of up to ``max_batch`` sequences (larger batches run eagerly). The
        capture writes no KV (the graph buffers' slots start at -1)."""
        self.graphs = DecodeGraphs(self.model, self.kv, self.block_size, max_batch,
                                   cdiv(self.max_model_len, self.block_size), self.device, (1,))
        self.graphs.capture()

    # ---- per-sequence state ----------------------------------------------------------------------------
    def release(self, seq_id: str) -> None:
        state = self.sequences.pop(seq_id, None)
        if state is not None:
            self.free_blocks.extend(reversed(state.block_table))

    def _sync(self, request: DraftRequest) -> _DraftSequence:
        """The draft state of ``request``, trimmed to the longest prefix it shares with the accepted ids."""
        state = self.sequences.get(request.seq_id)
        if state is None:
            seed = request.seed if request.seed is None else request.seed + 0x5EED  # not the target's stream
            state = self.sequences[request.seq_id] = _DraftSequence(generator=make_generator(seed, self.device))
        held, ids = state.token_ids, request.token_ids
        # Usually all but the last k - 1 held ids (the rejected drafts) are accepted: one list comparison (C speed)
        # finds that prefix, the id-by-id walk only runs past it (at most k - 1 ids).
        common = max(0, len(held) - MAX_QUERY_TOKENS)
        if held[:common] != ids[:common]:
            common = 0
        limit = min(len(held), len(ids))
        while common < limit and held[common] == ids[common]:
            common += 1
        del held[common:]
        return state

    def _reserve(self, state: _DraftSequence, num_tokens: int) -> bool:
        need = cdiv(num_tokens, self.block_size) - len(state.block_table)
        if need > len(self.free_blocks):
            return False
        for _ in range(need):
            state.block_table.append(self.free_blocks.pop())
        return True

    # ---- proposing -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose_many(self, requests: list[DraftRequest], k: int) -> dict[str, list[int]]:
        self.draft_probs.clear()
        rows: list[tuple[DraftRequest, _DraftSequence, list[int]]] = []
        for request in requests:
            state = self._sync(request)
            if len(state.token_ids) == len(request.token_ids):  # the last id's logits are needed: recompute it
                state.token_ids.pop()
            new = request.token_ids[len(state.token_ids) :]
            total = len(request.token_ids) + k - 1  # KV positions this step writes
            if total >= self.max_model_len or not self._reserve(state, total):
                continue  # no room in the draft's context or cache: this sequence decodes plainly
            rows.append((request, state, new))
        if not rows:
            return {}
        ids: list[int] = []
        positions: list[int] = []
        for _, state, new in rows:
            start = len(state.token_ids)
            ids.extend(new)
            positions.extend(range(start, start + len(new)))
        query_lens = [len(new) for _, _, new in rows]
        tables = [state.block_table for _, state, _ in rows]
        ends = [len(state.token_ids) + n for (_, state, _), n in zip(rows, query_lens, strict=True)]
        last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
        logits = self._forward(torch.tensor(ids, dtype=torch.long, device=self.device), positions, query_lens, ends,
                               tables, last)
        for _, state, new in rows:
            state.token_ids.extend(new)
        chosen: list[torch.Tensor] = []  # per step, [len(rows)] on the device: read once, after the last step
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        for step in range(k):
            tokens = self._choose(logits, rows, probs)
            chosen.append(tokens)
            if step == k - 1:
                break
            # Step ``step`` writes the KV of draft ``step`` at position end + step and reads end + step + 1.
            logits = self._forward(tokens, [end + step for end in ends], [1] * len(rows),
                                   [end + step + 1 for end in ends], tables, None)
        drafts = torch.stack(chosen, dim=1).tolist()
        out: dict[str, list[int]] = {}
        for (request, state, _), draft, row_probs in zip(rows, drafts, probs, strict=True):
            state.token_ids.extend(draft[: k - 1])  # the drafts whose KV the steps wrote
            limit = min(k, request.max_num_tokens)
            out[request.seq_id] = draft[:limit]
            if row_probs:
                self.draft_probs[request.seq_id] = torch.stack(row_probs[:limit])
        return out

    def _forward(self, input_ids: torch.Tensor, positions: list[int], query_lens: list[int], seq_lens: list[int],
                 tables: list[list[int]], last: torch.Tensor | None) -> torch.Tensor:
        """Logits [len(rows), target vocab] (fp32) of each row's last query token (ids past the target's
        vocabulary, padding of the draft's embedding, can never be proposed); with a reduced vocabulary
        [len(rows), N], column i scoring ``vocab_ids[i]``. ``seq_lens``: KV positions each row's attention reads
        after this step's writes."""
        meta = self.backend.build_metadata(query_lens, seq_lens, tables, self.block_size, self.device)
        input_positions = torch.tensor(positions, dtype=torch.long, device=self.device)
        if last is None and self.graphs is not None and self.graphs.can_run(meta):
            logits = self.graphs.run(input_ids, input_positions, meta).float()  # a copy: the buffer is reused
        else:
            hidden = self.model(input_ids, input_positions, self.kv, meta)
            if last is not None:
                hidden = hidden.index_select(0, last)
            logits = self.model.compute_logits(hidden).float()
        if self.vocab_ids is not None:
            return logits
        vocab = logits.shape[1]
        if vocab > self.target_vocab:
            logits = logits[:, : self.target_vocab]
        elif vocab < self.target_vocab:
            logits = torch.nn.functional.pad(logits, (0, self.target_vocab - vocab), value=float("-inf"))
        return logits

    def _choose(self, logits: torch.Tensor, rows: list, probs: list[list[torch.Tensor]]) -> torch.Tensor:
        """The next draft of every row (on the device): argmax for greedy requests, else a draw from the request's
        processed distribution q (kept for the target's rejection sampler)."""
        tokens = logits.argmax(dim=-1)
        if self.vocab_ids is not None:
            tokens = self.vocab_ids[tokens]
        sampled = [i for i, (request, _, _) in enumerate(rows)
                   if request.params is not None and not request.params.greedy]
        if sampled:
            rows_params = [SamplingRow(rows[i][0].params, [], ()) for i in sampled]
            index = torch.tensor(sampled, device=logits.device)
            picked = logits.index_select(0, index)
            if self.vocab_ids is not None:  # q over the full vocabulary: zero outside the subset
                full = picked.new_full((len(sampled), self.target_vocab), float("-inf"))
                picked = full.index_copy_(1, self.vocab_ids, picked)
            q = filtered_logits(picked, rows_params).softmax(dim=-1)
            generators = [rows[i][1].generator for i in sampled]
            # Unseeded rows share one draw from the default generator; seeded rows use their own.
            noise = exponential_noise(tuple(q.shape), generators, q.device)
            tokens[index] = (q / noise).argmax(dim=-1)
            for j, i in enumerate(sampled):
                probs[i].append(q[j])
        return tokens


def _kv_spec(model: torch.nn.Module, block_size: int, dtype: torch.dtype):
    from tokenmill.config import KVCacheSpec

    return KVCacheSpec(block_size, model.num_kv_heads, model.head_dim, dtype)
