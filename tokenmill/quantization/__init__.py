"""Weight-only quantization: ``tokenmill quantize`` (RTN, GPTQ, AWQ) writing GPTQ/AWQ checkpoints, the
quantized linear methods that serve them kept in low bits, and ``tokenmill eval perplexity``.

Importing the package registers the GPTQ and AWQ formats with model/linear_method.py's registry (which imports
this package on its first lookup).
"""

from tokenmill.quantization import linear_methods, online  # noqa: F401  (register gptq, awq, rtn4, int8)
