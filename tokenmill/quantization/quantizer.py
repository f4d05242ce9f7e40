"""``tokenmill quantize``: RTN / GPTQ / AWQ over a transformers model, one decoder layer at a time.

The model stays on the CPU in its own dtype; each decoder layer in turn moves to ``device`` in fp32, runs the
calibration activations (captured from the running model at layer 0, then the previous quantized layer's
outputs) with hooks that sum each linear's input Hessian, has its linears quantized, and goes back. Only one
layer and the activations are ever on the device, so an 8B model fits a single GPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tokenmill.quantization.awq import output_error, search_scales
from tokenmill.quantization.calibration import CALIBRATION_TEXT, calibration_samples, read_text
from tokenmill.quantization.gptq import gptq_quantize
from tokenmill.quantization.packing import QuantizedWeight, check_bits, rtn_quantize

METHODS = ("rtn", "gptq", "awq")
# Linears that read the same input tensor share one Hessian (computed once: the Hessian sums dominate the cost).
SHARED_INPUTS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


CHECKPOINT_FORMATS = ("gptq", "awq", "compressed-tensors")


@dataclass
class QuantizeConfig:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool | None = None  # None: symmetric for rtn/gptq (the GPTQ kernels' common case), zero points for awq
    act_order: bool = False
    damp_percent: float = 0.01
    num_samples: int = 128
    seq_len: int = 512
    calib_data: str | None = None
    device: str = "cpu"
    format: str | None = None  # checkpoint convention: gptq | awq | compressed-tensors (None: by method)
    lm_head: bool = False  # the (untied) LM head too, on the final norm's outputs (GPTQModel's lm_head=True)

    def __post_init__(self) -> None:
        if self.format not in (None, *CHECKPOINT_FORMATS):
            raise ValueError(f"--format {self.format!r} is not supported; choose one of {', '.join(CHECKPOINT_FORMATS)}")
        if self.format is not None and self.format != "compressed-tensors" and self.format != self._by_method():
            raise ValueError(f"--method {self.method} writes the {self._by_method()!r} or 'compressed-tensors' "
                             f"format; got --format {self.format}")
        if self.format == "compressed-tensors" and importlib.util.find_spec("compressed_tensors") is None:
            raise ValueError("--format compressed-tensors needs the compressed-tensors package: "
                             "pip install compressed-tensors")
        if self.format == "compressed-tensors" and self.act_order:
            raise ValueError("--act-order writes a per-channel group index (g_idx), which the compressed-tensors "
                             "format no longer takes (actorder 'group' was removed); drop --act-order or use "
                             "--format gptq")
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        check_bits(self.bits)
        if self.group_size != -1 and self.group_size < 8:
            raise ValueError(f"--group-size {self.group_size} is too small; use 32, 64, 128 or -1 (one group)")
        if self.sym is None:
            self.sym = self.method != "awq"
        if self.method == "awq" and (self.bits != 4 or self.sym):
            raise ValueError("AWQ checkpoints hold 4-bit weights with zero points: use --bits 4 without --sym")
        if self.act_order and self.method != "gptq":
            raise ValueError("--act-order applies to --method gptq only")
        if self.lm_head and self.checkpoint_format != "gptq":
            raise ValueError("--lm-head writes the GPTQ convention's lm_head: true (vLLM reads it); the "
                             f"{self.checkpoint_format!r} format keeps the LM head dense: use --format gptq with "
                             "--method gptq or rtn")
        if not 0.0 < self.damp_percent < 1.0:
            raise ValueError(f"--damp-percent must lie in (0, 1); got {self.damp_percent}")

    def _by_method(self) -> str:
        return "awq" if self.method == "awq" else "gptq"

    @property
    def checkpoint_format(self) -> str:
        return self.format or self._by_method()


@dataclass
class LayerReport:
    name: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    rel_error: float  # ||X (W - Wq)^T|| / ||X W^T|| on the calibration inputs


@dataclass
class QuantizeResult:
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # module name -> quantized weight
    reports: list[LayerReport] = field(default_factory=list)


class _InputStats:
    """Forward hook: running H = 2 X^T X / n and mean |x| per input channel of one linear."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.hessian = torch.zeros(in_features, in_features, device=device)
        self.abs_sum = torch.zeros(in_features, device=device)
        self.count = 0

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        total = self.count + x.shape[0]
        self.hessian.mul_(self.count / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.abs_sum += x.abs().sum(dim=0)
        self.count = total

    @property
    def act_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


class _StopForward(Exception):
    """Raised by the layer-0 hook once the calibration input is captured (the rest of the model is skipped)."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: only Llama-family decoders are supported")
    return layers


def capture_layer_inputs(model: nn.Module, samples: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering decoder layer 0 for each sample ([1, seq, hidden] each) and the keyword arguments
    the model passes its layers (rotary embeddings, mask), taken from the running model itself."""
    layer0 = decoder_layers(model)[0]
    captured: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in samples:
            try:
                model(input_ids=row[None, :], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen.pop("past_key_value", None)
    return captured, kwargs_seen


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float32) if value.is_floating_point() else value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    outputs = []
    for hidden in inputs:
        out = layer(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def _first_reader(name: str) -> bool:
    return not any(name in group[1:] for group in SHARED_INPUTS)


def _input_stats(layer: nn.Module, device: torch.device) -> dict[str, _InputStats]:
    """One statistics object per linear; linears of a SHARED_INPUTS group get the same object."""
    linears = _linears(layer)
    stats = {name: _InputStats(mod.in_features, device) for name, mod in linears.items()}
    for group in SHARED_INPUTS:
        if all(name in linears for name in group):
            for name in group[1:]:
                stats[name] = stats[group[0]]
    return stats


def _awq_groups(layer: nn.Module) -> list[tuple[str, list[str]]]:
    """(producer of the input, linears reading it), down first: its scale folds into up_proj before gate/up
    are searched. o_proj is scaled through v_proj only without grouped-query attention (shapes must match)."""
    groups = [("mlp.up_proj", ["mlp.down_proj"]), ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj",
              "self_attn.v_proj"]), ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])]
    v_proj = layer.get_submodule("self_attn.v_proj")
    o_proj = layer.get_submodule("self_attn.o_proj")
    if v_proj.out_features == o_proj.in_features:
        groups.insert(0, ("self_attn.v_proj", ["self_attn.o_proj"]))
    return groups


def _fold_inverse_scale(producer: nn.Module, scale: torch.Tensor) -> None:
    """Divide the producer's output channels by ``scale`` (an RMSNorm weight, or a linear's rows and bias)."""
    producer.weight.div_(scale.view(-1, *([1] * (producer.weight.dim() - 1))))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(scale)


def _quantize_layer(
    layer: nn.Module, stats: dict[str, _InputStats], config: QuantizeConfig
) -> dict[str, tuple[QuantizedWeight, tuple[torch.Tensor, torch.Tensor]]]:
    """Quantize every linear of one decoder layer in place (weights replaced by their dequantized values);
    returns name -> (quantized weight, (weight before rounding, after), both in the original input space so
    AWQ's scaling, which only moves where the rounding lands, is not counted as error)."""
    linears = _linears(layer)
    input_scale = {name: torch.ones(mod.in_features, device=mod.weight.device) for name, mod in linears.items()}
    if config.method == "awq":
        for producer_name, names in _awq_groups(layer):
            stat = stats[names[0]]
            scale = search_scales([linears[n].weight for n in names], stat.hessian, stat.act_mean,
                                  config.bits, config.group_size)
            _fold_inverse_scale(layer.get_submodule(producer_name), scale)
            for n in names:
                linears[n].weight.mul_(scale)
                input_scale[n] = scale
    results = {}
    for name, mod in linears.items():
        if config.method == "gptq":
            # H of the unscaled input (AWQ is the only method that rescales inputs).
            qw = gptq_quantize(mod.weight, stats[name].hessian, config.bits, config.group_size, bool(config.sym),
                               config.act_order, config.damp_percent)
        else:
            qw = rtn_quantize(mod.weight, config.bits, config.group_size, bool(config.sym))
        before = mod.weight.detach().clone() / input_scale[name]
        dense = qw.dequantize().to(mod.weight.device)
        mod.weight.copy_(dense)
        results[name] = (qw, (before, dense / input_scale[name]))
    return results


def quantize_model(model: nn.Module, tokenizer, config: QuantizeConfig, progress: bool = True) -> QuantizeResult:
    """Quantize ``model`` (a transformers Llama-family model on the CPU) in place; see the module docstring."""
    from tqdm import tqdm

    if config.lm_head and getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("--lm-head: this model ties its LM head to the input embedding table "
                         "(tie_word_embeddings), which stays dense; drop --lm-head")
    device = torch.device(config.device)
    text = read_text(config.calib_data, CALIBRATION_TEXT)
    samples = calibration_samples(tokenizer, text, config.num_samples, config.seq_len)
    result = QuantizeResult()
    with torch.no_grad():
        inputs, kwargs = capture_layer_inputs(model, samples)
        inputs = [_to(x, device) for x in inputs]
        kwargs = {k: _to(v, device) for k, v in kwargs.items()}
        layers = decoder_layers(model)
        bar = tqdm(list(enumerate(layers)), desc=f"{config.method} {config.bits}-bit", unit="layer",
                   disable=not progress)
        for index, layer in bar:
            original_dtype = next(layer.parameters()).dtype
            layer.to(device, torch.float32)
            stats = _input_stats(layer, device)
            handles = [layer.get_submodule(n).register_forward_hook(stat) for n, stat in stats.items()
                       if _first_reader(n)]
            try:
                _run_layer(layer, inputs, kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            for name, (qw, (before, after)) in _quantize_layer(layer, stats, config).items():
                full_name = f"model.layers.{index}.{name}"
                result.weights[full_name] = qw
                hessian = stats[name].hessian
                rel = output_error(after - before, hessian) / max(output_error(before, hessian), 1e-30)
                result.reports.append(LayerReport(full_name, rel**0.5))
            inputs = _run_layer(layer, inputs, kwargs)
            layer.to("cpu", original_dtype)
        if config.lm_head:
            _quantize_lm_head(model, inputs, config, result)
    return result


def _quantize_lm_head(model: nn.Module, hidden: list[torch.Tensor], config: QuantizeConfig,
                      result: QuantizeResult) -> None:
    """The LM head on the final norm of the last layer's outputs (its inputs), like any decoder linear."""
    head, norm = model.get_output_embeddings(), model.model.norm
    device = hidden[0].device
    originals = [(m, next(m.parameters()).dtype) for m in (head, norm)]
    head.to(device, torch.float32)
    norm.to(device, torch.float32)
    stats = _InputStats(head.in_features, device)
    inputs = [norm(x) for x in hidden]
    for x in inputs:
        stats(head, (x,), None)
    layer = nn.Module()
    layer.add_module("lm_head", head)
    (qw, (before, after)), = _quantize_layer(layer, {"lm_head": stats}, config).values()
    result.weights["lm_head"] = qw
    rel = output_error(after - before, stats.hessian) / max(output_error(before, stats.hessian), 1e-30)
    result.reports.append(LayerReport("lm_head", rel**0.5))
    for module, dtype in originals:
        module.to("cpu", dtype)


def load_source_model(model_path: str | Path):
    """(transformers model in its checkpoint dtype on the CPU, tokenizer) from an HF directory or a .gguf file
    (transformers dequantizes GGUF tensors; the embedded SmolLM2 is Q4_1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        kwargs = {"gguf_file": path.name}
        location = str(path.parent)
    elif path.is_dir() and (path / "config.json").is_file():
        kwargs, location = {}, str(path)
    else:
        raise ValueError(f"model {str(path)!r} is neither a directory with config.json nor a .gguf file")
    model = AutoModelForCausalLM.from_pretrained(location, dtype="auto", **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    return model, tokenizer
