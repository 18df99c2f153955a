#!/usr/bin/env bash
# One GPU session's checks of the fused EL, results under OUT (default ./gpu-check), most important first:
#   0. fairseq from .device-carry when fairseq does not import (see scripts/prepare_device_carry.sh)
#   1. the kernel tests on the GPU (every case, the no-host-sync check)
#   2. python -m encouraging_loss.tools.benchmark --device cuda at the issue's shapes (16384x10000, 8192x32000,
#      fp32 and bf16): CE, compiled paper formula, fused, in-place, floor
#   3. --tune: each kernel alone over path / block / warps, against torch CE
#   4. whole steps: timm resnet50 fp32 and AMP; fairseq (stock CLI with --fp16, and in-process fp16 model steps)
#   5. --projection: output projection + loss, time and peak memory
#   6. python -m encouraging_loss.tools.kernel_sass: machine instructions per element (this Triton, sm_90)
# Each step has a time limit and the whole run a budget (BUDGET seconds, default 480), so that one device call
# brings back whatever finished. Files in OUT: env.txt log.txt loss.json tune.json train.json projection.json
# sass.json (7 files: the device tool brings back at most 8).
#
#   bash scripts/gpu_check.sh [OUT]          (DEVICE=cpu: a dry run of the same steps at tiny sizes on CPU)
#
# On the device tool: carry .device-carry, command `bash scripts/gpu_check.sh $OUT`, timeout_s 540
# (a 15-minute device session then has room to start a machine again and rerun a step).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu-check}}"
DEVICE="${DEVICE:-cuda}"
CARRY="${CARRY:-.device-carry}"
BUDGET="${BUDGET:-480}"
PY="${PYTHON:-python3}"  # the GPU machine's interpreter is python3 (a plain `python` may not exist there)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
status=0
log() { echo "== $(date +%H:%M:%S) +$(( $(date +%s) - start ))s $*" | tee -a "$OUT/log.txt"; }
# run LIMIT CMD...: the command under min(LIMIT, what is left of BUDGET); a step that fails or times out is logged
run() {
    local limit=$1; shift
    local left=$(( BUDGET - ($(date +%s) - start) ))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then log "SKIPPED (budget spent): $*"; status=1; return 1; fi
    log "[limit ${limit}s] $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
    local rc=${PIPESTATUS[0]}
    if (( rc == 124 )); then log "FAILED (time limit): $*"; status=1
    elif (( rc != 0 )); then log "FAILED (exit $rc): $*"; status=1; fi
    return "$rc"
}

# 0. fairseq, built in place from the carried sdist and wheels (no network on the GPU machine)
if ! "$PY" -c "import fairseq" 2>/dev/null && [ -d "$CARRY/wheels" ]; then
    log "setting up fairseq from $CARRY"
    site=/tmp/el-site src=/tmp/el-fairseq carry_abs=$(cd "$CARRY" && pwd)
    rm -rf "$src" "$site" && mkdir -p "$src" "$site"
    if { "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$carry_abs"/wheels/*.whl \
        && tar xzf "$carry_abs"/fairseq_fixed-*.tar.gz -C "$src" --strip-components=1 \
        && (cd "$src" && "$PY" "$carry_abs/fairseq_inplace_build.py"); } >"$OUT/fairseq_build.txt" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$site:$src"
        rm -f "$OUT/fairseq_build.txt"
    else
        log "fairseq setup FAILED (see $OUT/fairseq_build.txt)"; status=1
    fi
fi
[ -z "${DATA_BIN:-}" ] && [ -d "$CARRY/data-bin" ] && DATA_BIN="$CARRY/data-bin"

"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("triton", "timm", "fairseq"):
    try:
        mod = __import__(name); print(name, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as exc:
        print(name, "not importable:", exc)
EOF

which=(timm)
train_extra=()
if [ -n "${DATA_BIN:-}" ] && "$PY" -c "import fairseq" 2>/dev/null; then
    which+=(fairseq); train_extra=(--data-bin "$DATA_BIN")
else
    log "fairseq whole steps skipped: fairseq does not import or no DATA_BIN / $CARRY/data-bin"
fi

xdist=()  # the CUDA kernel tests come in 4 shares: 4 processes compile the kernel variants in parallel
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)
if [ "$DEVICE" = cuda ]; then
    run 180 "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" tests/core/ops/test_triton_kernels.py -k "cuda or launch or sm90"
    run 240 "$PY" -m encouraging_loss.tools.benchmark --device cuda --shapes 16384x10000,8192x32000 --json "$OUT/loss.json"
    run 120 "$PY" -m encouraging_loss.tools.benchmark --device cuda --tune --json "$OUT/tune.json"
    run 240 "$PY" scripts/bench_train.py --device cuda --which "${which[@]}" "${train_extra[@]}" --repeats 3 \
        --json "$OUT/train.json"
    run 90 "$PY" -m encouraging_loss.tools.benchmark --device cuda --projection --json "$OUT/projection.json"
    run 60 "$PY" -m encouraging_loss.tools.kernel_sass --vocab 10000,32000 --json "$OUT/sass.json"
else  # dry run on CPU: the same steps at tiny sizes (the tune step through Triton's interpreter)
    run 300 "$PY" -m pytest -q -x -p no:cacheprovider tests/core/ops/test_triton_kernels.py -k "launch"
    run 120 "$PY" -m encouraging_loss.tools.benchmark --device cpu --quick --json "$OUT/loss.json"
    problem=$(TRITON_INTERPRET=1 "$PY" -c "from encouraging_loss.ops.triton_kernels import interpreter_problem as p
print(p() or '')" 2>&1)
    if [ -z "$problem" ]; then
        TRITON_INTERPRET=1 run 120 "$PY" -m encouraging_loss.tools.benchmark --device cpu --quick --tune --shapes 4x40 \
            --dtypes float32 --json "$OUT/tune.json"
    else
        log "tune dry run skipped: $problem"
    fi
    run 300 "$PY" scripts/bench_train.py --device cpu --which "${which[@]}" "${train_extra[@]}" --repeats 1 \
        --updates 4 --step-repeats 1 --step-batches 2 --steps 1 --warmup 1 --batch 2 --img-size 32 \
        --num-classes 10 --json "$OUT/train.json"
    run 120 "$PY" -m encouraging_loss.tools.benchmark --device cpu --quick --projection --json "$OUT/projection.json"
    run 60 "$PY" -m encouraging_loss.tools.kernel_sass --vocab 1000 --dtypes float32 --json "$OUT/sass.json"
fi
log "done (status $status); results in $OUT"
exit "$status"
