#!/usr/bin/env bash
# The whole GPU test suite on the device box, as separate pytest runs (tests/kernels and tests/quantization
# each import their own `conftest` module by name, so they cannot share one pytest process).
#   bash benchmarks/gpu_suite.sh GROUP...      GROUP: kernels | quantized_kernels | w4_kernels | quantization |
#                                                     model | engine | spec | distributed | all
# (kernels, quantized_kernels and w4_kernels are split so that run in parallel no group takes much longer than the
# others: on a fresh machine the W4 files' compiles alone took over 120 s.)
# Wheels the box lacks travel in .whl/ (benchmarks/fetch_gpu_wheels.sh); the log of each group goes to $OUT.
set -uo pipefail
out="${OUT:-/tmp/gpu_suite}"; mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import fastapi, xgrammar" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
ALL_GROUPS="kernels quantized_kernels w4_kernels quantization model engine spec distributed"
declare -A groups=(
  [kernels]="tests/kernels --ignore-glob=*fp8_* --ignore-glob=*wna16_* --ignore-glob=*w4_gemv* --ignore-glob=*w4_kmajor*"
  [quantized_kernels]="tests/kernels/test_fp8_gemm.py tests/kernels/test_fp8_fused_quant.py tests/kernels/test_fp8_gemv.py tests/kernels/test_fp8_stream.py tests/kernels/test_fp8_kv_kernels.py tests/kernels/test_wna16_gemm.py tests/kernels/test_wna16_splitk.py"
  [w4_kernels]="tests/kernels/test_w4_gemv.py tests/kernels/test_w4_kmajor_gemm.py tests/kernels/test_w4_kmajor_dequant.py"
  [quantization]="tests/quantization"
  [model]="tests/model tests/test_kv_cache.py tests/test_kv_cache_fp8.py tests/test_torch_attention.py tests/sampling tests/structured tests/distill/test_distill_gpu.py tests/bench/test_jit_watch.py tests/bench/test_throughput.py tests/gateway/test_gateway_health.py"
  [engine]="tests/engine"
  [spec]="tests/spec_decode"
  [distributed]="tests/distributed tests/modelserver/test_torch_backend.py"
)
names=("$@"); [ "${names[0]:-all}" = all ] && names=(${ALL_GROUPS})
status=0
for g in "${names[@]}"; do
  echo "== $g: ${groups[$g]}"
  python3 -m pytest ${groups[$g]} -q -p no:cacheprovider 2>&1 | tee "$out/gpu_suite_$g.txt" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/device.txt"
exit $status
