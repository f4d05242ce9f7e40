#!/usr/bin/env bash
# Issue 26's remaining figures on the 16-core GPU host, one device call (~3.5 minutes), everything under $OUT:
#   (a) the classifier served on CUDA (torch fp16 CUDA graphs) with 1 and 4 HTTP workers, a 640 x 427 JPEG photo
#       per request, 16/64/256 clients, plus the backend alone on uint8 pixels (what /v1/classify hands it);
#   (b) sentiment on onnxruntime's CPU EP, direct (best batch) vs served (1 and 4 workers), 16/64/256 clients.
# Needs the carried wheels (.whl: fastapi, uvicorn, ...) and .modelserver_carry (gpu_modelserver.py --prepare).
#   bash benchmarks/gpu_modelserver_issue26.sh        (FULL=1: also PNG bodies, 32 clients, float32 ceiling)
set -uo pipefail
out="${OUT:-/tmp/issue26}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" OUT="$out"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; uptime; } > "$out/host.txt" 2>&1
if [ "${FULL:-0}" = 1 ]; then
  extra=(--images jpeg,png --classifier-concurrency 16,32,64,256 --ceiling-image-inputs uint8,float32 --seconds 4)
else
  extra=(--images jpeg --classifier-concurrency 16,64,256 --ceiling-image-inputs uint8 --seconds 3)
fi
start=$(date +%s)
timeout "${CLASSIFIER_TIMEOUT:-130}" python3 -u benchmarks/gpu_modelserver.py --carry .modelserver_carry \
  --parts ceiling,classifier --workers 4,1 --client-procs 2 --ceiling-batch-sizes 1,8,64 --iterations 30 \
  "${extra[@]}" > "$out/classifier.log" 2>&1
echo "== classifier: exit $? in $(( $(date +%s) - start )) s"; tail -n 20 "$out/classifier.log"
start=$(date +%s)
timeout "${ORT_TIMEOUT:-100}" python3 -u benchmarks/modelserver_ort_served.py \
  --graph .modelserver_carry/sentiment_graph.onnx --tokenizer-dir .modelserver_carry/minilm --workers 4,1 \
  --concurrency 16,64,256 --seconds 3 --client-procs 2 --batch-sizes 16,32,64,128 --direct-spinning on \
  --direct-seconds 1 > "$out/ort_sentiment.log" 2>&1
echo "== ort sentiment: exit $? in $(( $(date +%s) - start )) s"; tail -n 20 "$out/ort_sentiment.log"
