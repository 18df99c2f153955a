#!/usr/bin/env bash
# MNIST, the paper's CNN (Liu et al. 2016 layout, timm model mnist_cnn; top-1 99.42 +- 0.06 CE,
# 99.56 +- 0.05 EL over 5 runs): CE and EL runs over seeds with timm-el-train, results table
# and plots. A run takes minutes on one GPU.
#
#   bash scripts/mnist.sh --data /data/mnist-folder                  # ImageFolder, 5 seeds, 1 GPU
#   bash scripts/mnist.sh --data /data/torchvision --dataset torch/mnist --download
#   bash scripts/mnist.sh --stages results                            # only the table
set -euo pipefail
PRESET=mnist
DEFAULT_SEEDS="1 2 3 4 5"
DEFAULT_DATASET=""
DEFAULT_MODEL=""
DATA_HELP="  --data DIR          MNIST as an ImageFolder (DIR/train/<digit>/*.png, DIR/val/<digit>/*.png), or with
                      --dataset torch/mnist torchvision's root (DIR/MNIST/raw/; with --download the four
                      original .gz files placed there are verified and unpacked without a network)
  --dataset NAME      '' (ImageFolder) or torch/mnist ['']"
RECIPE_USAGE="usage: bash scripts/mnist.sh --data DIR [options] [-- timm-el-train flags]

MNIST (EL_SPEC 4): mnist_cnn, SGD lr 0.1 momentum 0.9 weight decay 5e-4, batch 256, 100 epochs,
lr x0.1 at epochs 50 and 64 (the release's schedule), no augmentation, no label smoothing;
EL with log_end 0.75. Five runs of each loss; the paper reports 99.42 +- 0.06 (CE) and
99.56 +- 0.05 (EL)."
# shellcheck source=scripts/lib/image_recipe.sh
. "$(dirname "$0")/lib/image_recipe.sh"
recipe_main "$@"
