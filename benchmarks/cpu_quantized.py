"""CPU decode of the embedded SmolLM2 (Q4_1 GGUF): today's fp32 path (linears dequantized at load) against the
linears kept 4-bit (bf16 activations through PyTorch's int4 weight-only CPU kernel), batch 1 and batch 16,
greedy, same prompts, one process, repeats interleaved. Also the weight memory of each (the tied Q8_0 embedding
stays dense in both; the bf16 path also holds its 8-bit codes for a one-row LM head: quantization/gguf_embedding.py).
Both paths take the CPU decode attention (attention/cpu_decode.py), so the fp32 row is today's fp32 path, not the
one measured before it (23.1 tok/s at batch 1 on 2026-12-06, README).
Where ``llama_cpp`` (llama-cpp-python) imports, llama.cpp decodes the same file at batch 1 in the same run, with
as many threads as torch uses (the issue's second target: >= 50% of llama.cpp).

Usage: .venv/bin/python benchmarks/cpu_quantized.py [--max-tokens 64] [--repeats 3] [--threads N]
Prints a table and writes benchmarks/results/cpu_quantized_<date>.json (date, machine, command, medians). Each
run also gives the decode steps' rate alone (a one-token run's time, prompt + first token, taken off): PyTorch's int4
CPU kernel costs a GEMV per row, so a prompt's prefill is the 4-bit path's slow part.
The issue's target (batch-1 decode >= 2x the fp32 path) is reported, not asserted; on a shared machine the
load average is recorded beside the numbers (at the start and the end). Run it on an idle machine: with as many
torch threads as cores, a core taken by another process stalls every parallel region of a step (steps measured
20-50x slower on this 2-core box while another job ran): libgomp's waiting threads spin, so start the run with
``OMP_WAIT_POLICY=PASSIVE`` on a shared box (2 threads under load 3-5 here: 1.1 tok/s spinning, 20-35 passive), or
use ``--threads 1``. ``--with-module-path`` adds the 4-bit weights run through the modules (the flat CPU decode
stack of quantization/cpu_decode_stack.py off), to see what that stack gives in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_record import write_record  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402

VARIANTS = {"fp32 dequantized (today)": {"dtype": "float32"}, "bf16 int4 packed": {"dtype": "bfloat16"}}
MODULE_PATH = "bf16 int4, module path"  # --with-module-path: quantization/cpu_decode_stack.py turned off
PROMPTS = ["Write a short story about the ocean.", "Explain prime numbers to a child.", "Describe a train journey.",
           "What is bread made of?"]


def weight_bytes(llm: LLM) -> int:
    model = llm.engine.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():  # the CPU kernel's own copy of a packed weight
        cpu = getattr(module, "wna16_cpu", None)
        if cpu is not None:
            total += sum(t.numel() * t.element_size() for t in (cpu.weight, cpu.scales, cpu.offsets) if t is not None)
    q8 = getattr(model.lm_head.weight, "q8_cpu", None)  # the Q8_0 table's 8-bit copy (quantization/gguf_embedding.py)
    if q8 is not None:
        tensors = (q8.codes, q8.scales, q8.kernel.weight, q8.kernel.scales, q8.kernel.offsets)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def generate_s(llm: LLM, prompt_ids: list[list[int]], max_tokens: int) -> float:
    """Seconds to generate ``max_tokens`` greedy tokens for every prompt (prompt evaluation included)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
    start = time.perf_counter()
    llm.generate(prompt_ids, params, use_tqdm=False)
    return time.perf_counter() - start


def decode_tok_s(llm: LLM, prompt_ids: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """(tokens/s with the prompt included, tokens/s of the decode steps alone): the second takes the time of a
    one-token run (prompt + first token) off a ``max_tokens`` run."""
    first = generate_s(llm, prompt_ids, 1)
    total = generate_s(llm, prompt_ids, max_tokens)
    return len(prompt_ids) * max_tokens / total, len(prompt_ids) * (max_tokens - 1) / max(total - first, 1e-9)


def llama_cpp_model(threads: int):
    """llama.cpp (llama-cpp-python) on the embedded GGUF; None when it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from tokenmill.model.loader import embedded_model_path

    return Llama(model_path=str(embedded_model_path()), n_ctx=512, n_threads=threads, n_batch=512, verbose=False)


def llama_cpp_tok_s(model, prompt_ids: list[int], max_tokens: int) -> float:
    """Greedy batch-1 tokens/s of llama.cpp (prompt evaluation included, as in ``decode_tok_s``)."""
    start, count = time.perf_counter(), 0
    for _ in model.generate(prompt_ids, temp=0.0, top_k=1, reset=True):  # runs until we stop it (no EOS stop)
        count += 1
        if count == max_tokens:
            break
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) threads; default: torch's")
    parser.add_argument("--with-module-path", action="store_true",
                        help="also the 4-bit weights through the modules (the flat CPU decode stack turned off)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    batches = [int(b) for b in args.batches.split(",")]
    llms = {name: LLM(None, device="cpu", max_model_len=512, **kwargs) for name, kwargs in VARIANTS.items()}
    if args.with_module_path:
        llms[MODULE_PATH] = LLM(None, device="cpu", max_model_len=512, dtype="bfloat16")
        llms[MODULE_PATH].engine.model.model.flat_cpu_decode = False
    tokenizer = next(iter(llms.values())).get_tokenizer()
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
           for p in PROMPTS]
    llama = llama_cpp_model(torch.get_num_threads())
    runs: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in llms}
    decode_runs: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in llms}
    llama_cpp_runs: list[float] = []
    for llm in llms.values():
        generate_s(llm, ids[:1], 4)  # warm-up
    # Repeats interleave the variants (and llama.cpp), so a change in the machine's load hits them alike.
    for _ in range(args.repeats):
        for batch in batches:
            prompt_ids = [ids[i % len(ids)] for i in range(batch)]
            for name, llm in llms.items():
                with_prompt, decode_only = decode_tok_s(llm, prompt_ids, args.max_tokens)
                runs[name][batch].append(with_prompt)
                decode_runs[name][batch].append(decode_only)
        if llama is not None and 1 in batches:
            llama_cpp_runs.append(llama_cpp_tok_s(llama, ids[0], args.max_tokens))
    results: dict[str, dict] = {}
    for name, llm in llms.items():
        row = results[name] = {"weight_mib": weight_bytes(llm) / 2**20, "tok_s": {}}
        for batch in batches:
            row["tok_s"][batch] = {"median": statistics.median(runs[name][batch]), "runs": runs[name][batch],
                                   "decode_only_median": statistics.median(decode_runs[name][batch]),
                                   "decode_only_runs": decode_runs[name][batch]}
            print(f"{name:26s} batch {batch:3d}: {row['tok_s'][batch]['median']:8.1f} tok/s  "
                  f"(runs {[round(r, 1) for r in runs[name][batch]]}); decode steps alone "
                  f"{row['tok_s'][batch]['decode_only_median']:.1f}")
    llama_cpp = {"median": statistics.median(llama_cpp_runs), "runs": llama_cpp_runs} if llama_cpp_runs else None
    if llama_cpp is not None:
        print(f"{'llama.cpp (same file)':26s} batch   1: {llama_cpp['median']:8.1f} tok/s  "
              f"(runs {[round(r, 1) for r in llama_cpp_runs]})")
    base, packed = results["fp32 dequantized (today)"], results["bf16 int4 packed"]
    ratios = {b: packed["tok_s"][b]["median"] / base["tok_s"][b]["median"] for b in batches}
    print(f"\n{'variant':26s} {'weights MiB':>11s} " + " ".join(f"{'b' + str(b) + ' tok/s':>11s}" for b in batches))
    for name, row in results.items():
        print(f"{name:26s} {row['weight_mib']:11.1f} " + " ".join(f"{row['tok_s'][b]['median']:11.1f}" for b in batches))
    print("int4 / fp32: " + ", ".join(f"batch {b} {r:.2f}x" for b, r in ratios.items()))
    vs_llama_cpp = (None if llama_cpp is None or 1 not in batches
                    else packed["tok_s"][1]["median"] / llama_cpp["median"])
    if vs_llama_cpp is not None:
        print(f"int4 packed / llama.cpp at batch 1: {vs_llama_cpp:.2f}")
    out = Path(args.out or Path(__file__).parent / "results" / f"cpu_quantized_{dt.date.today().isoformat()}.json")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp's default spinning)"),
               "load_average_1m_at_start": load_at_start, "load_average_1m_at_end": os.getloadavg()[0]}
    write_record(out, "cpu_quantized", machine=machine, model="SmolLM2-135M-Instruct.Q4_1.gguf (embedded)",
                 max_tokens=args.max_tokens, variants=results, speedup_int4_over_fp32=ratios,
                 llama_cpp_batch1=llama_cpp, int4_packed_over_llama_cpp_batch1=vs_llama_cpp)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
