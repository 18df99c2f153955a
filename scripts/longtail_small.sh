#!/usr/bin/env bash
# A small long-tailed recipe in the shape of the paper's Table 3 (Zhao et al., AAAI 2022; EL_SPEC 6): Fashion-MNIST
# subsampled to an exponential class profile of ratio 100 (1000 ... 10 training images a class: many, medium and
# few-shot classes under Kang et al.'s 100 / 20 thresholds), a small CNN, every row of the table (CE,
# the three bonuses, cRT, cRT + EL, DRW, DRW + EL, focal, halted focal) over seeds, evaluated on the full balanced
# test set, All / Many / Medium / Few accuracy beside the paper's iNaturalist numbers. Runs on a CPU. Every decision
# is python -m timm_el.longtail_recipe's; this file checks the options and sequences the stages.
#
#   bash scripts/longtail_small.sh --data ../shared/data               # the whole table, seeds 1-3
#   bash scripts/longtail_small.sh --data ../shared/data --rows ce,el_normal,drw,drw_el --seeds 1
#   bash scripts/longtail_small.sh --data ../shared/data --smoke       # checks the recipe on a slice
set -euo pipefail
RECIPE=longtail_small
DEFAULT_WORK=runs/longtail_small
DEFAULT_SEEDS=1,2,3
USAGE_DATASET=1
USAGE_EPOCHS="16; 2 with --smoke"
USAGE_CRT_EPOCHS="4; 1 with --smoke"
USAGE_DRW="12, the last quarter; other --epochs: the same fraction"
USAGE_SMOKE="2 epochs (cRT 1) on the first 2,000
                      training and 200 test images, --long-tail-max 150 (150 ... 2 images a class)"
USAGE_HEAD="usage: bash scripts/longtail_small.sh [options] [-- timm-el-train flags]

Fashion-MNIST at --long-tail-ratio 100 --long-tail-max 1000 (class c keeps round(1000 * 100^(-c/9)) of its
training images, the first classes the most: 1000, 599, 359, 215, 129 | 77, 46, 28 | 17, 10, 2,480 in all; the
subset is the same for every seed, --long-tail-seed 0), the full balanced test set (10,000 images) as the
validation set. A narrow mnist_cnn (the paper's MNIST CNN with one 3x3 convolution of 16, 32, 32 channels per stage
and a 64-d feature layer, BatchNorm after each), SGD lr 0.1 momentum 0.9 weight decay 5e-4, batch 64, 16 epochs,
cosine to 0, no augmentation; cRT: 4 epochs over the frozen features; DRW from epoch 12. The preset is
timm_el.recipe.PRESETS['longtail_small'] (cRT: timm_el.longtail_recipe.RECIPES)."
USAGE_PREPARE="WORK/data: Fashion-MNIST and MNIST in torchvision's layout (python -m timm_el.mnist_ood's), from
            --data or downloaded with torchvision; a prepared WORK/data is kept"
USAGE_DATA="  --data DIR          local copy of the datasets: the project's layout (DIR/fashion-mnist/ and DIR/mnist/ with
                      the original .gz files) or torchvision's (DIR/FashionMNIST/raw, DIR/MNIST/raw); default:
                      keep a prepared WORK/data, else download with torchvision into WORK/data/download
  --dataset NAME      torch/fashion_mnist or torch/mnist [torch/fashion_mnist]"
USAGE_TAIL="
Cost (measured: 2 CPU cores shared with another training run, OMP_NUM_THREADS=1): an epoch takes 3 to 6 s
(training on 2,480 images, evaluating the 10,000 test images), a representation run about 1.5 minutes, a cRT run
about 30 s; one seed's ten rows about 12 minutes, the three seeds about 35 minutes. A GPU is not needed. On a
busy machine set OMP_NUM_THREADS=1: with two threads and the other core taken, an epoch took ten times longer."
# shellcheck source=scripts/lib/longtail_recipe.sh
. "$(dirname "$0")/lib/longtail_recipe.sh"
longtail_main "$@"
