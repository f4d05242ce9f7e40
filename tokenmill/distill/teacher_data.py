"""Sequence-level KD data for ``--target draft``: the teacher's own answers to chat prompts, generated with tokenmill's
engine (batched, greedy or sampled) and cached as JSONL, so the student learns the text it will be asked to draft.

A speculative draft only ever predicts after a prefix the target produced, so its training text should be the
target's continuations of the prompts it serves (DistillSpec, Zhou et al. 2023), not a corpus of other text.
``llm.DraftTask`` trains on these sequences with the loss masked to the answer's tokens.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.distill.data import DATA_DIR, HELDOUT_FRACTION

# Written for tokenmill (project licence): 25 chat templates x 118 topics, none of them the evaluation prompts of
# benchmarks/distill_cpu.py or benchmarks/spec_decode_cpu.py (tests check that).
TEMPLATES = DATA_DIR / "chat_templates.txt"
TOPICS = DATA_DIR / "chat_topics.txt"
CACHE_FILE = "teacher_generated.jsonl"


def bundled_prompts(seed: int = 0) -> list[str]:
    """Every template x topic prompt, in a seeded order (the first N are a varied sample). The order does not follow
    ``--seed``: a cache of answers stays valid for runs with other training seeds."""
    templates = [t for t in TEMPLATES.read_text().splitlines() if t.strip()]
    topics = [t for t in TOPICS.read_text().splitlines() if t.strip()]
    prompts = [template.format(topic=topic) for template in templates for topic in topics]
    random.Random(seed).shuffle(prompts)
    return prompts


def read_prompts(path: str | None) -> list[str]:
    """One prompt per line of ``path``, or the bundled ones."""
    if path is None:
        return bundled_prompts()
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"--prompts file {path!r} does not exist")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts file {path!r} holds no prompts (one per line)")
    return prompts


@dataclass(frozen=True)
class GenerationSpec:
    """How the teacher answered: part of every cached record, so a cache made otherwise is not reused silently."""

    max_tokens: int
    temperature: float  # 0: greedy
    seed: int  # of sampled answers (greedy ones do not depend on it)

    def matches(self, record: dict) -> bool:
        same_seed = self.temperature == 0 or record.get("seed") == self.seed
        return (record.get("max_tokens"), record.get("temperature")) == (self.max_tokens, self.temperature) and same_seed


def generate_answers(teacher: str | None, prompts: list[str], spec: GenerationSpec,
                     batch_size: int = 32) -> Iterator[list[dict]]:
    """The teacher's answer to each prompt (chat template applied when the tokenizer has one), in prompt order, one
    batch of ``{"prompt", "prompt_ids", "output_ids", ...spec}`` records at a time. Runs tokenmill's own engine
    (fp32)."""
    from tokenmill import LLM, SamplingParams

    llm = LLM(teacher, dtype="float32", max_num_seqs=batch_size)
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("the teacher has no tokenizer; teacher-generated data needs one to read the prompts")
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [_prompt_ids(tokenizer, p) for p in chunk]
        params = [SamplingParams(temperature=spec.temperature, max_tokens=spec.max_tokens,
                                 seed=None if spec.temperature == 0 else spec.seed + start + i)
                  for i in range(len(chunk))]
        outputs = llm.generate(ids, params, use_tqdm=False)
        yield [{"prompt": prompt, "prompt_ids": prompt_ids, "output_ids": list(output.outputs[0].token_ids),
                "max_tokens": spec.max_tokens, "temperature": spec.temperature, "seed": spec.seed}
               for prompt, prompt_ids, output in zip(chunk, ids, outputs, strict=True)]


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(prompt)


def keep_self_prompt(text: str, finish_reason: str | None, seen: set[str]) -> bool:
    """A sampled user turn worth answering: closed by the model, 4-60 words, mostly ASCII (the chat prompts a
    draft for this model serves), not a repeat (case-insensitive) of one in ``seen``."""
    ascii_share = sum(c.isascii() for c in text) / max(1, len(text))
    return (finish_reason == "stop" and 4 <= len(text.split()) <= 60 and ascii_share > 0.98
            and text.lower() not in seen)


# Openings of user turns for ``self_prompts(openings=...)``: the kinds of chat request a draft serves (stories, poems,
# tips, lists, explanations, how-tos, comparisons, plans, emails), each completed by the teacher; "" leaves the turn to
# the teacher alone (its own requests are mostly "Can you help me ..."). Written for tokenmill (project licence).
SELF_PROMPT_OPENINGS = (
    "", "", "", "Write a short story about", "Write a story for children about", "Tell me a story about",
    "Write a poem about", "Write a haiku about", "Give me tips for", "What are some tips for",
    "What are three ways to", "List five", "Make a list of", "Explain", "Explain to a beginner how",
    "Explain in simple terms why", "Why do", "Why is", "How do I", "How can I", "How does", "What is",
    "What is the difference between", "Describe", "Summarize", "Can you suggest", "What should I know about",
    "Compare", "Give me a recipe for", "Write a short email", "Write a paragraph about", "Help me plan",
    "What are the benefits of", "Give me an example of", "Teach me",
)


def self_prompts(teacher: str | None, count: int, seed: int = 0, temperature: float = 0.9,
                 max_tokens: int = 48, batch_size: int = 32, log=print, engine_args: dict | None = None,
                 openings: tuple[str, ...] | list[str] = ("",), llm=None, deadline: float | None = None) -> list[str]:
    """``count`` chat prompts the teacher writes itself: it samples a user turn after its chat template's opening
    of one (system turn, then the user header), as Magpie (Xu et al. 2024) does. An instruct model's own idea of
    what users ask covers more forms than a fixed set of templates, so a draft trained on its answers to them
    meets fewer unseen openings. Kept: turns the model closed itself (not cut at ``max_tokens``), of 4-60 words,
    mostly ASCII, not seen before; the seeds go on until ``count`` are kept (at most 4x as many tries).
    ``engine_args``: more ``LLM`` arguments (e.g. a GPU memory share). ``openings``: try ``i`` starts the user turn
    with ``openings[(seed + i) % len(openings)]`` (kept in the prompt) and the teacher completes it, which steers the
    kinds of request (``SELF_PROMPT_OPENINGS``); the default ``("",)`` is plain Magpie. ``llm``: an engine already
    running the teacher (``teacher`` and ``engine_args`` unused); ``deadline`` (``time.time()``): no batch starts
    after it."""
    from tokenmill import LLM, SamplingParams

    if count < 1:
        raise ValueError(f"self_prompts needs count >= 1; got {count}")
    if llm is None:
        llm = LLM(teacher, dtype="float32", **{"max_num_seqs": batch_size, **(engine_args or {})})
    tokenizer = llm.get_tokenizer()
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError("the teacher has no chat template; it cannot write its own user turns")
    marker = "\u2063prompt\u2063"  # a placeholder no template contains; the text before it opens a user turn
    rendered = tokenizer.render_chat([{"role": "user", "content": marker}], add_generation_prompt=False)
    header = rendered[: rendered.index(marker)]
    if not openings:
        raise ValueError("self_prompts needs at least one opening ('' for none)")
    starts = [tokenizer.encode(header + opening, add_special_tokens=False) for opening in openings]
    kept: list[str] = []
    seen: set[str] = set()
    tried = 0
    while len(kept) < count and tried < 4 * count and (deadline is None or time.time() < deadline):
        params = [SamplingParams(temperature=temperature, top_p=0.95, max_tokens=max_tokens, seed=seed + tried + i)
                  for i in range(batch_size)]
        which = [(seed + tried + i) % len(openings) for i in range(batch_size)]
        tried += batch_size
        outputs = llm.generate([starts[w] for w in which], params, use_tqdm=False)
        for w, output in zip(which, outputs, strict=True):
            completion = output.outputs[0]
            text = " ".join((openings[w] + tokenizer.decode(completion.token_ids, skip_special_tokens=True)).split())
            if keep_self_prompt(text, completion.finish_reason, seen):
                seen.add(text.lower())
                kept.append(text)
        log(f"self prompts: kept {len(kept)} of {tried} tries")
    return kept[:count]


def load_or_generate(cache: Path, teacher: str | None, prompts: list[str], spec: GenerationSpec,
                     log=print) -> list[dict]:
    """The first ``len(prompts)`` records of ``cache``, generating the missing ones and appending each batch as it
    finishes (an interrupted run keeps what it made). A cache written with other generation settings or for other
    prompts is refused, not mixed in."""
    records = []
    if cache.is_file():
        records = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
        for index, record in enumerate(records[: len(prompts)]):
            if not spec.matches(record) or record.get("prompt") != prompts[index]:
                raise ValueError(f"{cache} record {index} was generated for another prompt or with other settings "
                                 f"(max_tokens/temperature/seed); delete it or pass another --teacher-generated-cache")
    missing = prompts[len(records):]
    if missing:
        log(f"generating {len(missing)} teacher answers (max {spec.max_tokens} tokens) into {cache}")
        cache.parent.mkdir(parents=True, exist_ok=True)
        for batch in generate_answers(teacher, missing, spec):
            with cache.open("a") as file:
                file.writelines(json.dumps(record) + "\n" for record in batch)
            records += batch
            log(f"teacher answered {len(records)}/{len(prompts)} prompts")
    return records[: len(prompts)]


def teacher_answers(config, log=print) -> tuple[list[dict], list[dict], str]:
    """(training, held-out, description): the teacher's answers to the first ``config.teacher_generated`` prompts
    (``--prompts`` or the bundled ones), read from ``--teacher-generated-cache`` (default OUT/teacher_generated.jsonl)
    and generated where missing; the last tenth (at least one) is held out. ``--target draft`` and ``--target eagle``
    both train on these."""
    prompts = read_prompts(config.prompts)
    if len(prompts) < config.teacher_generated:
        raise ValueError(f"--teacher-generated {config.teacher_generated} asks for more prompts than the "
                         f"{len(prompts)} available; lower it or give a longer --prompts file")
    cache = Path(config.teacher_generated_cache or config.out_dir / CACHE_FILE).expanduser()
    spec = GenerationSpec(config.teacher_max_tokens, config.teacher_temperature, config.seed)
    records = load_or_generate(cache, config.teacher, prompts[: config.teacher_generated], spec, log=log)
    held = max(1, round(len(records) * HELDOUT_FRACTION))
    source = (f"teacher answers to {config.teacher_generated} prompts ({config.prompts or 'bundled templates x topics'}"
              f"; last {held} held out), {cache}")
    return records[:-held], records[-held:], source


def answer_batch(records: list[dict], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n, L], loss mask [n, L]) with L <= seq_len: prompt + answer, right-padded. mask[i, j] marks logits
    at j that predict an answer token (j + 1 inside the answer), the only predictions a draft is asked for."""
    length = min(seq_len, max(len(r["prompt_ids"]) + len(r["output_ids"]) for r in records))
    ids = torch.full((len(records), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(records), length), dtype=torch.bool)
    for row, record in enumerate(records):
        sequence = (record["prompt_ids"] + record["output_ids"])[:length]
        ids[row, : len(sequence)] = torch.tensor(sequence)
        first_answer = len(record["prompt_ids"])
        mask[row, max(0, first_answer - 1) : len(sequence) - 1] = True
    return ids, mask
