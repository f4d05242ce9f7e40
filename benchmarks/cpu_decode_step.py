"""CPU time of one batch-1 decode step of the embedded SmolLM2 kept 4-bit (bf16 activations), by part: the decoder
stack through the flat CPU decode stack (quantization/cpu_decode_stack.py) and through the modules, the flat stack
with its matmuls answered from a cache (what is left is the per-op cost: norms, rotary, cache write, SDPA, adds),
and the LM head (the Q8_0 table's one-row head with its fp32 refinement).

Process CPU time (``time.process_time``), not wall time: on this shared 2-core box another job's load stretches
wall time by 1.5-2x while the CPU time of a one-thread step moves little, so it measures the work a step does;
wall time is recorded beside it. Repeats interleave the variants. One sequence of ``--context`` tokens, the step's
metadata built as the runner builds it, the engine's KV cache. One thread by default (CPU time of several threads
counts their waiting too).

Usage: .venv/bin/python benchmarks/cpu_decode_step.py [--context 100] [--repeats 6] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_record import write_record  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.attention.metadata import HostLayout  # noqa: E402
from tokenmill.quantization import cpu_decode_stack  # noqa: E402
from tokenmill.transfer import upload_arrays  # noqa: E402


def timed(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.process_time() - cpu) / calls * 1e3, (time.perf_counter() - wall) / calls * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    llm = LLM(None, device="cpu", max_model_len=512, dtype="bfloat16")
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)  # builds the kernels' weights
    model, caches = llm.engine.model, llm.engine.runner.kv_caches
    block_size = caches.spec.block_size
    table = list(range(-(-args.context // block_size)))
    ids, positions = torch.tensor([5]), torch.tensor([args.context - 1])
    hidden = torch.zeros(1, model.spec.hidden_size, dtype=torch.bfloat16)

    def step(flat: bool) -> Callable[[], object]:
        def run() -> object:
            model.model.flat_cpu_decode = flat
            meta = model.attn_backend.prepare_metadata(
                *_layout(args.context, table, block_size))
            with torch.inference_mode():
                return model(ids, positions, caches, meta)
        return run

    def logits() -> object:
        with torch.inference_mode():
            return model.compute_logits(hidden)

    matmul = cpu_decode_stack.FlatLinear.__call__
    answers: dict[int, torch.Tensor] = {}

    def cached_matmul(self: cpu_decode_stack.FlatLinear, x: torch.Tensor) -> torch.Tensor:
        if id(self) not in answers:
            answers[id(self)] = matmul(self, x)
        return answers[id(self)]

    def without_matmuls() -> object:
        cpu_decode_stack.FlatLinear.__call__ = cached_matmul
        try:
            return step(True)()
        finally:
            cpu_decode_stack.FlatLinear.__call__ = matmul

    parts = {"decoder, flat stack": step(True), "decoder, module path": step(False),
             "flat stack without its matmuls": without_matmuls, "LM head (Q8_0, refined)": logits}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, fn in parts.items():
            for _ in range(3):
                fn()
            runs[name].append(timed(fn, args.calls))
    results = {name: {"cpu_ms": statistics.median(r[0] for r in rs), "wall_ms": statistics.median(r[1] for r in rs),
                      "cpu_ms_runs": [r[0] for r in rs]} for name, rs in runs.items()}
    for name, row in results.items():
        print(f"{name:32s} CPU {row['cpu_ms']:7.2f} ms  wall {row['wall_ms']:7.2f} ms  "
              f"(CPU runs {[round(r, 1) for r in row['cpu_ms_runs']]})")
    out = Path(args.out or Path(__file__).parent / "results" / f"cpu_decode_step_{dt.date.today().isoformat()}.json")
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "load_average_1m_at_start": load_at_start, "load_average_1m_at_end": os.getloadavg()[0]}
    write_record(out, "cpu_decode_step", machine=machine, model="SmolLM2-135M-Instruct.Q4_1.gguf (embedded), bf16",
                 context=args.context, calls_per_repeat=args.calls, parts=results)
    print(f"wrote {out}")
    return 0


def _layout(context: int, table: list[int], block_size: int) -> tuple:
    """The runner's (HostLayout, uploaded arrays) for one sequence decoding its ``context``-th token."""
    layout = HostLayout.build([1], [context], [table], block_size)
    (slots,) = upload_arrays([layout.slot_mapping], "cpu")
    return layout, [slots, *upload_arrays([layout.query_start_loc, layout.seq_lens, layout.block_tables], "cpu")]


if __name__ == "__main__":
    sys.exit(main())
