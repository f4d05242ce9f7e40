#!/usr/bin/env bash
# One device call at a session's end: the whole GPU test suite (its four groups in parallel: correctness only, the
# card has room for all of them), then issue 18's timing A/B alone on the idle card.
#   bash benchmarks/gpu_final_check.sh [BASELINE_DIR]     # logs and JSON under $OUT
set -uo pipefail
out="${OUT:-/tmp/final}"; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
for g in kernels quantization model engine; do
  OUT="$out" bash benchmarks/gpu_suite.sh "$g" > "$out/suite_$g.console" 2>&1 &
done
wait
for g in kernels quantization model engine; do echo "== $g: $(tail -n 3 "$out/gpu_suite_$g.txt" | grep -E 'passed|failed|error' | tail -1)"; done
OUT="$out" bash benchmarks/gpu_ab_vs_transformers.sh "${1:-.baseline}"
