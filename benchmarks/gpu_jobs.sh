#!/usr/bin/env bash
# Several GPU benchmark jobs in one device call, run one after another on the idle card (never two at once:
# each times its own work), every job's console log and JSON into one tarball, $OUT/gpu_jobs.tgz (the device
# tool returns a few files only). Installs the carried wheels (.whl) first.
#   bash benchmarks/gpu_jobs.sh ab18 kv_memory fp8 spec spec_adaptive spec_fp32 quantized e2e modelserver online_piecewise
#   bash benchmarks/gpu_jobs.sh online_chatbot issue26 quant_sweep quant_e2e quant_e2e_all w4_probe w4_chain fp8_probe fp8_e2e
#   bash benchmarks/gpu_jobs.sh norm_ab
#   JOB_TIMEOUT=230 bash benchmarks/gpu_jobs.sh w4_ring
#   JOB_TIMEOUT=170 bash benchmarks/gpu_jobs.sh norm_e2e
#   JOB_TIMEOUT=150 bash benchmarks/gpu_jobs.sh norm_tests norm_e2e
#   JOB_TIMEOUT=120 bash benchmarks/gpu_jobs.sh paged_table_ab
#   bash benchmarks/gpu_jobs.sh maxload
#   bash benchmarks/gpu_jobs.sh fp8_fuse
#   bash benchmarks/gpu_jobs.sh paged_probe paged_tests maxload_paged
#   bash benchmarks/gpu_jobs.sh eagle           (carry .eagle_carry: see the job)
#   bash benchmarks/gpu_jobs.sh distill_gpu
#   bash benchmarks/gpu_jobs.sh profiles
set -uo pipefail
out="$(mktemp -d)"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
run() { timeout "${JOB_TIMEOUT:-900}" "$@"; }  # a job past it is killed; the tarball still holds the others
for job in "$@"; do
  start=$(date +%s)
  case "$job" in
    ab18) REPEATS="${REPEATS:-2}" OUT="$out/ab18" bash benchmarks/gpu_ab_vs_transformers.sh "${BASELINE:-.baseline}" ;;
    kv_memory) run python3 -m tokenmill bench kv-memory --engine --random-weights llama3-8b --num-kv-blocks 10240 \
                 --num-requests "${KV_REQUESTS:-400}" --input-len-range 4:1024 --output-len-range 4:1024 \
                 --max-model-len 4096 --reserve max-model-len --output-json "$out/kv_memory_engine.json" \
                 --plot "$out/kv_memory_engine.png" ;;
    fp8) run python3 benchmarks/gpu_fp8.py --out "$out/gpu_fp8.json" ;;
    # Issue 22's max load: 1024 x 128 -> 128 at once, bf16 and FP8 W+KV, per (max_num_seqs, graph cap, prefill budget).
    maxload) run python3 benchmarks/gpu_maxload.py --out "$out/gpu_maxload.json" ${MAXLOAD_ARGS:-} ;;
    # Issue 22: RMSNorm / SiLU-and-mul writing FP8 for the next W8A8 linear. Their kernel and model tests, the pairs
    # timed fused vs unfused at 950 rows (Llama-3-8B widths), then max load (FUSE_SETTINGS) with FP8 W+KV fused (the
    # default), unfused, and fused with the FP8 LM head, runs started within FUSE_MAXLOAD_BUDGET s (a run past it is
    # listed as skipped). Target < 200 s.
    fp8_fuse) run python3 -m pytest tests/kernels/test_fp8_fused_quant.py -q -p no:cacheprovider 2>&1 \
                | tee "$out/fp8_fuse_kernel_tests.txt" | tail -3
              run python3 -m pytest tests/quantization/test_fp8_fusion.py -m gpu -q -p no:cacheprovider 2>&1 \
                | tee "$out/fp8_fuse_model_tests.txt" | tail -3
              run python3 benchmarks/gpu_fp8_fuse.py --out "$out/gpu_fp8_fuse.json"
              run python3 benchmarks/gpu_maxload.py --variants fp8_w_kv,fp8_w_kv_unfused,fp8_w_kv_lmhead \
                --settings "${FUSE_SETTINGS:-1024:1024:8192}" --budget-s "${FUSE_MAXLOAD_BUDGET:-75}" \
                --out "$out/gpu_maxload_fp8_fuse.json" ;;
    spec) run python3 benchmarks/gpu_spec_decode.py --out "$out/gpu_spec_decode.json" ;;
    spec_adaptive) run python3 benchmarks/gpu_spec_decode.py --skip-costs --draft-preset '' \
                 --out "$out/gpu_spec_decode_adaptive.json" ;;
    spec_fp32) run python3 benchmarks/gpu_spec_decode.py --dtype float32 --skip-costs --adaptive-batches 1 \
                 --adaptive-rounds 1 --draft-preset '' --out "$out/gpu_spec_decode_fp32.json" ;;
    # Issue 24's EAGLE head served on the GPU (needs .eagle_carry/head: config.json, model.safetensors and
    # draft_vocab.json of /tmp/s18e/head_s3): its engine tests (CUDA graphs ending at the hidden states), then
    # SmolLM2 batch 1 on the 3 chat prompts, plain vs EAGLE at k = 2 and 4 fixed and adaptive k <= 4.
    eagle) run python3 -m pytest tests/spec_decode/test_eagle_engine.py -q -p no:cacheprovider 2>&1 \
             | tee "$out/eagle_tests.txt" | tail -5
           for args in "--no-adaptive --k 2" "--no-adaptive --k 4" "--k 4"; do
             tag=$(echo "$args" | tr -d ' -')
             run python3 benchmarks/spec_decode_cpu.py --device cuda --kinds chat --no-ngram --eagle .eagle_carry/head \
               --rounds 2 $args --out "$out/spec_decode_eagle_${tag}.json"
           done ;;
    # Issue 24's `tokenmill distill` on CUDA (bf16 autocast): draft, encoder and eagle targets on tiny teachers
    # (--target eagle: the teacher's answers from the engine on the GPU, features there, the shared loop), and the
    # EAGLE head's unrolled bf16 training with its batched acceptance against the CPU replay. Well under 200 s.
    distill_gpu) run python3 -m pytest tests/distill/test_distill_gpu.py -q -p no:cacheprovider \
                   --junitxml "$out/distill_gpu_tests.xml" 2>&1 | tee "$out/distill_gpu_tests.txt" | tail -8 ;;
    quantized) run python3 benchmarks/gpu_quantized.py --e2e off --out "$out/gpu_quantized_kernels.json" ;;
    e2e) run python3 benchmarks/gpu_quantized.py --e2e only --out "$out/gpu_quantized_e2e.json" ;;
    modelserver) OUT="$out" python3 benchmarks/gpu_modelserver.py --carry .modelserver_carry ;;
    # Issue 19's p99 ITL: prompt steps on piecewise graphs (the default) at 512 and 256 prefill tokens a step vs
    # eager (FULL_DECODE_ONLY), chatbot arrivals at rate 20; the core's step trace is summarised per phase.
    online_piecewise) run python3 benchmarks/gpu_online_vs_offline.py --skip-offline --no-step-breakdown \
                 --num-prompts 200 --warmup-prompts 50 --profile-prompts 0 --chatbot-rates 20 --chatbot-prompts 200 \
                 --server-args "--max-num-batched-tokens 512" \
                 --ab-server-args "--max-num-batched-tokens 256" \
                 --ab-server-args "--compilation-config '{\"cudagraph_mode\":\"FULL_DECODE_ONLY\"}'" \
                 --out "$out" ;;
    # Issue 19: chatbot arrivals at a few rates (RATES, CHATBOT_PROMPTS each, prefill cap PREFILL_CAP, default 256).
    # nvidia-smi reads ~85% busy at any rate from 15 req/s (decode steps run back to back); load as a share of the
    # saturated output rate (~12k tok/s, ~220 tokens a request) is what the rate sets: 70% is ~35-40 req/s.
    online_chatbot) run python3 benchmarks/gpu_online_vs_offline.py --skip-offline --no-step-breakdown \
                 --num-prompts 200 --warmup-prompts 50 --profile-prompts 0 --chatbot-rates "${RATES:-10,15,20,25}" \
                 --chatbot-prompts "${CHATBOT_PROMPTS:-200}" --server-args "--max-num-batched-tokens ${PREFILL_CAP:-256}" --out "$out" ;;
    issue26) OUT="$out/issue26" bash benchmarks/gpu_modelserver_issue26.sh ;;  # needs .modelserver_carry too
    quant_sweep) run python3 benchmarks/gpu_quant_gemv_sweep.py --out "$out/quant_gemv_sweep.json" \
                 --configs-out "$out/quant_gemv.json" ;;
    # Issue 20's A/B: decode and prefill end to end, bf16 vs W4A16 (rtn4) in the GPTQ layout vs the K-major layout
    # (--quant-weight-layout), batch 1/64/256, weight GiB and KV blocks (max_model_len 4096: memory sizes the KV);
    # the linears' kernels from the table quant_sweep just wrote (else the committed one). Target < 200 s.
    # After w4_probe in the same call, its measured K-major winners are added to the table (quant_table_merge.py).
    quant_e2e) cfg="$out/quant_gemv.json"; [ -s "$cfg" ] || cfg=tokenmill/kernels/configs/quant_gemv.json
               if [ -s "$out/gpu_w4_gemv_probe.json" ]; then
                 python3 benchmarks/quant_table_merge.py "$cfg" "$out/gpu_w4_gemv_probe.json" \
                   "$out/quant_gemv_kmajor.json" && cfg="$out/quant_gemv_kmajor.json"
               fi
               TOKENMILL_QUANT_GEMV_CONFIGS="$cfg" run python3 benchmarks/gpu_quantized.py --e2e only \
                 --e2e-methods "${E2E_METHODS:-bf16,rtn4:gptq,rtn4:kmajor}" --e2e-batches "${E2E_BATCHES:-1,64,256}" \
                 --e2e-lens 128,32 --e2e-max-model-len 4096 --out "$out/gpu_quantized_e2e.json" ;;
    # The earlier e2e job: every weight format (bf16, rtn4, int8, fp8) at batch 1/16/64/256.
    quant_e2e_all) cfg="$out/quant_gemv.json"; [ -s "$cfg" ] || cfg=tokenmill/kernels/configs/quant_gemv.json
               TOKENMILL_QUANT_GEMV_CONFIGS="$cfg" run python3 benchmarks/gpu_quantized.py --e2e only \
                 --e2e-methods bf16,rtn4,int8,fp8 --e2e-batches 1,16,64,256 --out "$out/gpu_quantized_e2e_all.json" ;;
    # Issue 20: the W4A16 GEMV variants of kernels/w4_gemv.py, the K-major GEMM (with its transposed product, w_lhs,
    # in Triton and Gluon, from 16 rows) and dequantize + cuBLAS (8-256 rows)
    # vs bf16 and today's dispatched kernel; quant_e2e after it in the same call serves its K-major winners.
    w4_probe) run python3 benchmarks/gpu_w4_gemv_probe.py --time-limit "${W4_TIME_LIMIT:-150}" \
                 --out "$out/gpu_w4_gemv_probe.json" ;;
    # Issue 20, batch 64 / 256: the pipelined Gluon GEMM with the words on its cp.async ring (weight_ring) and
    # bf16x2 dequantization (pair_dequant) and the codes as the wgmma's register operand (register_a): its CUDA tests,
    # the probe (those vs the K-major kernel the shipped table picks, kmajor_today, and bf16 in the same run; add
    # W4_FAMILIES=weight_ring,w_lhs for Gluon's earlier kernels too), then batch 64 / 256 decode served with the
    # probe's winners merged into the table. Target < 480 s (JOB_TIMEOUT=230).
    w4_ring) (cd tests/kernels && run python3 -m pytest -q -p no:cacheprovider test_w4_kmajor_gemm.py -k gluon_ring) \
               2>&1 | tee "$out/w4_ring_tests.txt" | tail -3
             run python3 benchmarks/gpu_w4_gemv_probe.py --families "${W4_FAMILIES:-weight_ring}" \
               --rows "${W4_ROWS:-64,256,128}" --time-limit "${W4_TIME_LIMIT:-200}" --out "$out/gpu_w4_ring_probe.json"
             python3 benchmarks/quant_table_merge.py tokenmill/kernels/configs/quant_gemv.json \
               "$out/gpu_w4_ring_probe.json" "$out/quant_gemv_ring.json" &&
             TOKENMILL_QUANT_GEMV_CONFIGS="$out/quant_gemv_ring.json" run python3 benchmarks/gpu_quantized.py \
               --e2e only --e2e-methods bf16,rtn4:kmajor --e2e-batches "${W4_E2E_BATCHES:-64,256}" --e2e-lens 128,32 \
               --e2e-max-model-len 4096 --out "$out/gpu_quantized_e2e_ring.json" ;;
    # Issue 20: the batch-1 decode chain (norms, SiLU-mul and the four projections, 32 layers in one CUDA graph), bf16
    # vs W4 K-major today vs with PDL + pre-wait preload, then again with TOKENMILL_PDL_EARLY_LAUNCH=1 (~1 min).
    # Issues 20 and 22: the RMSNorms in the W4 and FP8 GEMVs (pass_config fuse_gemm_norm, off until this A/B): the
    # kernel and model tests on the card, then the chain (w4:fused_sums_act, norm inputs made by o / down, beside
    # w4:fused_act) and batch-1 decode with and without +norm, bf16 in the same run. Target < 400 s.
    norm_ab) (cd tests/kernels && run python3 -m pytest -q -p no:cacheprovider test_w4_gemv.py test_fp8_stream.py) \
               2>&1 | tee "$out/norm_ab_kernel_tests.txt" | tail -3
             (cd tests/quantization && run python3 -m pytest -q -p no:cacheprovider test_kmajor_layout.py \
               test_fp8_fusion.py) 2>&1 | tee "$out/norm_ab_model_tests.txt" | tail -3
             run python3 benchmarks/gpu_w4_chain.py --replays 30 --out "$out/gpu_w4_chain_norm.json"
             run python3 benchmarks/gpu_quantized.py --e2e only --e2e-methods \
               "${E2E_METHODS:-bf16,rtn4:kmajor+lmhead,rtn4:kmajor+lmhead+norm,fp8+lmhead,fp8+lmhead+norm}" \
               --e2e-batches 1 --e2e-lens 128,32 --e2e-max-model-len 4096 --out "$out/gpu_quantized_e2e_norm.json" ;;
    # norm_ab's model tests alone (the norm-fusion kernels' tests ran whole in gpu_suite.sh's kernel groups).
    norm_tests) (cd tests/quantization && run python3 -m pytest -q -p no:cacheprovider test_kmajor_layout.py \
                  test_fp8_fusion.py -k "norm or fus") 2>&1 | tee "$out/norm_model_tests.txt" | tail -3 ;;
    # norm_ab's batch-1 decode A/B alone (its tests run in gpu_suite.sh's groups).
    norm_e2e) run python3 benchmarks/gpu_quantized.py --e2e only --e2e-methods \
                "${E2E_METHODS:-bf16,rtn4:kmajor+lmhead,rtn4:kmajor+lmhead+norm,fp8+lmhead,fp8+lmhead+norm}" \
                --e2e-batches 1 --e2e-lens 128,32 --e2e-max-model-len 4096 --out "$out/gpu_quantized_e2e_norm.json" ;;
    # Issues 20 and 22, small batches: a paged decode option (PAGED_SET, default min_partition=64) set in the table's
    # split-plan entries (batches < 128) against the shipped table: the paged config tests on the card, then decode
    # both ways, PAGED_REPS times each, alternating (PAGED_BATCHES: the decode batches, default 1,16).
    paged_table_ab) (cd tests/kernels && run python3 -m pytest -q -p no:cacheprovider test_paged_decode_configs.py) \
                      2>&1 | tee "$out/paged_table_ab_tests.txt" | tail -3
                    sets=(); for f in ${PAGED_SET:-min_partition=64}; do sets+=(--set "$f"); done
                    python3 benchmarks/paged_decode_table_edit.py tokenmill/kernels/configs/paged_decode.json \
                      "$out/paged_decode_edited.json" --below 128 "${sets[@]}"
                    for rep in $(seq "${PAGED_REPS:-2}"); do
                      for v in shipped edited; do
                        tbl=tokenmill/kernels/configs/paged_decode.json
                        [ "$v" = edited ] && tbl="$out/paged_decode_edited.json"
                        TOKENMILL_PAGED_DECODE_CONFIGS="$tbl" run python3 benchmarks/gpu_quantized.py --e2e only \
                          --e2e-methods "${E2E_METHODS:-bf16,rtn4:kmajor+lmhead,fp8+lmhead}" \
                          --e2e-batches "${PAGED_BATCHES:-1,16}" --e2e-lens 128,32 --e2e-max-model-len 4096 \
                          --out "$out/gpu_quantized_e2e_paged_${v}_$rep.json"
                      done
                    done ;;
    w4_chain) run python3 benchmarks/gpu_w4_chain.py --out "$out/gpu_w4_chain.json"
              TOKENMILL_PDL_EARLY_LAUNCH=1 run python3 benchmarks/gpu_w4_chain.py --out "$out/gpu_w4_chain_early.json" ;;
    # Issue 22: the FP8-weight GEMV variants of kernels/fp8_stream.py vs bf16 and today's FP8 GEMV at 1-16 rows (each
    # checked against fp32 before it is timed; their tests are in gpu_suite.sh's quantized_kernels group).
    fp8_probe) run python3 benchmarks/gpu_fp8_gemv_probe.py --time-limit "${FP8_TIME_LIMIT:-140}" \
                 --out "$out/gpu_fp8_gemv_probe.json" --configs-out "$out/quant_gemv_fp8.json" ;;
    # Batch-1 and -16 decode, bf16 vs --quantization fp8, with the FP8 kernels fp8_probe just measured fastest (its
    # table; else the committed one): issue 22's batch-1 target is >= 1.8x bf16.
    fp8_e2e) cfg="$out/quant_gemv_fp8.json"; [ -s "$cfg" ] || cfg=tokenmill/kernels/configs/quant_gemv.json
             TOKENMILL_QUANT_GEMV_CONFIGS="$cfg" run python3 benchmarks/gpu_quantized.py --e2e only \
               --e2e-methods bf16,fp8 --e2e-batches 1,16 --out "$out/gpu_fp8_e2e.json" ;;
    # Issue 22's decode attention: launch configs of kernels/paged_attention.py (packed sequences, FP8 widening in
    # PTX, tiles/warps/stages, head-first grid) at max load (950 x U[128, 254], FP8 and bf16 KV), 256 x ~540 and
    # 1 x 4096, each checked against fp32 first; % of the byte floor at the copy rate measured in the run. Writes the
    # config table of each shape's winner (> 3% over today's launch) to $out/paged_decode.json: adopt it by copying
    # it to tokenmill/kernels/configs/paged_decode.json (the engine reads it; nothing else changes). < 150 s.
    paged_probe) run python3 benchmarks/gpu_paged_decode_probe.py --time-limit "${PAGED_TIME_LIMIT:-140}" \
                 --out "$out/gpu_paged_decode_probe.json" --configs-out "$out/paged_decode.json" ;;
    # maxload again with the decode configs paged_probe just wrote (same call: $out/paged_decode.json; else the
    # committed table): the engine A/B of the table against the plain maxload job's numbers.
    maxload_paged) cfg="$out/paged_decode.json"; [ -s "$cfg" ] || cfg=tokenmill/kernels/configs/paged_decode.json
                 TOKENMILL_PAGED_DECODE_CONFIGS="$cfg" run python3 benchmarks/gpu_maxload.py \
                   --out "$out/gpu_maxload_paged.json" ${MAXLOAD_ARGS:-} ;;
    # The paged decode kernel tests on the GPU: every DecodeConfig option (the PTX FP8 widening included) and FP8 KV
    # decode against fp32 (the rest of the paged tests run in gpu_suite.sh's kernels group).
    paged_tests) run python3 -m pytest tests/kernels/test_paged_decode_configs.py tests/kernels/test_fp8_kv_kernels.py \
                 -k "decode or config or widening or asm" -q -p no:cacheprovider ;;
    # Three torch-profiler summaries (kernel table + time by category; the chrome traces are dropped: too big to
    # return): issue 22's max-load prompt steps (FP8 W+KV, steps 2-4 of 1024 x 128 -> 128 at 8,192 tokens a step),
    # and batch-1 decode steps 20-29 of FP8 + FP8 LM head and of rtn4 K-major + 4-bit LM head (issues 22 and 20:
    # what besides the linears a batch-1 step spends). ~2 min.
    profiles) tp() { name=$1; shift; run python3 -m tokenmill bench throughput --random-weights llama3-8b \
                       --ignore-eos --profile "$out/prof_$name" "$@" && rm -f "$out/prof_$name/trace.json"; }
              tp maxload_prefill --quantization fp8 --kv-cache-dtype fp8 --num-prompts 1024 --input-len 128 \
                --output-len 128 --max-num-seqs 1024 --max-num-batched-tokens 8192 --max-cudagraph-capture-size 1024 \
                --profile-start 2 --profile-steps 3
              tp b1_fp8_lmhead --quantization fp8 --quantize-lm-head --num-prompts 1 --input-len 128 --output-len 64 \
                --max-num-seqs 8 --profile-start 20 --profile-steps 10
              tp b1_rtn4_kmajor_lmhead --quantization rtn4 --quant-weight-layout kmajor --quantize-lm-head \
                --num-prompts 1 --input-len 128 --output-len 64 --max-num-seqs 8 --profile-start 20 --profile-steps 10 ;;
    *) echo "unknown job $job" ;;
  esac > "$out/$job.log" 2>&1
  echo "== $job: exit $? in $(( $(date +%s) - start )) s"; tail -n 25 "$out/$job.log"
  tar czf "${OUT:-/tmp}/gpu_jobs.tgz" -C "$out" .  # after every job: a call cut at its limit keeps what finished
done
