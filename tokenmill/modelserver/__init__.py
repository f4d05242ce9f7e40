"""The non-LLM path: export torch models to ONNX, simplify, validate, quantize, benchmark, and serve them.

``tokenmill export`` builds a model repository; ``tokenmill serve-models`` serves it over KServe v2 (see docs/MODELSERVER.md).
"""
