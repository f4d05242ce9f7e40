#!/usr/bin/env bash
# A/B of the offline engine between this tree and a baseline tree (default .baseline = `git archive` of an older
# commit), alternating runs on the same GPU: `bench throughput` timing runs plus one profiled run per tree
# (GPU time by kernel category over decode steps, the rest of each step's wall time is host gaps).
#   [PROFILE=0] bash benchmarks/gpu_ab_offline.sh [BASELINE_DIR] [REPEATS]    # JSON, profiles: $OUT/ab_offline
# Workload (a) of gpu_vs_transformers.py: llama3-8b random weights, 128 x 512 -> 128, 8192-token budget.
set -uo pipefail
base="$(cd "${1:-.baseline}" && pwd)"; reps="${2:-2}"
out="${OUT:-/tmp/ab}/ab_offline"; mkdir -p "$out"
args=(bench throughput --random-weights llama3-8b --num-prompts 128 --input-len 512 --output-len 128
      --ignore-eos --max-num-batched-tokens 8192 --device cuda)
run() {  # tree label extra...
  local tree="$1" label="$2"; shift 2
  # cd into the tree: `python -m` puts the working directory ahead of PYTHONPATH
  (cd "$tree" && PYTHONPATH="$tree:${PYTHONPATH:-}" ${PYTHON:-python3} -m tokenmill "${args[@]}" --output-json "$out/$label.json" "$@" \
    > "$out/$label.log" 2>&1)
  echo "$label rc=$? $(grep -E 'output tok/s|decode roofline' "$out/$label.log" | tr -s ' ' | tr '\n' ' ')"
}
for r in $(seq 1 "$reps"); do
  run "$base" "base_r$r"; run "$PWD" "head_r$r"
done
if [ "${PROFILE:-1}" = 1 ]; then
  run "$base" base_prof --profile "$out/base_prof" --profile-start 24 --profile-steps 48
  run "$PWD" head_prof --profile "$out/head_prof" --profile-start 24 --profile-steps 48
fi
${PYTHON:-python3} - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*.json")):
    d = json.loads(f.read_text())
    ps = d.get("per_step", {})
    dec = ps.get("decode_ms_median_by_batch", {})
    print(f.stem, "out tok/s", round(d["results"]["output_tok_s"], 1), "elapsed", round(d["results"]["elapsed_s"], 3),
          "prefill/mixed s", round(ps.get("prefill_or_mixed_s", 0), 3),
          "decode median ms", {b: round(v["median_ms"], 2) for b, v in dec.items() if v["steps"] > 4})
for p in sorted(out.glob("*_prof/categories.json")):
    d = json.loads(p.read_text())
    print(p.parent.name, "wall", round(d["profiled_wall_s"], 3), "busy", round(d["gpu_busy_s"], 3),
          {k: round(v, 3) for k, v in sorted(d["gpu_time_s_by_category"].items(), key=lambda kv: -kv[1])[:8]})
PY
rm -f "$out"/*_prof/trace.json  # large; summaries stay
