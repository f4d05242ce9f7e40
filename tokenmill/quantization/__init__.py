"""Weight-only quantization: ``tokenmill quantize`` (RTN, GPTQ, AWQ) writing GPTQ/AWQ checkpoints, the
quantized linear methods that serve them kept in low bits, and ``tokenmill eval perplexity``.

The formats register with model/linear_method.py's registry when ``quantization/formats.py`` is imported, which
the registry does on its first lookup; importing this package alone stays light (no torch), so the CLI can list
``quantize`` without the gateway or model server paying for torch at start-up.
"""
