#!/usr/bin/env bash
# ImageNet ResNet-50, the paper's row (top-1 75.49 +- 0.28 CE, 76.43 +- 0.15 EL over 5 seeds):
# CE and EL runs with timm-el-train, results table and plots. Cost (paper): about 48 hours a
# run on 2 TITAN RTX, so 10 runs (2 losses x 5 seeds) are about 480 hours on such a pair.
#
#   bash scripts/imagenet_resnet50.sh --data /data/imagenet --gpus 2
#   bash scripts/imagenet_resnet50.sh --data /data/imagenet --gpus 8 --nodes 2 --node-rank 0 --master-addr host0
#   bash scripts/imagenet_resnet50.sh --dataset hfds/imagenet-1k --data /data/hf-cache --gpus 2
set -euo pipefail
PRESET=imagenet_resnet50
DEFAULT_SEEDS="1 2 3 4 5"
DEFAULT_DATASET=""
DEFAULT_MODEL=""
DATA_HELP="  --data DIR          ImageNet as an ImageFolder (DIR/train/<wnid>/*.JPEG, DIR/val/<wnid>/*.JPEG), or the
                      data directory of a --dataset form
  --dataset NAME      timm's dataset form: '' (ImageFolder or tar), hfds/imagenet-1k, tfds/imagenet2012,
                      wds/..., ... (-- --train-split / --val-split for other split names) ['']"
RECIPE_USAGE="usage: bash scripts/imagenet_resnet50.sh --data DIR [options] [-- timm-el-train flags]

ImageNet ResNet-50 (EL_SPEC 4; torchvision's ImageNet recipe, as the release): SGD lr 0.1,
momentum 0.9, weight decay 1e-4, batch 256 (over all GPUs), 90 epochs, lr x0.1 every 30
epochs, no warmup, no label smoothing, random-resized crop and flip; EL with log_end 0.75.
Paper: about 48 hours a run on 2 TITAN RTX (--gpus 2)."
# shellcheck source=scripts/lib/image_recipe.sh
. "$(dirname "$0")/lib/image_recipe.sh"
recipe_main "$@"
