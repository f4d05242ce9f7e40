"""Student shapes shared by both targets: which teacher layers a student keeps, its config, copying teacher
tensors into it where shapes allow (DistilBERT's initialisation), and the size / tokenizer checks."""

from __future__ import annotations

import re

import torch
from torch import nn

from tokenmill.distill.config import INTERMEDIATE_INITS

_LAYER_INDEX = re.compile(r"\b(layers?)\.(\d+)\.")  # model.layers.N. (Llama) / encoder.layer.N. (BERT)


def teacher_layer_map(num_teacher_layers: int, num_student_layers: int, chosen: list[int] | None = None) -> list[int]:
    """Student layer j takes teacher layer map[j]: ``chosen`` (checked), else evenly spaced, first and last kept
    (DistilBERT kept every other layer of BERT-base: 6 of 12)."""
    if num_student_layers > num_teacher_layers:
        raise ValueError(f"the student has {num_student_layers} layers but the teacher only {num_teacher_layers}; "
                         "a student must not be larger than its teacher")
    if chosen is not None:
        if len(chosen) != num_student_layers or sorted(set(chosen)) != list(chosen) or not (
                0 <= chosen[0] and chosen[-1] < num_teacher_layers):
            raise ValueError(f"--layer-map {','.join(map(str, chosen))} must name {num_student_layers} increasing "
                             f"teacher layers in 0..{num_teacher_layers - 1}")
        return list(chosen)
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [round(j * step) for j in range(num_student_layers)]


def student_config(teacher_config, layers: int | None, hidden: int | None, intermediate: int | None):
    """A copy of the teacher's HF config with fewer layers and/or a narrower width; attention heads keep the
    teacher's head size, so a narrower student has fewer heads."""
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    # A GGUF teacher carries transformers' GGUF quantization record; the student is a plain dense model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.num_hidden_layers = layers or max(1, teacher_config.num_hidden_layers // 2)
    if hidden is not None and hidden != teacher_config.hidden_size:
        head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // teacher_config.num_attention_heads
        if hidden % head_dim:
            raise ValueError(f"--student-hidden-size {hidden} must be a multiple of the teacher's head size {head_dim}")
        heads = hidden // head_dim
        config.hidden_size, config.num_attention_heads = hidden, heads
        if hasattr(config, "head_dim"):
            config.head_dim = head_dim
        kv = getattr(teacher_config, "num_key_value_heads", None)
        if kv is not None:
            config.num_key_value_heads = max(d for d in range(1, min(kv, heads) + 1) if heads % d == 0)
        if intermediate is None:
            intermediate = teacher_config.intermediate_size * hidden // teacher_config.hidden_size
    if intermediate is not None:
        config.intermediate_size = intermediate
    return config


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_not_larger(student: nn.Module, teacher: nn.Module) -> tuple[int, int]:
    student_params, teacher_params = count_parameters(student), count_parameters(teacher)
    if student_params > teacher_params:
        raise ValueError(f"the student has {student_params / 1e6:.2f}M parameters, more than the teacher's "
                         f"{teacher_params / 1e6:.2f}M; pick fewer --student-layers or a smaller --student-hidden-size")
    return student_params, teacher_params


def check_same_vocabulary(teacher_vocab: dict[str, int], student_vocab: dict[str, int], student: str) -> None:
    if teacher_vocab != student_vocab:
        only_teacher = len(set(teacher_vocab.items()) - set(student_vocab.items()))
        raise ValueError(f"the student {student!r} has a different tokenizer than the teacher ({len(student_vocab)} "
                         f"vs {len(teacher_vocab)} tokens, {only_teacher} teacher entries differ); "
                         "distillation needs one shared vocabulary")


def hidden_pairs(student_states: tuple[torch.Tensor, ...], teacher_states: tuple[torch.Tensor, ...],
                 layer_map: list[int], which: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(student layer outputs, the teacher layer outputs they imitate) from HF ``hidden_states`` (index 0 is the
    embeddings): every student layer vs the teacher layer it came from ("all"), or the last vs the last ("last":
    a per-token target for the states that are pooled, without pinning the first layers to their copies)."""
    students = list(student_states[1:])
    teachers = [teacher_states[i + 1] for i in layer_map]
    return (students[-1:], teachers[-1:]) if which == "last" else (students, teachers)


def ffn_neuron_scores(teacher_state: dict[str, torch.Tensor], layer_prefix: str, intermediate: int) -> torch.Tensor:
    """Importance of each of a teacher layer's ``intermediate`` FFN neurons: the product of the L2 norms of the
    weight rows/columns that feed and read it (BERT intermediate.dense + output.dense, Llama gate/up + down),
    so a neuron that is written or read weakly ranks low whichever side is small."""
    scores = torch.ones(intermediate)
    for name, tensor in teacher_state.items():
        if not name.startswith(layer_prefix) or tensor.dim() != 2 or list(tensor.shape).count(intermediate) != 1:
            continue
        axis = tensor.shape.index(intermediate)
        scores = scores * tensor.float().norm(dim=1 - axis)
    return scores


def _ffn_neurons(teacher_state: dict[str, torch.Tensor], layer_prefix: str, teacher_size: int, student_size: int,
                 how: str) -> torch.Tensor:
    """Which of the teacher's FFN neurons (in their original order) a narrower student layer keeps."""
    if how == "first":
        return torch.arange(student_size)
    top = ffn_neuron_scores(teacher_state, layer_prefix, teacher_size).topk(student_size).indices
    return top.sort().values


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module, layer_map: list[int],
                      intermediate_init: str = "norm") -> tuple[int, int]:
    """Copy every teacher tensor whose shape matches into the student (student layer j <- teacher layer
    layer_map[j]); with a narrower FFN (fewer intermediate neurons, same width) a layer's FFN tensors take the
    teacher's rows/columns of the kept neurons (``intermediate_init``: the largest-norm ones, or the first);
    the rest keep their random init. Returns (copied, total) student tensors."""
    if intermediate_init not in INTERMEDIATE_INITS:
        raise ValueError(f"--intermediate-init {intermediate_init!r} is not supported; choose norm or first")
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    teacher_ffn = getattr(teacher.config, "intermediate_size", None)
    student_ffn = getattr(student.config, "intermediate_size", None)
    kept: dict[str, torch.Tensor] = {}  # teacher layer prefix -> kept FFN neurons
    copied = 0
    for name, tensor in student_state.items():
        match = _LAYER_INDEX.search(name)
        source = name
        if match is not None:
            teacher_index = layer_map[int(match.group(2))]
            source = name[: match.start(2)] + str(teacher_index) + name[match.end(2):]
        original = teacher_state.get(source)
        if original is None or original.dim() != tensor.dim():
            continue
        if original.shape != tensor.shape and match is not None and teacher_ffn and student_ffn and student_ffn < teacher_ffn:
            narrowed = [d for d in range(tensor.dim()) if original.shape[d] != tensor.shape[d]]
            if len(narrowed) == 1 and (original.shape[narrowed[0]], tensor.shape[narrowed[0]]) == (teacher_ffn, student_ffn):
                prefix = source[: match.end()]
                if prefix not in kept:
                    kept[prefix] = _ffn_neurons(teacher_state, prefix, teacher_ffn, student_ffn, intermediate_init)
                original = original.index_select(narrowed[0], kept[prefix])
        if original.shape == tensor.shape:
            tensor.copy_(original.to(tensor.dtype))
            copied += 1
    return copied, len(student_state)
