"""benchmarks/gpu_w4_gemv_probe.py's winner selection and benchmarks/quant_table_merge.py on the CPU: a dequantize +
cuBLAS result that is fastest for a (shape, rows) becomes a ``dequant_mm`` table entry, the merged table routes
kernels/quant_dispatch.py to it at those rows (the K-major GEMM where that was fastest), the totals report each
K-major path alone; and the probe's --dry-run runs end to end under TRITON_INTERPRET=1."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.quant_dispatch import _tuned, config_from_json
from tokenmill.kernels.w4_gemv import W4GemvConfig
from tokenmill.kernels.w4_kmajor_dequant import KMajorDequantConfig
from tokenmill.kernels.w4_kmajor_gemm import KMajorGemmConfig

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "NVIDIA Test GPU"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def _row(shape: str, rows: int, variant: str, us: float, params: dict) -> dict:
    n, k = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}[shape]
    return {"shape": shape, "rows": rows, "n": n, "k": k, "variant": variant, "params": params, "us": us}


GEMM = {"kernel": "w4_kmajor_gemm", "block_m": 64, "block_n": 64, "block_k": 128, "split_k": 4, "one_dot": True,
        "num_warps": 4, "num_stages": 3, "x_runs": True, "scale_codes": True, "block_k_run": 128}
DEQUANT = {"kernel": "dequant_mm", "block_n": 64, "num_warps": 8, "chunk_n": 0}
GEMV = {"kind": "kmajor", "block_n": 4, "groups": 16, "num_warps": 2, "num_stages": 2}


def _results() -> list[dict]:
    """Per shape: at 64 rows the K-major GEMM is fastest, at 256 dequantize + cuBLAS; 1 row the K-major GEMV."""
    results = []
    for i, shape in enumerate(("qkv", "o", "gate_up", "down")):
        results += [_row(shape, 1, "bf16:cublas", 20.0, {"kernel": "cublas"}),
                    _row(shape, 1, "kmajor_n4_g16_w2_st2", 9.0, GEMV)]
        for rows, gemm_us, dequant_us in ((64, 50.0 + i, 70.0 + i), (256, 200.0 + i, 110.0 + i)):
            results += [_row(shape, rows, "bf16:cublas", 40.0, {"kernel": "cublas"}),
                        _row(shape, rows, "today:m128", 150.0, {"kernel": "WNA16Config"}),
                        _row(shape, rows, "kmgemm_r_sc_m64_n64_k128_s4_w4_st3", gemm_us, GEMM),
                        _row(shape, rows, "dequant_n64_w8", dequant_us, DEQUANT)]
    return results


def test_the_fastest_k_major_path_per_shape_and_rows_becomes_the_table_entry():
    probe = _script("gpu_w4_gemv_probe")
    results = _results()
    entries = probe.suggested_k_major_entries(results)
    assert entries["4096x4096"]["64"]["kernel"] == "w4_kmajor_gemm"
    assert entries["4096x4096"]["256"] == {"kernel": "dequant_mm", "block_n": 64, "num_warps": 8, "chunk_n": 0}
    assert entries["4096x14336"]["1"]["kernel"] == "w4_gemv"
    assert probe.suggested_entries(results) == {}  # no GPTQ-layout variant was measured
    totals = {t["rows"]: t for t in probe.decode_totals(results)}
    assert totals[64]["kmajor_gemm_us"] == 50 + 51 + 52 + 53 and totals[64]["dequant_us"] == 70 + 71 + 72 + 73
    assert totals[256]["k_major_us"] == totals[256]["dequant_us"] == 110 + 111 + 112 + 113
    assert totals[256]["dequant_x_bf16"] == pytest.approx(160 / 446)
    assert probe.k_major(results[-1]) and not probe.k_major(results[2])


def test_a_winning_transposed_product_is_an_entry_the_dispatch_reads_back():
    """A w_lhs GEMM row (the transposed product) counts in the K-major GEMM's total and its own, and where it is
    fastest its entry carries w_lhs, so the merged table's config is the transposed product; the other rows keep
    w_lhs False (today's kernel)."""
    probe = _script("gpu_w4_gemv_probe")
    wl = {**GEMM, "x_runs": False, "scale_codes": False, "w_lhs": True, "block_n": 128, "split_k": 2}
    results = _results() + [_row(shape, 64, "kmgemm_wl_m64_n128_k128_s2_w4_st3", 40.0, wl)
                            for shape in ("qkv", "o", "gate_up", "down")]
    entries = probe.suggested_k_major_entries(results)
    assert entries["4096x4096"]["64"] == {k: v for k, v in wl.items() if k != "block_k_run"}
    assert "w_lhs" not in entries["4096x4096"]["1"]
    config = config_from_json(entries["4096x4096"]["64"])
    assert isinstance(config, KMajorGemmConfig) and config.w_lhs
    assert config.name == "kmgemm_wl_m64_n128_k128_s2_w4_st3"
    old_entry = {k: v for k, v in GEMM.items() if k != "block_k_run"}  # as written before the variant existed
    assert not config_from_json(old_entry).w_lhs
    totals = {t["rows"]: t for t in probe.decode_totals(results)}
    assert totals[64]["kmajor_gemm_us"] == totals[64]["w_lhs_us"] == 160.0
    assert totals[256]["w_lhs_us"] != totals[256]["w_lhs_us"]  # NaN: none measured at 256 rows
    assert totals[64]["gluon_us"] != totals[64]["gluon_us"]  # the Triton-compiled product is not Gluon's
    assert probe.w_lhs_candidates(8) == [] and all(c.w_lhs for c in probe.w_lhs_candidates(256))
    assert {c.gluon for c in probe.w_lhs_candidates(64)} == {False, True}


def test_dequant_chunks_fit_l2_and_split_the_weight():
    probe = _script("gpu_w4_gemv_probe")

    def chunks(n: int, k: int) -> list[int]:
        return [c.chunk_n for c in probe.dequant_candidates(64, n, k) if c.chunk_n]

    assert chunks(28672, 4096) == [2048, 4096] and chunks(4096, 14336) == [512, 1024]
    assert chunks(4096, 4096) == [2048]  # 4096 channels would be the whole weight: the unchunked candidate
    assert probe.dequant_candidates(4, 28672, 4096) == []


def test_merge_adds_dequant_winners_and_the_dispatch_routes_to_them(tmp_path):
    probe = _script("gpu_w4_gemv_probe")
    gptq = {"4096x4096": {"16": {"kernel": "splitk", "block_m": 16, "block_n": 64, "block_k": 128, "split_k": 4}}}
    base = {DEVICE: {"w4a16_g128": gptq}}
    record = {"device": DEVICE, "suggested_table": {
        "w4a16_g128": {"4096x4096": {"16": {"kernel": "w4_gemv", "kind": "mma", "block_n": 64}}},
        "w4a16_g128_kmajor": probe.suggested_k_major_entries(_results())}}
    base_path, probe_path, out_path = tmp_path / "base.json", tmp_path / "probe.json", tmp_path / "merged.json"
    base_path.write_text(json.dumps(base))
    probe_path.write_text(json.dumps(record))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quant_table_merge.py"), str(base_path),
                           str(probe_path), str(out_path)], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "12 K-major entries (4 dequant_mm, 4 w4_gemv kmajor, 4 w4_kmajor_gemm)" in done.stdout
    merged = json.loads(out_path.read_text())
    assert merged[DEVICE]["w4a16_g128"] == gptq  # the GPTQ layout's baseline is not changed
    fmt = "w4a16_g128_kmajor"
    for n, k in ((4096, 4096), (28672, 4096), (4096, 14336)):
        assert _tuned(str(out_path), (DEVICE,), fmt, n, k, 1) == (True, W4GemvConfig(**GEMV))
        found, config = _tuned(str(out_path), (DEVICE,), fmt, n, k, 33)
        assert found and isinstance(config, KMajorGemmConfig) and config.split_k == 4
        assert _tuned(str(out_path), (DEVICE,), fmt, n, k, 129) == (True, KMajorDequantConfig(64, 8))
        assert _tuned(str(out_path), (DEVICE,), fmt, n, k, 257) == (False, None)  # defaults past the probe's rows


def test_merge_refuses_a_gptq_layout_kernel_under_the_k_major_format():
    merge = _script("quant_table_merge")
    record = {"device": DEVICE, "suggested_table": {"w4a16_g128_kmajor": {"64x256": {"8": {
        "kernel": "wna16_gemm", "block_m": 16, "block_n": 64, "block_k": 64}}}}}
    with pytest.raises(ValueError, match="not a K-major kernel"):
        merge.merge({}, record)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter)")
def test_probe_dry_run_checks_dequant_against_fp32_and_suggests_it(tmp_path):
    """One shape at 16 rows in the interpreter: dequantize + cuBLAS (and the dense copy alone, a ``part:`` row that
    is never a candidate) and the K-major GEMM are checked against fp32 and timed (wall clock), and the record
    carries a K-major entry for the shape and the new totals."""
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_w4_gemv_probe.py"), "--dry-run", "--shapes", "o",
                    "--rows", "16", "--out", str(out)], capture_output=True, text=True, check=True, timeout=600,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"})
    record = json.loads(out.read_text())
    assert record["dry_run"] and record["device"] == "cpu"
    ran = {r["variant"]: r for r in record["results"]}
    dequant = [v for v in ran if v.startswith("dequant_")]
    # the L2-sized chunk is capped at half the 64 channels: the chunked path runs too
    assert set(dequant) == {"dequant_n32_w4", "dequant_n64_w8", "dequant_n128_w8", "dequant_n32_w4_kf",
                            "dequant_n32_w4_c32"}
    assert all(ran[v]["rel_err"] < 2e-2 and ran[v]["params"]["kernel"] == "dequant_mm" for v in dequant)
    assert any(v.startswith("kmgemm") for v in ran)
    alone = {v for v in ran if v.startswith("part:")}
    assert alone == {"part:dequant_n32_w4", "part:dequant_n64_w8", "part:dequant_n128_w8", "part:dequant_n32_w4_kf"}
    assert all(ran[v]["rel_err"] < 2e-2 for v in alone)
    entry = record["suggested_table"]["w4a16_g128_kmajor"]["64x256"]["16"]
    assert entry["kernel"] in ("dequant_mm", "w4_kmajor_gemm", "w4_gemv")
    assert {"kmajor_gemm_us", "dequant_us"} <= set(record["decode_totals"][0])


def test_a_winning_pdl_preload_gemv_keeps_its_fields_through_the_merge(tmp_path):
    """The probe's 1-row PDL variants (pdl, preload_steps): where one is fastest, its entry carries both fields, the
    merged table hands the dispatch that config, and entries written before the fields existed read back without
    PDL."""
    probe = _script("gpu_w4_gemv_probe")
    pdl = {**GEMV, "pdl": True, "preload_steps": 2}
    results = _results() + [_row(shape, 1, "kmajor_n4_g16_w2_st2_pdl_pre2", 8.0, pdl)
                            for shape in ("qkv", "o", "gate_up", "down")]
    entries = probe.suggested_k_major_entries(results)
    assert entries["4096x4096"]["1"] == {"kernel": "w4_gemv", **pdl}
    record = {"device": DEVICE, "suggested_table": {"w4a16_g128_kmajor": entries}}
    (tmp_path / "probe.json").write_text(json.dumps(record))
    merge = _script("quant_table_merge")
    merged, _ = merge.merge({}, record)
    (tmp_path / "merged.json").write_text(json.dumps(merged))
    found, config = _tuned(str(tmp_path / "merged.json"), (DEVICE,), "w4a16_g128_kmajor", 4096, 14336, 1)
    assert found and config == W4GemvConfig(**pdl) and config.name.endswith("_pdl_pre2")
    assert not config_from_json({"kernel": "w4_gemv", **GEMV}).pdl
    assert [(c.pdl, c.preload_steps) for c in probe.candidates(1) if c.pdl or c.preload_steps] == [
        (True, 0), (True, 1), (True, 2), (True, 8), (False, 8)]


def test_shipped_gluon_entries_fall_back_to_triton_where_gluon_is_missing(monkeypatch):
    """Every K-major GEMM entry of the shipped table still parses on a Triton without Gluon: the same tiles through
    Triton's w_lhs kernel (the shipped H100 table names Gluon kernels from 16 rows)."""
    import tokenmill.kernels.quant_dispatch as dispatch

    table = json.loads(dispatch.SHIPPED_CONFIGS.read_text())
    entries = [e for formats in table.values() if isinstance(formats, dict)  # not an architecture's alias
               for fmt, shapes in formats.items() if fmt.endswith("_kmajor")
               for rows in shapes.values() for e in rows.values() if e["kernel"] == "w4_kmajor_gemm"]
    assert any(e.get("gluon") for e in entries)
    monkeypatch.setattr(dispatch, "HAS_GLUON", False)
    for entry in entries:
        config = config_from_json(entry)
        assert not config.gluon and not config.pipelined
        assert (config.block_m, config.block_n, config.split_k, config.w_lhs) == (
            entry["block_m"], entry["block_n"], entry["split_k"], entry["w_lhs"])


def test_a_new_variant_slower_than_the_k_major_table_leaves_its_entry_alone():
    """A probe of a few families (the ring alone) may measure nothing faster than the table's own K-major entry at a
    shape: no suggestion there, so the merge keeps the table's entry; where the new variant wins it is suggested."""
    probe = _script("gpu_w4_gemv_probe")
    results = _results() + [_row("down", 64, "kmajor_today:table", 45.0, {"kernel": "kmajor_table"}),
                            _row("o", 64, "kmajor_today:table", 60.0, {"kernel": "kmajor_table"})]
    entries = probe.suggested_k_major_entries(results)
    assert "64" not in entries["4096x14336"] and "256" in entries["4096x14336"]  # down: the table's 45 us beat 53
    assert entries["4096x4096"]["64"]["kernel"] == "w4_kmajor_gemm"  # o: 51 us beat the table's 60
