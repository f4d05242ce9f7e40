"""`tokenmill distill` end to end on tiny teachers (CPU, seconds): a few steps lower the held-out KD loss and
KL to the teacher; checkpoints resume bit-exactly; the draft student loads in tokenmill and generates what
transformers generates; the encoder student exports to ONNX and validates; bad arguments fail before training."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import make_tiny_bert_teacher, write_text
from tiny_models import build_tokenizer, make_tiny_model_dir, transformers_greedy

from tokenmill import LLM, SamplingParams
from tokenmill.cli import main
from tokenmill.distill.config import DistillConfig
from tokenmill.distill.run import CURVE_FILE, SUMMARY_FILE, distill


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on one thread: on a shared 2-core box two threads made them ~30x slower (sync waits)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("teacher") / "llama", "llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny_bert_teacher(tmp_path_factory.mktemp("teacher") / "bert")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("data") / "text.txt")


def draft_config(teacher: Path, data: Path, out: Path, **overrides) -> DistillConfig:
    fields = dict(target="draft", teacher=str(teacher), data=str(data), out=str(out), student_layers=2,
                  steps=12, batch_size=4, seq_len=16, warmup_steps=2, lr=3e-3, checkpoint_every=0,
                  progress=False)
    return DistillConfig(**{**fields, **overrides})


def encoder_config(teacher: tuple[Path, Path], data: Path, out: Path, **overrides) -> DistillConfig:
    fields = dict(target="encoder", teacher=str(teacher[0]), teacher_head=str(teacher[1]), data=str(data),
                  out=str(out), student_layers=2, student_hidden_size=16, steps=12, batch_size=8, seq_len=32,
                  warmup_steps=2, lr=3e-3, checkpoint_every=0, progress=False)
    return DistillConfig(**{**fields, **overrides})


def _quiet(_: str) -> None:
    pass


def test_draft_lowers_kd_loss_and_kl_and_loads_in_tokenmill(llama_teacher, text_file, tmp_path):
    out = tmp_path / "draft"
    summary = distill(draft_config(llama_teacher, text_file, out, hidden_weight=0.5), log=_quiet)
    first, last = summary["evals"][0], summary["evals"][-1]
    assert (first["step"], last["step"]) == (0, 12)
    assert last["kd_loss"] < first["kd_loss"]
    assert last["kl_to_teacher"] < first["kl_to_teacher"]
    assert summary["model"]["student_params"] < summary["model"]["teacher_params"]
    assert summary["model"]["layer_map"] == [0, 3]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", SUMMARY_FILE,
                 CURVE_FILE):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2

    # The student is an ordinary model directory: tokenmill serves it and matches transformers' greedy tokens.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = [tokenizer.encode(t) for t in ("The quick brown fox", "Paris is the capital of")]
    expected = transformers_greedy(out, prompts, 8)
    llm = LLM(str(out), device="cpu", dtype="float32")
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


def test_draft_vocab_size_writes_the_training_texts_ranking_and_drafts_from_it(llama_teacher, text_file, tmp_path):
    """--draft-vocab-size N: the ranking of the training tokens beside the student, N in config.json, the held-out
    agreement of the N-id argmax reported; as a draft the student's head holds N rows and greedy output is the
    teacher's own."""
    from tokenmill.spec_decode.draft_vocab import DRAFT_VOCAB_FILE, load_draft_vocab

    out = tmp_path / "draft_vocab"
    summary = distill(draft_config(llama_teacher, text_file, out, steps=4, draft_vocab_size=16), log=_quiet)
    ranking = json.loads((out / DRAFT_VOCAB_FILE).read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["draft_vocab_size"] == 16 and len(ranking["token_ids"]) == config["vocab_size"]
    assert ranking["counts"] == sorted(ranking["counts"], reverse=True) and ranking["counts"][15] > 0
    last = summary["evals"][-1]
    assert 0 <= last["top1_agreement_draft_vocab"] <= 1 and 0 < last["teacher_top1_in_draft_vocab"] <= 1
    assert load_draft_vocab(out, config["vocab_size"]).tolist() == ranking["token_ids"][:16]

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    plain = LLM(str(llama_teacher), device="cpu", dtype="float32")
    spec = LLM(str(llama_teacher), device="cpu", dtype="float32", speculative_config={
        "model": str(out), "num_speculative_tokens": 3, "adaptive": False})
    assert spec.engine.scheduler.draft_proposer.proposer.vocab_ids.numel() == 16
    prompts = ["The quick brown fox", "Paris is the capital of"]
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)] == expected
    assert spec.engine.get_stats().spec_decode.num_drafts > 0


def test_encoder_lowers_kd_loss_and_kl_and_exports_to_onnx(bert_teacher, text_file, tmp_path):
    out, repository = tmp_path / "encoder", tmp_path / "models"
    summary = distill(encoder_config(bert_teacher, text_file, out, repository=str(repository)), log=_quiet)
    first, last = summary["evals"][0], summary["evals"][-1]
    assert last["kd_loss"] < first["kd_loss"]
    assert last["kl_to_teacher"] < first["kl_to_teacher"]
    assert last["embedding_cosine"] > first["embedding_cosine"]
    # The encoder's default per-token term (last layer, through the training projection for a narrower student)
    history = summary["history"]
    assert summary["config"]["hidden_layers"] == "last" and summary["config"]["hidden_weight"] == 30.0
    assert sum(h["hidden_mse"] for h in history[-3:]) < sum(h["hidden_mse"] for h in history[:3])
    assert summary["model"]["student_hidden_size"] == 16
    report = json.loads((repository / "encoder" / "export_report.json").read_text())
    assert report["validation"]["max_abs"] <= report["validation"]["atol"]
    assert (repository / "encoder" / "1" / "model.onnx").is_file()
    assert (repository / "encoder" / "config.yaml").is_file()
    assert summary["export"]["max_abs_vs_torch"] == report["validation"]["max_abs"]

    assert_served_like_pytorch(repository, "encoder", out)


def assert_served_like_pytorch(repository: Path, name: str, student_dir: Path) -> None:
    """The model server loads the student's repository entry and its logits are the PyTorch student's."""
    from tokenmill.modelserver import bundled
    from tokenmill.modelserver.metrics import ServerMetrics
    from tokenmill.modelserver.repository import ModelRepository

    texts = ["What a wonderful, kind gesture.", "This was a terrible waste of time."]

    async def serve(root: Path) -> dict:
        models = ModelRepository(root, ServerMetrics(), device="cpu")
        await models.load(name)
        try:
            return await models.get(name).infer(texts)
        finally:
            await models.close()

    served = asyncio.run(serve(repository))
    head, _ = bundled.load_head(student_dir / "head.json")
    student = bundled.MeanPoolClassifier(bundled.load_encoder(student_dir), head).eval()
    encoded = bundled.load_tokenizer(student_dir).encode_batch(texts)
    with torch.no_grad():
        expected = student(torch.tensor([e.ids for e in encoded]), torch.tensor([e.attention_mask for e in encoded]))
    torch.testing.assert_close(torch.from_numpy(served["logits"]), expected, atol=1e-4, rtol=1e-4)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("target", ["draft", "encoder"])
def test_resume_is_bit_exact(target, llama_teacher, bert_teacher, text_file, tmp_path):
    # The encoder student trains with dropout here, so its resume also depends on the saved RNG state.
    make = (lambda out, **kw: draft_config(llama_teacher, text_file, out, **kw)) if target == "draft" else (
        lambda out, **kw: encoder_config(bert_teacher, text_file, out, student_dropout=0.1, **kw))
    straight = distill(make(tmp_path / "straight", steps=6, grad_accum=2, checkpoint_every=3), log=_quiet)
    interrupted = tmp_path / "interrupted"
    partial = distill(make(interrupted, steps=6, grad_accum=2, checkpoint_every=3), stop_after=3, log=_quiet)
    assert partial["steps_done"] == 3 and "student_dir" not in partial
    resumed = distill(make(interrupted, steps=6, grad_accum=2, checkpoint_every=3, resume="latest"), log=_quiet)
    assert resumed["resumed_from"].endswith("step_000003")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["evals"][-1]["kd_loss"] == straight["evals"][-1]["kd_loss"]
    a, b = _weights(tmp_path / "straight"), _weights(interrupted)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_arguments_is_refused(llama_teacher, text_file, tmp_path):
    out = tmp_path / "run"
    distill(draft_config(llama_teacher, text_file, out, steps=4), stop_after=2, log=_quiet)
    with pytest.raises(ValueError, match="trained with lr=0.003 but this run has lr=0.001"):
        distill(draft_config(llama_teacher, text_file, out, steps=4, lr=1e-3, resume="latest"), log=_quiet)


def _cli_error(capsys, argv: list[str]) -> str:
    """The one-line error of a refused command (exit status 2); earlier stderr lines are loading progress."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("tokenmill distill: error: ")
    return message


def test_bad_arguments_fail_before_training(llama_teacher, bert_teacher, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["distill", "--teacher", str(llama_teacher), "--data", str(text_file), "--out", str(out),
            "--steps", "2", "--warmup-steps", "0", "--seq-len", "16", "--no-progress"]

    other = make_tiny_model_dir(tmp_path / "other", "llama")
    build_tokenizer(other, vocab_size=300)  # same architecture, another vocabulary
    assert "different tokenizer than the teacher" in _cli_error(capsys, [*base, "--student", str(other)])

    assert "the student has 6 layers but the teacher only 4" in _cli_error(capsys, [*base, "--student-layers", "6"])
    assert "more than the teacher's" in _cli_error(
        capsys, [*base, "--student-layers", "2", "--student-hidden-size", "256"])

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "is empty" in _cli_error(capsys, [*base[:3], "--data", str(empty), *base[5:]])
    assert "does not exist" in _cli_error(capsys, [*base[:3], "--data", str(tmp_path / "missing.txt"), *base[5:]])

    encoder = ["distill", "--target", "encoder", "--teacher", str(bert_teacher[0]), "--data", str(text_file),
               "--out", str(out), "--steps", "2", "--warmup-steps", "0", "--no-progress"]
    assert "--teacher-head is required" in _cli_error(capsys, encoder)
    assert "different tokenizer than the teacher" in _cli_error(
        capsys, [*encoder, "--teacher-head", str(bert_teacher[1]), "--student", str(llama_teacher)])
    assert "--warmup-steps (5) must be >= 0 and below --steps (2)" in _cli_error(capsys, [*base, "--warmup-steps", "5"])
    assert "must name 2 increasing teacher layers in 0..3" in _cli_error(capsys, [*base, "--layer-map", "3,1"])
    assert "needs trained word embeddings" in _cli_error(
        capsys, [*encoder, "--teacher-head", str(bert_teacher[1]), "--student-hidden-size", "16",
                 "--freeze-word-embeddings"])
    assert "--draft-vocab-size applies to --target draft or eagle and must be >= 1" in _cli_error(
        capsys, [*base, "--draft-vocab-size", "0"])
    assert "--draft-vocab-size must lie between 1 and the vocabulary size" in _cli_error(
        capsys, [*base, "--draft-vocab-size", "100000"])
    assert not (out / "checkpoints").exists()  # nothing trained


def test_cli_happy_path_writes_the_student(llama_teacher, text_file, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["distill", "--teacher", str(llama_teacher), "--data", str(text_file), "--out", str(out),
            "--student-layers", "1", "--steps", "2", "--warmup-steps", "0", "--seq-len", "16", "--batch-size", "2",
            "--kd-loss", "jsd", "--checkpoint-every", "1", "--no-progress"]
    assert main(argv) == 0
    assert f"wrote the student to {out}" in capsys.readouterr().out
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["config"]["kd_loss"] == "jsd" and summary["model"]["layer_map"] == [3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]


def test_encoder_hidden_match_of_the_last_layer_is_what_the_pooled_cosine_measures(bert_teacher, text_file,
                                                                                  tmp_path):
    from tokenmill.distill.encoder import EncoderTask

    # A student holding all four teacher layers reproduces the teacher: the per-token loss on the last layer is
    # zero exactly where the evaluated (pooled, normalised) embedding cosine is one.
    full = EncoderTask(encoder_config(bert_teacher, text_file, tmp_path / "full", student_layers=4,
                                      student_hidden_size=None, hidden_weight=1.0))
    full.trainable().eval()
    with torch.no_grad():
        _, parts, _ = full.loss(list(range(8)))
        record = full.evaluate()
    assert parts["hidden_mse"] < 1e-10
    assert record["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)

    # A 2-layer student starts away from it and training lowers the term (the narrow student of
    # test_encoder_lowers_kd_loss_and_kl_and_exports_to_onnx shows the cosine rising with it).
    summary = distill(encoder_config(bert_teacher, text_file, tmp_path / "two", student_hidden_size=None,
                                     layer_map=[0, 3], hidden_weight=10.0, hidden_layers="last", steps=16),
                      log=_quiet)
    history = summary["history"]
    assert history[0]["hidden_mse"] > 0
    assert sum(h["hidden_mse"] for h in history[-4:]) < sum(h["hidden_mse"] for h in history[:4])
    assert summary["model"]["layer_map"] == [0, 3] and summary["model"]["word_embeddings"] == "frozen"
    teacher, student = _weights(bert_teacher[0]), _weights(tmp_path / "two")
    name = next(k for k in student if k.endswith("word_embeddings.weight"))
    assert torch.equal(student[name], teacher[name])  # frozen: still the teacher's table
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert saved["hidden_dropout_prob"] == saved["attention_probs_dropout_prob"] == 0.0  # trained without dropout
    layer = next(k for k in student if k.endswith("layer.1.output.dense.weight"))
    assert not torch.equal(student[layer], teacher[layer.replace("layer.1.", "layer.3.")])  # trained


def test_encoder_teacher_targets_computed_once_equal_the_teachers_outputs(bert_teacher, text_file, tmp_path):
    import torch.nn.functional as F

    from tokenmill.distill.encoder import EncoderTask, mean_pool

    task = EncoderTask(encoder_config(bert_teacher, text_file, tmp_path / "cached", hidden_weight=0.0))
    assert task.train_targets is not None  # no per-token term: the teacher's pooled outputs are precomputed
    rows = [5, 0, 3]
    ids, mask = task._encode([task.sentences[i] for i in rows])
    with torch.no_grad():
        embedding = F.normalize(mean_pool(task.teacher.encoder(input_ids=ids, attention_mask=mask)
                                          .last_hidden_state, mask), dim=-1)
    torch.testing.assert_close(task.train_targets[0][rows], embedding, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(task.train_targets[1][rows], task.teacher.head(embedding), atol=1e-5, rtol=1e-5)


def test_cli_encoder_with_a_narrower_ffn_starts_from_teacher_neurons_and_exports(bert_teacher, text_file, tmp_path):
    out, repository = tmp_path / "narrow_ffn", tmp_path / "models"
    argv = ["distill", "--target", "encoder", "--teacher", str(bert_teacher[0]), "--teacher-head",
            str(bert_teacher[1]), "--data", str(text_file), "--out", str(out), "--layer-map", "0,3",
            "--student-intermediate-size", "24", "--steps", "2", "--warmup-steps", "0", "--seq-len", "32",
            "--batch-size", "4", "--checkpoint-every", "0", "--repository", str(repository), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["config"]["intermediate_init"] == "norm"
    assert summary["model"]["student_intermediate_size"] == 24
    copied, total = (int(n) for n in summary["model"]["init"].split()[0].split("/"))
    assert copied == total  # the FFN tensors were sliced from the teacher's, not left random
    assert summary["export"]["max_abs_vs_torch"] <= summary["export"]["atol"]
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 24
    assert_served_like_pytorch(repository, "narrow_ffn", out)


def test_export_checkpoint_writes_the_finished_student(llama_teacher, text_file, tmp_path):
    """benchmarks/distill_export_checkpoint.py: the last checkpoint exports the same weights the finished run saved,
    and an earlier one exports a student too (a usable draft before a long run ends)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from distill_export_checkpoint import export_checkpoint

    out = tmp_path / "run"
    distill(draft_config(llama_teacher, text_file, out, steps=4, checkpoint_every=2), log=_quiet)
    assert export_checkpoint(out / "checkpoints" / "step_000004", tmp_path / "last") == 4
    finished, exported = _weights(out), _weights(tmp_path / "last")
    assert finished.keys() == exported.keys()
    assert all(torch.equal(finished[k], exported[k]) for k in finished)
    assert export_checkpoint(out / "checkpoints" / "step_000002", tmp_path / "early") == 2
    early = _weights(tmp_path / "early")
    assert early.keys() == finished.keys()
    assert not all(torch.equal(early[k], finished[k]) for k in finished)
