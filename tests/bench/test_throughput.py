"""``bench throughput`` and ``benchmarks/gpu_vs_transformers.py`` on CPU with the tiny random preset."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenmill.bench.throughput import kernel_category, sampling_params
from tokenmill.bench.workloads import fixed_workload, parse_range, range_workload
from tokenmill.cli import main

REPO = Path(__file__).resolve().parents[2]
BENCH_SCRIPT = REPO / "benchmarks" / "gpu_vs_transformers.py"
TINY = ["bench", "throughput", "--random-weights", "tiny-llama", "--device", "cpu", "--num-kv-blocks", "64",
        "--warmup-requests", "0"]


def _run_json(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    assert main([*TINY, *extra, "--output-json", str(out)]) == 0
    return json.loads(out.read_text())


def test_fixed_workload_counts_every_token_and_step(tmp_path: Path) -> None:
    record = _run_json(tmp_path, "--num-prompts", "4", "--input-len", "12", "--output-len", "5", "--ignore-eos")
    results = record["results"]
    assert results["num_requests"] == 4
    assert results["prompt_tokens"] == 48
    assert results["output_tokens"] == 20  # ignore_eos: exactly output-len each
    assert results["output_tok_s"] == pytest.approx(20 / results["elapsed_s"])
    steps = record["per_step"]["steps"]  # [num_seqs, tokens computed, cached tokens read, ms]
    # Every prompt token plus every generated token but the last is computed exactly once.
    assert sum(s[1] for s in steps) == 48 + 4 * (5 - 1)
    assert steps[0][2] == 0  # the first step reads no cached KV
    assert steps[-1] == [4, 4, 4 * (12 + 3), steps[-1][3]]  # last decode step: 4 sequences, 15 cached each
    assert record["roofline"]["num_steps"] == len(steps)
    assert record["roofline"]["num_decode_steps"] == sum(1 for s in steps if s[0] == s[1])
    assert 0 < record["roofline"]["floor_pct"] < 100
    assert record["command"] == shlex.join(sys.argv) and record["device"].startswith("cpu")
    assert record["config"]["random_weights"] == "tiny-llama"
    assert record["jit_compiles_in_timed_run"] == []  # CPU: nothing is JIT-compiled


def test_range_workload_runs(tmp_path: Path) -> None:
    record = _run_json(tmp_path, "--num-prompts", "3", "--input-len-range", "4:9", "--output-len-range", "2:4",
                       "--ignore-eos")
    expected = range_workload(3, (4, 9), (2, 4), 49152, seed=0)
    assert record["results"]["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in expected)
    assert record["results"]["output_tokens"] == sum(r.output_len for r in expected)


def test_sharegpt_dataset_on_hf_model_dir(tmp_path: Path) -> None:
    from tiny_models import make_tiny_model_dir
    from transformers import AutoTokenizer

    model_dir = make_tiny_model_dir(tmp_path / "model")
    prompts = ["Tell me about the ocean and its tides, please.", "Why is the sky blue on a clear summer day?"]
    replies = ["The ocean covers most of the planet and tides follow the moon.",
               "Sunlight scatters off air molecules, blue light the most."]
    conversations = [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]}
                     for p, r in zip(prompts, replies, strict=True)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    out = tmp_path / "result.json"
    argv = ["bench", "throughput", "--model", str(model_dir), "--device", "cpu", "--num-kv-blocks", "64",
            "--warmup-requests", "0", "--dataset", str(path), "--num-prompts", "2", "--ignore-eos",
            "--output-len", "3", "--output-json", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert results["num_requests"] == 2 and results["output_tokens"] == 6
    # Prompts are the human turns tokenized with the model's own tokenizer.
    assert results["prompt_tokens"] == sum(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts)
    # Without --output-len each request asks for as many tokens as its recorded reply has.
    assert main([a for a in argv if a not in ("--output-len", "3")]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["output_tokens"] == sum(len(tokenizer.encode(r, add_special_tokens=False)) for r in replies)


def test_profile_writes_trace_with_step_ranges(tmp_path: Path) -> None:
    record = _run_json(tmp_path, "--num-prompts", "2", "--input-len", "6", "--output-len", "3", "--ignore-eos",
                       "--profile", str(tmp_path / "prof"))
    trace = (tmp_path / "prof" / "trace.json").read_text()
    assert '"step 0"' in trace and '"step 2"' in trace
    assert (tmp_path / "prof" / "summary.txt").is_file()
    assert record["profile"]["profiled_steps"] == 3
    record = _run_json(tmp_path, "--num-prompts", "2", "--input-len", "6", "--output-len", "6", "--ignore-eos",
                       "--profile", str(tmp_path / "window"), "--profile-start", "2", "--profile-steps", "2")
    trace = (tmp_path / "window" / "trace.json").read_text()
    assert '"step 2"' in trace and '"step 3"' in trace
    assert '"step 1"' not in trace and '"step 4"' not in trace
    assert record["profile"]["profiled_steps"] == 2


def test_user_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "throughput", "--device", "cpu"]) == 2
    assert "--random-weights" in capsys.readouterr().err
    assert main([*TINY, "--input-len-range", "5:2", "--output-len-range", "1:2"]) == 2
    assert "LOW <= HIGH" in capsys.readouterr().err


def test_workload_helpers() -> None:
    assert parse_range("100:1024", "--x") == (100, 1024)
    with pytest.raises(ValueError, match="--x must look like LOW:HIGH"):
        parse_range("100-1024", "--x")
    a, b = range_workload(50, (100, 1024), (1, 3), 1000, seed=7), range_workload(50, (100, 1024), (1, 3), 1000, seed=7)
    assert a == b  # seeded
    assert all(100 <= len(r.prompt_token_ids) <= 1024 and 1 <= r.output_len <= 3 for r in a)
    assert all(0 <= t < 1000 for r in a for t in r.prompt_token_ids)
    fixed = fixed_workload(3, 7, 2, 50)
    assert [len(r.prompt_token_ids) for r in fixed] == [7, 7, 7] and {r.output_len for r in fixed} == {2}
    with pytest.raises(ValueError, match="input_len must be >= 1"):
        fixed_workload(1, 0, 1, 50)


def test_kernel_categories() -> None:
    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert kernel_category("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert kernel_category("_paged_decode_attention_kernel") == "attention"
    assert kernel_category("_fused_rms_norm_kernel") == "norm/rope/act"
    assert kernel_category("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") \
        == "copy/index"
    assert kernel_category("void at::native::(anonymous namespace)::cunn_SoftMaxForward") == "softmax"
    assert kernel_category("_gumbel_partial_kernel") == "sampling"  # the fused temperature sampler
    assert kernel_category("something_else") == "other"


def _load_bench_module():
    spec = importlib.util.spec_from_file_location("gpu_vs_transformers", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_benchmark_shares_weights_with_transformers() -> None:
    # The comparison is only fair if both engines run the same numbers: fp32 greedy tokens must match.
    bench = _load_bench_module()
    args = bench.parse_args(["--device", "cpu", "--preset", "tiny-llama", "--workloads", "b"])
    spec = bench.preset_spec("tiny-llama")
    hf = bench.build_hf_model(spec, torch.float32, "cpu", seed=3)
    engine = bench.build_engine("tiny-llama", args, 64, hf)
    prompt = fixed_workload(1, 10, 6, spec.vocab_size, seed=5)[0]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt.prompt_token_ids]), max_new_tokens=6, min_new_tokens=6,
                               do_sample=False, pad_token_id=0)[0, 10:].tolist()
    engine.add_request("check", prompt.prompt_token_ids, sampling_params(6, ignore_eos=True, temperature=0.0))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
    assert tokens == expected


def test_gpu_vs_transformers_quick_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH_SCRIPT), "--quick", "--preset", "tiny-llama", "--device", "cpu", "--out", str(out),
         "--profile", str(tmp_path / "prof")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["device"].startswith("cpu") and "--quick" in record["command"]
    engines = {(r["workload"], r["engine"]) for r in record["rows"]}
    assert engines == {(w, e) for w in "abc" for e in ("tokenmill", "transformers")}
    for row in record["rows"]:
        assert row["output_tokens"] == record["workloads"][row["workload"]]["output_tokens"]
        assert row["output_tok_s"] > 0 and row["floor_s"] > 0
    c_hf = next(r for r in record["rows"] if r["workload"] == "c" and r["engine"] == "transformers")
    assert any(n.startswith("ESTIMATED") for n in c_hf["notes"])  # one of two static batches timed
    assert [s["batch"] for s in record["decode_sweep"]] == [1, 2, 4]
    assert "(d) decode step vs bandwidth roofline" in proc.stdout
    assert (tmp_path / "prof" / "a" / "trace.json").is_file()  # profiled rerun, separate from the timed one
    profiled = next(r for r in record["rows"] if r["workload"] == "b" and r["engine"] == "tokenmill")["profile"]
    assert profiled["profiled_steps"] == 16  # all of (b)'s steps fit in the 32-step window


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_profiles_kernels_by_category(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    argv = ["bench", "throughput", "--random-weights", "qwen3-0.6b", "--device", "cuda", "--max-model-len", "256",
            "--num-prompts", "8", "--input-len", "64", "--output-len", "16", "--ignore-eos",
            "--profile", str(tmp_path / "prof"), "--output-json", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["results"]["output_tokens"] == 8 * 16
    assert not record["device"].startswith("cpu")  # the CUDA device's name
    profile = record["profile"]
    assert profile["gpu_busy_s"] > 0 and "gemm" in profile["gpu_time_s_by_category"]
    assert 0 < record["roofline"]["decode_roofline_pct"] < 100


def test_gpu_tensor_parallel_quick_on_cpu(tmp_path: Path) -> None:
    """The tensor-parallel benchmark end to end with gloo ranks: one record per run, the N-rank ceilings, and the
    scaling entry against the smallest size."""
    out = tmp_path / "tp.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_tensor_parallel.py"), "--runs", "tiny-llama:1,tiny-llama:2",
         "--quick", "--device", "cpu", "--decode-batches", "1,2", "--max-num-batched-tokens", "64", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert [(r["preset"], r["tensor_parallel_size"]) for r in record["runs"]] == [("tiny-llama", 1), ("tiny-llama", 2)]
    one, two = record["runs"]
    assert two["ceilings"]["bandwidth_gbps"] == pytest.approx(2 * one["ceilings"]["bandwidth_gbps"])
    for run in record["runs"]:
        assert set(run["workloads"]) == {"a", "b"} and all(w["output_tok_s"] > 0 for w in run["workloads"].values())
        assert [s["batch"] for s in run["decode_sweep"]] == [1, 2]
    (scale,) = record["scaling"]
    assert (scale["from_tp"], scale["to_tp"]) == (1, 2)
    speedup = two["workloads"]["b"]["output_tok_s"] / one["workloads"]["b"]["output_tok_s"]
    assert scale["b_speedup"] == pytest.approx(speedup) and scale["b_efficiency"] == pytest.approx(speedup / 2)
    assert "scaling tiny-llama TP 1 → 2" in proc.stdout


def test_roofline_counts_the_bytes_a_quantized_engine_stores() -> None:
    """``stored_bytes``: a dense engine's parameters give the spec's formula; rtn4 at load stores fewer (codes and
    scales), and an FP8 cache one byte a value."""
    from tokenmill.bench.roofline import kv_bytes_per_token, weight_bytes
    from tokenmill.bench.throughput import stored_bytes
    from tokenmill.engine.llm_engine import LLMEngine

    kwargs = dict(random_weights="tiny-llama", device="cpu", num_kv_blocks=16, stream_outputs=False)
    dense = LLMEngine.from_kwargs(**kwargs)
    spec = dense.model.spec
    assert stored_bytes(dense).weights == weight_bytes(spec, dense.config.model.torch_dtype.itemsize)
    assert stored_bytes(dense).kv_element == dense.config.model.torch_dtype.itemsize
    quantized = LLMEngine.from_kwargs(**kwargs, quantization="rtn4", kv_cache_dtype="fp8")
    stored = stored_bytes(quantized)
    assert stored.weights < weight_bytes(spec, quantized.config.model.torch_dtype.itemsize) and stored.kv_element == 1
    assert kv_bytes_per_token(spec, stored.kv_element) * 4 == kv_bytes_per_token(spec, 4)
    for engine in (dense, quantized):
        engine.shutdown()
