#!/usr/bin/env bash
# MNIST vs Fashion-MNIST out-of-distribution detection (Zhao et al., AAAI 2022; EL_SPEC 5): the paper
# reports AUROC 95.68 -> 98.04 and FPR95 20.92 -> 8.69 from CE to EL, scoring by the minimum conditional
# energy. Trains the MNIST CNN with CE and EL (scripts/mnist.sh, the paper's MNIST recipe), then runs
# el-analyze on each seed's pair (MNIST test in distribution, Fashion-MNIST test out of distribution)
# and prints the AUROC / FPR95 beside the paper's.
#
#   bash scripts/mnist_fashion_ood.sh --data ../shared/data         # local copy: DIR/mnist, DIR/fashion-mnist
#   bash scripts/mnist_fashion_ood.sh                               # downloads both with torchvision
#   bash scripts/mnist_fashion_ood.sh --seeds 1,2,3 --gpus 1
set -euo pipefail

usage() {
  cat <<EOF
usage: bash scripts/mnist_fashion_ood.sh [options] [-- timm-el-train flags]

Stages (each skipped when done; run the script again after an interruption):
  prepare   WORK/data/MNIST/raw and WORK/data/FashionMNIST/raw (python -m timm_el.mnist_ood prepare),
            from --data or downloaded with torchvision
  train     CE and EL runs per seed, WORK/runs/<loss>-seed<seed> (scripts/mnist.sh --stages train;
            finished runs are skipped, interrupted ones resumed)
  analyze   el-analyze per seed into WORK/analysis/seed<seed> (skipped when its report is complete;
            delete the folder to analyse again), then WORK/analysis/ood_summary.{md,json}

Options (defaults in brackets):
  --work DIR          [runs/mnist_fashion_ood]
  --data DIR          local copy of MNIST and Fashion-MNIST: the project's layout (DIR/mnist/ and
                      DIR/fashion-mnist/ with the original .gz files) or torchvision's (DIR/MNIST/raw,
                      DIR/FashionMNIST/raw); default: download with torchvision into WORK/data/download
  --seeds LIST        space- or comma-separated [1]
  --epochs N          training epochs [100, the paper's]
  --train-limit N     train on the first N MNIST training images only (quick runs) [all]
  --test-limit N      keep the first N test images of MNIST and Fashion-MNIST [all]
  --max-samples N     el-analyze: a random subset of N images per split [all]
  --probe             el-analyze: also the linear probe on frozen features (needs the training split)
  --log-end X         EL's log_end [0.75]
  --gpus N            GPUs for training [1]
  --stages LIST       comma-separated: prepare,train,analyze [all three]
  -h, --help          this help
  -- FLAGS            go to timm-el-train (through scripts/mnist.sh), e.g. -- -b 128
EOF
}

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
is_count() { case "$1" in ''|*[!0-9]*) return 1 ;; 0) return 1 ;; *) return 0 ;; esac; }

here="$(cd "$(dirname "$0")" && pwd)"
work="runs/mnist_fashion_ood" data="" seeds="1" epochs="" train_limit="" test_limit="" max_samples=""
probe="" log_end="" gpus=1 stages="prepare,train,analyze" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --work) work="${2:?--work needs a value}"; shift 2 ;;
    --data) data="${2:?--data needs a value}"; shift 2 ;;
    --seeds) seeds="${2:?--seeds needs a value}"; shift 2 ;;
    --epochs) epochs="${2:?--epochs needs a value}"; shift 2 ;;
    --train-limit) train_limit="${2:?--train-limit needs a value}"; shift 2 ;;
    --test-limit) test_limit="${2:?--test-limit needs a value}"; shift 2 ;;
    --max-samples) max_samples="${2:?--max-samples needs a value}"; shift 2 ;;
    --probe) probe=1; shift ;;
    --log-end) log_end="${2:?--log-end needs a value}"; shift 2 ;;
    --gpus) gpus="${2:?--gpus needs a value}"; shift 2 ;;
    --stages) stages="${2:?--stages needs a value}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
seeds="${seeds//,/ }"; stages=",${stages// /,},"
for s in ${stages//,/ }; do
  case "$s" in prepare|train|analyze) ;; *) die "--stages: unknown stage '$s' (prepare, train, analyze)" ;; esac
done
[ -n "${seeds// /}" ] || die "--seeds: no seed given"
for s in $seeds; do case "$s" in ''|*[!0-9]*) die "--seeds: '$s' is not a non-negative integer" ;; esac; done
for s in "epochs:$epochs" "train-limit:$train_limit" "test-limit:$test_limit" "max-samples:$max_samples" \
         "gpus:$gpus"; do
  [ -z "${s#*:}" ] || is_count "${s#*:}" || die "--${s%%:*}: '${s#*:}' is not an integer >= 1"
done
[ -z "$data" ] || [ -d "$data" ] || die "--data: directory not found: '$data'"

py="${PYTHON:-python}"
mkdir -p "$work"
shown="${stages//,/ }"; shown="${shown# }"
echo "== mnist_fashion_ood: work directory $work, stages ${shown% }, seeds $seeds" >&2

if [[ "$stages" == *,prepare,* ]]; then
  opts=(--root "$work/data")
  [ -n "$data" ] && opts+=(--data "$data")
  [ -n "$train_limit" ] && opts+=(--train-limit "$train_limit")
  [ -n "$test_limit" ] && opts+=(--test-limit "$test_limit")
  "$py" -m timm_el.mnist_ood prepare "${opts[@]}"
fi

if [[ "$stages" == *,train,* ]]; then
  [ -f "$work/data/prepared.json" ] || die "$work/data is not prepared (run the prepare stage)"
  opts=(--work "$work" --data "$work/data" --dataset torch/mnist --losses "ce el" --seeds "$seeds"
        --stages train --gpus "$gpus")
  [ -n "$log_end" ] && opts+=(--log-end "$log_end")
  flags=()
  [ -n "$epochs" ] && flags+=(--epochs "$epochs")
  bash "$here/mnist.sh" "${opts[@]}" -- "${flags[@]}" "${extra[@]}"
fi

if [[ "$stages" == *,analyze,* ]]; then
  reports=()
  for seed in $seeds; do
    out="$work/analysis/seed$seed"
    reports+=("$out")
    if [ -f "$out/report.json" ] && [ -f "$out/ood_scores.png" ]; then
      echo "== analysis of seed $seed: done ($out), skipping" >&2
      continue
    fi
    for loss in ce el; do
      [ -f "$work/runs/$loss-seed$seed/last.pth.tar" ] || die "no trained $loss run for seed $seed in $work/runs (run the train stage)"
    done
    opts=(--names CE EL --data-dir "$work/data" --dataset torch/mnist --split test
          --ood-data-dir "$work/data" --ood-dataset torch/fashion_mnist --ood-split test --out "$out" --force)
    [ -n "$max_samples" ] && opts+=(--max-samples "$max_samples")
    [ -n "$probe" ] && opts+=(--probe)
    echo "== analysis of seed $seed -> $out" >&2
    "$py" -m timm_el.analyze "$work/runs/ce-seed$seed" "$work/runs/el-seed$seed" "${opts[@]}" >/dev/null
  done
  echo "== summary over seeds $seeds -> $work/analysis" >&2
  "$py" -m timm_el.mnist_ood summary "${reports[@]}" --out "$work/analysis"
fi
