#!/usr/bin/env bash
# The last device call of a session: the whole GPU suite (benchmarks/gpu_final_check.sh, AB=0; its tarball is
# written first, so it survives a later cut), then short re-measures on the idle card, each in its own time box.
#   bash benchmarks/gpu_session_end.sh        # $OUT/final_check.tgz, $OUT/structured_throughput.json, online JSON
set -uo pipefail
AB=0 bash benchmarks/gpu_final_check.sh
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
timeout 150 python3 benchmarks/structured_throughput.py --preset llama3-8b --batch-sizes 64 256 --max-tokens 128 \
  > "$OUT/structured.log" 2>&1; echo "structured rc=$?"; tail -8 "$OUT/structured.log"
timeout 170 python3 benchmarks/gpu_online_vs_offline.py --warmup-prompts 100 --profile-prompts 0 --no-step-breakdown \
  --out "$OUT" > "$OUT/online.log" 2>&1; echo "online rc=$?"; tail -12 "$OUT/online.log"
