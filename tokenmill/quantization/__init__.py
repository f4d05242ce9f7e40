"""Weight-only quantization: ``tokenmill quantize`` (RTN, GPTQ, AWQ) writing GPTQ/AWQ checkpoints, the
quantized linear methods that serve them kept in low bits, and ``tokenmill eval perplexity``."""
