#!/usr/bin/env bash
# Issue 26's remaining figures on the 16-core GPU host, one device call (< 8 minutes), everything under $OUT:
#   (a) the classifier served on CUDA (torch fp16 CUDA graphs) with 1 and 4 HTTP workers, JPEG and PNG photos,
#       16/32/64/256 clients, plus the backend alone (uint8 pixels and float32 tensors);
#   (b) sentiment on onnxruntime's CPU EP, direct vs served (1 and 4 workers), 16/64/256 clients.
# Needs the carried wheels (.whl: fastapi, uvicorn, ...) and .modelserver_carry (gpu_modelserver.py --prepare).
#   bash benchmarks/gpu_modelserver_issue26.sh
set -uo pipefail
out="${OUT:-/tmp/issue26}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" OUT="$out"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; uptime; git rev-parse HEAD 2>/dev/null; } \
  > "$out/host.txt" 2>&1
start=$(date +%s)
timeout "${CLASSIFIER_TIMEOUT:-280}" python3 -u benchmarks/gpu_modelserver.py --carry .modelserver_carry \
  --parts ceiling,classifier --workers 1,4 --classifier-concurrency 16,32,64,256 --seconds 4 --client-procs 4 \
  --ceiling-batch-sizes 1,8,32,64 > "$out/classifier.log" 2>&1
echo "== classifier: exit $? in $(( $(date +%s) - start )) s"; tail -n 30 "$out/classifier.log"
start=$(date +%s)
timeout "${ORT_TIMEOUT:-170}" python3 -u benchmarks/modelserver_ort_served.py --graph .modelserver_carry/sentiment_graph.onnx \
  --tokenizer-dir .modelserver_carry/minilm --workers 1,4 --concurrency 16,64,256 --seconds 5 --client-procs 4 \
  --direct-seconds 1.5 > "$out/ort_sentiment.log" 2>&1
echo "== ort sentiment: exit $? in $(( $(date +%s) - start )) s"; tail -n 20 "$out/ort_sentiment.log"
