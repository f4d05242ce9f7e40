"""Paged decode under every DecodeConfig option (kernels/paged_decode_config.py): the packed kernel (several
sequences a program), the FP8 widening modes and the head-first grid, against the fp32 reference; and the
measured table's lookup. Kernels run on CUDA, or on CPU with TRITON_INTERPRET=1 (fp16 queries there: the
interpreter mis-computes bf16 dots)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import fp8_device, make_paged_batch, rel_err, triton_device

from tokenmill.kernels import paged_attention
from tokenmill.kernels.kv_cache_write import reshape_and_cache
from tokenmill.kernels.paged_attention import (
    paged_decode,
    paged_decode_reference,
    plan_decode,
    plan_for_config,
)
from tokenmill.kernels.paged_decode_config import CONFIGS_ENV, DecodeConfig, decode_config, kv_convert

TOL = 1e-2
needs_kernels = pytest.mark.skipif(triton_device() is None, reason="needs CUDA + triton (or TRITON_INTERPRET=1)")


def _query_dtype(device: str) -> torch.dtype:
    return torch.float16 if device == "cpu" else torch.bfloat16


def _batch(seq_lens: list[int], heads: int, kv_heads: int, dim: int, block_size: int, dtype: torch.dtype,
           device: str, seed: int):
    """A random decode batch (one new token a sequence, its K/V written); NaN in every unused cache slot."""
    query, key, value, cache, meta = make_paged_batch([(max(n - 1, 0), 1) for n in seq_lens], heads, kv_heads, dim,
                                                      block_size, dtype, device, seed=seed)
    reshape_and_cache(key, value, cache, meta.slot_mapping)
    return query, cache, meta


def _fp8(cache: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The cache stored as FP8 under per-head scales (NaN poison kept)."""
    k_scale, v_scale = scales
    s = torch.stack([k_scale, v_scale]).float()[:, None, None, :, None]
    limit = torch.finfo(dtype).max
    return (cache.float() / s).clamp(-limit, limit).to(dtype)


CONFIGS = [
    DecodeConfig(seqs_per_program=4),
    DecodeConfig(seqs_per_program=4, pack_keys="run"),
    DecodeConfig(seqs_per_program=2, block_n=32, num_warps=2),
    DecodeConfig(seqs_per_program=2, block_n=16, pack_keys="run"),
    DecodeConfig(seqs_per_program=4, block_n=16, heads_fastest=True),
    DecodeConfig(heads_fastest=True),
    DecodeConfig(block_n=128, num_stages=3),
]


@needs_kernels
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (12, 2)])
def test_configs_match_the_reference(config, heads, kv_heads):
    device = triton_device()
    # Lengths spanning tile and pack boundaries, a padding row (0) and a count that leaves the last pack short.
    seq_lens = [1, 17, 0, 64, 130, 33, 5]
    query, cache, meta = _batch(seq_lens, heads, kv_heads, 64, 16, _query_dtype(device), device, seed=heads)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    plan = plan_decode(len(seq_lens), kv_heads, meta.block_tables.shape[1] * 16, 1, block_n=config.block_n)
    assert plan.num_splits == 1
    out = torch.full_like(query, float("nan"))
    paged_decode(query, cache, meta.block_tables, seq_lens_t, 0.125, plan=plan, out=out, config=config)
    ref = paged_decode_reference(query.float(), cache.float(), meta.block_tables, seq_lens_t, 0.125)
    assert rel_err(out, ref) <= TOL
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # seq_len 0: zeros


@pytest.mark.skipif(fp8_device() is None, reason="needs CUDA sm89+ + triton (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize(("kv_convert", "fp8"), [("f32", "e4m3"), ("direct", "e4m3"), ("f16", "e4m3"), ("asm", "e4m3"),
                                                 ("f16", "e5m2"), ("asm", "e5m2")])
@pytest.mark.parametrize("pack", [1, 4, "4run"])
def test_fp8_cache_widening_modes(kv_convert, fp8, pack):
    """"asm" runs its PTX on CUDA only; under the interpreter it runs as "f16" (kernels.paged_attention.kv_convert)."""
    device = fp8_device()
    dtype = torch.bfloat16 if kv_convert in ("f16", "asm") or device != "cpu" else torch.float16
    seq_lens = [40, 129, 3, 77, 200]
    heads, kv_heads, dim = 8, 2, 128
    query, cache, meta = _batch(seq_lens, heads, kv_heads, dim, 16, dtype, device, seed=len(str(pack)) + 3)
    scales = ((0.004 + 0.01 * torch.rand(kv_heads)).to(device), (0.004 + 0.01 * torch.rand(kv_heads)).to(device))
    fp8 = _fp8(cache, scales, torch.float8_e4m3fn if fp8 == "e4m3" else torch.float8_e5m2)
    config = DecodeConfig(seqs_per_program=int(str(pack)[0]), kv_convert=kv_convert,
                          pack_keys="run" if pack == "4run" else "tiles")
    plan = plan_decode(len(seq_lens), kv_heads, meta.block_tables.shape[1] * 16, 1)
    out = torch.full_like(query, float("nan"))
    paged_decode(query, fp8, meta.block_tables, meta.seq_lens, dim**-0.5, plan=plan, out=out, config=config,
                 k_scale=scales[0], v_scale=scales[1])
    ref = paged_decode_reference(query.float(), fp8, meta.block_tables, meta.seq_lens, dim**-0.5, 1, *scales)
    assert rel_err(out, ref) <= TOL
    unscaled = paged_decode_reference(query.float(), fp8, meta.block_tables, meta.seq_lens, dim**-0.5)
    assert rel_err(unscaled, ref) > 0.1  # the scales matter


@needs_kernels
def test_packing_is_skipped_where_it_does_not_apply():
    """Split plans and verification rows run the per-sequence kernel whatever the config says."""
    device = triton_device()
    seq_lens = [300, 41, 129]
    query, cache, meta = _batch(seq_lens, 8, 2, 64, 16, _query_dtype(device), device, seed=11)
    split = plan_decode(len(seq_lens), 2, meta.block_tables.shape[1] * 16, 10_000, min_partition=64)
    assert split.num_splits > 1
    out = torch.full_like(query, float("nan"))
    paged_decode(query, cache, meta.block_tables, meta.seq_lens, 0.125, plan=split, out=out,
                 config=DecodeConfig(seqs_per_program=4))
    ref = paged_decode_reference(query.float(), cache.float(), meta.block_tables, meta.seq_lens, 0.125)
    assert rel_err(out, ref) <= TOL


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="seqs_per_program"):
        DecodeConfig(seqs_per_program=3)
    with pytest.raises(ValueError, match="kv_convert"):
        DecodeConfig(kv_convert="fp32")
    with pytest.raises(ValueError, match="pack_keys"):
        DecodeConfig(seqs_per_program=2, pack_keys="dense")
    with pytest.raises(ValueError, match="block_n"):
        DecodeConfig(block_n=48)
    with pytest.raises(ValueError, match="unknown fields"):
        DecodeConfig.from_json({"block_n": 64, "pack": 2})


def test_asm_widening_falls_back_where_it_cannot_run():
    asm = DecodeConfig(kv_convert="asm")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert kv_convert(asm, torch.float8_e4m3fn, cuda) == "asm"
    assert kv_convert(asm, torch.float8_e5m2, cuda) == "f16"
    assert kv_convert(asm, torch.float8_e4m3fn, cpu) == "f16"
    assert kv_convert(DecodeConfig(kv_convert="direct"), torch.float8_e5m2, cuda) == "direct"


def test_table_gives_the_largest_measured_batch_at_or_below(tmp_path, monkeypatch):
    table = {"cpu": {"fp8": {"1": {"num_warps": 2}, "512": DecodeConfig(seqs_per_program=4).to_json()},
                     "16bit": {"256": {"block_n": 32}}}}
    path = tmp_path / "paged_decode.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(CONFIGS_ENV, str(path))
    cpu = torch.device("cpu")
    assert decode_config(cpu, torch.float8_e4m3fn, 1) == DecodeConfig(num_warps=2)
    assert decode_config(cpu, torch.float8_e4m3fn, 511) == DecodeConfig(num_warps=2)
    assert decode_config(cpu, torch.float8_e4m3fn, 950) == DecodeConfig(seqs_per_program=4)
    assert decode_config(cpu, torch.bfloat16, 255) == DecodeConfig()  # below every entry: today's launch
    assert decode_config(cpu, torch.float16, 256) == DecodeConfig(block_n=32)
    monkeypatch.setenv(CONFIGS_ENV, str(tmp_path / "missing.json"))
    assert decode_config(cpu, torch.bfloat16, 256) == DecodeConfig()


@needs_kernels
@pytest.mark.parametrize("config", [DecodeConfig(min_partition=32, block_n=16), DecodeConfig(min_partition=64)],
                         ids=lambda c: c.name)
def test_min_partition_spreads_short_contexts(config, monkeypatch):
    """Without a given plan, paged_decode plans with the config's min_partition (plan_for_config, the backend's
    planner too): short sequences in a graph-sized block table spread over length / min_partition splits (the
    default 128 gives 41 keys one split), and the result stays the reference's."""
    device = triton_device()
    seq_lens = [41, 130, 0, 7]
    query, cache, meta = _batch(seq_lens, 8, 2, 64, 16, _query_dtype(device), device, seed=config.min_partition)
    table = torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables).repeat(1, 20)], dim=1)  # ~3k keys
    plan = plan_for_config(config, len(seq_lens), 2, table.shape[1] * 16, 64)
    default = plan_for_config(dataclasses.replace(config, min_partition=128), len(seq_lens), 2, table.shape[1] * 16,
                              64)
    assert plan.min_partition == config.min_partition < default.min_partition  # 41 keys: 2 splits or more, not 1
    plans = []
    monkeypatch.setattr(paged_attention, "plan_for_config",
                        lambda *args: plans.append(plan_for_config(*args)) or plans[-1])
    out = torch.full_like(query, float("nan"))
    paged_decode(query, cache, table, meta.seq_lens, 0.125, num_sms=64, out=out, config=config)
    assert plans == [plan]
    ref = paged_decode_reference(query.float(), cache.float(), meta.block_tables, meta.seq_lens, 0.125)
    assert rel_err(out, ref) <= TOL
    with pytest.raises(ValueError, match="min_partition"):
        DecodeConfig(min_partition=40)
