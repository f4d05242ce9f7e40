"""Every weight format shipped with tokenmill, registered with model/linear_method.py's registry on import.

gptq, awq, compressed-tensors (+ its pack-quantized int schemes), rtn4, int8; fp8 (W8A8 e4m3 checkpoints,
--quantization fp8) and the compressed-tensors float-quantized FP8 scheme.
"""

from tokenmill.quantization import compressed_tensors, fp8, fp8_compressed_tensors, linear_methods, online  # noqa: F401
