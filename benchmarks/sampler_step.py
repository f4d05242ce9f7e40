"""Micro-benchmark of one Sampler step: milliseconds per call for batch sizes and sampling mixes.

    python benchmarks/sampler_step.py --device cuda --out $OUT/sampler.json

"temperature" takes the fused Gumbel-max kernel on CUDA; "temperature_torch" is the same rows forced
through the torch path (softmax + exponential race), measured in the same run for the ratio.
"""

from __future__ import annotations

import argparse
import random
import time
from array import array
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
from gpu_record import write_record

from tokenmill.sampling import Sampler, SamplingRow, make_generator
from tokenmill.sampling_params import SamplingParams


def rows_for(mix: str, batch: int, vocab: int, device: torch.device, rng: random.Random) -> list[SamplingRow]:
    rows = []
    for i in range(batch):
        params = {
            "greedy": dict(temperature=0.0),
            "temperature": dict(temperature=0.8),
            "temperature_torch": dict(temperature=0.8),
            "top_k_top_p": dict(temperature=0.8, top_k=50, top_p=0.9) if i % 2 else dict(temperature=0.8),
            "top_p_only": dict(temperature=0.8, top_p=0.9),  # no top_k: the full-vocabulary sort
            "penalties": dict(
                temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1
            ),
            "seeded": dict(temperature=0.8, top_p=0.95, seed=i),
            "logprobs": dict(temperature=0.8, logprobs=5),
            "penalties_array": dict(  # the same, with array('q') histories
                temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1
            ),
            "everything": dict(
                temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=i, logprobs=5
            ),
        }[mix]
        sp = SamplingParams(**params)
        prompt = [rng.randrange(vocab) for _ in range(512)]
        output = [rng.randrange(vocab) for _ in range(256)]
        if mix == "penalties_array":
            prompt, output = array("q", prompt), array("q", output)
        rows.append(SamplingRow(sp, prompt, output, make_generator(sp.seed, device)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the timings as JSON here")
    parser.add_argument(
        "--profile", default="", help="a mix to profile at the largest batch (torch.profiler)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    sampler = Sampler(eos_token_ids={0})
    rng = random.Random(0)
    print(f"device={device} vocab={args.vocab} torch={torch.__version__}")
    timings = []
    for batch in (int(b) for b in args.batches.split(",")):
        logits = torch.randn(batch, args.vocab, device=device) * 3
        for mix in (
            "greedy",
            "temperature",
            "temperature_torch",
            "top_k_top_p",
            "top_p_only",
            "penalties",
            "penalties_array",
            "seeded",
            "logprobs",
            "everything",
        ):
            rows = rows_for(mix, batch, args.vocab, device, rng)
            forced = (mock.patch("tokenmill.sampling.sampler.fused_sampling_applies", return_value=False)
                      if mix == "temperature_torch" else nullcontext())
            with forced:
                for _ in range(3):
                    sampler(logits, rows)
                start = time.perf_counter()
                for _ in range(args.iters):
                    sampler(logits, rows)  # ends with .tolist(): one host sync per call
                ms = (time.perf_counter() - start) / args.iters * 1e3
            timings.append({"batch": batch, "mix": mix, "ms_per_step": ms})
            print(f"batch={batch:4d} {mix:17s} {ms:8.3f} ms/step")
    if args.out:
        write_record(Path(args.out), "sampler_step", device=torch.cuda.get_device_name() if device.type == "cuda"
                     else "cpu", vocab=args.vocab, timings=timings)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        rows = rows_for(args.profile, batch, args.vocab, device, rng)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                sampler(logits, rows)
        sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=25))


if __name__ == "__main__":
    main()
