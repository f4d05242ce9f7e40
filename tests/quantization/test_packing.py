"""GPTQ / AWQ packing against loop-by-loop packers written from the formats' descriptions, and round trips."""

from __future__ import annotations

import pytest
import torch

from tokenmill.quantization.packing import (
    QuantizedWeight,
    from_awq,
    from_gptq,
    pack_along,
    rtn_quantize,
    to_awq,
    to_gptq,
    unpack_along,
)


def _word(values: list[int], bits: int) -> int:
    """One int32 word holding ``values`` (value j at bits j*bits), as a signed Python int."""
    word = 0
    for j, v in enumerate(values):
        word |= int(v) << (j * bits)
    return word - (1 << 32) if word >= 1 << 31 else word


def naive_gptq_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] -> [in / per_word, out]: word (r, c) packs input channels r*per_word ... of output c."""
    per_word = 32 // bits
    out_f, in_f = codes.shape
    words = torch.zeros(in_f // per_word, out_f, dtype=torch.int32)
    for r in range(in_f // per_word):
        for c in range(out_f):
            words[r, c] = _word(codes[c, r * per_word : (r + 1) * per_word].tolist(), bits)
    return words


def naive_awq_rows(values: torch.Tensor) -> torch.Tensor:
    """values [rows, out] -> [rows, out / 8]: nibble i of word w holds output channel 8w + (0,2,4,6,1,3,5,7)[i]."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    rows, out_f = values.shape
    words = torch.zeros(rows, out_f // 8, dtype=torch.int32)
    for r in range(rows):
        for w in range(out_f // 8):
            words[r, w] = _word([values[r, 8 * w + order[i]] for i in range(8)], 4)
    return words


def _random_qw(bits: int, out_f: int = 16, in_f: int = 64, group: int = 32, seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(out_f, in_f, generator=gen), bits, group, sym=False)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_tensors_match_the_format(bits):
    qw = _random_qw(bits)
    tensors = to_gptq(qw)
    assert torch.equal(tensors["qweight"], naive_gptq_qweight(qw.codes, bits))
    assert torch.equal(tensors["qzeros"], naive_gptq_qweight((qw.zeros.long() - 1).int(), bits).t())
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (2, 16)
    assert tensors["g_idx"].tolist() == [i // 32 for i in range(64)]
    back = from_gptq(tensors, bits)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros.long(), qw.zeros.long())


def test_awq_tensors_match_the_format():
    qw = _random_qw(4)
    tensors = to_awq(qw)
    assert torch.equal(tensors["qweight"], naive_awq_rows(qw.codes.t()))
    assert torch.equal(tensors["qzeros"], naive_awq_rows(qw.zeros.long()))
    back = from_awq(tensors, group_size=32)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros.long(), qw.zeros.long())
    assert torch.allclose(back.dequantize(), qw.dequantize(), rtol=1e-3, atol=1e-4)  # fp16 scales


def test_pack_unpack_round_trip_covers_the_sign_bit():
    values = torch.tensor([[15, 0, 7, 8, 1, 14, 3, 15]] * 3).t()  # top nibble 15: the int32 is negative
    words = pack_along(values, 4, dim=0)
    assert words.shape == (1, 3) and (words < 0).all()
    assert torch.equal(unpack_along(words, 4, dim=0), values.int())


def test_rtn_error_is_at_most_half_a_step():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 128, generator=gen)
    for sym in (True, False):
        qw = rtn_quantize(weight, 4, 64, sym)
        step = qw.scales[qw.g_idx.long()].t()
        assert ((qw.dequantize() - weight).abs() <= step / 2 + 1e-6).all()


def test_bad_bits_and_group_sizes_fail_with_a_sentence():
    with pytest.raises(ValueError, match="bits=3"):
        rtn_quantize(torch.randn(4, 64), 3, 32, True)
    with pytest.raises(ValueError, match="does not divide"):
        rtn_quantize(torch.randn(4, 96), 4, 64, True)
    with pytest.raises(ValueError, match="AWQ format stores 4-bit"):
        to_awq(_random_qw(8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, True)])
def test_rtn_codes_are_the_same_on_cuda_and_cpu(bits, sym):
    """Each symmetric group's extreme weight sits on a rounding tie: one ulp of scale must not flip it by device."""
    weight = (torch.randn(256, 512, generator=torch.Generator().manual_seed(7)) * 0.2).to(torch.bfloat16).float()
    on_cpu = rtn_quantize(weight, bits, 128, sym=sym)
    on_gpu = rtn_quantize(weight.cuda(), bits, 128, sym=sym)
    assert torch.equal(on_cpu.codes, on_gpu.codes.cpu())
    assert torch.equal(on_cpu.scales, on_gpu.scales.cpu())
