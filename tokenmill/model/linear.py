"""The linear family: column / merged / q|k|v / row-parallel linears and the vocabulary-parallel embedding + LM head.

Tensor parallelism of size 1 is the trivial group: the same classes serve one GPU and N ranks. Each layer holds
only its rank's partition from construction on and delegates its weights' format to a ``LinearMethod``
(model/linear_method.py). Every parameter carries its layout (output_dim, input_dim, packed_dim, packed_factor),
so ``load_partition`` below is the ONE loader: it takes the FULL checkpoint tensor (or a lazy slice of it) and
copies this rank's part of this fused shard into the parameter, whatever the format.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from tokenmill.distributed.context import ParallelContext
from tokenmill.model.linear_method import DenseLinearMethod, LinearMethod, NormedInput, set_weight_attrs

SINGLE_RANK = ParallelContext(0, 1, None)


class Sliceable(Protocol):
    """A full checkpoint tensor, or a lazy handle that reads only the asked-for slice (safetensors get_slice)."""

    @property
    def shape(self) -> Any: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...


def divide(size: int, world_size: int, what: str) -> int:
    if size % world_size:
        raise ValueError(f"{what} ({size}) must be divisible by tensor_parallel_size ({world_size})")
    return size // world_size


def _packed(param: torch.Tensor, dim: int, value: int, what: str) -> int:
    """``value`` (in logical rows/columns along ``dim``) in units of the parameter's storage along ``dim``."""
    if getattr(param, "packed_dim", None) != dim:
        return value
    factor = param.packed_factor
    if value % factor:
        raise ValueError(f"{what}: offset or size {value} is not a multiple of the packing factor {factor}")
    return value // factor


def load_partition(
    param: torch.Tensor, loaded: Sliceable, output_part: tuple[int, int, int] | None, input_rank: int | None,
    what: str,
) -> None:
    """Copy this rank's part of a full checkpoint tensor into ``param`` (or into its fused-shard slice).

    ``output_part`` = (offset in the parameter, length, start in the checkpoint tensor), in logical output rows,
    or None to take the whole output dim. Along the input dim a rank holds an even slice: rank ``input_rank``
    takes the ``param.shape[input_dim]`` columns at ``input_rank * param.shape[input_dim]`` (None: no input split).
    Packed dims divide every offset by their factor; dims a parameter does not declare are copied whole.
    """
    target, source = param.data, loaded
    output_dim = getattr(param, "output_dim", None)
    input_dim = getattr(param, "input_dim", None)
    full = tuple(loaded.shape)
    if len(full) != target.dim():
        raise ValueError(f"{what}: checkpoint tensor has shape {full}; the parameter has {target.dim()} dims")
    if output_dim is not None and output_part is not None:
        offset, length, start = (_packed(param, output_dim, v, what) for v in output_part)
        if start + length > full[output_dim]:
            raise ValueError(f"{what}: checkpoint tensor has shape {full}; cannot take [{start}:{start + length}] "
                             f"along dim {output_dim}")
        target = target.narrow(output_dim, offset, length)
        source = source.narrow(output_dim, start, length)
    if input_dim is not None and input_rank is not None:
        length = target.shape[input_dim]
        start = input_rank * length
        if start + length > full[input_dim]:
            raise ValueError(f"{what}: checkpoint tensor has shape {full}; cannot take [{start}:{start + length}] "
                             f"along dim {input_dim}")
        source = source.narrow(input_dim, start, length)
    if tuple(source.shape) != tuple(target.shape):
        raise ValueError(f"{what}: checkpoint tensor has shape {full}; its part {tuple(source.shape)} does not "
                         f"match the parameter's {tuple(target.shape)}")
    if not isinstance(source, torch.Tensor):  # a lazy slice nobody narrowed: read it whole
        source = source.narrow(0, 0, full[0])
    target.copy_(source)


class LinearBase(nn.Module):
    """y = x W^T + b through ``linear_method``. Subclasses fix the partition: ``output_shards`` maps a shard id
    (None for an unfused layer) to (offset in this rank's output, local width, start row in the full checkpoint
    tensor); ``input_rank`` is the rank whose slice of the input columns this layer holds (None when unsplit)."""

    def __init__(
        self, input_size: int, output_shards: dict[Any, tuple[int, int, int]], bias: bool,
        linear_method: LinearMethod | None, parallel: ParallelContext | None, input_rank: int | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel or SINGLE_RANK
        self.linear_method = linear_method or DenseLinearMethod()
        self.output_shards = output_shards
        self.input_rank = input_rank
        self.input_size = input_size
        self.output_size = sum(size for _, size, _ in output_shards.values())
        # Row count (a power of two) -> GEMV / tiled-GEMM config that beat cuBLAS for this weight at start-up
        # (runner/linear_tuning.py); read by DenseLinearMethod.apply; absent: cuBLAS.
        self.gemm_plan: dict[int, Any] = {}
        dtype = torch.get_default_dtype()
        self.linear_method.create_weights(
            self, input_size, [size for _, size, _ in output_shards.values()], dtype
        )
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size, dtype=dtype), requires_grad=False)
            set_weight_attrs(self.bias, {"input_dim": None, "output_dim": 0, "packed_dim": None, "packed_factor": None})
        for param in self.parameters(recurse=False):
            if not hasattr(param, "weight_loader"):
                param.weight_loader = self.weight_loader

    @property
    def shard_ids(self) -> list[Any]:
        """The checkpoint tensors this layer's fused parameters are loaded from (one None when unfused)."""
        return list(self.output_shards)

    def weight_loader(self, param: nn.Parameter, loaded: Sliceable, shard_id: Any = None) -> None:
        if shard_id not in self.output_shards:
            raise ValueError(f"shard id {shard_id!r} is not one of {list(self.output_shards)}")
        what = "weight" if shard_id is None else f"shard {shard_id!r}"
        load_partition(param, loaded, self.output_shards[shard_id], self.input_rank, what)

    def matmul_bias(self) -> torch.Tensor | None:
        """The bias the matmul adds (the GEMM tuner times the same call)."""
        return self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)

    def silu_and_mul(self, x: torch.Tensor | NormedInput) -> torch.Tensor | None:
        """A fused gate|up layer's silu(gate) * up from one kernel, where its method has one for x's rows; else None
        (see LinearMethod.apply_silu_and_mul)."""
        return self.linear_method.apply_silu_and_mul(self, x, self.bias)

    def accepts_normed_input(self, hidden: torch.Tensor) -> bool:
        """Whether this layer takes the residual stream as a NormedInput (its kernel applies the norm)."""
        return self.linear_method.accepts_normed_input(self, hidden)

    def accepts_rms_input(self, hidden: torch.Tensor) -> bool:
        """Whether this layer takes a producer-made norm input (NormedInput with sums; LinearMethod's)."""
        return self.linear_method.accepts_rms_input(self, hidden)

    def add_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """x W^T (+ b) + residual from one kernel where the method has one for x's rows; else None."""
        return self.linear_method.apply_add_residual(self, x, self.bias, residual)

    def accepts_residual_norm(self, x: torch.Tensor) -> bool:
        """Whether ``add_residual_norm`` serves an input of x's rows (LinearMethod.accepts_residual_norm)."""
        return self.linear_method.accepts_residual_norm(self, x)

    def add_residual_norm(self, x: torch.Tensor, residual: torch.Tensor,
                          norm: NormedInput) -> tuple[torch.Tensor, NormedInput] | None:
        """The residual stream and the next norm's input from one kernel (LinearMethod.apply_add_residual_norm)."""
        return self.linear_method.apply_add_residual_norm(self, x, self.bias, residual, norm)

    def accepts_fp8_tokens(self, x: torch.Tensor) -> bool:
        """Whether this layer takes an input of x's rows as ``Fp8Tokens`` (its method decides; see LinearMethod)."""
        return self.linear_method.accepts_fp8_tokens(self, x)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, rank={self.parallel.rank}/"
                f"{self.parallel.world_size}, method={type(self.linear_method).__name__}")


def _column_shards(sizes: dict[Any, int], parallel: ParallelContext) -> dict[Any, tuple[int, int, int]]:
    """Each fused shard's rows split evenly over ranks; this rank's slices stacked in shard order."""
    shards, offset = {}, 0
    for shard_id, size in sizes.items():
        local = divide(size, parallel.world_size, "output size" if shard_id is None else f"{shard_id} output size")
        shards[shard_id] = (offset, local, parallel.rank * local)
        offset += local
    return shards


class ColumnParallelLinear(LinearBase):
    """Output rows split over ranks (no communication); with one rank, a plain linear layer."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 linear_method: LinearMethod | None = None, parallel: ParallelContext | None = None) -> None:
        parallel = parallel or SINGLE_RANK
        super().__init__(input_size, _column_shards({None: output_size}, parallel), bias, linear_method, parallel)


class MergedColumnParallelLinear(LinearBase):
    """Several projections of one input in one matmul (gate|up), each split over ranks by rows."""

    def __init__(self, input_size: int, output_sizes: dict[str, int], bias: bool = False,
                 linear_method: LinearMethod | None = None, parallel: ParallelContext | None = None) -> None:
        parallel = parallel or SINGLE_RANK
        super().__init__(input_size, _column_shards(output_sizes, parallel), bias, linear_method, parallel)


class QKVParallelLinear(LinearBase):
    """Fused q|k|v split by heads. With fewer KV heads than ranks each KV head is replicated on the ranks whose
    query heads use it (GQA groups stay whole). ``num_heads`` / ``num_kv_heads`` are this rank's."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False, linear_method: LinearMethod | None = None,
                 parallel: ParallelContext | None = None) -> None:
        parallel = parallel or SINGLE_RANK
        tp, rank = parallel.world_size, parallel.rank
        self_heads = divide(total_num_heads, tp, "num_attention_heads")
        if total_num_kv_heads >= tp:
            kv_heads = divide(total_num_kv_heads, tp, "num_key_value_heads")
            kv_start = rank * kv_heads
        else:
            if tp % total_num_kv_heads:
                raise ValueError(f"tensor_parallel_size ({tp}) must be a multiple of num_key_value_heads "
                                 f"({total_num_kv_heads}) when it is larger")
            kv_heads, kv_start = 1, rank // (tp // total_num_kv_heads)
        q_size, kv_size = self_heads * head_dim, kv_heads * head_dim
        shards = {
            "q": (0, q_size, rank * q_size),
            "k": (q_size, kv_size, kv_start * head_dim),
            "v": (q_size + kv_size, kv_size, kv_start * head_dim),
        }
        super().__init__(hidden_size, shards, bias, linear_method, parallel)
        self.num_heads, self.num_kv_heads, self.head_dim = self_heads, kv_heads, head_dim


class RowParallelLinear(LinearBase):
    """y = all_reduce(x_r W_r^T) + b: input columns split over ranks, one all-reduce, the bias added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 linear_method: LinearMethod | None = None, parallel: ParallelContext | None = None) -> None:
        parallel = parallel or SINGLE_RANK
        local = divide(input_size, parallel.world_size, "row-parallel input size")
        super().__init__(local, {None: (0, output_size, 0)}, bias, linear_method, parallel, input_rank=parallel.rank)
        self.reduce = parallel.world_size > 1

    def matmul_bias(self) -> torch.Tensor | None:
        return None if self.reduce else self.bias

    def add_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        # several ranks: the residual is added after the all-reduce, outside the kernel
        return None if self.reduce else super().add_residual(x, residual)

    def accepts_residual_norm(self, x: torch.Tensor) -> bool:
        return not self.reduce and super().accepts_residual_norm(x)  # several ranks: as add_residual

    def add_residual_norm(self, x: torch.Tensor, residual: torch.Tensor,
                          norm: NormedInput) -> tuple[torch.Tensor, NormedInput] | None:
        return None if self.reduce else super().add_residual_norm(x, residual, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce:  # one rank: the bias rides in the matmul
            return self.linear_method.apply(self, x, self.bias)
        out = self.parallel.all_reduce(self.linear_method.apply(self, x, None))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows split over ranks (padded to equal parts); ids outside a rank's rows embed to 0, then sum."""

    def __init__(self, vocab_size: int, hidden_size: int, linear_method: LinearMethod | None = None,
                 parallel: ParallelContext | None = None, tie_to: VocabParallelEmbedding | None = None) -> None:
        super().__init__()
        self.parallel = parallel or SINGLE_RANK
        self.linear_method = linear_method or DenseLinearMethod()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.parallel.world_size)
        self.vocab_start = self.parallel.rank * self.rows_per_rank
        self.num_real_rows = max(0, min(vocab_size - self.vocab_start, self.rows_per_rank))
        self.gemm_plan: dict[int, Any] = {}
        self.tied = tie_to is not None
        if tie_to is not None:  # one table serves the embedding and the LM head
            self.weight, self.linear_method = tie_to.weight, tie_to.linear_method
            return
        self.linear_method.create_weights(self, hidden_size, [self.rows_per_rank], torch.get_default_dtype())
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Sliceable, shard_id: Any = None) -> None:
        output_dim = getattr(param, "output_dim", None)
        if output_dim is None:  # a quantized head's per-input tensor (GPTQ g_idx): whole on every rank
            load_partition(param, loaded, None, None, "the LM head")
            return
        packed = getattr(param, "packed_dim", None) == output_dim  # e.g. GPTQ qzeros: 8 vocabulary rows a word
        rows = tuple(loaded.shape)[output_dim] * (param.packed_factor if packed else 1)
        if rows != self.vocab_size:
            raise ValueError(f"checkpoint vocabulary has {rows} rows; the model expects {self.vocab_size}")
        if self.num_real_rows < self.rows_per_rank:
            param.data.zero_()  # the last rank's padding rows stay zero
        load_partition(param, loaded, (0, self.num_real_rows, self.vocab_start), None, "the vocabulary")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return self.linear_method.embedding(self, input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_real_rows)
        hidden = self.linear_method.embedding(self, local.masked_fill(outside, 0))
        hidden = hidden.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.parallel.all_reduce(hidden)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary slice, all-gathered into [N, vocab] on every rank. ``tie_to``: share the
    embedding's weight instead of holding one."""

    def __init__(self, vocab_size: int, hidden_size: int, linear_method: LinearMethod | None = None,
                 parallel: ParallelContext | None = None, tie_to: VocabParallelEmbedding | None = None) -> None:
        super().__init__(vocab_size, hidden_size, linear_method, parallel, tie_to)
        self.gather = self.parallel.world_size > 1

    def matmul_bias(self) -> torch.Tensor | None:
        return None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear_method.apply(self, hidden, None)
        if not self.gather:
            return logits
        return self.parallel.all_gather(logits, dim=-1)[..., : self.vocab_size]


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every layer's method repack its loaded weights for the kernel, once (a tied LM head shares the
    embedding's table and is not processed twice)."""
    for module in model.modules():
        method = getattr(module, "linear_method", None)
        if method is not None and not getattr(module, "tied", False):
            method.process_weights_after_loading(module)


def matmul_layers(model: nn.Module) -> Iterator[tuple[str, LinearBase | ParallelLMHead]]:
    """(name, layer) for every layer that runs a matmul through its LinearMethod (embeddings only gather rows)."""
    for name, module in model.named_modules():
        if isinstance(module, LinearBase | ParallelLMHead):
            yield name, module
