"""Write chat prompts the teacher writes itself (``teacher_data.self_prompts``, Magpie-style), one per line, for
``tokenmill distill --target draft --teacher-generated N --prompts FILE``. Deterministic for a seed on one machine
(the engine's seeded sampling); several processes with seeds far apart split the work on a multi-core box.

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/distill_self_prompts.py --count 1000 --seed 0 --out a.txt
    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/distill_self_prompts.py --count 1000 --seed 100000 --out b.txt
    cat a.txt b.txt > self_prompts.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tokenmill.distill.teacher_data import self_prompts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    prompts = self_prompts(args.teacher, args.count, args.seed, args.temperature, args.max_tokens)
    Path(args.out).write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    print(f"wrote {len(prompts)} prompts to {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
