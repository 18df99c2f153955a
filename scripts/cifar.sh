#!/usr/bin/env bash
# CIFAR-10 / CIFAR-100 with ResNet-50 or EfficientNet-B0 at 224 px (the paper's rows:
# CIFAR-10 ResNet-50 92.34 -> 92.97, EfficientNet-B0 93.21 -> 94.24; CIFAR-100 ResNet-50
# 74.39 -> 75.80, EfficientNet-B0 76.22 -> 77.21, CE -> EL, 5 seeds): CE and EL runs with
# timm-el-train, results table and plots.
#
#   bash scripts/cifar.sh --download                                   # CIFAR-10, ResNet-50, 1 GPU
#   bash scripts/cifar.sh --dataset torch/cifar100 --model efficientnet_b0 --data /data/cifar
#   bash scripts/cifar.sh --dataset torch/cifar100 --stages results
set -euo pipefail
PRESET=cifar
DEFAULT_SEEDS="1 2 3 4 5"
DEFAULT_DATASET="torch/cifar10"
DEFAULT_MODEL="resnet50"
recipe_default_work() { local d="${1##*/}"; echo "runs/${d}_$2"; }
recipe_default_data() { echo "$1/data"; }
DATA_HELP="  --data DIR          torchvision's CIFAR root (cifar-10-batches-py/ or cifar-100-python/ in it) [WORK/data]
  --dataset NAME      torch/cifar10 or torch/cifar100 [torch/cifar10]
  --model NAME        resnet50 or efficientnet_b0 [resnet50]"
RECIPE_USAGE="usage: bash scripts/cifar.sh [options] [-- timm-el-train flags]

CIFAR-10/100 (EL_SPEC 4, the release's cifar configs): ResNet-50 or EfficientNet-B0 from scratch
at 224 px (random-resized crop and flip; resize 256, centre crop 224 for validation), SGD lr
0.0125 nesterov, momentum 0.9, weight decay 1e-4, batch 32, 90 epochs, lr x0.1 at 30, 60, 80;
EL with log_end 0.75. The default work directory is runs/<cifar10|cifar100>_<model>."
# shellcheck source=scripts/lib/image_recipe.sh
. "$(dirname "$0")/lib/image_recipe.sh"
recipe_main "$@"
