"""One Llama-family decoder for Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

Tokens of all sequences arrive packed flat ([T], no batch dim); attention goes through the paged-KV backend.
Checkpoint names (HF layout) load through ``load_weights``, which packs q/k/v and gate/up into fused weights.
On CPU, decode-shaped steps of a stack whose linears all have a PyTorch CPU kernel weight (int4/int8, bf16) run
through quantization/cpu_decode_stack.py instead of the modules (same ops, bit-identical, less Python per token).
Each RMSNorm and the SiLU-and-mul are told the linear they feed, which may take their output quantized to FP8 in the
same pass (model/layers.py; vLLM's pass_config fuse_norm_quant / fuse_act_quant: on for quantized models unless turned off).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.kv_scales import KVScales, checkpoint_kv_scale, load_kv_scale
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.distributed.context import ParallelContext
from tokenmill.kernels.fp8_quant import Fp8Tokens
from tokenmill.kernels.gemv_epilogue import NormSums
from tokenmill.model.layers import RMSNorm, RotaryEmbedding, default_weight_loader, silu_and_mul
from tokenmill.model.linear import (
    SINGLE_RANK,
    LinearBase,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
)
from tokenmill.model.linear_method import NormedInput, QuantizationConfig, linear_method_for
from tokenmill.model.spec import ModelSpec
from tokenmill.quantization import cpu_decode_stack


def check_parallel_shape(spec: ModelSpec, world_size: int) -> None:
    """Raise ValueError (before any process starts) when the heads or MLP width cannot be split over the ranks."""
    divide(spec.num_heads, world_size, "num_attention_heads")
    divide(spec.intermediate_size, world_size, "intermediate_size")
    kv = spec.num_kv_heads
    if (kv >= world_size and kv % world_size) or (kv < world_size and world_size % kv):
        raise ValueError(f"num_key_value_heads ({kv}) and tensor_parallel_size ({world_size}) must divide one another")


class LlamaAttention(nn.Module):
    """This rank's heads: ``num_heads`` / ``num_kv_heads`` are the partition's, not the model's."""

    def __init__(self, spec: ModelSpec, prefix: str, layer_idx: int, attn_backend: AttentionBackend,
                 rotary: RotaryEmbedding, parallel: ParallelContext, quant_config: QuantizationConfig | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.qkv_proj = QKVParallelLinear(
            spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.qkv_bias,
            linear_method_for(quant_config, f"{prefix}.qkv_proj"), parallel,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size = self.num_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.o_proj = RowParallelLinear(
            spec.num_heads * spec.head_dim, spec.hidden_size, spec.o_bias,
            linear_method_for(quant_config, f"{prefix}.o_proj"), parallel,
        )
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        # Shared across layers; kept out of this module's children so it is not registered once per layer.
        self._rotary = (rotary,)
        self.attn_backend = attn_backend
        self.kv_scales = KVScales()  # used only when the cache stores FP8

    def project(self, hidden: torch.Tensor | Fp8Tokens) -> tuple[torch.Tensor, ...]:
        """q [T, heads, dim], k and v [T, kv heads, dim] of this layer's tokens, not yet rotated.
        Graph-capturable: no metadata, no host reads."""
        qkv = self.qkv_proj(hidden)
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, _ = self.q_norm(q)
            k, _ = self.k_norm(k)
        return q, k, v

    def attend(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Rotary, KV-cache write and attention: [T, heads * dim], before ``o_proj``. FP8 scales come from the
        unrotated keys on both paths (a fused backend rotates inside its cache write)."""
        rotary = self._rotary[0]
        k_scale, v_scale = self.kv_scales.for_cache(kv_cache, k, v)
        if self.attn_backend.fuses_rotary:
            out = self.attn_backend.forward(q, k, v, kv_cache, meta, self.scale, (positions, rotary.cos_sin_cache),
                                            k_scale=k_scale, v_scale=v_scale)
        else:
            q, k = rotary(q, k, positions)
            out = self.attn_backend.forward(q, k, v, kv_cache, meta, self.scale, k_scale=k_scale, v_scale=v_scale)
        return out.reshape(q.shape[0], self.q_size)


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec, prefix: str, parallel: ParallelContext,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        size = spec.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            spec.hidden_size, {"gate": size, "up": size}, spec.mlp_bias,
            linear_method_for(quant_config, f"{prefix}.gate_up_proj"), parallel,
        )
        self.down_proj = RowParallelLinear(
            size, spec.hidden_size, spec.mlp_bias, linear_method_for(quant_config, f"{prefix}.down_proj"), parallel
        )
        self.fuse_act_quant = quant_config is not None and quant_config.fuse_act_quant  # dense: no question to ask
        self.fuse_gemm_act = quant_config is not None and quant_config.fuse_gemm_act

    def forward(self, x: torch.Tensor | Fp8Tokens | NormedInput) -> torch.Tensor:
        return self.down_proj(self.activated(x))

    def activated(self, x: torch.Tensor | Fp8Tokens | NormedInput) -> torch.Tensor | Fp8Tokens:
        """silu(gate) * up, the down projection's input (``x`` a NormedInput: gate_up applies the norm)."""
        # the gate|up kernel's own epilogue where it has one for these rows (the 4-bit K-major / FP8 fma GEMVs)
        fusable = self.fuse_gemm_act and isinstance(x, torch.Tensor | NormedInput)
        act = self.gate_up_proj.silu_and_mul(x) if fusable else None
        if act is None:
            act = silu_and_mul(self.gate_up_proj(x), feeds=self.down_proj if self.fuse_act_quant else None)
        return act


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, attn_backend: AttentionBackend, rotary: RotaryEmbedding,
                 parallel: ParallelContext, quant_config: QuantizationConfig | None):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.self_attn = LlamaAttention(spec, f"{prefix}.self_attn", layer_idx, attn_backend, rotary, parallel,
                                        quant_config)
        self.mlp = LlamaMLP(spec, f"{prefix}.mlp", parallel, quant_config)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, attn_backend: AttentionBackend, parallel: ParallelContext,
                 quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            spec.vocab_size, spec.hidden_size, linear_method_for(quant_config, "model.embed_tokens"), parallel
        )
        self.rotary_emb = RotaryEmbedding(
            spec.head_dim, spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(spec, i, attn_backend, self.rotary_emb, parallel, quant_config)
            for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.fuse_norm_quant = quant_config is not None and quant_config.fuse_norm_quant
        self.fuse_gemm_norm = quant_config is not None and quant_config.fuse_gemm_norm
        self._norm_sums: NormSums | None = None  # fuse_gemm_norm: the next norms' sums of squares (two slots)
        self.flat_cpu_decode = True  # CPU decode steps of int4/int8 CPU-kernel weights: quantization/cpu_decode_stack.py
        self._cpu_stack: cpu_decode_stack.CPUDecodeStack | None = None
        self._cpu_stack_built = False

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if self.flat_cpu_decode and input_ids.device.type == "cpu":
            if not self._cpu_stack_built:  # on the first CPU step: the kernels' weights are made on first use
                self._cpu_stack, self._cpu_stack_built = cpu_decode_stack.for_model(self), True
            if self._cpu_stack is not None and self._cpu_stack.accepts(input_ids, kv_caches, meta):
                return self._cpu_stack.forward(input_ids, positions, kv_caches, meta)
        out = residual = None
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            q, k, v, residual = self.forward_piece(index, input_ids, out, residual)
            out = layer.self_attn.attend(positions, q, k, v, kv_cache, meta)
        return self.forward_piece(len(self.layers), input_ids, out, residual)[0]

    @property
    def num_pieces(self) -> int:
        return len(self.layers) + 1

    def forward_piece(self, index: int, input_ids: torch.Tensor, attn_out: torch.Tensor | None,
                      residual: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The forward pass between two attention calls (what piecewise CUDA graphs capture, runner/
        piecewise_graphs.py; the eager pass runs the same pieces). Piece 0 embeds the tokens and projects layer
        0's q, k, v; piece i finishes layer i - 1 from its attention output ``attn_out`` and projects layer i's;
        the last piece finishes the last layer and returns (final hidden states,). Else (q, k, v, residual)."""
        fuse = self.fuse_norm_quant
        if index == 0:  # the stream starts as the embeddings (no residual to add)
            hidden, residual = None, self.embed_tokens(input_ids)
        else:  # the residual add is fused into the next norm: rms_norm(x, w, eps, r) returns (norm(x+r), x+r)
            layer = self.layers[index - 1]
            sums = self._norm_sums_for(layer, attn_out, residual)
            hidden, residual = self._project_add(layer.self_attn.o_proj, attn_out, residual,
                                                 layer.post_attention_layernorm, sums, 0)
            normed, residual = self._normed(layer.post_attention_layernorm, hidden, residual, layer.mlp.gate_up_proj,
                                            fuse)
            next_norm = self.norm if index == len(self.layers) else self.layers[index].input_layernorm
            hidden, residual = self._project_add(layer.mlp.down_proj, layer.mlp.activated(normed), residual,
                                                 next_norm, sums, 1)
        if index == len(self.layers):  # the final norm feeds the LM head only on sampled rows (and feature sinks)
            if isinstance(hidden, NormedInput):  # made only to keep the sums' ring zeroed: the norm kernel runs
                hidden = None
            return (self.norm(residual)[0] if hidden is None else self.norm(hidden, residual)[0],)
        layer = self.layers[index]
        normed, residual = self._normed(layer.input_layernorm, hidden, residual, layer.self_attn.qkv_proj, fuse)
        return (*layer.self_attn.project(normed), residual)

    def _norm_sums_for(self, layer: LlamaDecoderLayer, attn_out: torch.Tensor | Fp8Tokens,
                       residual: torch.Tensor) -> NormSums | None:
        """The ring o_proj and down_proj write the next norms' inputs into (slots 0 and 1), where both serve these
        rows with that epilogue; None otherwise. Both or neither: slot 0 is zeroed only by down_proj, so an o_proj
        writing it without its down_proj after would leave it dirty for the next layer's."""
        if not (self.fuse_gemm_norm and isinstance(attn_out, torch.Tensor)
                and layer.self_attn.o_proj.accepts_residual_norm(attn_out)
                and layer.mlp.down_proj.accepts_residual_norm(residual)):
            return None
        if self._norm_sums is None:  # zeros; no memset after: producers keep each other's slot zeroed
            self._norm_sums = NormSums.make(residual.device)
        return self._norm_sums

    def _project_add(self, linear: RowParallelLinear, x: torch.Tensor | Fp8Tokens, residual: torch.Tensor,
                     next_norm: RMSNorm, sums: NormSums | None,
                     slot: int) -> tuple[torch.Tensor | NormedInput | None, torch.Tensor]:
        """(None, x W^T + residual) where the projection's kernel adds the residual stream (fuse_gemm_norm), or
        (the next norm's input, that sum) where it also makes that input (``sums``: its ring, written at ``slot``);
        else (x W^T, residual) for the next norm to add."""
        if sums is not None:
            made = linear.add_residual_norm(x, residual, NormedInput(residual, next_norm.weight, next_norm.eps,
                                                                     sums, slot))
            if made is None:  # _norm_sums_for said both serve these rows: a bug that would corrupt the ring
                raise RuntimeError(f"{type(linear).__name__} refused the next-norm epilogue it accepted")
            return made[1], made[0]
        if self.fuse_gemm_norm and isinstance(x, torch.Tensor):
            summed = linear.add_residual(x, residual)
            if summed is not None:
                return None, summed
        return linear(x), residual

    def _normed(self, norm: RMSNorm, hidden: torch.Tensor | NormedInput | None, residual: torch.Tensor,
                feeds: LinearBase, fuse_quant: bool) -> tuple[torch.Tensor | Fp8Tokens | NormedInput, torch.Tensor]:
        """(the consumer's input, the residual stream): ``hidden`` None means ``residual`` already holds the sum;
        then the consumer applies the norm in its own kernel where it can (NormedInput). A NormedInput ``hidden``
        (made by the producer) goes to a consumer that takes it; otherwise the norm kernel runs on the stream."""
        if isinstance(hidden, NormedInput):
            if feeds.accepts_rms_input(residual):
                return hidden, residual
            hidden = None
        if hidden is not None:
            return norm(hidden, residual, feeds=feeds if fuse_quant else None)
        if self.fuse_gemm_norm and feeds.accepts_normed_input(residual):
            return NormedInput(residual, norm.weight, norm.eps), residual
        return norm(residual, feeds=feeds if fuse_quant else None)[0], residual


class LlamaForCausalLM(nn.Module):
    """Serves LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM checkpoints."""

    # checkpoint sub-name -> (fused parameter sub-name, shard id)
    packed_modules_mapping: dict[str, tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, spec: ModelSpec, attn_backend: AttentionBackend, parallel: ParallelContext | None = None,
                 quant_config: QuantizationConfig | None = None) -> None:
        """Built for one tensor-parallel rank from the start (``parallel``; default: the single rank): every
        layer allocates only its partition, and ``num_kv_heads`` is this rank's (the runner sizes its KV cache
        from it)."""
        super().__init__()
        parallel = parallel or SINGLE_RANK
        self.spec = spec
        self.num_layers = spec.num_layers
        self.head_dim = spec.head_dim
        self.vocab_size = spec.vocab_size
        self.attn_backend = attn_backend  # the runner builds this backend's metadata and graph buffers
        self.model = LlamaModel(spec, attn_backend, parallel, quant_config)
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads if spec.num_layers else spec.num_kv_heads
        if spec.tie_word_embeddings and quant_config is not None and quant_config.lm_head_quantized:
            raise ValueError("a quantized LM head (--quantize-lm-head, or a GPTQ checkpoint's lm_head: true): this "
                             "model ties its LM head to the input embedding table (tie_word_embeddings), which "
                             "stays dense; drop the flag")
        self.lm_head = ParallelLMHead(
            spec.vocab_size, spec.hidden_size, linear_method_for(quant_config, "lm_head"), parallel,
            tie_to=self.model.embed_tokens if spec.tie_word_embeddings else None,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] for the packed tokens of this step."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in the model's dtype, as transformers computes them before its own upcast.

        Not upcast here: greedy argmax and the fused sampler read bf16 directly (the upcast is exact, so the
        argmax is the same), and an fp32 copy of a 256 x 128k batch cost ~0.1 ms per decode step on the H100;
        the sampler's other paths and the logprobs upcast where they compute.
        """
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named checkpoint tensors; raises if a name is unknown or a parameter stays unloaded."""
        params = dict(self.named_parameters())
        expected = self._expected_shards(params)
        loaded: set[tuple[str, str | None]] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.spec.tie_word_embeddings and name == "lm_head.weight"):
                continue
            kv_scale = checkpoint_kv_scale(name)
            if kv_scale is not None:  # FP8 KV-cache scales: buffers of the layer's attention, not parameters
                load_kv_scale(self.model.layers[kv_scale[0]].self_attn.kv_scales, kv_scale[1], tensor)
                continue
            param_name, shard_id = self._map_name(name)
            param = params.get(param_name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {self.spec.architecture}")
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                loader(param, tensor, shard_id)
            except ValueError as exc:
                raise ValueError(f"cannot load checkpoint tensor {name!r}: {exc}") from exc
            loaded.add((param_name, shard_id))
        missing = sorted(f"{n}[{s}]" if s else n for n, s in expected - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} tensors: {shown}")

    def _map_name(self, name: str) -> tuple[str, str | None]:
        for ckpt_name, (fused_name, shard_id) in self.packed_modules_mapping.items():
            if f".{ckpt_name}." in name:
                return name.replace(f".{ckpt_name}.", f".{fused_name}."), shard_id
        return name, None

    def _expected_shards(self, params: dict[str, nn.Parameter]) -> set[tuple[str, str | None]]:
        """(parameter, shard id) pairs a complete checkpoint fills: one per fused shard of a fused layer."""
        expected: set[tuple[str, str | None]] = set()
        for module_name, module in self.named_modules():
            shard_ids = getattr(module, "shard_ids", [None])
            for param_name, _ in module.named_parameters(prefix=module_name, recurse=False):
                if param_name in params:  # a tied weight is listed once, under its first owner
                    expected.update((param_name, shard) for shard in shard_ids)
        return expected
