"""Weight-only quantization: ``tokenmill quantize`` (RTN, GPTQ, AWQ) writing GPTQ/AWQ checkpoints, the
quantized linear methods that serve them kept in low bits, and ``tokenmill eval perplexity``.

Importing the package registers the GPTQ and AWQ formats with model/linear_method.py's registry (which imports
this package on its first lookup).
"""

import tokenmill.quantization.fp8  # noqa: F401  (registers fp8: W8A8 e4m3 checkpoints, --quantization fp8)
from tokenmill.quantization import linear_methods, online  # noqa: F401  (register gptq, awq, rtn4, int8)

try:  # registers the float-quantized FP8 scheme with the compressed-tensors dispatcher
    from tokenmill.quantization import fp8_compressed_tensors  # noqa: F401
except ModuleNotFoundError as exc:  # the dispatcher (quantization/compressed_tensors.py) comes with i20-quant2
    if exc.name != "tokenmill.quantization.compressed_tensors":
        raise
