"""EAGLE proposer: an EAGLE-1 draft head (distill/eagle_head.py, saved as vLLM's ``EagleLlamaForCausalLM``) drafts
k tokens per decoding sequence from the target's own last-layer features, all sequences batched.

Features arrive through ``add_features`` (the runner's feature sink: every step's post-norm hidden states of the
positions it computed, keyed by request id and start position). A sequence's state is the head's KV cache over the
positions it has read with the target's true features, and the features it predicted after the last of them. Each
``propose_many`` call first reads the positions the target computed since (a catch-up forward: the prompt at first,
then the accepted tokens of the last verification), then runs k - 1 one-token draft steps feeding its own predicted
features back in; draft keys are dropped afterwards (rejected drafts leave nothing behind). The same loop, batch 1
and without the engine, is spec_decode/eagle_reference.py's ``EagleDrafter``; the tests hold the two to equal drafts.

A prefix-cache hit means the target never computes the prefix's positions for that sequence: the head's cache then
starts from another sequence's (live, or one of the last ``PREFIX_STORE`` finished) whose ids agree over the prefix:
position t's head keys depend on ids 0..t + 1 only, so they agree but for the prefix's last position when the two
sequences part right after it (its key read the other's next token: one approximate key). With no such sequence
the cache starts after the prefix (positions stay absolute for RoPE). Either way only drafts can get worse, never
the output: verification is the target's. Drafts are the head's argmax for every request (as vLLM's EAGLE proposer): a sampled request is
verified by the target's own draws, which is exact.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokenmill.config import SpeculativeConfig
from tokenmill.distill.eagle_head import ARCHITECTURE, EagleHead
from tokenmill.model.linear_method import DenseLinearMethod
from tokenmill.spec_decode.decoder import DraftRequest
from tokenmill.spec_decode.draft_vocab import load_draft_vocab

logger = logging.getLogger(__name__)

PREFIX_STORE = 8  # finished sequences whose head caches a later prefix-cache hit may start from


@dataclass
class _EagleSequence:
    keys: torch.Tensor | None = None  # [kv_heads, capacity, head_dim]: the head's cache, positions base..end - 1
    values: torch.Tensor | None = None
    base: int = 0  # absolute position of the cache's first entry
    length: int = 0  # entries held
    last: torch.Tensor | None = None  # [h]: the head's predicted features of position end (its first draft's)
    pending: torch.Tensor | None = None  # [P, h]: target features of positions pending_start.. not read yet
    pending_start: int = 0
    token_ids: list[int] = field(default_factory=list)  # the sequence's ids at the last proposal (read-only)
    prefix_looked_up: bool = False  # a late-starting cache looked for another sequence's prefix once

    @property
    def end(self) -> int:
        return self.base + self.length

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append [kv_heads, T, d] (capacity doubles: a decode step adds a few entries, not a copy of the cache)."""
        t = keys.shape[1]
        if self.keys is None or self.length + t > self.keys.shape[1]:
            capacity = max(16, 2 * (self.length + t))
            grown_k = keys.new_empty(keys.shape[0], capacity, keys.shape[2])
            grown_v = torch.empty_like(grown_k)
            if self.keys is not None:
                grown_k[:, : self.length] = self.keys[:, : self.length]
                grown_v[:, : self.length] = self.values[:, : self.length]
            self.keys, self.values = grown_k, grown_v
        self.keys[:, self.length : self.length + t] = keys
        self.values[:, self.length : self.length + t] = values
        self.length += t

    def restart_at(self, position: int) -> None:
        """Forget the cache: the target's features for its next position are gone (recomputed from later on)."""
        self.keys = self.values = self.last = None
        self.base, self.length, self.prefix_looked_up = position, 0, False


class EagleProposer:
    def __init__(self, head: EagleHead, vocab_ids: torch.Tensor | None = None) -> None:
        """``head``: loaded with the target's embedding table and LM head, in the target's dtype and device.
        ``vocab_ids``: the token ids the head proposes from (a reduced draft vocabulary), None for all."""
        self.head = head.eval()
        self.vocab_ids = vocab_ids
        self.rows = head.lm_head if vocab_ids is None else head.lm_head.index_select(0, vocab_ids).contiguous()
        self.sequences: dict[str, _EagleSequence] = {}
        self.finished: deque[_EagleSequence] = deque(maxlen=PREFIX_STORE)
        self.feature_sink = self  # the runner hands every step's hidden states to ``add_features``

    @classmethod
    def for_target(cls, config: SpeculativeConfig, target: Any, device: str) -> EagleProposer:
        """Load the head at ``config.model`` for a loaded target engine (``LLMEngine``); raise ValueError with what
        to fix when it cannot serve that target."""
        if target.config.runner.tensor_parallel_size > 1:
            raise ValueError('speculative method "eagle" runs with tensor_parallel_size 1 only (the head reads rank '
                             "0's hidden states, which tensor parallelism does not hand back yet)")
        head = load_head_for(config.model, target.model)
        vocab_ids = load_draft_vocab(config.model, head.config.vocab_size, config.draft_vocab_size)
        if vocab_ids is not None:
            vocab_ids = vocab_ids.to(head.lm_head.device)
            logger.info("EAGLE head %s proposes from its %d most frequent token ids", config.model, vocab_ids.numel())
        return cls(head.to(device), vocab_ids)

    @property
    def num_weights_per_token(self) -> int:
        """Weights one draft token reads: fc, the layer and the head rows (the embedding is a row lookup)."""
        return sum(p.numel() for p in self.head.parameters()) + self.rows.numel()

    # ---- per-sequence state ----------------------------------------------------------------------------
    def add_features(self, seq_id: str, start: int, features: torch.Tensor) -> None:
        """The target's post-norm hidden states [T, h] of positions start..start + T - 1 of ``seq_id`` (the
        runner, every step). Rows past the accepted tokens (rejected drafts) are overwritten by the next ones."""
        state = self.sequences.get(seq_id)
        if state is None:
            state = self.sequences[seq_id] = _EagleSequence(base=start)
        if start < state.end:  # recomputed after a preemption: the head has read these positions already
            features = features[state.end - start :]
            start = state.end
        if features.shape[0] == 0:
            return
        features = features.to(self.rows.dtype)
        pending_end = state.pending_start + (0 if state.pending is None else state.pending.shape[0])
        if state.pending is None or not state.pending_start <= start <= pending_end:
            state.pending, state.pending_start = features.clone(), start
        else:
            state.pending = torch.cat([state.pending[: start - state.pending_start], features])

    def release(self, seq_id: str) -> None:
        state = self.sequences.pop(seq_id, None)
        if state is not None and state.base == 0 and state.length:
            state.pending = state.last = None  # only its cache and ids serve a later prefix-cache hit
            self.finished.append(state)

    def _seed_from_prefix(self, state: _EagleSequence, token_ids: list[int]) -> None:
        """Give a cache that starts at position base > 0 (a prefix-cache hit) the head's keys of positions
        0..base - 1 from a sequence whose ids 0..base - 1 agree (live first, then recently finished)."""
        base, state.prefix_looked_up = state.base, True
        for other in (*self.sequences.values(), *reversed(self.finished)):
            if (other is not state and other.base == 0 and other.length >= base and len(other.token_ids) >= base
                    and other.token_ids[:base] == token_ids[:base]):
                held_k, held_v, length = state.keys, state.values, state.length
                state.keys = state.values = None
                state.base, state.length = 0, 0
                state.append(other.keys[:, :base], other.values[:, :base])
                if length:
                    state.append(held_k[:, :length], held_v[:, :length])
                return

    # ---- proposing -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose_many(self, requests: list[DraftRequest], k: int) -> dict[str, list[int]]:
        rows: list[tuple[DraftRequest, _EagleSequence, int]] = []  # with the positions to read first
        for request in requests:
            state = self.sequences.get(request.seq_id)
            if state is None:
                continue
            state.token_ids = request.token_ids
            if state.base > 0 and not state.prefix_looked_up:
                self._seed_from_prefix(state, request.token_ids)
            want = len(request.token_ids) - 1  # the head reads every position whose next token is known
            if state.pending is not None and state.pending_start > state.end:
                state.restart_at(state.pending_start)  # a gap (prefix-cache hit): start the cache after it
            have = state.end if state.pending is None else state.pending_start + state.pending.shape[0]
            if want < state.end or (want > state.end and have < want) or (want == state.end and state.last is None):
                continue  # features not here (yet): this sequence decodes plainly
            rows.append((request, state, want - state.end))
        if not rows:
            return {}
        self._catch_up([(r, s, n) for r, s, n in rows if n > 0])
        drafts = self._draft([s for _, s, _ in rows], [s.end for _, s, _ in rows], k)
        return {r.seq_id: d[: min(k, r.max_num_tokens)] for (r, _, _), d in zip(rows, drafts, strict=True)}

    def _catch_up(self, rows: list[tuple[DraftRequest, _EagleSequence, int]]) -> None:
        """Read each row's next ``n`` positions with the target's features (one batched forward)."""
        if not rows:
            return
        device = self.rows.device
        width = max(n for _, _, n in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        features = self.rows.new_zeros(len(rows), width, self.rows.shape[1])
        for i, (request, state, n) in enumerate(rows):
            end, offset = state.end, state.end - state.pending_start
            ids[i, :n] = torch.tensor(request.token_ids[end + 1 : end + 1 + n])
            positions[i] = torch.arange(end, end + width)
            features[i, :n] = state.pending[offset : offset + n]
        lengths = torch.tensor([n for _, _, n in rows], device=device)
        # Query t of row i sees the row's cache and its new keys 0..t (padding queries past n see the same).
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        new_valid = causal[None] & (torch.arange(width, device=device)[None, None] < lengths[:, None, None])
        states = [s for _, s, _ in rows]
        out, keys, values = self._layer(self.head.mix(ids.to(device), features), positions.to(device), states,
                                        new_valid)
        for i, (_, state, n) in enumerate(rows):
            state.append(keys[i, :, :n], values[i, :, :n])
            state.last = out[i, n - 1]
            state.pending = state.pending[state.end - state.pending_start :] if state.pending is not None else None
            state.pending_start = state.end
            if state.pending is not None and state.pending.shape[0] == 0:
                state.pending = None

    def _draft(self, states: list[_EagleSequence], ends: list[int], k: int) -> list[list[int]]:
        """k drafts per row: the first from the predicted features after the cache, then k - 1 one-token steps
        at positions end, end + 1, .. (their keys kept only for this call). One host read, after the last."""
        device = self.rows.device
        feats = torch.stack([s.last for s in states])[:, None]  # [B, 1, h]
        positions = torch.tensor(ends, device=device)[:, None]
        chosen = [self._token(feats[:, 0])]
        extra_k: list[torch.Tensor] = []
        extra_v: list[torch.Tensor] = []
        valid = torch.ones(len(states), 1, 1, dtype=torch.bool, device=device)  # the step's own key
        for step in range(k - 1):
            out, keys, values = self._layer(self.head.mix(chosen[-1][:, None], feats), positions + step, states,
                                            valid, extra_k, extra_v)
            extra_k.append(keys)
            extra_v.append(values)
            feats = out
            chosen.append(self._token(feats[:, 0]))
        return torch.stack(chosen, 1).tolist()

    def _token(self, features: torch.Tensor) -> torch.Tensor:
        best = (features @ self.rows.T).argmax(-1)
        return best if self.vocab_ids is None else self.vocab_ids[best]

    def _layer(self, x: torch.Tensor, positions: torch.Tensor, states: list[_EagleSequence], new_valid: torch.Tensor,
               extra_k: list[torch.Tensor] = (), extra_v: list[torch.Tensor] = ()) -> tuple[torch.Tensor, ...]:
        """The head's layer and norm on x [B, T, h] at ``positions`` [B, T]: attends to each row's cache (padded
        to the longest), then ``extra_k/v`` (earlier draft steps' keys, all valid), then the T new keys as
        ``new_valid`` [B, T, T] allows. Returns (normed output [B, T, h], new keys, new values [B, kv, T, d])."""
        layer = self.head.layers[0]
        q, k, v = layer.project(x, positions)
        batch, t = x.shape[0], x.shape[1]
        longest = max(s.length for s in states)
        if batch == 1 and states[0].keys is not None:  # no padding: a view of the cache
            past_k, past_v = states[0].keys[None, :, :longest], states[0].values[None, :, :longest]
        else:
            past_k = k.new_zeros(batch, k.shape[1], longest, k.shape[3])
            past_v = torch.zeros_like(past_k)
            for i, s in enumerate(states):
                if s.length:
                    past_k[i, :, : s.length] = s.keys[:, : s.length]
                    past_v[i, :, : s.length] = s.values[:, : s.length]
        lengths = torch.tensor([s.length for s in states], device=x.device)
        past_valid = (torch.arange(longest, device=x.device)[None] < lengths[:, None])[:, None].expand(batch, t, -1)
        extra = sum(e.shape[2] for e in extra_k)
        mask = torch.cat([past_valid, x.new_ones(batch, t, extra, dtype=torch.bool), new_valid], 2)
        keys = torch.cat([past_k, *extra_k, k], 2)
        values = torch.cat([past_v, *extra_v, v], 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], enable_gqa=True)
        return self.head.norm(layer.finish(x, out)), k, v


def load_head_for(model_dir: str | Path, target: torch.nn.Module) -> EagleHead:
    """The head at ``model_dir`` on ``target``'s embedding table and LM head (tokenmill's ``LlamaForCausalLM``),
    in the target's dtype; ValueError if it is not an EAGLE head for this target."""
    path = Path(model_dir).expanduser()
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f'speculative method "eagle" needs "model": a directory with config.json and '
                         f"model.safetensors of an {ARCHITECTURE} head; {str(path)!r} is not one")
    spec = getattr(target, "spec", None)
    inner = getattr(target, "model", None)
    embed = getattr(getattr(inner, "embed_tokens", None), "weight", None)
    lm_head = getattr(getattr(target, "lm_head", None), "weight", None)
    methods = [getattr(getattr(inner, "embed_tokens", None), "linear_method", None),
               getattr(getattr(target, "lm_head", None), "linear_method", None)]
    if spec is None or embed is None or lm_head is None or not all(isinstance(m, DenseLinearMethod) for m in methods):
        raise ValueError('speculative method "eagle" needs a target with dense (unquantized) embedding and LM head '
                         "weights: the head reads both")
    data = json.loads(config_path.read_text())
    if data.get("architectures") != [ARCHITECTURE]:
        raise ValueError(f"{str(path)!r} is not an EAGLE head (architectures {data.get('architectures')}, expected "
                         f"[{ARCHITECTURE!r}])")
    want = {"hidden_size": spec.hidden_size, "vocab_size": spec.vocab_size, "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim}
    wrong = {key: (data.get(key), value) for key, value in want.items() if data.get(key) != value}
    if wrong:
        shown = ", ".join(f"{key} {got} (target: {value})" for key, (got, value) in wrong.items())
        raise ValueError(f"the EAGLE head at {str(path)!r} was not trained for this target: {shown}")
    head = EagleHead.load(path, embed.detach(), lm_head.detach())
    return head.to(dtype=embed.dtype)
