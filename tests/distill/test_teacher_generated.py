"""`tokenmill distill --target draft --teacher-generated N` on a tiny teacher (CPU, seconds): the teacher's answers are
its greedy continuations (as transformers computes them), cached and reused; training on them lowers the held-out
KL on answers; the loss sees answer tokens only; bad combinations fail before anything runs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import test_distill
import torch
from tiny_models import transformers_greedy

from tokenmill.distill import teacher_data
from tokenmill.distill.config import DistillConfig
from tokenmill.distill.run import distill
from tokenmill.distill.teacher_data import CACHE_FILE, answer_batch, bundled_prompts

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# test_distill's fixtures: the tiny 4-layer Llama teacher and one torch thread
llama_teacher, one_thread = test_distill.llama_teacher, test_distill.one_thread


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(bundled_prompts(0)[:12]) + "\n")
    return path


def config(teacher_dir: Path, prompts: Path, out: Path, **overrides) -> DistillConfig:
    fields = dict(target="draft", teacher=str(teacher_dir), prompts=str(prompts), teacher_generated=10,
                  teacher_max_tokens=12, out=str(out), student_layers=2, steps=15, batch_size=3, seq_len=64,
                  warmup_steps=2, lr=3e-3, checkpoint_every=0, progress=False)
    return DistillConfig(**{**fields, **overrides})


def _evaluation_prompts() -> list[str]:
    """The chat prompts the benchmarks measure acceptance on (quoted strings in their prompt lists)."""
    found = []
    for name, anchor in (("distill_cpu.py", "CHAT_PROMPTS = ["), ("spec_decode_cpu.py", '"chat": [')):
        text = (BENCHMARKS / name).read_text()
        start = text.index(anchor) + len(anchor)
        block = text[start: text.index("]", start)]
        found += re.findall(r'"([^"]+)"', block)
    return found


def test_bundled_prompts_are_disjoint_from_the_evaluation_prompts():
    prompts = bundled_prompts(0)
    assert len(prompts) == len(set(prompts)) > 2500
    evaluation = _evaluation_prompts()
    assert len(evaluation) == 9
    assert not set(prompts) & set(evaluation)
    topics = [t for t in teacher_data.TOPICS.read_text().splitlines() if t]
    for prompt in evaluation:  # no topic of the training prompts is a topic of an evaluation prompt
        assert not [t for t in topics if re.search(rf"\b{re.escape(t)}\b", prompt, re.IGNORECASE)], prompt


def test_answer_batch_masks_the_answer_predictions_only():
    records = [{"prompt_ids": [5, 6, 7], "output_ids": [8, 9]}, {"prompt_ids": [5], "output_ids": [4, 3, 2, 1]}]
    ids, mask = answer_batch(records, seq_len=16, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 1]]
    # logits at j predict ids[j + 1]: row 0 predicts 8 (j = 2) and 9 (j = 3); row 1 predicts 4, 3, 2, 1
    assert mask.tolist() == [[False, False, True, True, False], [True, True, True, True, False]]
    ids, mask = answer_batch(records, seq_len=4, pad_id=0)  # cut at seq_len
    assert ids.tolist() == [[5, 6, 7, 8], [5, 4, 3, 2]] and mask[0].tolist() == [False, False, True, False]


def test_teacher_answers_train_the_draft_and_are_cached(llama_teacher, prompts_file, tmp_path, monkeypatch):
    out = tmp_path / "draft"
    summary = distill(config(llama_teacher, prompts_file, out, freeze_word_embeddings=True), log=lambda _: None)
    records = [json.loads(line) for line in (out / CACHE_FILE).read_text().splitlines()]
    assert len(records) == 10 and all(r["output_ids"] for r in records)
    # The cached answers are the teacher's greedy continuations, as transformers computes them.
    expected = transformers_greedy(llama_teacher, [r["prompt_ids"] for r in records[:3]], 12)
    assert [r["output_ids"] for r in records[:3]] == [e[: len(r["output_ids"])] for e, r in zip(expected, records[:3], strict=True)]
    first, last = summary["evals"][0], summary["evals"][-1]
    assert last["kl_to_teacher"] < first["kl_to_teacher"]  # on the held-out answers (prompt 10)
    assert "text_kl_to_teacher" in last and summary["model"]["eval_windows"]["answers"] == 1
    # Frozen embeddings (tied to the head): the student's are still the teacher's.
    from safetensors.torch import load_file
    student = load_file(out / "model.safetensors")
    teacher_weights = load_file(llama_teacher / "model.safetensors")
    assert torch.equal(student["model.embed_tokens.weight"], teacher_weights["model.embed_tokens.weight"])

    # A second run reuses the cache: nothing is generated.
    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(teacher_data, "generate_answers", refuse)
    again = distill(config(llama_teacher, prompts_file, tmp_path / "again", steps=3,
                           teacher_generated_cache=str(out / CACHE_FILE)), log=lambda _: None)
    assert again["steps_done"] == 3


def test_a_cache_from_other_settings_is_refused(llama_teacher, prompts_file, tmp_path):
    cache = tmp_path / "cache.jsonl"
    cache.write_text(json.dumps({"prompt": "something else", "prompt_ids": [1], "output_ids": [2], "max_tokens": 12,
                                 "temperature": 0.0, "seed": 0}) + "\n")
    with pytest.raises(ValueError, match="another prompt or with other settings"):
        distill(config(llama_teacher, prompts_file, tmp_path / "out", teacher_generated_cache=str(cache)),
                log=lambda _: None)


@pytest.mark.parametrize("overrides, message", [
    ({"data": "x.txt"}, "drop --data"),
    ({"teacher_generated": 1}, ">= 2 prompts"),
    ({"target": "encoder"}, "--target draft or eagle, not encoder"),
    ({"teacher_max_tokens": 0}, "--teacher-max-tokens"),
])
def test_bad_teacher_generated_arguments(overrides, message, tmp_path):
    fields = {"target": "draft", "teacher_generated": 10, "out": str(tmp_path), **overrides}
    with pytest.raises(ValueError, match=re.escape(message)):
        DistillConfig(**fields)


def test_more_prompts_than_available_fail_before_generation(llama_teacher, prompts_file, tmp_path):
    with pytest.raises(ValueError, match="more prompts than the 12 available"):
        distill(config(llama_teacher, prompts_file, tmp_path / "out", teacher_generated=20), log=lambda _: None)


def test_cli_flags_reach_the_config_and_bad_ones_exit_2(llama_teacher, prompts_file, tmp_path, capsys):
    from tokenmill.cli import main

    base = ["distill", "--teacher", str(llama_teacher), "--prompts", str(prompts_file), "--out", str(tmp_path / "out"),
            "--student-layers", "2", "--steps", "2", "--warmup-steps", "1", "--batch-size", "3", "--seq-len", "64",
            "--teacher-max-tokens", "6", "--checkpoint-every", "0", "--no-progress"]
    with pytest.raises(SystemExit) as exited:
        main([*base, "--teacher-generated", "1"])
    assert exited.value.code == 2 and ">= 2 prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # frozen embeddings need the teacher's (same width) embeddings
        main([*base, "--teacher-generated", "4", "--freeze-word-embeddings", "--student-hidden-size", "32"])
    assert exited.value.code == 2 and "narrower student" in capsys.readouterr().err
    assert main([*base, "--teacher-generated", "4", "--cpu-bf16"]) == 0
    summary = json.loads((tmp_path / "out" / "distill_summary.json").read_text())
    assert summary["config"]["cpu_bf16"] and summary["model"]["eval_windows"]["answers"] == 1


def test_keep_self_prompt_filters_cut_short_foreign_and_repeated_turns():
    seen = {"what is a good name for a cat?"}
    assert teacher_data.keep_self_prompt("How do I plant tomatoes in spring?", "stop", seen)
    assert not teacher_data.keep_self_prompt("How do I plant tomatoes in spring?", "length", seen)  # cut
    assert not teacher_data.keep_self_prompt("Hello there", "stop", seen)  # under 4 words
    assert not teacher_data.keep_self_prompt(" ".join(["word"] * 61), "stop", seen)
    assert not teacher_data.keep_self_prompt("Что такое фотосинтез и зачем он нужен?", "stop", seen)
    assert not teacher_data.keep_self_prompt("What is a good name for a CAT?", "stop", seen)  # a repeat


def test_self_prompts_are_the_teachers_own_user_turns(llama_teacher, monkeypatch):
    """The tiny teacher writes user turns after its template's user header; the kept ones pass the filter, one
    per line, and a seed repeats them."""
    monkeypatch.setattr(teacher_data, "keep_self_prompt",
                        lambda text, reason, seen: bool(text.strip()) and text.lower() not in seen)
    first = teacher_data.self_prompts(str(llama_teacher), 5, seed=3, max_tokens=8, batch_size=4, log=lambda _: None)
    again = teacher_data.self_prompts(str(llama_teacher), 5, seed=3, max_tokens=8, batch_size=4, log=lambda _: None)
    assert len(first) == 5 and first == again
    assert all("\n" not in p and p == " ".join(p.split()) for p in first)
    assert len({p.lower() for p in first}) == 5
    with pytest.raises(ValueError, match="count"):
        teacher_data.self_prompts(str(llama_teacher), 0)


def test_self_prompts_openings_steer_the_user_turn(llama_teacher, monkeypatch):
    """Each try starts the user turn with its opening (seed + try index, cycling), which stays in the kept prompt."""
    monkeypatch.setattr(teacher_data, "keep_self_prompt",
                        lambda text, reason, seen: bool(text.strip()) and text.lower() not in seen)
    openings = ("Tell me a story about", "List five")
    prompts = teacher_data.self_prompts(str(llama_teacher), 6, seed=2, max_tokens=6, batch_size=4,
                                        log=lambda _: None, openings=openings)
    assert len(prompts) == 6
    assert all(p.startswith(openings) for p in prompts)
    assert {p.startswith(openings[0]) for p in prompts} == {True, False}  # both kinds were asked
    with pytest.raises(ValueError, match="opening"):
        teacher_data.self_prompts(str(llama_teacher), 2, openings=())


def test_near_benchmark_drops_the_evaluation_prompts_and_their_paraphrases():
    sys.path.insert(0, str(BENCHMARKS))
    from distill_self_prompts import CHAT_PROMPTS, ENGINE_CHAT_PROMPTS, near_benchmark

    evaluation = _evaluation_prompts()
    assert sorted(CHAT_PROMPTS + ENGINE_CHAT_PROMPTS) == sorted(evaluation)  # the copy matches spec_decode_cpu.py
    for prompt in evaluation:
        assert near_benchmark(prompt.upper(), evaluation) == prompt
    assert near_benchmark("Tell me a story about an old lighthouse keeper and his dog.", evaluation)
    assert near_benchmark("How do I make a cup of green tea?", evaluation)
    assert near_benchmark("Write a short story about a dragon who learns to fly.", evaluation) is None
    assert near_benchmark("Explain how vaccines work.", evaluation) is None
    assert not [o for o in teacher_data.SELF_PROMPT_OPENINGS if near_benchmark(o, evaluation)]
