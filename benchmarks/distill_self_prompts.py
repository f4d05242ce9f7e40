"""Write chat prompts the teacher writes itself (``teacher_data.self_prompts``, Magpie-style), one per line, for
``tokenmill distill --target draft --teacher-generated N --prompts FILE``. Deterministic for a seed on one machine
(the engine's seeded sampling); several processes with seeds far apart split the work on a multi-core box.
``--openings kinds`` starts each user turn with one of ``teacher_data.SELF_PROMPT_OPENINGS`` (stories, tips, lists,
explanations, how-tos, ...) for the teacher to complete; ``none`` is plain Magpie (mostly "Can you help me ...").
Prompts too close to the evaluation prompts (distill_cpu.py's and spec_decode_cpu.py's chat prompts) are dropped
and counted: ``near_benchmark``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/distill_self_prompts.py --count 1000 --seed 0 --out a.txt
    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/distill_self_prompts.py --count 1000 --seed 100000 --out b.txt
    cat a.txt b.txt > self_prompts.txt
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_cpu import CHAT_PROMPTS  # noqa: E402

from tokenmill.distill.teacher_data import SELF_PROMPT_OPENINGS, self_prompts  # noqa: E402

# spec_decode_cpu.prompts()["chat"], spelled out: that function reads the quote passage too.
ENGINE_CHAT_PROMPTS = ["Write a short story about a lighthouse keeper.", "What are three tips for learning to cook?",
                       "Explain why the sky is blue to a child."]
STOPWORDS = frozenset("a an the of to for in on at is are what why how do i me my you your and or about with "
                      "two three short give write explain make".split())


@functools.lru_cache(maxsize=4096)  # the evaluation prompts' words are looked up once per candidate
def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS)


@functools.lru_cache(maxsize=4096)
def _flat(text: str) -> str:
    return " ".join(text.lower().split())


def near_benchmark(prompt: str, benchmarks: list[str]) -> str | None:
    """The evaluation prompt ``prompt`` is too close to, if any: the same text (case and spacing aside), or all of
    an evaluation prompt's content words (e.g. "lighthouse keeper", "sky blue child") in it."""
    flat, mine = _flat(prompt), content_words(prompt)
    for bench in benchmarks:
        words = content_words(bench)
        if flat == _flat(bench) or (words and words <= mine):
            return bench
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--openings", choices=["none", "kinds"], default="none")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    openings = SELF_PROMPT_OPENINGS if args.openings == "kinds" else ("",)
    written = self_prompts(args.teacher, args.count, args.seed, args.temperature, args.max_tokens, openings=openings)
    benchmarks = CHAT_PROMPTS + ENGINE_CHAT_PROMPTS
    dropped = [(p, b) for p in written if (b := near_benchmark(p, benchmarks))]
    for prompt, bench in dropped:
        print(f"dropped (near {bench!r}): {prompt}")
    kept = [p for p in written if not near_benchmark(p, benchmarks)]
    Path(args.out).write_text("".join(p + "\n" for p in kept), encoding="utf-8")
    print(f"wrote {len(kept)} prompts to {args.out} ({len(dropped)} dropped as near an evaluation prompt) in "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
