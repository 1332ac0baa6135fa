#!/usr/bin/env bash
# GPU check in one go, for an H100/H200 machine with its own torch and no
# network: build lskd._C (CPU + CUDA kernels) against that torch, run the CUDA
# self-test and the GPU tests, run the GPU benchmarks, write everything into
# $OUT (default benches/results/gpu-run) and print a short table last.
#
#   bash benches/gpu_check.sh            # build, tests, profile, benchmarks
#   STAGES="build bench trainbench" bash benches/gpu_check.sh
#
# Stage times on a fresh H100/H200 (2026-11-26): build 35-46 s, GPU tests 150 s,
# profile 30 s, benchmarks without torch.compile about 50 s (loss) + 50 s (ops).
# torch.compile of the eager code takes minutes per dtype on a fresh machine, so
# the default compiles only the whole loss (LSKD_BENCH_COMPILE=loss; "all" adds the
# per-op compile columns, "none" drops them): about 8-10 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benches/results/gpu-run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${STAGES:-"build tests profile bench"}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}
# Wheels brought along for packages the GPU machine lacks (e.g. expecttest for opcheck).
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/lskd-site .whl/*.whl && export PYTHONPATH=/tmp/lskd-site${PYTHONPATH:+:$PYTHONPATH}
fi
export LSKD_BENCH_ROUNDS=${LSKD_BENCH_ROUNDS:-10} LSKD_BENCH_COMPILE=${LSKD_BENCH_COMPILE:-loss} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FORCE_CUDA=1
status=0
stage() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }
log() { echo "== $(date +%T) $*"; }

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt" || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

if stage build; then
  # In-place build: pip's editable install needs build dependencies from the
  # network there, which the GPU machine does not have.
  log "build (MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST)"
  t0=$(date +%s)
  timeout 300 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  log "built in $(( $(date +%s) - t0 )) s"
fi
# What the installed package maps: lskd.kernels -> kernels/ (ignored link, see .gitignore).
[ -e lskd/kernels ] || ln -s ../kernels lskd/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import lskd; print('backends on cuda:', lskd.available_backends('cuda'))" 2>&1 | tee -a "$OUT/build.log"

if stage selftest; then
  log "CUDA self-test"
  timeout 180 $PY benches/cuda_selftest.py 2>&1 | tee "$OUT/selftest.log" | grep -vE "^PASS" | tail -40
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  grep -c "^PASS" "$OUT/selftest.log" | sed 's/^/self-test PASS lines: /'
fi

if stage tests; then
  log "GPU tests"
  # The reference backend on CUDA is not a deliverable: test the kernels.
  LSKD_EXPECT_GPU_BACKENDS=cuda,triton LSKD_GPU_TEST_BACKENDS=${GPU_TEST_BACKENDS:-cuda,triton} timeout $TEST_TIMEOUT $PY -m pytest tests -m gpu -q -p no:cacheprovider \
      --maxfail=25 ${TEST_K:+-k "$TEST_K"} --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.log" 2>&1
  rc=$?; [ $rc = 0 ] || status=1
  grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | head -30; tail -3 "$OUT/gpu-tests.log"; echo "gpu tests rc=$rc"
fi

if stage profile; then
  # Wall time against kernel time (torch.profiler) of the whole loss (fused / per term) and of md_masks.
  log "profile: whole loss and md_masks, wall vs kernel time"
  timeout 90 $PY benches/profile_loss.py --json "$OUT/profile.json" 2>&1 | grep -vE "^(USDT|ERROR|WARNING)" | tee "$OUT/profile.log" | grep "^##"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if stage bench; then
  # Two parts, each with its own JSON, so that a time-out loses at most one.
  part=0
  for expr in "${BENCH_K1:-lskd_loss}" "${BENCH_K2:-pod_distill or md_masks or sop_distill}"; do
    part=$((part + 1))
    log "GPU benchmarks, part $part: $expr"
    LSKD_BENCH_EXPECT=cuda,triton timeout $BENCH_TIMEOUT $PY -m pytest benches -q -p no:cacheprovider --benchmark-only -k "$expr" \
        --benchmark-json="$OUT/bench$part.json" > "$OUT/bench$part.log" 2>&1
    [ $? = 0 ] || { status=1; tail -15 "$OUT/bench$part.log"; }
  done
  for part in 1 2; do
    [ -s "$OUT/bench$part.json" ] && $PY benches/summarize.py "$OUT/bench$part.json" --markdown "$OUT/summary$part.md"
  done
fi
if stage trainbench; then
  # Seconds per LSKD training iteration: fixed weights, RGE, GradNorm, the search (orders 1, 2).
  log "training-iteration benchmark (weighting / search overhead)"
  timeout ${TRAIN_BENCH_TIMEOUT:-180} $PY -m pytest benches/test_bench_training.py -q -p no:cacheprovider --benchmark-only \
      --benchmark-json="$OUT/train.json" > "$OUT/train.log" 2>&1
  [ $? = 0 ] || { status=1; tail -15 "$OUT/train.log"; }
  [ -s "$OUT/train.json" ] && $PY benches/summarize.py "$OUT/train.json" --markdown "$OUT/train.md"
fi
log "done, status $status"
exit $status
