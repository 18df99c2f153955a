#!/usr/bin/env bash
# One GPU session's checks of the fused EL, results under OUT (default ./gpu-check):
#   1. the kernel tests on the GPU (every case, the no-host-sync check)
#   2. python -m encouraging_loss.benchmark --device cuda: CE, compiled paper formula,
#      fused, in-place, floor (16384x10000, 8192x32000, fp32 and bf16), then --projection and --tune
#   3. whole steps: timm resnet50 fp32 and AMP (and fairseq when DATA_BIN is set and fairseq imports)
# Usage: bash scripts/gpu_check.sh [OUT]      (DEVICE=cpu: a dry run of the commands on CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu-check}}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
log() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/log.txt"; }
run() { log "$*"; "$@" 2>&1 | tee -a "$OUT/log.txt"; return "${PIPESTATUS[0]}"; }

python - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
EOF

status=0
if [ "$DEVICE" = cuda ]; then
    run python -m pytest -q -x tests/test_triton_kernels.py -k "cuda or launch" || status=1
    run python -m encouraging_loss.benchmark --device cuda --json "$OUT/loss.json" || status=1
    run python -m encouraging_loss.benchmark --device cuda --projection --json "$OUT/projection.json" || status=1
    run python -m encouraging_loss.benchmark --device cuda --tune --json "$OUT/tune.json" || status=1
    which=(timm)
    if [ -n "${DATA_BIN:-}" ] && python -c "import fairseq" 2>/dev/null; then which+=(fairseq); fi
    extra=()
    [ -n "${DATA_BIN:-}" ] && extra=(--data-bin "$DATA_BIN")
    run python scripts/bench_train.py --device cuda --which "${which[@]}" "${extra[@]}" --repeats 3 \
        --json "$OUT/train.json" || status=1
else  # dry run on CPU: the same commands at tiny sizes
    run python -m encouraging_loss.benchmark --device cpu --quick --json "$OUT/loss.json" || status=1
    run python -m encouraging_loss.benchmark --device cpu --quick --projection --json "$OUT/projection.json" || status=1
    TRITON_INTERPRET=1 run python -m encouraging_loss.benchmark --device cpu --quick --tune --shapes 4x40 --dtypes float32 \
        --json "$OUT/tune.json" || status=1
    run python scripts/bench_train.py --device cpu --which timm --repeats 1 --steps 1 --warmup 1 --batch 2 \
        --img-size 32 --num-classes 10 --timm-precision fp32 amp --json "$OUT/train.json" || status=1
fi
log "done (status $status); results in $OUT"
exit "$status"
