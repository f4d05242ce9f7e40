#!/usr/bin/env bash
# Download the Python 3.12 manylinux x86_64 wheels the GPU box lacks for the online benchmark
# (benchmarks/gpu_online_vs_offline.py): the server stack, the engine-core channel (pyzmq, msgspec), uvicorn's
# fast event loop and HTTP parser (uvloop, httptools: without them uvicorn falls back to asyncio + h11) and py-spy.
# Versions are the ones the CPU tests ran with. The GPU box already has click, h11, anyio, httpx, psutil,
# matplotlib, rich, typing-extensions, numpy, torch.
#
#   bash benchmarks/fetch_gpu_wheels.sh [DIR]        # default DIR: .whl (add "/.whl/" to .git/info/exclude)
# then on the GPU box:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH     # py-spy's binary lands in /tmp/site/bin
set -euo pipefail
dest="${1:-.whl}"
mkdir -p "$dest"
PIP="${PIP:-python3 -m pip}"
packages=(
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 opentelemetry-api==1.45.3 annotated-doc==0.0.7  # fastapi 0.165 imports opentelemetry
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  pyzmq==27.3.0 msgspec==0.23.0
  uvloop==0.23.0 httptools==0.9.0
  py-spy
  # the GPU test suite (benchmarks/gpu_suite.sh): the openai client (httpx2 needs truststore), gguf, xgrammar + deps
  openai jiter sniffio httpx2 httpcore2 truststore gguf
  xgrammar apache-tvm-ffi jsonschema jsonschema-specifications referencing rpds-py attrs
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64; do
  platforms+=(--platform "$p")
done
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$dest" "${packages[@]}"
ls -la "$dest"
