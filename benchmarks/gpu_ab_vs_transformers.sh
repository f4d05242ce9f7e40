#!/usr/bin/env bash
# Issue 18's acceptance A/B in one call: `gpu_vs_transformers.py --workloads a,b,d --skip-transformers` on a
# baseline tree (default .baseline = `git archive 64f2143`) and on this tree, back to back on the same GPU, then a
# side-by-side table (workloads a, b: output tok/s; d: median decode step ms per batch).
#   bash benchmarks/gpu_ab_vs_transformers.sh [BASELINE_DIR]      # JSON under $OUT
set -uo pipefail
base="$(cd "${1:-.baseline}" && pwd)"; head="$PWD"
out="${OUT:-/tmp/ab}"; mkdir -p "$out"
flags=(--workloads a,b,d --skip-transformers --max-num-batched-tokens 8192)
for side in before after; do
  tree="$base"; [ "$side" = after ] && tree="$head"
  (cd "$tree" && PYTHONPATH="$tree:${PYTHONPATH:-}" ${PYTHON:-python3} benchmarks/gpu_vs_transformers.py "${flags[@]}" \
     --out "$out/abd_$side.json" > "$out/abd_$side.log" 2>&1) || { echo "$side failed"; tail -20 "$out/abd_$side.log"; }
done
${PYTHON:-python3} - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
runs = {s: json.loads((out / f"abd_{s}.json").read_text()) for s in ("before", "after") if (out / f"abd_{s}.json").exists()}
if len(runs) == 2:
    rows = {s: {r["workload"]: r for r in d["rows"] if r["engine"] == "tokenmill"} for s, d in runs.items()}
    for w in ("a", "b"):
        b, a = rows["before"][w]["output_tok_s"], rows["after"][w]["output_tok_s"]
        print(f"({w}) output tok/s  before {b:9.1f}  after {a:9.1f}  {100 * (a / b - 1):+6.2f}%")
    sweep = {s: {p["batch"]: p for p in d["decode_sweep"]} for s, d in runs.items()}
    for batch in sorted(sweep["before"]):
        b, a = sweep["before"][batch]["median_step_ms"], sweep["after"][batch]["median_step_ms"]
        print(f"(d) batch {batch:4d} step ms  before {b:7.3f}  after {a:7.3f}  {100 * (b / a - 1):+6.2f}% tok/s")
PY
