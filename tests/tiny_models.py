"""Tiny random models of real architectures, saved as Hugging Face directories, for fast CPU tests.

The tokenizer is a small byte-level BPE trained here on a fixed text (so multi-byte UTF-8 is exercised),
with a ChatML chat template; weights come from transformers' own classes with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "Continuous batching keeps the GPU busy; paged attention stores keys and values in blocks.",
    "Unicode: café, naïve, Straße, 東京, 北京, emoji 🚀🔥, Ελληνικά, русский текст.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n",
    "Once upon a time there was a little model that generated tokens one at a time.",
] * 20

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def build_tokenizer(directory: Path, vocab_size: int = 384) -> int:
    """Train and save a byte-level BPE tokenizer; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return len(fast)


def _config(arch: str, vocab_size: int, eos_id: int, overrides: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        eos_token_id=eos_id,
        bos_token_id=SPECIAL_TOKENS.index("<|im_start|>"),
        tie_word_embeddings=False,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common, rope_theta=10000.0)
    elif arch == "mistral":
        cfg = MistralConfig(**common, rope_theta=10000.0, sliding_window=None)
    elif arch == "qwen2":
        cfg = Qwen2Config(**{**common, "tie_word_embeddings": True}, rope_theta=1e6, use_sliding_window=False)
    elif arch == "qwen3":
        cfg = Qwen3Config(**{**common, "tie_word_embeddings": True}, head_dim=32, rope_theta=1e6, use_sliding_window=False)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_tiny_model_dir(directory: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a 2-layer random model of ``arch`` with the tiny tokenizer into ``directory``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(directory)
    eos_id = SPECIAL_TOKENS.index("<|im_end|>")  # special tokens take the first ids, in order
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, vocab, eos_id, overrides), dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; widen it so logits are not all near-equal
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    GenerationConfig(eos_token_id=eos_id, bos_token_id=SPECIAL_TOKENS.index("<|im_start|>")).save_pretrained(directory)
    return directory


def round_weights_to_bf16(directory: Path) -> Path:
    """Round every saved tensor to a bf16-representable value (kept fp32), in place.

    Quantizing at load happens after the cast to the serving dtype, so a bf16 and an fp32 model of one fp32
    checkpoint hold different codes (a rounding boundary moves with the cast). On bf16-exact weights both quantize
    the same values, and a bf16-vs-fp32 comparison measures the kernels, not two different quantizations.
    """
    from safetensors.torch import load_file, save_file

    for shard in Path(directory).glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({name: t.to(torch.bfloat16).to(t.dtype) for name, t in tensors.items()}, shard,
                  metadata={"format": "pt"})
    return Path(directory)


def transformers_greedy(model_dir: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """transformers ``generate`` greedy continuations (fp32), each cut after its first EOS: the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    outputs = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=eos)
        new = out[0, len(ids):].tolist()
        outputs.append(new[: new.index(eos) + 1] if eos in new else new)
    return outputs
