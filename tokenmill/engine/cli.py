"""``tokenmill generate [MODEL] --prompt ...``: one-shot generation from the command line."""

from __future__ import annotations

import argparse
import logging

from tokenmill.sampling_params import SamplingParams


def add_engine_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model_flag: bool = False) -> None:
    """Engine flags shared by generate, serve and bench (vLLM's names where the meaning matches).

    The model is positional (``tokenmill serve MODEL``) unless ``model_flag`` asks for ``--model``.
    """
    model_help = "HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)"
    if model_flag:
        parser.add_argument("--model", default=None, help=model_help)
    else:
        parser.add_argument("model", nargs="?", default=None, help=model_help)
    parser.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per engine step (default: 8192 on CUDA, 2048 on CPU)")
    parser.add_argument("--long-prefill-token-threshold", type=int, default=0,
                        help="most prompt tokens one request computes per step (0: no cap); lower keeps running "
                             "decodes' inter-token latency steadier when long prompts arrive, at some TTFT")
    parser.add_argument("--kv-reservation", default="none", choices=["none", "request", "max-model-len"],
                        help="reserve each request's whole KV at admission, as a contiguous allocator would "
                             "(request: prompt + max_tokens); for measuring what paging buys, never faster")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", type=float, default=None, help="KV cache budget in GiB (CPU)")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="explicit KV block count")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                        help="KV cache storage: auto (the model's dtype) or FP8 (half the bytes of bf16: twice the "
                             "tokens; sm89+ on GPUs, emulated on CPU)")
    parser.add_argument("--calculate-kv-scales", action="store_true",
                        help="FP8 KV cache: set each layer's k/v scale from the first step's keys/values (else 1.0)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--max-cudagraph-capture-size", type=int, default=None,
                        help="largest decode batch captured as a CUDA graph (default: min(max-num-seqs, 512)); "
                             "larger decode steps run eagerly or through piecewise graphs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-weights", default=None, help="preset name: random weights of a real shape")
    parser.add_argument("--quantization", "-q", default=None,
                        help="weight format: read from the checkpoint when omitted (gptq, awq, compressed-tensors, "
                             "gguf); rtn4 | int8 quantize a dense model at load")
    parser.add_argument("--quant-weight-layout", default="auto", choices=["auto", "gptq", "kmajor"],
                        help="device layout of 4-bit weight-only linears (GPTQ, AWQ, compressed-tensors, rtn4) on "
                             "CUDA: gptq (packed along K as loaded), kmajor (one K-major copy: the fast batch-1 "
                             "GEMV, a tensor-core GEMM and dequantize + cuBLAS for prefill), auto (gptq for now; "
                             "layers kmajor cannot serve keep gptq)")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="the LM head quantized at load too (default: bf16, as vLLM): FP8 per vocabulary row "
                             "with --quantization fp8 or an FP8 checkpoint; 4-/8-bit codes with rtn4 / int8")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="ranks sharing each layer, one process per rank (gloo on CPU, NCCL on GPUs)")
    parser.add_argument("--custom-all-reduce", action="store_true",
                        help="tensor parallelism on GPUs: small all-reduces by a one-shot kernel over CUDA IPC "
                             "buffers instead of NCCL (experimental)")
    parser.add_argument("--compilation-config", "-O", default=None, metavar="JSON",
                        help='vLLM\'s key cudagraph_mode: FULL_AND_PIECEWISE (default) also replays graphs for '
                             'steps with prompts (attention eager between them); \'{"cudagraph_mode": '
                             '"FULL_DECODE_ONLY"}\' graphs decode steps only; NONE is --enforce-eager. '
                             'pass_config fuse_norm_quant / fuse_act_quant (default true): RMSNorm / SiLU-and-mul '
                             'write FP8 for the next W8A8 linear')
    parser.add_argument("--speculative-config", default=None, metavar="JSON",
                        help='speculative decoding, vLLM\'s keys: \'{"method": "ngram", "num_speculative_tokens": 4, '
                             '"prompt_lookup_max": 4, "prompt_lookup_min": 1}\', \'{"method": "draft_model", '
                             '"model": PATH, "num_speculative_tokens": 4}\' or \'{"method": "eagle", "model": '
                             'EAGLE_HEAD_DIR, "num_speculative_tokens": 2}\'')


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        kv_reservation=args.kv_reservation,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_dtype=args.kv_cache_dtype,
        calculate_kv_scales=args.calculate_kv_scales,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager,
        max_cudagraph_capture_size=args.max_cudagraph_capture_size,
        seed=args.seed,
        random_weights=args.random_weights,
        quantization=args.quantization,
        quant_weight_layout=args.quant_weight_layout,
        quantize_lm_head=args.quantize_lm_head,
        tensor_parallel_size=args.tensor_parallel_size,
        custom_all_reduce=args.custom_all_reduce,
        speculative_config=args.speculative_config,
        compilation_config=args.compilation_config,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text offline for one or more prompts")
    add_engine_arguments(parser)
    parser.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message with the chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--sample-seed", type=int, default=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.engine.llm import LLM

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prompts = args.prompt or ["What is the capital of France?"]
    chat = args.chat or args.prompt is None
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sample_seed)
    llm = LLM(**engine_kwargs(args))
    if chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        print(f"### {prompt}\n{output.outputs[0].text}\n")
    return 0
