"""An EAGLE-1 draft head (Li et al. 2024) for a Llama-family target: at position t it reads the target's last hidden
state f_t (after the final norm: the features the LM head reads) and the embedding of the next token x_{t+1},
mixes them with a linear ``fc`` (2h -> h; vLLM's order: embedding first), runs ONE decoder layer (initialised from
the target's last layer) and the target's frozen final norm, and so predicts f_{t+1}; the target's own LM head
(optionally only the reduced draft vocabulary's rows) turns that into a proposal for x_{t+2}. Drafting further
feeds its own predicted features back in.

Saved like vLLM's EAGLE-1 Llama checkpoints (``EagleLlamaForCausalLM``): config.json + model.safetensors holding
``fc.weight``, ``layers.0.*`` and ``norm.weight``; the embedding table and LM head are the target's (not saved).
Unlike vLLM's layer 0 we keep the copied ``input_layernorm``: the copied layer expects a normed input.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels.rms_norm import rms_norm_reference
from tokenmill.kernels.rotary import rope_inv_freq

ARCHITECTURE = "EagleLlamaForCausalLM"


@dataclass(frozen=True)
class EagleConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int

    @staticmethod
    def from_target(config) -> EagleConfig:
        """From an HF Llama config (transformers 5 keeps rope_theta in ``rope_parameters``)."""
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"the EAGLE head supports default RoPE only; the target uses {rope['rope_type']!r}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return EagleConfig(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                           config.num_key_value_heads, head_dim, float(config.rms_norm_eps), float(theta),
                           config.vocab_size)

    def to_json(self, draft_vocab_size: int | None) -> dict:
        extra = {"draft_vocab_size": draft_vocab_size} if draft_vocab_size is not None else {}
        return {"architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
                "hidden_act": "silu", "tie_word_embeddings": False, **asdict(self), **extra}

    @staticmethod
    def from_json(data: dict) -> EagleConfig:
        return EagleConfig(**{k: data[k] for k in EagleConfig.__dataclass_fields__})


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's rotate-half RoPE on x [B, heads, T, d] at ``positions`` [T] (every row) or [B, T] (per row)."""
    d = x.shape[-1]
    inv_freq = rope_inv_freq(d, theta).to(x.device)
    angles = positions.float()[..., None] * inv_freq
    if angles.dim() == 3:  # [B, T, d/2] -> [B, 1, T, d/2]: one position row per batch row, shared by the heads
        angles = angles[:, None]
    cos, sin = torch.cat([angles, angles], -1).cos().to(x.dtype), torch.cat([angles, angles], -1).sin().to(x.dtype)
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin


class KVCache:
    """One layer's keys/values [B, kv_heads, L, d]; ``truncate`` drops rejected draft positions."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        return self.k, self.v

    def truncate(self, length: int) -> None:
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]


class DecoderLayer(nn.Module):
    """A Llama decoder layer with HF's parameter names (so the target's last layer copies in by name)."""

    def __init__(self, c: EagleConfig) -> None:
        super().__init__()
        self.c = c
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = nn.ModuleDict({
            "q_proj": nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False),
            "k_proj": nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False),
            "v_proj": nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False),
            "o_proj": nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)})
        self.mlp = nn.ModuleDict({
            "gate_proj": nn.Linear(c.hidden_size, c.intermediate_size, bias=False),
            "up_proj": nn.Linear(c.hidden_size, c.intermediate_size, bias=False),
            "down_proj": nn.Linear(c.intermediate_size, c.hidden_size, bias=False)})

    def forward(self, x: torch.Tensor, start: int, cache: KVCache | None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask`` [t, keys] (True: may attend) replaces the causal rule: training's unrolled draft steps
        (eagle_train.draft_passes) see keys of several passes at one position."""
        t = x.shape[1]
        positions = torch.arange(start, start + t, device=x.device)
        q, k, v = self.project(x, positions)
        if cache is not None:
            k, v = cache.append(k, v)
        if attn_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        elif k.shape[2] == t:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # t new queries after a cache: query i sees keys up to start + i
            mask = torch.arange(k.shape[2], device=x.device)[None] <= positions[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.finish(x, out)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, heads, T, d] and k, v [B, kv_heads, T, d] of x [B, T, h], rotated to ``positions`` ([T] or
        [B, T]): the half before attention (the engine's proposer attends over its own batched caches)."""
        c, attn = self.c, self.self_attn
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = attn["q_proj"](h).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = attn["k_proj"](h).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = attn["v_proj"](h).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The layer's output from its input x [B, T, h] and the attention output [B, heads, T, d]."""
        b, t, _ = x.shape
        x = x + self.self_attn["o_proj"](attn_out.transpose(1, 2).reshape(b, t, -1))
        h = self.post_attention_layernorm(x)
        mlp = self.mlp
        return x + mlp["down_proj"](F.silu(mlp["gate_proj"](h)) * mlp["up_proj"](h))


class EagleHead(nn.Module):
    """fc + one decoder layer + the target's final norm. ``embed`` / ``lm_head``: the target's (frozen, not
    saved) embedding table and LM head weight [vocab, h]."""

    def __init__(self, c: EagleConfig, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        super().__init__()
        self.config = c
        self.fc = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(c)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.register_buffer("embed", embed.detach(), persistent=False)
        self.register_buffer("lm_head", lm_head.detach(), persistent=False)

    def forward(self, next_ids: torch.Tensor, features: torch.Tensor, start: int = 0,
                cache: KVCache | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted features [B, T, h] (normed) of positions start+1.., from ``next_ids`` [B, T] (x_{t+1}) and the
        target's ``features`` [B, T, h] (f_t) at positions start.. ."""
        return self.norm(self.layers[0](self.mix(next_ids, features), start, cache, attn_mask))

    def mix(self, next_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The layer's input [B, T, h]: fc over [embedding of ``next_ids`` | ``features``] (vLLM's order)."""
        return self.fc(torch.cat([F.embedding(next_ids, self.embed).to(features.dtype), features], -1))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """fc and the layer; the final norm stays the target's (its output is what the target's head reads)."""
        return [p for name, p in self.named_parameters() if not name.startswith("norm.")]

    @staticmethod
    def from_target(target: nn.Module) -> EagleHead:
        """Layer copied from the target's last layer, final norm copied, fc = [I | I] (embedding + feature: the
        copied layer first sees a sum it can read, rather than noise)."""
        c = EagleConfig.from_target(target.config)
        head = EagleHead(c, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
        last = target.model.layers[-1].state_dict()
        head.layers[0].load_state_dict({k: v.float() for k, v in last.items() if "rotary" not in k})
        head.norm.weight.data.copy_(target.model.norm.weight.float())
        eye = torch.eye(c.hidden_size)
        head.fc.weight.data.copy_(torch.cat([eye, eye], 1))
        return head

    def save(self, out: Path, draft_vocab_size: int | None = None) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        # host tensors (safetensors writes from host memory; the head may sit on a GPU)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(self.config.to_json(draft_vocab_size), indent=2) + "\n")

    @staticmethod
    def load(path: Path, embed: torch.Tensor, lm_head: torch.Tensor) -> EagleHead:
        from safetensors.torch import load_file

        data = json.loads((Path(path) / "config.json").read_text())
        if data.get("architectures") != [ARCHITECTURE]:
            raise ValueError(f"{path} is not an EAGLE head (architectures {data.get('architectures')})")
        head = EagleHead(EagleConfig.from_json(data), embed, lm_head)
        head.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return head.eval()
