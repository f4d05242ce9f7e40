"""``tokenmill quantize MODEL --method rtn|gptq|awq|fp8 --out DIR`` and ``tokenmill eval perplexity [MODEL]``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    quantize = subparsers.add_parser("quantize", help="quantize a model's linears to 4/8-bit (GPTQ/AWQ format) or FP8")
    quantize.add_argument("model", help="HF directory or .gguf file (GGUF tensors are dequantized first)")
    quantize.add_argument("--out", required=True, help="output directory (an HF checkpoint)")
    quantize.add_argument("--method", default="gptq", choices=("rtn", "gptq", "awq", "fp8"),
                          help="fp8: e4m3 weights (W8A8, sm89+ to serve); the other options below apply to 4/8-bit")
    quantize.add_argument("--bits", type=int, default=4, choices=(4, 8))
    quantize.add_argument("--format", default=None, choices=("gptq", "awq", "compressed-tensors", "fp8"),
                          help="checkpoint convention (default: awq for --method awq, compressed-tensors for "
                               "--method fp8, else gptq); compressed-tensors pack-quantized needs the "
                               "compressed-tensors package; fp8: vLLM's quant_method fp8 (per-tensor scales)")
    quantize.add_argument("--activation-scheme", default="dynamic", choices=("dynamic", "static"),
                          help="--method fp8: per-token scales computed at run time, or one static scale per "
                               "linear from the calibration text")
    quantize.add_argument("--group-size", type=int, default=128, help="input channels per scale; -1: one group")
    quantize.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                          help="symmetric codes (default: on for rtn/gptq, off (zero points) for awq)")
    quantize.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation")
    quantize.add_argument("--damp-percent", type=float, default=0.01, help="GPTQ: Hessian damping")
    quantize.add_argument("--lm-head", action="store_true",
                          help="the (untied) LM head too (GPTQ format: lm_head: true, as GPTQModel writes; faster "
                               "decode, larger logit error)")
    quantize.add_argument("--calib-data", default=None, help="text file (default: bundled public-domain KJV excerpt)")
    quantize.add_argument("--num-samples", type=int, default=128)
    quantize.add_argument("--seq-len", type=int, default=512)
    quantize.add_argument("--device", default="cpu", help="where each layer is quantized (cpu | cuda[:N])")
    quantize.set_defaults(func=run_quantize)

    evaluate = subparsers.add_parser("eval", help="evaluate a model's quality")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    ppl = eval_sub.add_parser("perplexity", help="sliding-window perplexity on held-out text")
    ppl.add_argument("model", nargs="?", default=None,
                     help="HF directory (dense, GPTQ or AWQ) or .gguf file (default: embedded SmolLM2)")
    ppl.add_argument("--data", default=None, help="text file (default: bundled KJV excerpt, disjoint from calibration)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    ppl.add_argument("--window", type=int, default=512, help="tokens per forward window")
    ppl.add_argument("--stride", type=int, default=256, help="new tokens scored per window")
    ppl.add_argument("--dtype", default="float32")
    ppl.add_argument("--device", default="cpu")
    ppl.add_argument("--json", default=None, help="also write the result as JSON to this file")
    ppl.set_defaults(func=run_perplexity)


def run_quantize(args: argparse.Namespace) -> int:
    if args.method == "fp8":
        return run_quantize_fp8(args)
    from tokenmill.quantization.checkpoint import save_quantized
    from tokenmill.quantization.quantizer import QuantizeConfig, load_source_model, quantize_model
    from tokenmill.quantization.report import error_table

    config = QuantizeConfig(
        method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym, act_order=args.act_order,
        damp_percent=args.damp_percent, num_samples=args.num_samples, seq_len=args.seq_len,
        calib_data=args.calib_data, device=args.device, format=args.format, lm_head=args.lm_head,
    )
    model, tokenizer = load_source_model(args.model)
    result = quantize_model(model, tokenizer, config)
    out = save_quantized(model, tokenizer, result, config, args.out)
    print(error_table(result.reports))
    print(f"wrote {config.checkpoint_format.upper()} checkpoint to {out}")
    return 0


def run_quantize_fp8(args: argparse.Namespace) -> int:
    """FP8 checkpoint: compressed-tensors float-quantized with per-channel weight scales (llm-compressor's
    FP8_DYNAMIC when dynamic) by default, or vLLM's ``quant_method: fp8`` with per-tensor scales."""
    from pathlib import Path

    fmt = args.format or "compressed-tensors"
    if fmt not in ("compressed-tensors", "fp8"):
        raise ValueError(f"--method fp8 writes the 'compressed-tensors' or 'fp8' format; got --format {fmt}")
    if args.lm_head:
        raise ValueError("--lm-head applies to rtn/gptq checkpoints; FP8 checkpoints keep the LM head dense: serve "
                         "with --quantize-lm-head to quantize it at load")
    if args.bits != 4 or args.group_size != 128 or args.sym is not None or args.act_order:
        # 4 / 128 are the 4-bit defaults: anything else was asked for and means nothing for e4m3.
        raise ValueError("--bits, --group-size, --sym and --act-order apply to rtn/gptq/awq; FP8 keeps one scale "
                         "per output channel (compressed-tensors) or per tensor (--format fp8)")
    from tokenmill.quantization.calibration import CALIBRATION_TEXT, calibration_samples, read_text
    from tokenmill.quantization.fp8_checkpoint import save_fp8
    from tokenmill.quantization.quantizer import load_source_model

    model, tokenizer = load_source_model(args.model)
    prompts = None
    if args.activation_scheme == "static":
        text = read_text(args.calib_data, CALIBRATION_TEXT)
        prompts = calibration_samples(tokenizer, text, args.num_samples, args.seq_len).tolist()
    out = Path(args.out).expanduser()
    save_fp8(model, out, fmt, "tensor" if fmt == "fp8" else "channel", prompts)
    tokenizer.save_pretrained(str(out))
    scales = "per-tensor" if fmt == "fp8" else "per-channel"
    print(f"wrote FP8 ({fmt}, {scales} weight scales, {args.activation_scheme} activations) checkpoint to {out}")
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    import json

    from tokenmill.quantization.perplexity import PerplexityConfig, evaluate_perplexity

    config = PerplexityConfig(model=args.model, data=args.data, max_tokens=args.max_tokens, window=args.window,
                              stride=args.stride, dtype=args.dtype, device=args.device)
    result = evaluate_perplexity(config)
    print(f"perplexity {result['perplexity']:.4f} over {result['num_tokens']} tokens ({result['model']})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0
