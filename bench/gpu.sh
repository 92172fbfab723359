#!/usr/bin/env bash
# The GPU suite (issue 3), one command for a machine with a GPU and no network:
#
#     bash bench/gpu.sh            # or: make gpu-check
#
# 1. build   ensel in place with the machine's own Python and torch (pip -e, no deps, no isolation)
# 2. test    the whole test suite with ENSEL_TEST_DEVICE=cuda: every contract test on the cuda and
#            triton backends (tests/device_shim.py), plus the GPU-only tests
# 3. sanitize  compute-sanitizer memcheck over a small run of every kernel (bench/gpu_smoke.py),
#            racecheck and synccheck over the CUDA kernels
# 4. bench   bench/gpu_report.py: K in {10, 100, 1000, 32000} x E in {8, 100} x {bf16, f32}
#
# Everything lands in one folder: $OUT when set (the device tool's), else bench/results/gpu-<date>:
# gpu_suite.log (all output), gpu_report.{json,txt,png}. Stages run in order under time limits
# that fit one 10-minute call (BUDGET seconds in all, 570 by default: each stage gets the smaller
# of its own cap and what is left; the report writes its files after every case, so a cut-short
# benchmark still leaves its finished cases). STAGES="test bench" picks some stages, QUICK=1
# shrinks the benchmark.
# Exit status: the number of failed stages.
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEST=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
STAGES=${STAGES:-build test sanitize bench}
mkdir -p "$DEST"
exec > >(tee "$DEST/gpu_suite.log") 2>&1
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

failed=0
BUDGET=${BUDGET:-570}
stage() {  # stage NAME CAP_SECONDS COMMAND...: runs COMMAND under a time limit, reports, never aborts
    local name=$1 limit=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) echo "== $name: skipped (STAGES=$STAGES)"; return 0 ;; esac
    local left=$((BUDGET - SECONDS))
    [ $left -lt $limit ] && limit=$left
    if [ $limit -le 5 ]; then echo "== $name: FAILED (no time left of BUDGET=${BUDGET}s)"; failed=$((failed + 1)); return 0; fi
    echo "== $name: $* (limit ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 0 ]; then
        echo "== $name: passed in $((SECONDS - t0))s"
    else
        echo "== $name: FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit')) after $((SECONDS - t0))s"
        failed=$((failed + 1))
    fi
}

echo "== machine: $(hostname), $(date -Is)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
$PY - <<'EOF' || true
import torch, sys
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
try:
    import triton; print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
EOF
echo "ensel commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

stage build 150 $PY -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
$PY -c "import ensel, ensel._C as C; print('ensel._C: cuda compiled', C.cuda_compiled, '| backends', {n: ensel.backends.get(n).available() for n in ensel.backends.names()})" || true

XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n 8)
stage test 210 env ENSEL_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider "${XDIST[@]}" --maxfail=50 tests

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SANITIZER" ]; then
    stage sanitize 100 "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check no \
        $PY bench/gpu_smoke.py --backends cuda,triton --quick
    stage sanitize 45 "$SANITIZER" --tool racecheck --error-exitcode 1 $PY bench/gpu_smoke.py --backends cuda --quick
    stage sanitize 30 "$SANITIZER" --tool synccheck --error-exitcode 1 $PY bench/gpu_smoke.py --backends cuda --quick
else
    echo "== sanitize: compute-sanitizer not found; running the smoke check without it"
    stage sanitize 120 $PY bench/gpu_smoke.py --backends cuda,triton
fi

BENCH_ARGS=()
[ -n "${QUICK:-}" ] && BENCH_ARGS=(--quick)
stage bench 300 $PY bench/gpu_report.py --out "$DEST" "${BENCH_ARGS[@]}"

echo "== done: $failed stage(s) failed; results in $DEST"
exit $failed
