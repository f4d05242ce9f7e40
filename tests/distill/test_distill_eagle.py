"""`tokenmill distill --target eagle` on a tiny random Llama teacher (CPU, seconds): a few steps on the teacher's own
answers lower the training and held-out losses; checkpoints resume bit-exactly; the saved head directory loads in
the engine as ``{"method": "eagle", "model": OUT}`` and greedy output is token-identical to plain decoding; bad
arguments fail before anything is generated or trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_distill
import torch
from test_distill import _cli_error, _weights
from test_teacher_generated import prompts_file  # noqa: F401  (a fixture: 12 bundled prompts)
from tiny_models import make_tiny_model_dir

from tokenmill import LLM, SamplingParams
from tokenmill.cli import main
from tokenmill.distill.config import DistillConfig
from tokenmill.distill.run import CURVE_FILE, SUMMARY_FILE, distill
from tokenmill.distill.teacher_data import teacher_answers
from tokenmill.spec_decode.draft_vocab import DRAFT_VOCAB_FILE

one_thread = test_distill.one_thread  # tiny matmuls on one torch thread


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("eagle_teacher") / "llama", "llama")


def config(teacher: Path, prompts: Path, out: Path, cache: Path, **overrides) -> DistillConfig:
    fields = dict(target="eagle", teacher=str(teacher), prompts=str(prompts), teacher_generated=10,
                  teacher_max_tokens=16, teacher_generated_cache=str(cache), out=str(out), steps=12, batch_size=3,
                  warmup_steps=2, lr=3e-3, checkpoint_every=0, progress=False)
    return DistillConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def answers(teacher, prompts_file, tmp_path_factory) -> Path:  # noqa: F811
    """The teacher's answers, generated once with the engine (teacher_data.teacher_answers) for every test here."""
    cache = tmp_path_factory.mktemp("eagle_answers") / "answers.jsonl"
    train, held, _ = teacher_answers(config(teacher, prompts_file, cache.parent / "out", cache), log=lambda _: None)
    assert (len(train), len(held)) == (9, 1) and all(r["output_ids"] for r in train)
    return cache


def test_eagle_head_learns_and_serves_token_identical_greedy_output(teacher, prompts_file, answers,  # noqa: F811
                                                                    tmp_path):
    out = tmp_path / "head"
    summary = distill(config(teacher, prompts_file, out, answers, draft_vocab_size=96), log=lambda _: None)
    first, last = summary["evals"][0], summary["evals"][-1]
    assert (first["step"], last["step"]) == (0, 12)
    assert last["loss"] < first["loss"] and last["kl_to_teacher"] < first["kl_to_teacher"]
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert 1.0 <= last["acceptance_length_k4"] <= 5.0 and 0.0 <= last["top1_agreement"] <= 1.0
    assert summary["model"]["train_answers"] == 9 and summary["model"]["held_out_answers"] == 1
    assert summary["config"]["unroll"] == 2 and summary["config"]["weight_decay"] == 0.0  # the measured recipe
    for name in ("config.json", "model.safetensors", DRAFT_VOCAB_FILE, SUMMARY_FILE, CURVE_FILE):
        assert (out / name).is_file(), name
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["EagleLlamaForCausalLM"] and saved["draft_vocab_size"] == 96

    # The head directory is what the engine's EAGLE proposer loads; verification keeps greedy output the target's.
    engine = dict(device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = ["The quick brown fox", "Paris is the capital of", "def add(a, b):"]
    plain = [o.outputs[0].token_ids for o in LLM(str(teacher), **engine).generate(prompts, params, use_tqdm=False)]
    spec = LLM(str(teacher), **engine, speculative_config={"method": "eagle", "model": str(out),
                                                           "num_speculative_tokens": 3, "adaptive": False})
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)] == plain
    assert spec.engine.get_stats().spec_decode.num_drafts > 0
    assert spec.engine.scheduler.draft_proposer.proposer.vocab_ids.numel() == 96


def test_eagle_resume_is_bit_exact(teacher, prompts_file, answers, tmp_path):  # noqa: F811
    # Input noise on (the default): the resumed run also depends on the checkpoint's RNG state.
    def make(out: Path, **kw) -> DistillConfig:
        return config(teacher, prompts_file, out, answers, steps=6, grad_accum=2, checkpoint_every=3, **kw)

    straight = distill(make(tmp_path / "straight"), log=lambda _: None)
    interrupted = tmp_path / "interrupted"
    partial = distill(make(interrupted), stop_after=3, log=lambda _: None)
    assert partial["steps_done"] == 3 and "student_dir" not in partial
    resumed = distill(make(interrupted, resume="latest"), log=lambda _: None)
    assert resumed["resumed_from"].endswith("step_000003")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["evals"][-1] == straight["evals"][-1]
    a, b = _weights(tmp_path / "straight"), _weights(interrupted)
    assert a.keys() == b.keys() == {"fc.weight", "norm.weight", *(k for k in a if k.startswith("layers.0."))}
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="trained with unroll=2 but this run has unroll=1"):
        distill(make(interrupted, unroll=1, resume="latest"), log=lambda _: None)


def test_eagle_bad_arguments_fail_before_anything_runs(teacher, prompts_file, answers, tmp_path,  # noqa: F811
                                                       capsys):
    out = tmp_path / "out"
    base = ["distill", "--target", "eagle", "--teacher", str(teacher), "--prompts", str(prompts_file),
            "--teacher-generated", "10", "--teacher-max-tokens", "16", "--teacher-generated-cache", str(answers),
            "--out", str(out), "--steps", "2", "--warmup-steps", "0", "--no-progress"]
    assert "--student-layers does not apply to --target eagle" in _cli_error(capsys, [*base, "--student-layers", "1"])
    assert "--unroll must be 1..5" in _cli_error(capsys, [*base, "--unroll", "6"])
    assert "drop --data" in _cli_error(capsys, [*base, "--data", str(prompts_file)])
    assert "--eval-data does not apply to --target eagle" in _cli_error(capsys, [*base, "--eval-data", "x.txt"])
    assert "--teacher-generated must be 0 (off) or >= 2" in _cli_error(capsys, [*base, "--teacher-generated", "1"])
    assert "nothing to train on" in _cli_error(capsys, [*base, "--feature-weight", "0", "--token-weight", "0"])
    assert "--draft-vocab-size must lie between 1 and the vocabulary size" in _cli_error(
        capsys, [*base, "--draft-vocab-size", "100000"])
    draft = ["distill", "--teacher", str(teacher), "--out", str(out), "--steps", "2", "--warmup-steps", "0"]
    assert "--unroll applies to --target eagle only" in _cli_error(capsys, [*draft, "--unroll", "2"])

    # A teacher whose layers are not Llama's (Qwen2: q/k/v biases) is refused before its answers are generated.
    qwen = make_tiny_model_dir(tmp_path / "qwen2", "qwen2")
    fresh = tmp_path / "fresh.jsonl"
    swap = {str(teacher): str(qwen), str(answers): str(fresh)}
    message = _cli_error(capsys, [swap.get(arg, arg) for arg in base])
    assert "supports Llama-family teachers" in message
    assert not fresh.exists() and not (out / "checkpoints").exists()  # nothing generated, nothing trained


def test_cli_writes_the_head(teacher, prompts_file, answers, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "cli"
    argv = ["distill", "--target", "eagle", "--teacher", str(teacher), "--prompts", str(prompts_file),
            "--teacher-generated", "10", "--teacher-max-tokens", "16", "--teacher-generated-cache", str(answers),
            "--out", str(out), "--steps", "2", "--warmup-steps", "0", "--batch-size", "4", "--unroll", "1",
            "--no-prompt-positions", "--checkpoint-every", "1", "--no-progress"]
    assert main(argv) == 0
    assert f"wrote the EAGLE head to {out}" in capsys.readouterr().out
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["config"]["unroll"] == 1 and summary["config"]["prompt_positions"] is False
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]


def test_eagle_bf16_autocast_in_the_shared_loop_lowers_the_loss(teacher, prompts_file, answers, tmp_path):  # noqa: F811
    """The GPU's path (the Trainer's bf16 autocast around the unrolled passes; the teacher's distribution stays fp32)
    on the CPU's autocast: dtypes meet, the loss falls, the master weights and the saved head stay fp32."""
    summary = distill(config(teacher, prompts_file, tmp_path / "bf16", answers, cpu_bf16=True), log=lambda _: None)
    first, last = summary["evals"][0], summary["evals"][-1]
    assert last["loss"] < first["loss"]
    assert all(t.dtype == torch.float32 for t in _weights(tmp_path / "bf16").values())
