#!/usr/bin/env bash
# The whole GPU session in one call: facts, check, gpu tests, compute-sanitizer, benchmarks.
#
#   bash bench/gpu_suite.sh [STAGE ...]      stages: info check tests tests1 tests2 shard shards
#                                            sanitize
#                                            bench
#                                            memory train
#                                            workloads train_gqa train_profile issue10 host decode
#                                            pre_convert step_idle
#                                            generate ab
#                                            decode_ab decode16 decode_fused fwd_ncu fwd_times issue15
#                                            exp2_fma fwd_overlap fwd_persistent desc_add
#                                            fwd_persistent_sanitize fwd_n176 fwd_defaults
#                                            fwd_tma bwd_tma fwd_bounds fwd_d256_ws
#                                            bwd_dq_first bwd_hsplit bwd_bounds
#                                            issue15_bench
#                                            hopper_d192 head_dim_v verify_defaults verify_rest
#                                            pair_tiles
#                                            modifiers varlen fwd90_tiles bwd90_tiles det
#                                            det_pieces bwd_stages det_window varlen_ncu
#                                            pending tma_verify dropout_ab block_sparse_pers
#                                            varlen_tma block_mask_tma dropout_ncu
#                                            dropout_words causal_sparse drop_packed
#                                            drop_ring fwd_rescale fwd256_bounds stalls
#                                            dq_red4 hsplit_red4
#                                            (default: info check tests sanitize bench workloads)
#
# Runs from the repository root on a machine with a CUDA GPU and CuPy, torch and pytest
# installed (the device image has them); cuflash itself is used from the checkout
# (pure Python, no build). Logs and JSON go under $OUT (default ./gpu_out): each stage's log,
# then everything packed into $OUT/suite.tar.gz, with the last lines of each log in
# $OUT/summary.txt. SUITE_TIME_BUDGET (seconds, default 540) bounds the pytest stage; PYTEST_XDIST
# (e.g. "-n 6") spreads the fwd_defaults and head_dim_v tests over processes (NVRTC compiles).
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT/logs" "$OUT/results"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# each failing test's id as it fails (tests/conftest.py): a stage cut off by its timeout
# prints no summary
export CUFLASH_FAILURE_LOG=${CUFLASH_FAILURE_LOG:-$OUT/logs/failed_tests.txt}
# and each test phase of a second or more (setup: a module's compile ahead): where the time went
export CUFLASH_DURATION_LOG=${CUFLASH_DURATION_LOG:-$OUT/logs/test_durations.txt}
# and each NVRTC build (a cubin cache miss, cuflash/compiler.py): whether a pack served
export CUFLASH_COMPILE_LOG=${CUFLASH_COMPILE_LOG:-$OUT/logs/compiles.txt}
# and the tests started and not finished (a stage cut off by its time limit: which hung)
export CUFLASH_RUNNING_LOG=${CUFLASH_RUNNING_LOG:-$OUT/logs/running_tests.txt}
PY=${PYTHON:-python3}
# kernels built ahead on the CPU machine (bench/dev/cubin_pack.py, carried as .cubin_cache):
# the runtime's own cache, so a hit skips NVRTC and a miss compiles as ever
# or as .cubin_pack.tar.xz (cubin_pack.py --archive: a tenth of the size), unpacked first
if [ -f "$PWD/.cubin_pack.tar.xz" ] && [ ! -d "$PWD/.cubin_cache" ]; then
  mkdir -p "$PWD/.cubin_cache" && ${PYTHON:-python3} -c \
    'import sys, tarfile; kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
tarfile.open(sys.argv[1]).extractall(sys.argv[2], **kw)' \
    "$PWD/.cubin_pack.tar.xz" "$PWD/.cubin_cache"
fi
if [ -d "$PWD/.cubin_cache" ] && [ -z "${CUPY_CACHE_DIR:-}" ]; then
  export CUPY_CACHE_DIR=$PWD/.cubin_cache
  echo "cubin cache: $CUPY_CACHE_DIR ($(ls "$CUPY_CACHE_DIR" | grep -c '\.cubin$') cubins)"
fi
# pytest over several processes: one BLAS thread each, since every process's float64
# references otherwise start a thread per core (session 33: test calls of 30-34 s on 12
# workers, with their cubins packed; a dropout case's references take 2 s on one core of
# the CPU machine)
if [ -n "${PYTEST_XDIST:-}" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
  export MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
fi
stages=${*:-info check tests sanitize bench workloads}
summary=$OUT/summary.txt
: >"$summary"

run_stage() {  # name, command...: run, log, and record the exit code and the log's tail
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$summary"
  "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  { tail -n "${TAIL_LINES:-25}" "$OUT/logs/$name.log"; echo "=== $name rc=$rc in $((SECONDS - start)) s"
    [ -s "$CUFLASH_FAILURE_LOG" ] && echo "=== failed so far: $(wc -l <"$CUFLASH_FAILURE_LOG") tests ($CUFLASH_FAILURE_LOG)"
    if [ -s "$CUFLASH_RUNNING_LOG" ]; then  # kept per stage: the next pytest rewrites it
      echo "=== still running when it ended:"; cat "$CUFLASH_RUNNING_LOG"
      mv "$CUFLASH_RUNNING_LOG" "$OUT/logs/running_$name.txt"
    fi
  } >>"$summary"
  # packed after every stage: an outer timeout may end the suite, and the device tool brings
  # back only a handful of files, so the tarball is what survives
  tar -C "$OUT" -czf "$OUT/suite.tar.gz" logs results 2>/dev/null
  return $rc
}

run_shard() {  # name, k/M, seconds: one shard over 12 processes, a file's tests in one of
  # them, one BLAS thread each (12 x the cores' worth of threads on the float64 references
  # oversubscribes 16 cores: 12 workers ran only 2.4x one in session 32); a test that runs
  # past TEST_TIMEOUT seconds (120) ends its worker, failing by name (tests/conftest.py),
  # where a hung kernel held session 34's shards to their time limits (raise it where no
  # cubin pack serves: a module's compile-ahead test then builds every kernel it runs)
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  CUFLASH_TEST_TIMEOUT=${TEST_TIMEOUT:-120} CUFLASH_TEST_SHARD=$2 CUFLASH_POISON=1 \
    run_stage "$1" timeout "$3" $PY -m pytest -m gpu -q -rfEs --maxfail=10 \
    -p no:cacheprovider --durations=25 ${PYTEST_XDIST:--n 12 --dist loadfile} \
    --junitxml="$OUT/results/gpu_$1.xml" tests
}

fwd_bounds() {  # "head_dim:seqlen ...", "dropout p ...": ncu's sections of the selected
  # forward (with FWD_BOUNDS_TMA=1 the TMA forward too), one stage a row, loads and p
  for row in $1; do
    for tma in 0 ${FWD_BOUNDS_TMA:+1}; do
      for p in $2; do
        run_stage "fwd_bounds_d${row%%:*}_s${row##*:}_tma${tma}_p$p" \
          env CUFLASH_TEST_TMA=$tma ncu --clock-control none -k regex:flash_fwd -s 2 -c 1 \
          --section SpeedOfLight --section ComputeWorkloadAnalysis \
          --section MemoryWorkloadAnalysis --section InstructionStats \
          --section SchedulerStats --section WarpStateStats --section Occupancy \
          --page details $PY bench/dev/fwd_profile.py --head-dim "${row%%:*}" \
          --seqlen "${row##*:}" --dropout "$p"
      done
    done
  done
}

tma_first_stage() {  # name: one TMA box read back raw, then the plain TMA forward (first)
  CUFLASH_POISON=1 run_stage "$1" timeout 150 $PY -m pytest -m gpu -q -rfEs -x \
    -p no:cacheprovider "tests/test_gpu_tma.py::test_box_lands_in_the_panel_layout" \
    "tests/test_gpu_tma.py::test_forward_matches_reference" -k "plain or panel"
}

for stage in $stages; do
  case $stage in
    info)
      run_stage info bash -c "nvidia-smi; $PY -m pip list 2>/dev/null | grep -i -E 'cupy|torch|jax|numpy|hypothesis|pytest|ml.dtypes'; $PY -m cuflash info" ;;
    check)
      run_stage check $PY -m cuflash check ;;
    tests)
      CUFLASH_POISON=1 run_stage tests timeout "${SUITE_TIME_BUDGET:-540}" \
        $PY -m pytest -m gpu -q -rfEs -x --maxfail=10 -p no:cacheprovider \
        --junitxml="$OUT/results/gpu_tests.xml" ${PYTEST_ARGS:-tests} ;;
    tests1|tests2)  # the suite in two halves by file name (the whole took ~12 min on an
      # H200 on 2026-12-02, more than one 10-minute device call): test files before
      # test_gpu_jax_decode.py, then the rest
      files=$(ls tests/test_*.py | sort | awk -v part="$stage" \
        '(part == "tests1") == ($0 < "tests/test_gpu_jax_decode.py")')
      CUFLASH_POISON=1 run_stage "$stage" timeout "${SUITE_TIME_BUDGET:-540}" \
        $PY -m pytest -m gpu -q -rfEs -x --maxfail=10 -p no:cacheprovider \
        --junitxml="$OUT/results/gpu_$stage.xml" $files ;;
    shard)  # one shard of the GPU suite (SHARD=k/M, default 1/10; tests/conftest.py): the
      # whole suite (6,357 tests on 2026-12-06) took more than a session's device time, in
      # turns of 10 it fits a call each (session 34 with the cubin pack: 41-116 s a shard)
      run_shard shard "${SHARD:-1/10}" "${SUITE_TIME_BUDGET:-540}" ;;
    shards)  # several shards in one call: SHARDS="4 7 9 10" of SHARD_OF (10), each for at
      # most SHARD_BUDGET seconds (150); their results are in summary.txt as shard_<k>
      for k in ${SHARDS:-1 2 3 4 5 6 7 8 9 10}; do
        run_shard "shard_$k" "$k/${SHARD_OF:-10}" "${SHARD_BUDGET:-150}"
      done ;;
    sanitize)  # the device's own kernels, then the portable 16-bit ones (wgmma off)
      run_stage sanitize_warm $PY bench/sanitize.py --warm  # compiled in parallel, not under
      CUFLASH_DISABLE_WGMMA=1 run_stage sanitize_warm_portable $PY bench/sanitize.py --warm \
        --dtypes bfloat16                                  # the sanitizer, one by one
      run_stage memcheck timeout "${SANITIZE_TIME:-150}" compute-sanitizer --tool memcheck \
        --error-exitcode 1 $PY bench/sanitize.py
      CUFLASH_DISABLE_WGMMA=1 run_stage memcheck_portable timeout "${SANITIZE_TIME:-150}" \
        compute-sanitizer --tool memcheck --error-exitcode 1 $PY bench/sanitize.py \
        --dtypes bfloat16
      TAIL_LINES=12 run_stage racecheck timeout "${SANITIZE_TIME:-150}" compute-sanitizer \
        --tool racecheck --racecheck-report all --error-exitcode 1 $PY bench/sanitize.py --quick
      CUFLASH_DISABLE_WGMMA=1 TAIL_LINES=12 run_stage racecheck_portable \
        timeout "${SANITIZE_TIME:-150}" compute-sanitizer --tool racecheck \
        --racecheck-report all --error-exitcode 1 $PY bench/sanitize.py --quick --dtypes bfloat16 ;;
    bench)
      run_stage bench $PY bench/attention_sweep.py --quick --out-dir "$OUT/results" ;;
    memory)
      run_stage memory $PY bench/attention_sweep.py --memory --out-dir "$OUT/results" ;;
    train)
      run_stage train $PY bench/train_small.py --out "$OUT/results" ;;
    train_gqa)  # GQA model at a real width: step time vs SDPA, eager and compiled
      run_stage train_gqa $PY bench/train_small.py --gqa --steps "${TRAIN_STEPS:-20}" --lr "${TRAIN_LR:-1e-4}" \
        --out "$OUT/results" ;;
    workloads)  # host time per call, GQA/MQA, short sequences, JAX under jit, beside peers
      run_stage workloads $PY bench/real_workloads.py --out "$OUT/results" \
        ${WORKLOADS_SKIP:+--skip $WORKLOADS_SKIP} ;;
    issue10)  # real workloads' done-when in one run: the CUDA-graph tests, then host time,
      # GQA / MQA, 1k / 2k, JAX under jit, long sequences beside peers, and the GQA model's
      # training step eager and compiled against SDPA
      CUFLASH_POISON=1 run_stage graph_tests timeout 120 $PY -m pytest -m gpu -q -rfEs \
        -p no:cacheprovider tests/test_gpu_host_path.py
      run_stage workloads $PY bench/real_workloads.py --out "$OUT/results"
      run_stage train_gqa $PY bench/train_small.py --gqa --steps "${TRAIN_STEPS:-20}" \
        --lr "${TRAIN_LR:-1e-4}" --pipelined "${TRAIN_PIPELINED:-20}" --out "$OUT/results" ;;
    train_profile)  # the GQA model's training step, kernel by kernel, cuflash beside SDPA;
      # and one attention forward+backward at the GQA shape (16/4, 4k, d128, causal)
      run_stage train_profile $PY bench/dev/train_step_kernels.py
      run_stage train_profile_compiled $PY bench/dev/train_step_kernels.py --compile
      run_stage step_kernels $PY bench/dev/step_kernels.py --heads-kv 16 4 ;;
    pre_convert)  # the backward's two elementwise kernels: us and TB/s beside cuDNN's; with
      # an older checkout in .old (e.g. a git archive), the same from it
      run_stage pre_convert $PY bench/dev/pre_convert_bench.py
      if [ -d .old ]; then
        run_stage pre_convert_old $PY bench/dev/pre_convert_bench.py --tree .old
      fi
      # the knobs CF_PRE_PASSES / CF_CONVERT_PASSES in variants, each launch alone
      run_stage pre_variants bash -c "for sh in 1,16,4,4096,128 1,16,1,4096,128 \
        16,16,16,1024,128 4,16,16,4096,64; do $PY bench/dev/pre_variants.py --shape \$sh; done" ;;
    step_idle)  # the GQA model's step: device busy and idle time, cuflash beside SDPA; and
      # where the compiled step's host time goes
      run_stage train_profile $PY bench/dev/train_step_kernels.py
      run_stage step_probe $PY bench/dev/compiled_host_probe.py --rows 15 ;;
    host)  # where the host time of a call goes (cProfile)
      run_stage host $PY bench/dev/host_overhead.py ;;
    decode)  # KV-cache decode bandwidth beside SDPA's backends and the copy ceiling
      run_stage decode $PY bench/decode.py --out "$OUT/results/decode.json" \
        ${DECODE_PARTS:+--parts $DECODE_PARTS} ;;
    decode16)  # issue 16's candidate decode knobs: their float64-reference tests (at most
      # 110 s), then their speed against the selection and SDPA's cuDNN (bench/dev/decode16.py,
      # at most 170 s; results/decode16.json). Under 5 minutes together on an H200.
      CUFLASH_POISON=1 run_stage decode16_tests timeout "${DECODE16_TEST_TIMEOUT:-110}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider \
        tests/test_gpu_decode_candidates.py
      run_stage decode16 timeout "${DECODE16_TIMEOUT:-170}" $PY bench/dev/decode_variants.py \
        --decode16 --out "$OUT/results/decode16.json" ;;
    decode_pdl)  # decode's combine as the split's programmatic dependent (decode.PDL, a
      # candidate written without a GPU): its float64-reference tests (graphs included),
      # then TB/s with and without beside cuDNN (bench/dev/decode_knob_ab.py, bit for bit)
      CUFLASH_POISON=1 run_stage decode_pdl_tests timeout "${DECODE_PDL_TEST_TIMEOUT:-150}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        tests/test_gpu_decode_pdl.py
      run_stage decode_pdl timeout "${DECODE_PDL_TIMEOUT:-150}" $PY bench/dev/decode_knob_ab.py \
        --knob PDL --out "$OUT/results/decode_pdl.json" ;;
    decode_fused)  # session 41: the split kernel's last block of a row tile merges the splits
      # (decode.FUSED_COMBINE, CF_FUSED_COMBINE; written without a GPU): the splitting decode
      # tests with it (graph replays included), then TB/s off / on beside cuDNN at q_len 1,
      # 2, 4, 8 (bench/dev/decode_knob_ab.py), bench/decode.py's table with it, memcheck of
      # bench/sanitize.py's decode cases with it, its TB/s by split count (decode_splits.py),
      # racecheck
      CUFLASH_POISON=1 run_stage decode_fused_tests timeout "${DECODE_FUSED_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        tests/test_gpu_decode_fused.py
      run_stage decode_fused timeout "${DECODE_FUSED_TIMEOUT:-200}" $PY bench/dev/decode_knob_ab.py \
        --knob FUSED_COMBINE --q-lens 1 2 4 8 --out "$OUT/results/decode_fused.json"
      run_stage decode_fused_table timeout "${DECODE_FUSED_TABLE_TIMEOUT:-200}" \
        $PY bench/decode.py --set FUSED_COMBINE=1 --out "$OUT/results/decode_fused_table.json"
      run_stage decode_fused_memcheck timeout 150 compute-sanitizer --tool memcheck \
        --error-exitcode 1 $PY bench/sanitize.py --kinds decode --decode-fused
      run_stage decode_fused_splits timeout "${DECODE_FUSED_SPLITS_TIMEOUT:-150}" \
        $PY bench/dev/decode_splits.py --fused
      TAIL_LINES=12 run_stage decode_fused_racecheck timeout 150 compute-sanitizer \
        --tool racecheck --racecheck-report all --error-exitcode 1 $PY bench/sanitize.py \
        --kinds decode --decode-fused ;;
    exp2_fma)  # the Hopper forward's softmax with part of its exp2 on the FMA pipe
      # (CF_EXP2_FMA): its float64-reference tests, then TFLOP/s against the selection and
      # cuDNN (bench/dev/exp2_fma_ab.py; EXP2_FMA_ARGS, e.g. --values 0,2,4,6)
      CUFLASH_POISON=1 run_stage exp2_fma_tests timeout "${EXP2_FMA_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider tests/test_gpu_exp2_fma.py
      run_stage exp2_fma timeout "${EXP2_FMA_TIMEOUT:-240}" $PY bench/dev/exp2_fma_ab.py \
        --out "$OUT/results/exp2_fma.json" ${EXP2_FMA_ARGS:-} ;;
    desc_add)  # session 42: wgmma descriptors by one add a k-step (CF_DESC_ADD, selected by
      # registry.DESC_ADD): both forms bit for bit and the selection's Hopper tests, then
      # bench/dev/desc_ab.py (all buckets; then d256 with value 3 of the 8-warp forward)
      CUFLASH_POISON=1 run_stage desc_add_tests timeout "${DESC_ADD_TEST_TIMEOUT:-300}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        tests/test_gpu_desc_add.py tests/test_gpu_bwd_hsplit.py tests/test_gpu_backward.py \
        tests/test_gpu_modifiers.py
      run_stage desc_ab timeout "${DESC_AB_TIMEOUT:-150}" $PY bench/dev/desc_ab.py \
        --out "$OUT/results/desc_ab.json"
      run_stage desc_ab_d256_v3 timeout "${DESC_AB_TIMEOUT:-150}" $PY bench/dev/desc_ab.py \
        --head-dims 256 --fwd-knobs CF_FWD_OVERLAP=3 --out "$OUT/results/desc_ab_d256_v3.json" ;;
    fwd_overlap)  # the 8-warp Hopper forward (head_dim 192 / 256) with each warpgroup's softmax
      # beside its P V product (CF_FWD_OVERLAP): its float64-reference tests, then TFLOP/s
      # against the loop before and cuDNN, alternating rounds (FWD_OVERLAP_VALUES, default 0,2,3:
      # 2 is the selection, 3 the mbarrier candidate; FWD_OVERLAP_ARGS adds arguments)
      CUFLASH_POISON=1 run_stage fwd_overlap_tests timeout "${FWD_OVERLAP_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider tests/test_gpu_fwd_overlap.py
      run_stage fwd_overlap timeout "${FWD_OVERLAP_TIMEOUT:-240}" $PY bench/dev/exp2_fma_ab.py \
        --knob CF_FWD_OVERLAP --values ${FWD_OVERLAP_VALUES:-0,2,3} --head-dims 192,256 --rounds 5 \
        --out "$OUT/results/fwd_overlap.json" ${FWD_OVERLAP_ARGS:-} ;;
    fwd_persistent)  # the warp-specialized Hopper forward (head_dim 64 / 128) with persistent
      # blocks (CF_FWD_PERSISTENT; 2: the pipeline across tiles): its float64-reference tests,
      # then TFLOP/s for each value beside cuDNN at 16k tokens (seqlen 1k / 4k / 16k) and on
      # the GQA rows, alternating rounds
      CUFLASH_POISON=1 run_stage fwd_persistent_tests timeout "${FWD_PERSISTENT_TEST_TIMEOUT:-420}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider tests/test_gpu_fwd_persistent.py
      for rows in tokens gqa; do
        run_stage "fwd_persistent_$rows" timeout "${FWD_PERSISTENT_TIMEOUT:-200}" $PY \
          bench/dev/exp2_fma_ab.py --knob CF_FWD_PERSISTENT --values ${FWD_PERSISTENT_VALUES:-0,1,2} \
          --head-dims 64,128 \
          --rows $rows --rounds 5 --out "$OUT/results/fwd_persistent_$rows.json" \
          ${FWD_PERSISTENT_ARGS:-}
      done ;;
    fwd_tma)  # the warp-specialized Hopper forward (head_dim 64 / 128) loading with bulk
      # tensor copies (CF_FWD_TMA, a candidate written without a GPU), and in clusters of two
      # sharing K / V (CF_FWD_CLUSTER=2): one tile through the
      # copy engine read back raw (the map and the swizzle alone), the plain forward cases,
      # then all its float64-reference tests, the sanitizers, then TFLOP/s with and without
      # beside cuDNN at 16k tokens and on the GQA rows, alternating rounds
      tma_first_stage fwd_tma_first
      CUFLASH_POISON=1 run_stage fwd_tma_tests timeout "${FWD_TMA_TEST_TIMEOUT:-300}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        tests/test_gpu_tma.py
      for tool in memcheck synccheck racecheck; do
        for what in tma cluster; do
          run_stage "${what}_$tool" timeout "${SANITIZE_TIME:-150}" compute-sanitizer \
            --tool $tool --error-exitcode 1 $PY bench/dev/sanitize_persistent.py --$what
        done
      done
      for rows in tokens gqa; do
        run_stage "fwd_tma_$rows" timeout "${FWD_TMA_TIMEOUT:-200}" $PY \
          bench/dev/exp2_fma_ab.py --knob CF_FWD_TMA --values 0,1 --head-dims 64,128 \
          --rows $rows --rounds 5 --out "$OUT/results/fwd_tma_$rows.json"
        run_stage "fwd_cluster_$rows" timeout "${FWD_TMA_TIMEOUT:-200}" $PY \
          bench/dev/exp2_fma_ab.py --knob CF_FWD_CLUSTER --values 0,2 --head-dims 128 \
          --rows $rows --rounds 5 --out "$OUT/results/fwd_cluster_$rows.json"
      done ;;
    pending)  # every candidate written without a GPU, its float64-reference tests in one
      # pytest run (one cold compile phase; give PYTEST_XDIST="-n 8"): the TMA probe first, then
      # TMA / cluster forward and backward, dropout's early flags, three backward stages, the
      # ordered window. Then time the ones that pass: tma_verify's sweep, dropout_ab,
      # bwd_stages, det_window, block_sparse_pers, varlen (bench/dev/NOTES.md, session 28).
      # 535 tests (266 of them TMA): PENDING_FILES splits them over calls
      tma_first_stage tma_first
      CUFLASH_POISON=1 run_stage pending_tests timeout "${PENDING_TEST_TIMEOUT:-420}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=30 -p no:cacheprovider ${PYTEST_XDIST:-} \
        ${PENDING_FILES:-tests/test_gpu_tma.py tests/test_gpu_fwd_drop_early.py \
        tests/test_gpu_bwd_drop_fold.py tests/test_gpu_bwd_stages.py \
        tests/test_gpu_ordered_window.py} ;;
    tma_verify)  # the TMA kernels after session 27's parameter-offset fix (launch.param_packer),
      # in one call: the probe and the plain forward first (stop there if they fail), the
      # forward's, cluster's and backward's float64-reference tests, then TFLOP/s with and
      # without TMA at 16k tokens (fwd_tma and bwd_tma run the full sets and sanitizers)
      tma_first_stage tma_first || continue
      CUFLASH_POISON=1 run_stage tma_tests timeout "${TMA_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        tests/test_gpu_tma.py -k "not d256"
      run_stage tma_memcheck timeout "${SANITIZE_TIME:-90}" compute-sanitizer \
        --tool memcheck --error-exitcode 1 $PY bench/dev/sanitize_persistent.py --tma
      run_stage fwd_tma_tokens timeout "${FWD_TMA_TIMEOUT:-120}" $PY \
        bench/dev/exp2_fma_ab.py --knob CF_FWD_TMA --values 0,1 --head-dims 64,128 \
        --rows tokens --rounds 3 --out "$OUT/results/fwd_tma_tokens.json" ;;
    dropout_ab)  # #15's dropout cost on the Hopper kernels: the forward drawing its kept flags
      # while its products run (CF_FWD_DROP_EARLY, a candidate): bitwise against the selection,
      # the kept set, the float64 reference (tests/test_gpu_fwd_drop_early.py), and the
      # backward with 1 / (1 - p) folded into its statistics (CF_BWD_DROP_FOLD, session 29)
      # against the reference; then step, forward and backward times of no dropout, the
      # selection, the candidates, early with persistent blocks, and 7 Philox rounds (timing
      # only), beside SDPA's flash (bench/dev/dropout_ab.py)
      # Session 32's candidates first (TMA with dropout, selected in session 33 but with a
      # block mask; the d64 two-consumer tile, no gain: tests/test_gpu_dropout_candidates.py),
      # then the variants (DROPOUT_AB_VARIANTS; session 33 timed none,drop,tma,m128,m128_tma)
      CUFLASH_POISON=1 run_stage drop_early_tests timeout "${DROP_EARLY_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        ${DROPOUT_AB_TESTS:-tests/test_gpu_dropout_candidates.py tests/test_gpu_fwd_drop_early.py}
      run_stage dropout_ab timeout "${DROPOUT_AB_TIMEOUT:-300}" $PY bench/dev/dropout_ab.py \
        --rounds "${DROPOUT_AB_ROUNDS:-3}" \
        --variants "${DROPOUT_AB_VARIANTS:-none,drop}" \
        --out "$OUT/results/dropout_ab.json" ;;
    fwd_d256_ws)  # head_dim 256 on the warp-specialized forward (#12's d256 gap: the 8-warp
      # kernel runs 0.79-0.83x cuDNN): 128 x 64 and FlashAttention-3's 128 x 80 tiles, with
      # and without TMA (candidates, not selected): their float64-reference tests, then
      # TFLOP/s against the selected 8-warp tile (overlap 2) beside SDPA's flash and cuDNN
      CUFLASH_POISON=1 run_stage fwd_d256_ws_tests timeout "${FWD_D256_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        tests/test_gpu_tma.py -k "d256 or panel"
      run_stage fwd_d256_selected bash -c "cd bench/dev && timeout ${FWD_D256_TIMEOUT:-150} \
        $PY tile_sweep.py --kind fwd90 --head-dim 256 --seqlen ${FWD_D256_SEQLENS:-4096 16384} \
        --causal both --candidates 8,64,2 --define CF_FWD_OVERLAP=2"
      run_stage fwd_d256_ws bash -c "cd bench/dev && timeout ${FWD_D256_TIMEOUT:-240} $PY \
        tile_sweep.py --kind fwd90 --head-dim 256 --seqlen ${FWD_D256_SEQLENS:-4096 16384} \
        --causal both --candidates 12,64,2 12,80,2 --variant CF_FWD_TMA=1" ;;
    bwd_tma)  # the warp-specialized Hopper backward (head_dim 64 / 128) loading K, V, Q and
      # dO with bulk tensor copies (CF_BWD_TMA; its tests passed on an H200, session 30): its
      # float64-reference tests, then each tile with and without, atomic and ordered dQ,
      # beside SDPA's flash and cuDNN (BWD_TMA_SEQLENS, default 4096 16384)
      CUFLASH_POISON=1 run_stage bwd_tma_tests timeout "${BWD_TMA_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        tests/test_gpu_tma.py -k "backward or panel"
      # the selection adds bulk dQ (specs.with_bulk_dq): TMA is timed beside it, as selected
      # (session 30 timed TMA against cp.async without bulk dQ: registry.BWD90_TMA)
      run_stage bwd_tma bash -c "cd bench/dev && timeout ${BWD_TMA_TIMEOUT:-240} $PY \
        tile_sweep.py --kind bwd90 --head-dim 64 128 --seqlen ${BWD_TMA_SEQLENS:-4096 16384} \
        --causal both --ordered --candidates 12,64,2 12,128,2 --variant CF_DQ_BULK=1 \
        --variant CF_DQ_BULK=1,CF_BWD_TMA=1" ;;  # (the 8-warp kernel has no bulk dQ)
    det_window)  # the deterministic backward with a sliding window on the warp-specialized
      # kernel (ordered dQ, descending key tiles; selected since session 31): its
      # float64-reference and bitwise-repeat tests, then TFLOP/s against the atomic mode and
      # the portable kernels the deterministic mode ran before
      CUFLASH_POISON=1 run_stage det_window_tests timeout "${DET_WINDOW_TEST_TIMEOUT:-300}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        tests/test_gpu_ordered_window.py
      run_stage det_window bash -c "cd bench/dev && timeout ${DET_WINDOW_TIMEOUT:-240} $PY \
        det_window.py 64 128" ;;
    bwd_stages)  # the warp-specialized Hopper backward at head_dim 128 with three Q / dO
      # stages: its float64-reference tests (tests/test_gpu_bwd_stages.py), then beside two,
      # bulk dQ as selected, atomic and ordered (deterministic) in one sweep
      # beside SDPA's flash and cuDNN (session 27: without bulk dQ on an H100, three stages
      # took 16k 438 / causal 422 TFLOP/s against two's 403 / 389; the ordered three did not
      # fit its mbarriers until kBarBytes grew with the stages)
      CUFLASH_POISON=1 run_stage bwd_stages_tests timeout "${BWD_STAGES_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        tests/test_gpu_bwd_stages.py
      run_stage bwd_stages bash -c "cd bench/dev && timeout ${BWD_STAGES_TIMEOUT:-240} $PY \
        tile_sweep.py --kind bwd90 --head-dim 128 --seqlen ${BWD_STAGES_SEQLENS:-4096 16384} \
        --causal both --ordered --candidates 12,64,2 12,64,3 --define CF_DQ_BULK=1" ;;
    fwd_n176)  # the head_dim 128 warp-specialized forward with 176-key tiles (two stages),
      # a candidate: its float64-reference tests, then TFLOP/s against the selected 128-key
      # tile, one block per tile and persistent, beside SDPA's flash and cuDNN
      CUFLASH_POISON=1 run_stage fwd_n176_tests timeout "${FWD_N176_TEST_TIMEOUT:-200}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider tests/test_gpu_fwd_n176.py
      run_stage fwd_n176 bash -c "cd bench/dev && timeout ${FWD_N176_TIMEOUT:-200} $PY \
        tile_sweep.py --kind fwd90 --head-dim 128 --seqlen 4096 16384 --causal both \
        --candidates 12,176,2 12,128,3 --variant CF_FWD_PERSISTENT=1" ;;
    fwd_defaults)  # the GPU tests that run the selected forward (persistent at d64 / d128)
      # through every path: modifiers, dropout, the host fast path and CUDA graphs, torch /
      # JAX frameworks and adapters (session 20's call 4 lost its machine before these ran)
      CUFLASH_POISON=1 run_stage fwd_defaults_tests timeout "${FWD_DEFAULTS_TIMEOUT:-420}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=10 -p no:cacheprovider ${PYTEST_XDIST:-} tests/test_gpu_modifiers.py \
        tests/test_gpu_dropout.py tests/test_gpu_host_path.py tests/test_gpu_frameworks.py \
        tests/test_gpu_adapters.py tests/test_gpu_jax_modifiers.py \
        -k "not portable and not 48k and not 100k" ;;
    pair_tiles)  # v's own head_dim, (192, 128): the forward's 64-key tile (selected) and a
      # 128-key one (FlashAttention-3's public tile_size.h picks 128 x 128 for head_dim 192
      # with v <= 128), each with CF_FWD_OVERLAP=2 where it fits, beside (192, 192)'s tile
      # and SDPA, kernel time alone (tile_sweep pins the spec); the backward's tile too,
      # with dQ's panels balanced over its warpgroups (CF_BWD_DQ_BALANCE, a candidate)
      for dv in 192 128; do
        run_stage "pair_tiles_fwd_v$dv" bash -c "cd bench/dev && timeout ${PAIR_TILES_TIMEOUT:-150} \
          $PY tile_sweep.py --kind fwd90 --head-dim 192 --head-dim-v $dv --seqlen 4096 16384 \
          --causal both --candidates 8,64,2 8,128,2 --variant CF_FWD_OVERLAP=2"
        run_stage "pair_tiles_bwd_v$dv" bash -c "cd bench/dev && timeout ${PAIR_TILES_TIMEOUT:-150} \
          $PY tile_sweep.py --kind bwd90 --head-dim 192 --head-dim-v $dv --seqlen 4096 16384 \
          --causal both --candidates 8,64,2 --variant CF_BWD_DQ_FIRST=1 \
          --variant CF_BWD_DQ_FIRST=1,CF_BWD_DQ_BALANCE=1"
      done ;;
    verify_defaults)  # after sessions without a full GPU run: the selected forward's tests
      # (fwd_defaults' files), the pair kernels' (head_dim_v's), packed sequences (uniform
      # ones now persistent, session 23) and the kernel cache (every kernel a cubin since
      # session 23, compiled once across processes) in one pytest over the
      # cores (-n), each result logged as it finishes (-v), so that a call cut short still
      # says which passed (session 22's -q run said only "276 passed"); VERIFY_K narrows
      # the selection (a -k expression)
      CUFLASH_POISON=1 XLA_PYTHON_CLIENT_PREALLOCATE=false run_stage verify_defaults timeout \
        "${VERIFY_TIMEOUT:-480}" $PY -m pytest -m gpu -v -rfEs --maxfail=30 -p no:cacheprovider \
        -n "${VERIFY_JOBS:-14}" tests/test_gpu_modifiers.py tests/test_gpu_dropout.py \
        tests/test_gpu_host_path.py tests/test_gpu_frameworks.py tests/test_gpu_adapters.py \
        tests/test_gpu_jax_modifiers.py tests/test_gpu_head_dim_v.py \
        tests/test_gpu_varlen.py tests/test_gpu_warmup.py \
        -k "not portable and not 48k and not 100k${VERIFY_K:+ and ($VERIFY_K)}" ;;
    verify_rest)  # verify_defaults' files that session 26's H100 calls did not reach (its
      # 230 s on a cold machine ran 27%), and the equal-lengths varlen test changed after its
      # d128 failure there, in one pytest over the cores
      CUFLASH_POISON=1 XLA_PYTHON_CLIENT_PREALLOCATE=false run_stage verify_rest timeout \
        "${VERIFY_TIMEOUT:-480}" $PY -m pytest -m gpu -v -rfEs --maxfail=30 -p no:cacheprovider \
        -n "${VERIFY_JOBS:-14}" tests/test_gpu_dropout.py tests/test_gpu_host_path.py \
        tests/test_gpu_frameworks.py tests/test_gpu_adapters.py tests/test_gpu_jax_modifiers.py \
        tests/test_gpu_warmup.py \
        "tests/test_gpu_varlen.py::test_equal_lengths_equal_the_dense_kernels" \
        -k "not portable and not 48k and not 100k" ;;
    fwd_persistent_sanitize)  # that kernel's blocks walking tiles, under compute-sanitizer
      for tool in memcheck racecheck synccheck; do
        run_stage "persistent_$tool" timeout "${SANITIZE_TIME:-150}" compute-sanitizer \
          --tool $tool --error-exitcode 1 $PY bench/dev/sanitize_persistent.py
      done ;;
    bwd_dq_first)  # the Hopper backward at head_dim 192 / 256 with a dQ panel issued before
      # dK / dV (CF_BWD_DQ_FIRST): its float64-reference tests, then each tile with and without
      # it beside SDPA's flash and cuDNN (BWD_DQ_FIRST_SEQLENS, default 4096 16384)
      CUFLASH_POISON=1 run_stage bwd_dq_first_tests timeout "${BWD_DQ_FIRST_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider tests/test_gpu_bwd_dq_first.py
      run_stage bwd_dq_first bash -c "cd bench/dev && timeout ${BWD_DQ_FIRST_TIMEOUT:-240} $PY \
        tile_sweep.py --kind bwd90 --head-dim 192 256 --seqlen ${BWD_DQ_FIRST_SEQLENS:-4096 16384} \
        --causal both --variant CF_BWD_DQ_FIRST=1" ;;
    bwd_hsplit)  # the head_dim 256 / 192 backward on 80- / 96-key tiles (flash_bwd_sm90_hsplit.cu,
      # the warpgroups split head_dim; selected since session 26): its float64-reference
      # tests, memcheck and racecheck of a few, then TFLOP/s of the split, atomic and ordered
      # dQ (the deterministic mode; the portable kernels ran it before), with and without dQ
      # by bulk reduce-adds (CF_DQ_BULK, the default mode's selection), and of the role split
      # (64 keys, CF_BWD_DQ_FIRST; the selection before), each beside SDPA's flash and cuDNN
      # (BWD_HSPLIT_SEQLENS, default 4096 16384)
      CUFLASH_POISON=1 run_stage bwd_hsplit_tests timeout "${BWD_HSPLIT_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        tests/test_gpu_bwd_hsplit.py
      for tool in memcheck racecheck; do
        run_stage "bwd_hsplit_$tool" timeout "${SANITIZE_TIME:-150}" compute-sanitizer \
          --tool $tool --error-exitcode 1 $PY -m pytest -m gpu -q -x -p no:cacheprovider \
          tests/test_gpu_bwd_hsplit.py \
          -k "(test_backward_matches_reference and 131 and plain) or (bit_for_bit and plain)"
      done
      run_stage bwd_hsplit bash -c "cd bench/dev && timeout ${BWD_HSPLIT_TIMEOUT:-240} $PY \
        tile_sweep.py --kind bwd90 --head-dim 256 192 --seqlen ${BWD_HSPLIT_SEQLENS:-4096 16384} \
        --causal both --candidates 8,64,2,80 12,64,2,96 --ordered"
      run_stage bwd_hsplit_bulk bash -c "cd bench/dev && timeout ${BWD_HSPLIT_TIMEOUT:-240} $PY \
        tile_sweep.py --kind bwd90 --head-dim 256 192 --seqlen ${BWD_HSPLIT_SEQLENS:-4096 16384} \
        --causal both --candidates 8,64,2,80 12,64,2,96 --variant CF_DQ_BULK=1"
      run_stage bwd_hsplit_role_split bash -c "cd bench/dev && timeout ${BWD_HSPLIT_TIMEOUT:-240} \
        $PY tile_sweep.py --kind bwd90 --head-dim 256 192 \
        --seqlen ${BWD_HSPLIT_SEQLENS:-4096 16384} --causal both --candidates 8,64,2 \
        --define CF_BWD_DQ_FIRST=1" ;;
    bwd_bounds)  # what bounds the head_dim 256 backward (#13's weakest rows): ncu's throughput,
      # memory-workload, scheduler and warp-state sections of the selected role split and of
      # the 80-key head-dim split at 16k (bf16). Is L2 (Q, dO in and dQ's atomics out, 1 / keys
      # bytes a FLOP each) near its ceiling?
      for hsplit in "" --hsplit; do
        run_stage "bwd_bounds_d256${hsplit:+_hsplit}" ncu --clock-control none \
          -k regex:flash_bwd_sm90 -s 2 -c 1 --section SpeedOfLight \
          --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
          --section SchedulerStats --section WarpStateStats --page details \
          bash -c "cd bench/dev && $PY bwd_profile.py --head-dim 256 --seqlen 16384 $hsplit"
      done ;;
    fwd256_bounds)  # session 39, what bounds the head_dim 256 forward (#12's widest gap): the
      # same ncu sections as bwd_bounds for the selected 8-warp tile and the 128 x 80
      # warp-specialized tile with TMA (FWD256_KNOBS: more knobs of the latter), 16k, bf16
      for tile in "" 12,80,2; do
        run_stage "fwd256_bounds${tile:+_ws80}" ncu --clock-control none \
          -k regex:flash_fwd_sm90 -s 2 -c 1 --section SpeedOfLight \
          --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
          --section SchedulerStats --section WarpStateStats --page details \
          bash -c "cd bench/dev && $PY fwd_profile.py --head-dim 256 --seqlen 16384 \
            ${tile:+--tile $tile --knob CF_FWD_TMA=1 ${FWD256_KNOBS:-}}"
      done ;;
    dq_red4)  # session 40: dQ by vector reductions from registers into the tiled accumulator
      # (CF_DQ_RED4, specs.with_dq_red4): its float64-reference tests (the bulk-dQ guard file
      # and the head-dim split's red4 cases), then tile_sweep of the selected tiles with bulk
      # dQ against the same tiles with the reductions, SDPA's flash and cuDNN beside
      CUFLASH_POISON=1 run_stage red4_tests timeout "${RED4_TEST_TIMEOUT:-300}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=20 -p no:cacheprovider ${PYTEST_XDIST:--n 8} \
        tests/test_gpu_bulk_dq.py tests/test_gpu_bwd_hsplit.py -k "red4 or bulk"
      for row in "256 8,64,2,80" "128 12,64,2" "64 12,128,2"; do
        d=${row%% *}
        run_stage "red4_sweep_d$d" timeout 300 $PY bench/dev/tile_sweep.py --kind bwd90 \
          --head-dim "$d" --seqlen 4096 16384 --causal both --candidates "${row#* }" \
          --define CF_DQ_BULK=1 $([ "$d" = 256 ] || echo --define CF_BWD_TMA=1) \
          --variant CF_DQ_RED4=1 ${RED4_SWEEP_ARGS:-}
      done ;;
    hsplit_red4)  # session 40: the head-dim split's selected vector reductions
      # (CF_DQ_RED4=2) and its candidates: test_gpu_bwd_hsplit.py whole and the red4 guard
      # tests, then tile_sweep d256 / d192 (4k, 16k, causal and not) of the selection against
      # every panel at once (=1), the staged bulk adds (=0) and, at 256, each warpgroup
      # loading its own dO panels (CF_HSPLIT_DO_OWN=1); HSPLIT_DTYPES (default bfloat16)
      CUFLASH_POISON=1 run_stage hsplit_red4_tests timeout "${RED4_TEST_TIMEOUT:-300}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=20 -p no:cacheprovider ${PYTEST_XDIST:--n 12} \
        tests/test_gpu_bwd_hsplit.py tests/test_gpu_bulk_dq.py -k "hsplit or red4"
      for dtype in ${HSPLIT_DTYPES:-bfloat16}; do
        run_stage "hsplit_red4_d256_$dtype" timeout 240 $PY bench/dev/tile_sweep.py \
          --kind bwd90 --dtype "$dtype" --head-dim 256 --seqlen 4096 16384 --causal both \
          --candidates 8,64,2,80 --define CF_DQ_BULK=1 --define CF_DQ_RED4=2 \
          --variant CF_DQ_RED4=1 --variant CF_DQ_RED4=0 --variant CF_HSPLIT_DO_OWN=1
        run_stage "hsplit_red4_d192_$dtype" timeout 200 $PY bench/dev/tile_sweep.py \
          --kind bwd90 --dtype "$dtype" --head-dim 192 --seqlen 4096 16384 --causal both \
          --candidates 12,64,2,96 --define CF_DQ_BULK=1 --variant CF_DQ_RED4=1 \
          --variant CF_DQ_RED4=2
      done ;;
    stalls)  # session 40, where the warps of a kernel wait, instruction by instruction: ncu's
      # source counters of each STALL_ROWS entry ("name:script:args"; default the selected
      # d256 backward at 16k and at 4k causal, and the selected d256 forward at 16k), the SASS
      # page as CSV (results/stalls_<name>.csv.xz) and bench/dev/sass_stalls.py's summary
      rows=${STALL_ROWS:-"bwd256:bwd_profile.py:--head-dim 256 --seqlen 16384
bwd256c4k:bwd_profile.py:--head-dim 256 --seqlen 4096 --causal
fwd256:fwd_profile.py:--head-dim 256 --seqlen 16384"}
      while IFS= read -r row; do
        name=${row%%:*}; rest=${row#*:}; script=${rest%%:*}; args=${rest#*:}
        kernel=$([ "${script#bwd}" != "$script" ] && echo flash_bwd_sm90 || echo flash_fwd_sm90)
        run_stage "stalls_$name" ncu --clock-control none -k "regex:$kernel" -s 2 -c 1 \
          --section WarpStateStats --section SourceCounters --section SpeedOfLight \
          --page details -f -o "$OUT/results/stalls_$name" \
          bash -c "cd bench/dev && $PY $script $args"
        ncu -i "$OUT/results/stalls_$name.ncu-rep" --page source --csv --print-source sass \
          >"$OUT/results/stalls_$name.csv" 2>"$OUT/logs/stalls_${name}_export.err"
        run_stage "stalls_${name}_sass" $PY bench/dev/sass_stalls.py "$OUT/results/stalls_$name.csv"
        ncu -i "$OUT/results/stalls_$name.ncu-rep" --page details \
          >"$OUT/logs/stalls_${name}_details.txt" 2>&1
        xz -f "$OUT/results/stalls_$name.csv"; rm -f "$OUT/results/stalls_$name.ncu-rep"
      done <<<"$rows" ;;
    generate)  # transformers greedy generation: per-token latency, sdpa vs cufa (~2 min)
      run_stage generate $PY bench/generate.py --out "$OUT/results/generate.json" \
        ${GENERATE_ARGS:-} ;;
    ab)  # kernel TFLOP/s of an older tree ($AB_OLD, e.g. a git archive) against this one
      # (AB_ARGS: more options, e.g. --head-dims 256 --seqlens 4096,16384)
      run_stage ab $PY bench/dev/ab_compare.py "${AB_OLD:-.old}" . --rounds "${AB_ROUNDS:-2}" \
        --out "$OUT/results/ab.json" ${AB_ARGS:-} ;;
    fwd_ncu)  # one forward kernel under ncu (full set), from an older tree ($AB_OLD) and this
      # one: FWD_NCU_ARGS picks the problem (default the head_dim 256 causal forward at 4k, the
      # one row of #10's A/B that stayed 1-2% under the 2026-12-01 tree)
      for tree in "${AB_OLD:-.old}" .; do
        tag=$([ "$tree" = . ] && echo new || echo old)
        run_stage "fwd_ncu_$tag" env PYTHONPATH="$(realpath "$tree")" ncu --clock-control none \
          -k regex:flash_fwd -s 2 -c 1 --set full -o "$OUT/results/fwd_ncu_$tag" \
          $PY bench/dev/fwd_profile.py ${FWD_NCU_ARGS:---head-dim 256 --seqlen 4096 --causal}
      done ;;
    fwd_bounds)  # what bounds the selected forward (#12's gaps to cuDNN): ncu's throughput,
      # pipe, memory-workload, instruction, scheduler and warp-state sections of one forward
      # kernel for d128 at 16k and 1k tokens a sequence, d256 at 16k (FWD_BOUNDS_ROWS; 16k
      # tokens, bf16), printed; with FWD_BOUNDS_TMA=1 the TMA forward too. Does the L2 -> SM
      # traffic (K and V reread by every query tile: 1 / block_m bytes a FLOP) near its ceiling?
      fwd_bounds "${FWD_BOUNDS_ROWS:-128:16384 128:1024 256:16384}" 0 ;;
    dropout_ncu)  # #15: what the d64 forward spends on dropout (it nearly doubles, and seven
      # Philox rounds instead of ten saved only 4-7%, session 31): fwd_bounds' sections of
      # the selected forward without and with dropout 0.1 (DROPOUT_NCU_ROWS head_dim:seqlen,
      # default 64:4096 128:4096)
      fwd_bounds "${DROPOUT_NCU_ROWS:-64:4096 128:4096}" "0 0.1" ;;
    varlen_ncu)  # #14's varlen gap (1.107x dense at 2 x 8192, d128, session 27): ncu's
      # throughput, scheduler and warp-state sections of the dense forward as selected
      # (persistent), the dense forward one block per tile, and the packed one
      for mode in selected one-block-per-tile varlen; do
        flag=$([ "$mode" = selected ] || echo "--$mode")
        run_stage "varlen_ncu_$mode" ncu --clock-control none -k regex:flash_fwd -s 2 -c 1 \
          --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
          --section LaunchStats --page details \
          $PY bench/dev/fwd_profile.py --head-dim 128 --seqlen 8192 $flag
      done ;;
    fwd_times)  # forward kernel durations alone (ncu, one metric: no replay), an older tree
      # ($AB_OLD) and this one, three turns, the older first in odd turns; FWD_TIMES_ARGS picks
      # the problem (default the head_dim 256 causal forward at 16k, #10's A/B row furthest
      # under the older tree)
      for turn in 1 2 3; do
        order=$([ $((turn % 2)) = 1 ] && echo "old new" || echo "new old")
        for tag in $order; do
          tree=$([ "$tag" = new ] && echo . || echo "${AB_OLD:-.old}")
          run_stage "fwd_times_${tag}_$turn" env PYTHONPATH="$(realpath "$tree")" ncu \
            --clock-control none --cache-control none --metrics gpu__time_duration.sum \
            -k regex:flash_fwd -s 2 --csv $PY bench/dev/fwd_profile.py --calls 12 \
            ${FWD_TIMES_ARGS:---head-dim 256 --seqlen 16384 --causal}
        done
      done ;;
    decode_ab)  # decode bandwidth of an older tree ($AB_OLD) and of this one, in one process each
      run_stage decode_ab bash -c "PYTHONPATH=$(realpath "${AB_OLD:-.old}") $PY bench/decode.py \
        --parts main --out $OUT/results/decode_old.json && $PY bench/decode.py --parts main \
        --out $OUT/results/decode_new.json" ;;
    fwd90_tiles)  # the Hopper forward's tiles side by side (8 warps: flash_fwd_sm90.cu; 12 / 16:
      # the warp-specialized kernel with 2 / 3 consumers), SDPA's flash and cuDNN first
      run_stage fwd90_tiles bash -c "cd bench/dev && $PY tile_sweep.py --kind fwd90 \
        --head-dim 64 128 256 --seqlen 1024 4096 16384 --causal both \
        --candidates ${FWD90_TILES:-8,128,2 8,64,2 12,128,3 16,128,3}" ;;
    bwd90_tiles)  # the Hopper backward (flash_bwd_sm90.cu) beside SDPA's flash and cuDNN;
      # BWD90_AB=NAME=VALUE times each tile again with that knob (an A/B in the same run)
      run_stage bwd90_tiles bash -c "cd bench/dev && $PY tile_sweep.py --kind bwd90 \
        --head-dim 64 128 256 --seqlen ${BWD90_SEQLENS:-1024 4096 16384} --causal both \
        --dtype ${BWD90_DTYPE:-bfloat16} ${BWD90_AB:+--variant $BWD90_AB}" ;;
    modifiers)  # what window / softcap / ALiBi / sinks cost against plain attention
      run_stage modifiers $PY bench/dev/modifiers_overhead.py ;;
    varlen)  # varlen against dense at equal total tokens (issue 14: within 5%)
      run_stage varlen $PY bench/dev/varlen_bench.py ;;
    varlen_tma)  # the packed forward and backward loading with bulk tensor copies, their
      # rows past a sequence zeroed (selected in session 33: 84 passed; memcheck, racecheck
      # clean): their float64-reference, isolation and bitwise tests, then varlen / dense
      # (session 33, H100: 0.989-1.018 forward and backward; 1.085-1.144 forward unboxed)
      CUFLASH_POISON=1 run_stage varlen_tma_tests timeout "${VARLEN_TMA_TEST_TIMEOUT:-330}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:-} \
        tests/test_gpu_varlen_tma.py
      run_stage varlen_tma $PY bench/dev/varlen_bench.py --tma
      # their zeroed tails under the sanitizer (compiled outside it first)
      run_stage varlen_tma_warm $PY bench/sanitize.py --warm --boxed varlen --kinds varlen \
        --dtypes bfloat16
      run_stage varlen_tma_memcheck timeout "${SANITIZE_TIME:-150}" compute-sanitizer \
        --tool memcheck --error-exitcode 1 $PY bench/sanitize.py --boxed varlen \
        --kinds varlen --dtypes bfloat16
      TAIL_LINES=12 run_stage varlen_tma_racecheck timeout "${SANITIZE_TIME:-150}" \
        compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 1 $PY \
        bench/sanitize.py --boxed varlen --kinds varlen --dtypes bfloat16 ;;
    block_mask_tma)  # the boxed forward under a block mask hung (session 34: the issuing
      # thread ran the mask's warp ballot alone); with its warp kept (kTmaWarp), not yet run:
      # test_gpu_tma's forward and backward block-mask cases and the boxed dropout ones with
      # a mask (both force TMA whatever the selection), then the boxed sparse cases under
      # memcheck and racecheck. If they pass: TMA_OFF_WHEN = () and test_gpu_block_sparse
      CUFLASH_POISON=1 run_stage block_mask_tma_tests timeout "${BLOCK_MASK_TMA_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:--n 12} \
        tests/test_gpu_tma.py tests/test_gpu_dropout_candidates.py \
        -k "block_masks or (block_mask and boxed)"
      run_stage block_mask_tma_warm $PY bench/sanitize.py --warm --boxed block_sparse \
        --kinds sparse --dtypes bfloat16 --head-dims 64,128
      run_stage block_mask_tma_memcheck timeout "${SANITIZE_TIME:-150}" compute-sanitizer \
        --tool memcheck --error-exitcode 1 $PY bench/sanitize.py --boxed block_sparse \
        --kinds sparse --dtypes bfloat16 --head-dims 64,128
      TAIL_LINES=12 run_stage block_mask_tma_racecheck timeout "${SANITIZE_TIME:-150}" \
        compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 1 $PY \
        bench/sanitize.py --boxed block_sparse --kinds sparse --dtypes bfloat16 \
        --head-dims 64,128 ;;
    dropout_words)  # session 35, written without a GPU: the kernels that read dropout's
      # seed from device memory (CF_DROP_RNG_PTR: torch's CUDA calls and graphs, jitted JAX
      # on CUDA) and the varlen kernels with dropout; their GPU tests, then memcheck on the
      # torch graph replay test
      CUFLASH_POISON=1 run_stage dropout_words_tests timeout "${DROPOUT_WORDS_TIMEOUT:-300}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:--n 8} \
        tests/test_dropout_device.py tests/test_torch_dropout.py tests/test_gpu_jax_dropout.py \
        tests/test_gpu_dropout.py tests/test_gpu_varlen.py -k "dropout or cuda or jax"
      run_stage dropout_words_memcheck timeout "${SANITIZE_TIME:-150}" compute-sanitizer \
        --tool memcheck --error-exitcode 1 $PY -m pytest -m gpu -q -p no:cacheprovider \
        tests/test_torch_dropout.py -k "graph_replays_read" ;;
    drop_packed)  # session 37, #15's dropout cost: the forward dropping P after packing
      # it, by byte masks (CF_DROP_PACKED; about 23% fewer instructions in the mask's share
      # of a step by SASS; selected after this stage's first run): bitwise against dropping
      # the floats, the kept set and the float64 reference (tests/test_gpu_fwd_drop_early.py
      # -k packed), then dropout_ab's none / drop (packed) / unpacked, and 7 Philox rounds
      # (timing only)
      CUFLASH_POISON=1 run_stage drop_packed_tests timeout "${DROP_PACKED_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:--n 8} \
        tests/test_gpu_fwd_drop_early.py -k packed
      run_stage dropout_ab timeout "${DROPOUT_AB_TIMEOUT:-300}" $PY bench/dev/dropout_ab.py \
        --rounds "${DROPOUT_AB_ROUNDS:-3}" \
        --variants "${DROPOUT_AB_VARIANTS:-none,drop,unpacked,packed_r7}" \
        --out "$OUT/results/dropout_ab.json" ;;
    drop_ring)  # session 38, #15's dropout cost: the kept flags drawn by the producers'
      # idle warps into a ring of shared-memory slots (CF_DROP_RING, candidates:
      # registry.FWD90_DROP_RING / BWD90_DROP_RING): bitwise against the same tiles drawing
      # in their consumers (the backward's dQ within rounding: atomics),
      # the kept set and the float64 reference (tests/test_gpu_drop_ring.py), then
      # dropout_ab's none / drop / ring_tile / ring / bwd_ring / rings (both)
      CUFLASH_POISON=1 run_stage drop_ring_tests timeout "${DROP_RING_TEST_TIMEOUT:-240}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:--n 8} \
        tests/test_gpu_drop_ring.py
      run_stage dropout_ab timeout "${DROPOUT_AB_TIMEOUT:-300}" $PY bench/dev/dropout_ab.py \
        --rounds "${DROPOUT_AB_ROUNDS:-2}" \
        --variants "${DROPOUT_AB_VARIANTS:-none,drop,ring_tile,ring,bwd_ring,rings}" \
        --out "$OUT/results/dropout_ab.json" ;;
    fwd_rescale)  # session 39, #12's d256 forward: O rescaled under the S product
      # (CF_FWD_RESCALE_EARLY, specs.with_forward_rescale_early; FlashAttention-3 does so above
      # head_dim 128, where it also drops the warpgroups' turn-taking): the float64-reference
      # tests, then the selection with and without (d128 / d256, 16k tokens, alternating
      # rounds), then the 128 x 80 warp-specialized tile with TMA, early rescale, no turns
      # and clusters of two against the selected 8-warp tile, beside SDPA's flash and cuDNN
      CUFLASH_POISON=1 run_stage fwd_rescale_tests timeout "${FWD_RESCALE_TEST_TIMEOUT:-200}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:--n 8} \
        tests/test_gpu_fwd_rescale_early.py
      run_stage fwd_rescale_ab timeout "${FWD_RESCALE_TIMEOUT:-200}" $PY \
        bench/dev/exp2_fma_ab.py --knob CF_FWD_RESCALE_EARLY --values 0,1 --head-dims 256,128 \
        --rows tokens --rounds "${FWD_RESCALE_ROUNDS:-3}" --out "$OUT/results/fwd_rescale.json"
      run_stage fwd_rescale_d256 bash -c "cd bench/dev && timeout ${FWD_D256_TIMEOUT:-200} \
        $PY tile_sweep.py --kind fwd90 --head-dim 256 --seqlen ${FWD_D256_SEQLENS:-4096 16384} \
        --candidates 8,64,2 --define CF_FWD_OVERLAP=2 --variant CF_FWD_RESCALE_EARLY=1 \
        --causal both && timeout ${FWD_D256_TIMEOUT:-200} $PY tile_sweep.py --kind fwd90 \
        --head-dim 256 --seqlen ${FWD_D256_SEQLENS:-4096 16384} --candidates 12,80,2 \
        --define CF_FWD_TMA=1 --variant CF_FWD_RESCALE_EARLY=1 --variant CF_FWD_PINGPONG=0 \
        --variant CF_FWD_RESCALE_EARLY=1,CF_FWD_PINGPONG=0 --variant CF_FWD_CLUSTER=2 \
        --variant CF_FWD_CLUSTER=2,CF_FWD_RESCALE_EARLY=1,CF_FWD_PINGPONG=0" ;;
    causal_sparse)  # session 36, the d64 causal block-sparse backward on the 12-warp tile
      # boxed, its consumers at 240 registers (a candidate: registry.BWD90_BOXED_ONLY): the
      # block-mask GPU tests (test_causal_d64_backward_on_the_wide_boxed_tile runs it),
      # memcheck on its causal cases, then block_sparse.py's speed (the GPU's
      # time and the idle-GPU time), the candidate's backward and persistent forwards beside.
      # If its tests pass and it wins, set registry.BWD90_BOXED_ONLY = True.
      CUFLASH_POISON=1 run_stage causal_sparse_tests timeout "${CAUSAL_SPARSE_TIMEOUT:-200}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=8 -p no:cacheprovider ${PYTEST_XDIST:--n 12} \
        tests/test_gpu_block_sparse.py
      CUFLASH_POISON=1 run_stage causal_sparse_memcheck timeout "${SANITIZE_TIME:-150}" \
        compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -m gpu -q \
        -p no:cacheprovider tests/test_gpu_block_sparse.py \
        -k "wide_boxed and 389 and bfloat16"
      run_stage causal_sparse_speed timeout "${BLOCK_SPARSE_TIMEOUT:-240}" $PY \
        bench/block_sparse.py --seqlen 16384 --head-dims 64,128 --persistent --wide-boxed \
        --json "$OUT/results/block_sparse_causal.json" ;;
    det)  # the deterministic backward against the default (issue 13: at most 20% slower):
      # its bitwise tests, then TFLOP/s through the public API
      CUFLASH_POISON=1 run_stage det_tests timeout "${SUITE_TIME_BUDGET:-540}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=3 -p no:cacheprovider \
        tests/test_gpu_backward.py tests/test_edges_gpu.py -k "determin or det or every_head_dim"
      run_stage det_speed bash -c "cd bench/dev && $PY det_compare.py 128 64" ;;
    issue15)  # dropout, block-sparse, padded head dims: their gpu tests (the kept set
      # exactly, the reference per family); issue15_bench: their speed beside dense
      CUFLASH_POISON=1 run_stage issue15_tests timeout "${SUITE_TIME_BUDGET:-540}" \
        $PY -m pytest -m gpu -q -rfEs --maxfail=20 -p no:cacheprovider \
        --junitxml="$OUT/results/gpu_issue15.xml" ${ISSUE15_TESTS:-tests/test_dropout_device.py \
        tests/test_gpu_dropout.py tests/test_gpu_block_sparse.py tests/test_gpu_head_dims.py \
        tests/test_torch_dropout.py} ;;
    issue15_bench)
      run_stage dropout_bench $PY bench/dropout.py --json "$OUT/results/dropout.json"
      run_stage head_dims_bench $PY bench/head_dims.py --json "$OUT/results/head_dims.json"
      [ "${ISSUE15_SPARSE:-1}" = 1 ] && run_stage block_sparse_bench $PY bench/block_sparse.py \
        --seqlen 16384 --head-dims 64,128 --flex --json "$OUT/results/block_sparse.json" ;;
    block_sparse_pers)  # #15's block-sparse speed-up (5x at 10% density, 16k; met only at
      # d128 non-causal) with the Hopper forward's persistent blocks under a block mask (a
      # candidate; its tests passed in session 27): dense, sparse, sparse persistent
      run_stage block_sparse_pers timeout "${BLOCK_SPARSE_TIMEOUT:-240}" $PY \
        bench/block_sparse.py --seqlen 16384 --head-dims 64,128 --persistent \
        --json "$OUT/results/block_sparse_pers.json" ;;
    det_pieces)  # ordered bulk dQ with two pieces a warpgroup (CF_DQ_PIECES=2, written
      # 2026-12-04, not selected): the bulk-dQ tests (its guard, reference, bitwise repeat),
      # then its speed beside one piece and the atomic mode, d64 and d128
      CUFLASH_POISON=1 run_stage det_pieces_tests timeout 300 $PY -m pytest -m gpu -q -rfEs \
        -p no:cacheprovider tests/test_gpu_bulk_dq.py
      run_stage det_pieces_ab bash -c "cd bench/dev && $PY tile_sweep.py --kind bwd90 --ordered \
        --head-dim 64 128 --seqlen 4096 16384 --causal both --candidates 12,64,2 12,128,2 \
        --variant CF_DQ_BULK=1 --variant CF_DQ_BULK=1,CF_DQ_PIECES=2" ;;
    hopper_d192)  # the Hopper kernels at head_dim 192 (not in the registry until this
      # passes): their accuracy tests, then their speed beside SDPA's flash and cuDNN
      CUFLASH_POISON=1 run_stage hopper_d192_tests timeout "${SUITE_TIME_BUDGET:-540}" \
        $PY -m pytest -m gpu -q -rfEs -p no:cacheprovider tests/test_gpu_hopper_d192.py
      run_stage fwd90_d192_speed bash -c "cd bench/dev && $PY tile_sweep.py --kind fwd90 \
        --head-dim 192 --seqlen 4096 16384 --causal both --candidates 8,64,2"
      run_stage bwd90_d192_speed bash -c "cd bench/dev && $PY tile_sweep.py --kind bwd90 \
        --head-dim 192 --seqlen 4096 16384 --causal both --candidates 8,64,2" ;;
    head_dim_v)  # v's own head_dim on the Hopper kernels (CUFLASH_HEAD_DIM_V_NATIVE=1; written
      # 2026-12-05, off by default until this passes): their accuracy tests, a memcheck of
      # the forward and backward of (192, 128) with split kv heads, then the pairs' speed on
      # copies and native beside head_dim 192 / 256 and SDPA (issue #15's 0.9x per FLOP)
      CUFLASH_POISON=1 run_stage head_dim_v_tests timeout "${HEAD_DIM_V_TEST_TIMEOUT:-540}" \
        $PY -m pytest -m gpu -q -rfEs -p no:cacheprovider ${PYTEST_XDIST:-} tests/test_gpu_head_dim_v.py \
        tests/test_gpu_head_dims.py::test_gpu_jax_jit_head_dims \
        tests/test_gpu_head_dims.py::test_gpu_torch_autograd_head_dim_v \
        tests/test_gpu_varlen.py::test_head_dim_v_on_padded_copies
      CUFLASH_POISON=1 run_stage head_dim_v_transformers timeout "${HEAD_DIM_V_HF_TIMEOUT:-240}" $PY -m pytest -q -rfEs \
        -p no:cacheprovider tests/test_transformers.py -k deepseek
      CUFLASH_POISON=1 run_stage head_dim_v_memcheck timeout "${HEAD_DIM_V_MEMCHECK_TIMEOUT:-300}" compute-sanitizer \
        --tool memcheck --error-exitcode 1 $PY -m pytest -m gpu -q -x -p no:cacheprovider \
        "tests/test_gpu_head_dim_v.py::test_gpu_pair_split_kv_heads"
      for seqlen in ${HEAD_DIM_V_SEQLENS:-4096 16384}; do  # 16k: kernel time well above host time
        run_stage "head_dim_v_bench_$seqlen" timeout "${HEAD_DIM_V_BENCH_TIMEOUT:-300}" $PY \
          bench/head_dims.py --seqlen "$seqlen" --native both \
          --pairs ${HEAD_DIM_V_PAIRS:-192,192 192,128 256,256 256,128 128,128 64,128 128,64} \
          --json "$OUT/results/head_dim_v_$seqlen.json"
      done ;;
    *)
      echo "unknown stage $stage" | tee -a "$summary" ;;
  esac
done

tar -C "$OUT" -czf "$OUT/suite.tar.gz" logs results 2>/dev/null
cat "$summary"
