"""Roofline arithmetic on hand-computed numbers (GPU_NOTES.md's Llama-3-8B figures and the issue's example)."""

from __future__ import annotations

import pytest

from tokenmill.bench.roofline import (
    Ceilings,
    StepShape,
    StoredBytes,
    attention_pairs,
    bandwidth_time,
    floor_time,
    kv_bytes_per_token,
    step_bytes,
    step_flops,
    summarize,
    total_params,
    weight_bytes,
)
from tokenmill.model.presets import preset_spec

H100 = Ceilings(bandwidth_gbps=3010.0, matmul_tflops=800.0)


def test_llama3_8b_weights_and_kv_per_token() -> None:
    spec = preset_spec("llama3-8b")
    assert total_params(spec) == 8_030_261_248  # the published Llama-3-8B count
    assert weight_bytes(spec) == 16_060_522_496  # 16.06 GB in bf16
    assert kv_bytes_per_token(spec) == 32 * 8 * 128 * 2 * 2 == 131_072


def test_tied_embeddings_counted_once() -> None:
    spec = preset_spec("qwen3-0.6b")
    assert total_params(spec) == 596_049_920  # Qwen3-0.6B: 0.6B with tied embeddings
    assert kv_bytes_per_token(spec) == 28 * 8 * 128 * 2 * 2


def test_batch1_decode_ceiling_is_187_tokens_per_second() -> None:
    spec = preset_spec("llama3-8b")
    step = StepShape(cached=(0,), new=(1,), num_sampled=1)
    # 3.01e12 / 16.06e9 ≈ 187.4 steps/s; one token of KV written adds 131 KB.
    seconds = bandwidth_time(spec, step, H100)
    assert seconds == pytest.approx((16_060_522_496 + 131_072) / 3.01e12)
    assert 1.0 / seconds == pytest.approx(187.4, abs=0.1)


def test_decode_step_bytes_add_kv_read_and_written() -> None:
    spec = preset_spec("llama3-8b")
    step = StepShape(cached=(100, 300), new=(1, 1), num_sampled=2)
    assert step.is_decode and step.num_tokens == 2
    assert step_bytes(spec, step) == 16_060_522_496 + 131_072 * 400 + 131_072 * 2


def test_stored_bytes_replace_the_dtype_formula() -> None:
    """Quantized weights and an FP8 cache: the bytes they really take, not the model dtype's (a 4-bit Llama-3-8B
    at 4.58 GiB read at bf16's 16 GB showed 204% of the decode roofline)."""
    spec = preset_spec("llama3-8b")
    step = StepShape(cached=(100, 300), new=(1, 1), num_sampled=2)
    stored = StoredBytes(weights=4_918_000_000, kv_element=1)
    assert step_bytes(spec, step, 2, stored) == 4_918_000_000 + 65_536 * 402
    assert step_bytes(spec, step, 2, StoredBytes()) == step_bytes(spec, step)  # nothing given: the formula
    assert step_bytes(spec, step, 2, StoredBytes(kv_element=1)) == 16_060_522_496 + 65_536 * 402
    summary = summarize(spec, [step], [0.01], H100, 2, stored)
    assert summary.decode_roofline_s == pytest.approx(step_bytes(spec, step, 2, stored) / 3.01e12)


def test_attention_pairs_are_causal() -> None:
    assert attention_pairs(0, 1) == 1
    assert attention_pairs(0, 4) == 1 + 2 + 3 + 4
    assert attention_pairs(10, 1) == 11
    assert attention_pairs(10, 3) == 11 + 12 + 13


def test_prefill_flops_of_issue_example() -> None:
    # Workload (a): 128 prompts × 512 tokens. Dense 2 × 6.98e9 × 65536, lm_head on 128 rows, causal attention.
    spec = preset_spec("llama3-8b")
    step = StepShape(cached=(0,) * 128, new=(512,) * 128, num_sampled=128)
    dense = 2 * 6_979_588_096 * 65_536
    head = 2 * 128_256 * 4096 * 128
    attn = 4 * 32 * 32 * 128 * 128 * (512 * 513 // 2)
    assert step_flops(spec, step) == pytest.approx(dense + head + attn)
    # The issue's ≈ 1.05 PFLOP counts all 8.03e9 params per token; ours skips the embedding gather and the
    # lm_head of unsampled tokens, so it is the smaller (stricter) floor.
    assert 0.9e15 < step_flops(spec, step) < 1.05e15
    assert floor_time(spec, step, H100) == pytest.approx(step_flops(spec, step) / 800e12)


def test_summary_of_issue_example_a() -> None:
    # Prefill of all 128 prompts then 128 decode steps (the first token comes with the prefill).
    spec = preset_spec("llama3-8b")
    steps = [StepShape(cached=(0,) * 128, new=(512,) * 128, num_sampled=128)]
    steps += [StepShape(cached=(512 + i,) * 128, new=(1,) * 128, num_sampled=128) for i in range(127)]
    summary = summarize(spec, steps, [0.01] * len(steps), H100)
    assert summary.num_decode_steps == 127
    decode_bytes = sum(step_bytes(spec, s) for s in steps[1:])
    assert summary.decode_roofline_s == pytest.approx(decode_bytes / 3.01e12)
    # The issue: decode ≈ 1.1 s, prefill ≈ 1.3 s at full-param FLOPs; ours ≈ 1.15 s prefill.
    assert 1.0 < summary.decode_roofline_s < 1.2
    assert 2.0 < summary.floor_s < 2.5
    assert summary.floor_pct == pytest.approx(100 * summary.floor_s / (0.01 * 128))
    # The made-up 10 ms prefill step only checks the arithmetic (a real one takes over a second).
    assert summary.prefill_measured_s == pytest.approx(0.01)
    assert summary.prefill_compute_s == pytest.approx(step_flops(spec, steps[0]) / 800e12)
    assert summary.prefill_matmul_pct == pytest.approx(100 * summary.prefill_compute_s / 0.01)


def test_summary_rejects_mismatched_lengths() -> None:
    spec = preset_spec("tiny-llama")
    with pytest.raises(ValueError, match="same length"):
        summarize(spec, [StepShape((0,), (1,), 1)], [], H100)


def test_ceilings_validated() -> None:
    with pytest.raises(ValueError, match="bandwidth_gbps"):
        Ceilings(bandwidth_gbps=0.0)


def test_wave_schedule_prefills_each_wave_then_decodes_it() -> None:
    from tokenmill.bench.roofline import wave_schedule

    steps = wave_schedule(num_requests=5, input_len=4, output_len=3, max_num_seqs=2, max_num_batched_tokens=8)
    # waves of 2, 2, 1: one prefill step each (2 prompts of 4 fit 8 tokens), then 2 decode steps at the wave's batch
    assert [(s.new, s.cached) for s in steps] == [
        ((4, 4), (0, 0)), ((1, 1), (4, 4)), ((1, 1), (5, 5)),
        ((4, 4), (0, 0)), ((1, 1), (4, 4)), ((1, 1), (5, 5)),
        ((4,), (0,)), ((1,), (4,)), ((1,), (5,)),
    ]
    assert all(s.num_sampled == len(s.new) for s in steps)


def test_wave_floor_max_load_bf16_by_batch() -> None:
    """Issue 22's paper floor (benchmarks/gpu_maxload.py's table): 1024 x 128 -> 128 of Llama-3-8B at 3.0 TB/s and
    800 TFLOP/s. Weights re-read every step bound decode at batch 256; from 512 on it is compute-bound."""
    from tokenmill.bench.roofline import wave_floor

    spec = preset_spec("llama3-8b")
    ceilings = Ceilings(bandwidth_gbps=3000.0, matmul_tflops=800.0)
    by_batch = {b: wave_floor(spec, 1024, 128, 128, b, 8192, ceilings) for b in (256, 512, 1024)}
    prefill = 2.0 * 1024 * 128 * 6_979_588_096 / 800e12  # layer FLOPs; LM head and attention add < 0.5%
    for floor in by_batch.values():
        assert floor.prefill_s == pytest.approx(prefill, rel=5e-3)
    b256 = by_batch[256]
    assert b256.num_decode_steps == 4 * 127 and b256.decode_compute_bound_share == 0.0
    # a decode step at 256: all weights + 256 rows of KV at mean context 191 (128..254), over the copy rate
    step = (16_060_522_496 + 131_072 * 256 * (191 + 1)) / 3.0e12
    assert b256.decode_step_s == pytest.approx(step, rel=1e-3)
    assert by_batch[1024].decode_compute_bound_share == 1.0
    assert b256.output_tok_s == pytest.approx(21_472, rel=1e-3)
    assert by_batch[1024].output_tok_s == pytest.approx(27_592, rel=1e-3)
    assert b256.output_tok_s < by_batch[512].output_tok_s < by_batch[1024].output_tok_s
    # Kernels in sequence: at 1024 rows the matmuls' FLOPs (19.3 ms) plus attention's KV bytes (8.6 ms).
    b1024 = by_batch[1024]
    kv = 131_072 * 1024 * (191 + 1) / 3.0e12
    assert b1024.serial_decode_step_s == pytest.approx(b1024.decode_step_s + kv, rel=1e-3)
    assert b256.serial_output_tok_s == pytest.approx(21_451, rel=1e-3)  # at the ridge: KV hides under nothing
    assert b1024.serial_output_tok_s == pytest.approx(22_417, rel=1e-3)
