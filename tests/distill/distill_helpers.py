"""Tiny teachers for distillation tests: a 4-layer random Llama (the tiny BPE tokenizer), a 4-layer random BERT with
MiniLM's tokenizer + a random two-label head, a 2-layer in-memory Llama with its greedy answers and features (the
EAGLE head's), plus a short training text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tokenmill.distill.encoder import ENCODER_TOKENIZER_FILES
from tokenmill.modelserver.bundled import SENTIMENT_LABELS, minilm_dir

TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "Continuous batching keeps the GPU busy; paged attention stores keys and values in blocks. "
    "Once upon a time there was a little model that generated tokens one at a time. "
    "A wise man will hear, and will increase learning; a fool despiseth wisdom and instruction.\n"
) * 12


def write_text(path: Path, text: str = TEXT) -> Path:
    path.write_text(text)
    return path


def make_tiny_bert_teacher(directory: Path, layers: int = 4, hidden: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """(encoder directory, head JSON): random weights, MiniLM's WordPiece tokenizer (30522 tokens)."""
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=hidden * 2, max_position_embeddings=256)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    for name in ENCODER_TOKENIZER_FILES:
        shutil.copy2(minilm_dir() / name, directory / name)
    head = torch.nn.Linear(hidden, len(SENTIMENT_LABELS))
    torch.nn.init.normal_(head.weight, std=3.0)  # a sharp head, so its soft labels carry signal
    head_path = directory / "head.json"
    head_path.write_text(json.dumps({"labels": list(SENTIMENT_LABELS), "weight": head.weight.tolist(),
                                     "bias": head.bias.tolist()}))
    return directory, head_path


def tiny_eagle_teacher():
    """A 2-layer random Llama (vocab 96, hidden 64) with a sharpened head, so greedy answers vary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, rope_theta=10000.0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a sharper head, so greedy answers vary instead of repeating one token
        model.lm_head.weight.mul_(20)
    return model


def tiny_eagle_features(teacher, count: int):
    """``count`` seeded 6-token prompts, the teacher's 16-token greedy answers and its features over them."""
    from tokenmill.distill.eagle_data import compute_features
    from tokenmill.spec_decode.eagle_reference import plain_greedy

    generator = torch.Generator().manual_seed(1)
    records = []
    for _ in range(count):
        prompt = torch.randint(3, 96, (6,), generator=generator).tolist()
        records.append({"prompt_ids": prompt, "output_ids": plain_greedy(teacher, prompt, 16, None)})
    return compute_features(teacher, records, log_every=0)
