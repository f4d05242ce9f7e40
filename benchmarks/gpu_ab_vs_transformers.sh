#!/usr/bin/env bash
# Issue 18's acceptance A/B in one call: `gpu_vs_transformers.py --workloads a,b,d --skip-transformers` on a
# baseline tree (default .baseline = `git archive 64f2143`) and on this tree, alternating on the same GPU
# (REPEATS rounds of before, after), then a side-by-side table of the per-side medians over rounds
# (workloads a, b: output tok/s; d: median decode step ms per batch).
#   [WORKLOADS=a,b,d] [REPEATS=1] bash benchmarks/gpu_ab_vs_transformers.sh [BASELINE_DIR]      # JSON under $OUT
set -uo pipefail
base="$(cd "${1:-.baseline}" && pwd)"; head="$PWD"
out="${OUT:-/tmp/ab}"; mkdir -p "$out"
flags=(--workloads "${WORKLOADS:-a,b,d}" --skip-transformers --max-num-batched-tokens 8192)
for round in $(seq 1 "${REPEATS:-1}"); do
  for side in before after; do
    tree="$base"; [ "$side" = after ] && tree="$head"
    (cd "$tree" && PYTHONPATH="$tree:${PYTHONPATH:-}" ${PYTHON:-python3} benchmarks/gpu_vs_transformers.py "${flags[@]}" \
       --out "$out/abd_${side}_r$round.json" > "$out/abd_${side}_r$round.log" 2>&1) \
      || { echo "$side round $round failed"; tail -20 "$out/abd_${side}_r$round.log"; }
  done
done
${PYTHON:-python3} - "$out" <<'PY'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
runs = {s: [json.loads(f.read_text()) for f in sorted(out.glob(f"abd_{s}_r*.json"))] for s in ("before", "after")}
if not all(runs.values()):
    sys.exit("a side has no results")
def rows(side, w):
    return [r["output_tok_s"] for d in runs[side] for r in d["rows"] if r["engine"] == "tokenmill" and r["workload"] == w]
def steps(side, batch):
    return [p["median_step_ms"] for d in runs[side] for p in d["decode_sweep"] if p["batch"] == batch]
for w in ("a", "b"):
    if rows("before", w) and rows("after", w):
        b, a = statistics.median(rows("before", w)), statistics.median(rows("after", w))
        print(f"({w}) output tok/s  before {b:9.1f}  after {a:9.1f}  {100 * (a / b - 1):+6.2f}%   "
              f"rounds before {rows('before', w)} after {rows('after', w)}")
batches = sorted({p["batch"] for d in runs["before"] for p in d.get("decode_sweep", [])})
for batch in batches:
    b, a = statistics.median(steps("before", batch)), statistics.median(steps("after", batch))
    print(f"(d) batch {batch:4d} step ms  before {b:7.3f}  after {a:7.3f}  {100 * (b / a - 1):+6.2f}% tok/s   "
          f"rounds before {[round(x, 3) for x in steps('before', batch)]} after {[round(x, 3) for x in steps('after', batch)]}")
PY
