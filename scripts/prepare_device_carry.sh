#!/usr/bin/env bash
# Gather, here, what scripts/gpu_check.sh needs on a GPU machine that has torch, Triton and
# timm but no fairseq and no network: wheels of fairseq's Python needs, the fairseq-fixed
# sdist, the in-place build helper and a binarized IWSLT14 De-En slice, all in one folder
# (default .device-carry, git-ignored) to name in the device tool's `carry`.
#
#   bash scripts/prepare_device_carry.sh [DIR]
#
# Environment: PY_VERSION (the GPU machine's Python, default 3.12), SHARED (default ../shared:
# tools/fairseq_inplace_build.py and data/iwslt14-de-en), PYTHON (the interpreter with fairseq
# installed, default python). Re-running refreshes DIR; the result must stay under the device
# tool's 64 MiB working-tree limit (about 12 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.device-carry}"
PY_VERSION="${PY_VERSION:-3.12}"
SHARED="${SHARED:-../shared}"
PYTHON="${PYTHON:-python}"
TOOL="$SHARED/tools/fairseq_inplace_build.py"
IWSLT="$SHARED/data/iwslt14-de-en"
for need in "$TOOL" "$IWSLT"; do
    [ -e "$need" ] || { echo "prepare_device_carry: $need not found (set SHARED=...)" >&2; exit 2; }
done
"$PYTHON" -c "import fairseq" 2>/dev/null || {
    echo "prepare_device_carry: PYTHON=$PYTHON cannot import fairseq (it binarizes the data)" >&2; exit 2; }
case "$DIR" in .device-carry|.device-carry/*) ;; *)
    echo "note: $DIR is not .device-carry; make sure git ignores it (the device tool sends untracked files)" >&2;;
esac

rm -rf "$DIR.tmp" && mkdir -p "$DIR.tmp/wheels"
tag="cp${PY_VERSION/./}"
echo "wheels for Python $PY_VERSION ($tag) ..."
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR.tmp/wheels" hydra-core==1.3.2 omegaconf==2.3.0 bitarray
# antlr4-python3-runtime 4.9.3 (omegaconf's) and fairseq-fixed are sdists: the first becomes a pure-Python wheel here
"$PYTHON" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$DIR.tmp" \
    antlr4-python3-runtime==4.9.3 fairseq-fixed==0.12.3.1
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR.tmp/wheels" "$DIR.tmp"/antlr4-python3-runtime-*.tar.gz
rm "$DIR.tmp"/antlr4-python3-runtime-*.tar.gz
cp "$TOOL" "$DIR.tmp/"

echo "binarizing the IWSLT14 De-En slice ..."
"$PYTHON" scripts/make_iwslt14_sample.py --data "$IWSLT" --out "$DIR.tmp/iwslt14" \
    --train 4600 --valid 500 --test 500 >"$DIR.tmp/make_sample.log" 2>&1 || {
    tail -20 "$DIR.tmp/make_sample.log" >&2; exit 1; }
mv "$DIR.tmp/iwslt14/bin" "$DIR.tmp/data-bin" && rm -rf "$DIR.tmp/iwslt14"

rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
size=$(du -sm "$DIR" | cut -f1)
echo "ready: $DIR ($size MiB):"
ls -1 "$DIR" "$DIR/wheels"
[ "$size" -lt 60 ] || { echo "prepare_device_carry: $DIR is $size MiB, too large to carry" >&2; exit 1; }
