"""Distillation parts: the KD losses against torch's own KL, the batch order, the corpus reader, config checks,
student shapes and initialisation from teacher layers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tokenmill.distill.config import DistillConfig
from tokenmill.distill.data import BatchOrder, read_corpus, sentences, split_windows, token_windows
from tokenmill.distill.losses import hidden_mse, kd_loss, kl_to_teacher
from tokenmill.distill.students import hidden_pairs, init_from_teacher, student_config, teacher_layer_map


def _logits(seed: int, shape=(3, 5, 11)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_forward_kl_matches_torch_kl_div_and_scales_by_t_squared():
    s, t = _logits(0), _logits(1)
    for temperature in (1.0, 2.0):
        reference = F.kl_div(F.log_softmax(s / temperature, -1).flatten(0, 1), F.log_softmax(t / temperature, -1)
                             .flatten(0, 1), log_target=True, reduction="batchmean") * temperature**2
        torch.testing.assert_close(kd_loss(s, t, temperature), reference)
    reverse = F.kl_div(F.log_softmax(t, -1).flatten(0, 1), F.log_softmax(s, -1).flatten(0, 1), log_target=True,
                       reduction="batchmean")
    torch.testing.assert_close(kd_loss(s, t, kind="reverse_kl"), reverse)


def test_divergences_vanish_only_at_the_teacher():
    s, t = _logits(2), _logits(3)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert kd_loss(t.clone(), t, 2.0, kind).abs() < 1e-5
        assert kd_loss(s, t, 2.0, kind) > 0.01
    # JSD is bounded by log 2 (times T² = 1 here) and sits below either KL for beta = 0.5
    jsd = kd_loss(s, t, kind="jsd")
    assert jsd < min(kd_loss(s, t), kd_loss(s, t, kind="reverse_kl"))
    assert jsd <= torch.log(torch.tensor(2.0))


def test_masked_rows_do_not_count():
    s, t = _logits(4), _logits(5)
    mask = torch.ones(3, 5)
    mask[:, 3:] = 0
    torch.testing.assert_close(kl_to_teacher(s, t, mask), kl_to_teacher(s[:, :3], t[:, :3]))
    hidden = [torch.randn(3, 5, 8)]
    torch.testing.assert_close(hidden_mse(hidden, [h + 1 for h in hidden], mask), torch.tensor(1.0))


def test_batch_order_is_a_function_of_seed_and_index():
    order = BatchOrder(10, 4, seed=7)
    first_epoch = order.indices(0) + order.indices(1) + order.indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))  # each example once per epoch
    again = BatchOrder(10, 4, seed=7)
    assert [again.indices(i) for i in (5, 2, 0)] == [order.indices(i) for i in (5, 2, 0)]
    assert BatchOrder(10, 4, seed=8).indices(0) != order.indices(0)
    with pytest.raises(ValueError, match="yields no examples"):
        BatchOrder(0, 4, seed=0)


def test_corpus_reader_text_jsonl_and_errors(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"text": "first line"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert read_corpus(jsonl) == "first line\nsecond"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match='line 1 must be an object with a "text" string'):
        read_corpus(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match="is empty"):
        read_corpus(empty)
    assert sentences("Short. A longer sentence here; and another clause!\nNext line is fine") == [
        "A longer sentence here;", "and another clause!", "Next line is fine"]


def test_windows_and_split():
    windows = token_windows(list(range(105)), 10)
    assert windows.shape == (10, 10) and windows[1, 0] == 10
    train, held = split_windows(windows)
    assert (len(train), len(held)) == (9, 1) and held[0, 0] == 90


def test_config_checks():
    with pytest.raises(ValueError, match="--target 'gpt' is not supported"):
        DistillConfig(target="gpt")
    with pytest.raises(ValueError, match="exclude each other"):
        DistillConfig(student="dir", student_layers=2)
    with pytest.raises(ValueError, match="applies to --target encoder only"):
        DistillConfig(repository="models")
    with pytest.raises(ValueError, match="--temperature must be > 0"):
        DistillConfig(temperature=0)
    with pytest.raises(ValueError, match="--layer-map names 3 layers but --student-layers is 2"):
        DistillConfig(layer_map=[0, 4, 5], student_layers=2)
    assert DistillConfig(freeze_word_embeddings=True).freeze_word_embeddings  # drafts too (tied head kept)
    with pytest.raises(ValueError, match=r"--student-dropout must lie in \[0, 1\)"):
        DistillConfig(target="encoder", student_dropout=1.0)
    with pytest.raises(ValueError, match="--hidden-layers 'middle' is not supported"):
        DistillConfig(hidden_layers="middle")
    with pytest.raises(ValueError, match="--intermediate-init 'random' is not supported; choose norm or first"):
        DistillConfig(target="encoder", intermediate_init="random")
    # Fields left None take the target's values; given ones stay.
    draft, encoder = DistillConfig(), DistillConfig(target="encoder", lr=2e-4, layer_map=[0, 4, 5])
    assert (draft.lr, draft.batch_size, draft.hidden_weight, draft.hidden_layers) == (5e-4, 8, 0.0, "all")
    assert (encoder.lr, encoder.batch_size, encoder.hidden_weight, encoder.hidden_layers) == (2e-4, 32, 30.0, "last")
    assert encoder.student_layers == 3


def test_hidden_pairs_and_chosen_layer_maps():
    student_states = tuple(torch.full((1, 2, 4), float(i)) for i in range(3))  # embeddings + 2 layers
    teacher_states = tuple(torch.full((1, 2, 4), 10.0 + i) for i in range(7))  # embeddings + 6 layers
    students, teachers = hidden_pairs(student_states, teacher_states, [0, 5], "all")
    assert [float(s[0, 0, 0]) for s in students] == [1.0, 2.0] and [float(t[0, 0, 0]) for t in teachers] == [11.0, 16.0]
    students, teachers = hidden_pairs(student_states, teacher_states, [0, 5], "last")
    assert [float(s[0, 0, 0]) for s in students] == [2.0] and [float(t[0, 0, 0]) for t in teachers] == [16.0]
    assert teacher_layer_map(6, 3, [0, 4, 5]) == [0, 4, 5]
    for bad in ([0, 4], [4, 0, 5], [0, 4, 6], [0, 0, 5]):
        with pytest.raises(ValueError, match="must name 3 increasing teacher layers in 0..5"):
            teacher_layer_map(6, 3, bad)


def test_student_shapes_and_teacher_initialisation():
    from transformers import LlamaConfig, LlamaForCausalLM

    assert teacher_layer_map(12, 6) == [0, 2, 4, 7, 9, 11]
    assert teacher_layer_map(30, 2) == [0, 29]
    with pytest.raises(ValueError, match="must not be larger than its teacher"):
        teacher_layer_map(4, 5)
    teacher_config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)
    narrow = student_config(teacher_config, 2, 32, None)
    assert (narrow.num_attention_heads, narrow.num_key_value_heads, narrow.intermediate_size) == (2, 2, 64)
    with pytest.raises(ValueError, match="multiple of the teacher's head size 16"):
        student_config(teacher_config, 2, 40, None)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(teacher_config)
    student = LlamaForCausalLM(student_config(teacher_config, 2, None, None))
    copied, total = init_from_teacher(student, teacher, [0, 3])
    assert copied == total
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    narrow_student = LlamaForCausalLM(narrow)
    assert init_from_teacher(narrow_student, teacher, [0, 3])[0] == 0  # no shape matches: random init stays


def _half_dead_ffn_teacher(model_class, config) -> torch.nn.Module:
    """A random teacher in which a random half of every layer's FFN neurons is never read (its output weight
    columns are zero), so dropping exactly those neurons leaves every layer's output unchanged."""
    torch.manual_seed(0)
    teacher = model_class(config).eval()
    size = config.intermediate_size
    with torch.no_grad():
        for name, weight in teacher.named_parameters():
            if name.endswith(("output.dense.weight", "down_proj.weight")) and weight.shape[-1] == size:
                weight[:, torch.randperm(size)[: size // 2]] = 0.0
    return teacher


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_narrower_ffn_keeps_the_teachers_largest_norm_neurons(family):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    if family == "bert":
        model_class, config = BertModel, BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                    num_attention_heads=4, intermediate_size=96)
    else:
        model_class, config = LlamaForCausalLM, LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96,
                                                            num_hidden_layers=3, num_attention_heads=4,
                                                            num_key_value_heads=2)
    teacher = _half_dead_ffn_teacher(model_class, config)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        expected = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    results = {}
    for how in ("norm", "first"):
        student = model_class(student_config(config, 3, None, 48)).eval()
        copied, total = init_from_teacher(student, teacher, [0, 1, 2], how)
        assert copied == total  # the FFN tensors too, sliced to the kept neurons
        with torch.no_grad():
            states = student(input_ids=ids, output_hidden_states=True).hidden_states
        results[how] = max(float((s - t).abs().max()) for s, t in zip(states, expected, strict=True))
    # The norm score finds the live half exactly: the narrower student computes the teacher's function.
    assert results["norm"] < 1e-5
    assert results["first"] > 1e-2  # the first half of the neurons includes dead ones and drops live ones
