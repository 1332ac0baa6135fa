#!/usr/bin/env bash
# GPU check in one go, for an H100/H200 machine with its own torch and no
# network: build lskd._C (CPU + CUDA kernels) against that torch, run the CUDA
# self-test and the GPU tests, run the GPU benchmarks, write everything into
# $OUT (default benches/results/gpu-run) and print a short table last.
#
#   bash benches/gpu_check.sh            # build, tests, profile, benchmarks, training step
#   STAGES="build bench trainbench" bash benches/gpu_check.sh
#   STAGES="build stepbench" bash benches/gpu_check.sh   # the training step at full size
#
# Stages (STAGES, default "build tests profile bench stepbench"; also selftest, trainbench):
# build, selftest (benches/cuda_selftest.py), tests (pytest -m gpu), profile
# (benches/profile_loss.py), bench (the op benchmarks, two parts), trainbench
# (benches/test_bench_training.py), stepbench (benches/test_bench_step.py: one whole training
# iteration per method, (a) the student alone .. (f) LSKD as released, and PLOP eager; one
# part and JSON per dtype of STEP_BENCH_DTYPES, "bfloat16 float32", bf16 first).
#
# Stage times on a fresh H100/H200 (benches/results/h200-2026-11-26.md): build
# 35-46 s, GPU tests 150 s, profile 30 s, benchmarks without torch.compile about
# 50 s (part 1, the whole loss, BENCH_K1) + 50 s (part 2, the ops, BENCH_K2).
# stepbench: not yet timed on a GPU; estimated 40-60 s (bf16) and 60-120 s (float32) for
# ResNet-101 at 512, batch 12, 8 variants x (2 warm-up + 5) iterations. Each part runs ResNet-101
# at 512 when its time-out (the budget left, at most STEP_BENCH_TIMEOUT) is at least
# STEP_BENCH_FULL_S (120 s), else the fallback ResNet-50 at 256 (said in a note); set
# LSKD_STEP_BENCH_BACKBONE / _SIZE / _BATCH / _ROUNDS to choose by hand. In the default run it
# comes last, with what the budget leaves (the fallback, or skipped): for the full-size figures
# run STAGES="build stepbench".
# torch.compile of the eager loss (the compile column of part 1,
# LSKD_BENCH_COMPILE=loss; "all" adds per-op compile columns, which nothing warms,
# "none" drops them) takes more than 150 s cold, nearly all of it inductor (a few
# seconds dynamo): too long to pay inside part 1, hence the compile warm-up.
#
# Compile warm-up: right after the build, benches/warm_compile.py compiles exactly
# that loss (both dtypes, one niced process each) in the background while the
# tests run, into the inductor cache TORCHINDUCTOR_CACHE_DIR (default
# /tmp/lskd-inductor-cache, shared by every stage), so that part 1 loads the
# compiled graphs and kernels and only traces again (seconds). Log and JSON:
# $OUT/warm_compile.{log,json}. If it still runs when the bench stage starts,
# part 2 runs first, beside it; before part 1 the script waits for it while more
# than BENCH_RESERVE_S (90 s) of the budget are left, then kills it and runs part 1
# with LSKD_BENCH_COMPILE=none, saying so. WARM_COMPILE=0: no warm-up (part 1
# compiles cold under its time-out).
#
# Time budget: the run fits GPU_CHECK_BUDGET_S (default 450 s, from the script's
# start; the issue allows 8 minutes) by construction. Each stage runs under
# `timeout -k 10 min(its cap, budget left - GPU_CHECK_RESERVE_S)` (20 s kept for
# a kill and the summary); a stage that would get less than GPU_CHECK_MIN_STAGE_S (10 s) is
# skipped with a "SKIP <stage>: time budget spent" line. Caps: BUILD_TIMEOUT 300,
# SELFTEST_TIMEOUT 180, TEST_TIMEOUT 240, PROFILE_TIMEOUT 90, BENCH_TIMEOUT 240
# (per part), TRAIN_BENCH_TIMEOUT 180, STEP_BENCH_TIMEOUT 180 (per part), WARM_TIMEOUT 420.
# Expected default run: machine 10 s, build 45 s, tests 150 s, profile 30 s, bench 120 s:
# about 6 min; stepbench then gets the rest (about 70 s: ResNet-50 at 256, bf16 first).
# Other knobs: TEST_K (pytest -k of the tests), BENCH_K1 / BENCH_K2 (-k of the two
# benchmark parts), LSKD_BENCH_ROUNDS (10), LSKD_BENCH_COMPILE (loss),
# WARM_COMPILE_ARGS (extra arguments of warm_compile.py), OUT, PYTHON,
# GPU_TEST_BACKENDS, LSKD_BENCH_EXPECT (cuda,triton).
#
# Last come the summaries (with the compile column's first-call time and cache
# hits), the warm-up's lines, one line per stage (seconds, result) and "done,
# status N". Exit status: 0 every stage ran and passed; 1 a stage failed or timed
# out; 2 none failed but one was skipped for the budget.
set -uo pipefail
START_EPOCH=$(( $(date +%s) - SECONDS ))
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-benches/results/gpu-run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${STAGES:-"build tests profile bench stepbench"}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
RESERVE=${GPU_CHECK_RESERVE_S:-20}
MIN_STAGE=${GPU_CHECK_MIN_STAGE_S:-10}
BENCH_RESERVE_S=${BENCH_RESERVE_S:-90}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-300}
SELFTEST_TIMEOUT=${SELFTEST_TIMEOUT:-180}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-90}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}
TRAIN_BENCH_TIMEOUT=${TRAIN_BENCH_TIMEOUT:-180}
STEP_BENCH_TIMEOUT=${STEP_BENCH_TIMEOUT:-180}
STEP_BENCH_FULL_S=${STEP_BENCH_FULL_S:-120}
STEP_BENCH_DTYPES=${STEP_BENCH_DTYPES:-"bfloat16 float32"}
WARM_TIMEOUT=${WARM_TIMEOUT:-420}
# Wheels brought along for packages the GPU machine lacks (e.g. expecttest for opcheck).
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/lskd-site .whl/*.whl && export PYTHONPATH=/tmp/lskd-site${PYTHONPATH:+:$PYTHONPATH}
fi
export LSKD_BENCH_ROUNDS=${LSKD_BENCH_ROUNDS:-10} LSKD_BENCH_COMPILE=${LSKD_BENCH_COMPILE:-loss} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FORCE_CUDA=1
# One inductor cache for the warm-up and the benchmark processes.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/lskd-inductor-cache}
status=0
skipped=()
notes=()
stage_lines=()
warm_pid=""
warm_state="not run"
stage() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }
log() { echo "== $(date +%T) +${SECONDS}s $*"; }
left() { echo $(( BUDGET - RESERVE - SECONDS )); }
# budget NAME CAP: LIMIT = min(CAP, budget left); false (and a SKIP line) when under MIN_STAGE.
budget() {
  local l; l=$(left)
  LIMIT=$(( $2 < l ? $2 : l ))
  CUT=$(( LIMIT < $2 ))  # 1: the budget, not the stage's cap, sets its time-out
  if (( LIMIT < MIN_STAGE )); then
    log "SKIP $1: time budget spent (${SECONDS} s of GPU_CHECK_BUDGET_S=$BUDGET s used, $RESERVE s kept for the summary, a stage needs $MIN_STAGE s)"
    skipped+=("$1"); stage_lines+=("$(printf '%-10s     -   skipped (budget spent)' "$1")")
    return 1
  fi
}
# record NAME T0 RC: one line of the final table; a non-zero RC fails the run.
record() {
  local what="ok"
  if [ "$3" = 124 ] || [ "$3" = 137 ]; then
    what="TIMED OUT after $LIMIT s"; (( CUT )) && what="$what (cut by the budget)"
  elif [ "$3" != 0 ]; then
    what="FAILED (rc $3)"
  fi
  [ "$3" = 0 ] || status=1
  stage_lines+=("$(printf '%-10s %5d s  %s' "$1" $(( SECONDS - $2 )) "$what")")
}
# End the background warm-up (if running) and reap it; sets warm_state.
stop_warm() {
  [ -n "$warm_pid" ] || return 0
  if kill -0 "$warm_pid" 2>/dev/null; then
    kill "$warm_pid" 2>/dev/null; wait "$warm_pid" 2>/dev/null
    warm_end=$SECONDS; warm_state="killed after $(( warm_end - warm_t0 )) s (unfinished)"
  else
    wait "$warm_pid"; local rc=$?
    # It ended when it last wrote its log, or at its time-out.
    warm_end=$(( $(stat -c %Y "$OUT/warm_compile.log" 2>/dev/null || date +%s) - START_EPOCH ))
    if [ $rc = 0 ]; then warm_state="done in $(( warm_end - warm_t0 )) s"
    elif [ $rc = 124 ] || [ $rc = 137 ]; then warm_end=$(( warm_t0 + warm_limit )); warm_state="timed out after $warm_limit s"
    else warm_state="failed (rc $rc)"; fi
  fi
  echo "$warm_state" > "$OUT/warm_compile.status"
  stage_lines+=("$(printf '%-10s %5d s  %s' warm-up $(( warm_end - warm_t0 )) "background torch.compile warm-up: $warm_state")")
  warm_pid=""
}
trap '[ -z "$warm_pid" ] || kill "$warm_pid" 2>/dev/null' EXIT
# The summaries, the stage table and the status: always last.
finish() {
  stop_warm
  log "summary"
  for part in 1 2; do
    [ -s "$OUT/bench$part.json" ] && timeout 30 "$PY" benches/summarize.py "$OUT/bench$part.json" --markdown "$OUT/summary$part.md"
  done
  [ -s "$OUT/train.json" ] && timeout 30 "$PY" benches/summarize.py "$OUT/train.json" --markdown "$OUT/train.md"
  for f in "$OUT"/step-*.json; do
    [ -s "$f" ] && timeout 30 "$PY" benches/summarize.py "$f" --markdown "${f%.json}.md"
  done
  [ -s "$OUT/warm_compile.log" ] && grep "^warm_compile: " "$OUT/warm_compile.log" | grep -v "^warm_compile: dtypes"
  echo "stages (GPU_CHECK_BUDGET_S=$BUDGET s, used $SECONDS s):"
  printf '  %s\n' "${stage_lines[@]}"
  (( ${#skipped[@]} )) && { notes+=("skipped for the budget: ${skipped[*]}"); [ $status = 0 ] && status=2; }
  (( ${#notes[@]} )) && printf 'note: %s\n' "${notes[@]}"
  log "done, status $status"
  exit $status
}

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt" || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

if stage build && budget build "$BUILD_TIMEOUT"; then
  # In-place build: pip's editable install needs build dependencies from the
  # network there, which the GPU machine does not have.
  log "build (MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST)"
  t0=$SECONDS
  timeout -k 10 "$LIMIT" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?; record build $t0 $rc
  log "build rc=$rc in $(( SECONDS - t0 )) s"
  [ $rc = 0 ] || { tail -30 "$OUT/build.log"; finish; }
fi
# What the installed package maps: lskd.kernels -> kernels/ (ignored link, see .gitignore).
[ -e lskd/kernels ] || ln -s ../kernels lskd/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import lskd; print('backends on cuda:', lskd.available_backends('cuda'))" 2>&1 | tee -a "$OUT/build.log"

# torch.compile warm-up of the loss benchmark's compile column, in the background
# while the tests run (they leave most of the 16 cores idle).
if stage bench && [ "$LSKD_BENCH_COMPILE" != none ] && [ "${WARM_COMPILE:-1}" != 0 ]; then
  if budget warm-up "$WARM_TIMEOUT"; then
    log "background: benches/warm_compile.py (torch.compile of the loss, cache $TORCHINDUCTOR_CACHE_DIR, time-out $LIMIT s)"
    warm_t0=$SECONDS; warm_limit=$LIMIT
    # shellcheck disable=SC2086  # WARM_COMPILE_ARGS: words
    timeout -k 5 "$LIMIT" nice -n 10 "$PY" benches/warm_compile.py --json "$OUT/warm_compile.json" ${WARM_COMPILE_ARGS:-} \
        > "$OUT/warm_compile.log" 2>&1 &
    warm_pid=$!
  else
    warm_state="skipped (budget spent)"
  fi
fi
warm_running() { [ -n "$warm_pid" ] && kill -0 "$warm_pid" 2>/dev/null; }

if stage selftest && budget selftest "$SELFTEST_TIMEOUT"; then
  log "CUDA self-test"
  t0=$SECONDS
  timeout -k 10 "$LIMIT" "$PY" benches/cuda_selftest.py 2>&1 | tee "$OUT/selftest.log" | grep -vE "^PASS" | tail -40
  record selftest $t0 "${PIPESTATUS[0]}"
  grep -c "^PASS" "$OUT/selftest.log" | sed 's/^/self-test PASS lines: /'
fi

if stage tests && budget tests "$TEST_TIMEOUT"; then
  log "GPU tests (time-out $LIMIT s)"
  t0=$SECONDS
  # The reference backend on CUDA is not a deliverable: test the kernels.
  LSKD_EXPECT_GPU_BACKENDS=cuda,triton LSKD_GPU_TEST_BACKENDS=${GPU_TEST_BACKENDS:-cuda,triton} timeout -k 10 "$LIMIT" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider \
      --maxfail=25 ${TEST_K:+-k "$TEST_K"} --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.log" 2>&1
  rc=$?; record tests $t0 $rc
  grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | head -30; tail -3 "$OUT/gpu-tests.log"; echo "gpu tests rc=$rc"
fi

if stage profile && budget profile "$PROFILE_TIMEOUT"; then
  # Wall time against kernel time (torch.profiler) of the whole loss (fused / per term) and of md_masks.
  log "profile: whole loss and md_masks, wall vs kernel time$(warm_running && echo ' (the compile warm-up still runs beside it)')"
  t0=$SECONDS
  timeout -k 10 "$LIMIT" "$PY" benches/profile_loss.py --json "$OUT/profile.json" 2>&1 | grep -vE "^(USDT|ERROR|WARNING)" | tee "$OUT/profile.log" | grep "^##"
  record profile $t0 "${PIPESTATUS[0]}"
fi

if stage bench; then
  # Two parts, each with its own JSON, so that a time-out loses at most one: 1 the loss (with the
  # compile column), 2 the ops. A warm-up still running lets part 2 go first, beside it.
  bench_k=("" "${BENCH_K1:-lskd_loss}" "${BENCH_K2:-pod_distill or md_masks or sop_distill}")
  order="1 2"
  if warm_running; then
    order="2 1"
    log "the compile warm-up still runs: benchmark part 2 (no torch.compile) first, beside it (niced), then part 1"
  fi
  for part in $order; do
    compile=$LSKD_BENCH_COMPILE
    if [ "$part" = 1 ] && [ -n "$warm_pid" ]; then
      # Wait for the warm-up while part 1 keeps BENCH_RESERVE_S of the budget.
      warm_running && log "waiting for the compile warm-up while more than BENCH_RESERVE_S=$BENCH_RESERVE_S s of the budget are left (now $(left) s)"
      while warm_running && (( $(left) > BENCH_RESERVE_S )); do sleep 1; done
      stop_warm
      log "compile warm-up: $warm_state"
    fi
    budget "bench$part" "$BENCH_TIMEOUT" || continue
    if [ "$part" = 1 ] && [ "$compile" != none ]; then
      case $warm_state in
        "done in"*|"not run") ;;
        *) # Cold, the compilation alone would outlast the part's time-out.
           compile=none
           log "no torch.compile column for the loss: the warm-up was $warm_state, part 1 runs with LSKD_BENCH_COMPILE=none"
           notes+=("no torch.compile column for the loss (warm-up $warm_state)") ;;
      esac
    fi
    log "GPU benchmarks, part $part: ${bench_k[$part]} (LSKD_BENCH_COMPILE=$compile, time-out $LIMIT s)"
    t0=$SECONDS
    LSKD_BENCH_COMPILE=$compile LSKD_BENCH_EXPECT=${LSKD_BENCH_EXPECT-cuda,triton} timeout -k 10 "$LIMIT" "$PY" -m pytest benches -q -p no:cacheprovider --benchmark-only -k "${bench_k[$part]}" \
        --benchmark-json="$OUT/bench$part.json" > "$OUT/bench$part.log" 2>&1
    rc=$?; record "bench$part" $t0 $rc
    [ $rc = 0 ] || tail -15 "$OUT/bench$part.log"
  done
fi
if stage trainbench && budget trainbench "$TRAIN_BENCH_TIMEOUT"; then
  # Seconds per LSKD training iteration: fixed weights, RGE, GradNorm, the search (orders 1, 2).
  log "training-iteration benchmark (weighting / search overhead)"
  t0=$SECONDS
  timeout -k 10 "$LIMIT" "$PY" -m pytest benches/test_bench_training.py -q -p no:cacheprovider --benchmark-only \
      --benchmark-json="$OUT/train.json" > "$OUT/train.log" 2>&1
  rc=$?; record trainbench $t0 $rc
  [ $rc = 0 ] || tail -15 "$OUT/train.log"
fi
if stage stepbench; then
  # One whole training iteration per method, (a)-(f) and PLOP eager, on one batch: one part and JSON
  # per dtype, so that a time-out loses one part at most.
  for dt in $STEP_BENCH_DTYPES; do
    case $dt in bfloat16) part=step-bf16;; float32) part=step-fp32;; *) part=step-$dt;; esac
    budget "$part" "$STEP_BENCH_TIMEOUT" || continue
    bb=${LSKD_STEP_BENCH_BACKBONE:-resnet101}; size=${LSKD_STEP_BENCH_SIZE:-512}
    if [ -z "${LSKD_STEP_BENCH_BACKBONE:-}" ] && (( LIMIT < STEP_BENCH_FULL_S )); then
      # Too little time for ResNet-101 at 512 (and a time-out would lose the part's JSON).
      bb=resnet50; size=${LSKD_STEP_BENCH_SIZE:-256}
      notes+=("$part: the fallback ResNet-50 at $size ($LIMIT s left, ResNet-101 wants STEP_BENCH_FULL_S=$STEP_BENCH_FULL_S s)")
    fi
    log "training-step benchmark, $dt: $bb at $size (time-out $LIMIT s)"
    t0=$SECONDS
    LSKD_STEP_BENCH_DTYPE=$dt LSKD_STEP_BENCH_BACKBONE=$bb LSKD_STEP_BENCH_SIZE=$size timeout -k 10 "$LIMIT" \
        "$PY" -m pytest benches/test_bench_step.py -q -p no:cacheprovider --benchmark-only \
        --benchmark-json="$OUT/$part.json" > "$OUT/$part.log" 2>&1
    rc=$?; record "$part" $t0 $rc
    [ $rc = 0 ] || tail -15 "$OUT/$part.log"
  done
fi
finish
