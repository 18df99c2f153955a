#!/usr/bin/env bash
# ImageNet EfficientNet-B0, the paper's row (top-1 77.80 +- 0.15 CE, 78.28 +- 0.13 EL): CE and
# EL runs with timm-el-train, results table and plots. Cost (paper): about 158 hours a run on
# 2 GPUs (TITAN RTX), 450 epochs.
#
#   bash scripts/imagenet_efficientnet_b0.sh --data /data/imagenet --gpus 2 --seeds 1
#   bash scripts/imagenet_efficientnet_b0.sh --data /data/imagenet --gpus 8 --nodes 2 --node-rank 1 --master-addr host0
set -euo pipefail
PRESET=imagenet_efficientnet_b0
DEFAULT_SEEDS="1 2 3 4 5"
DEFAULT_DATASET=""
DEFAULT_MODEL=""
DATA_HELP="  --data DIR          ImageNet as an ImageFolder (DIR/train/<wnid>/*.JPEG, DIR/val/<wnid>/*.JPEG), or the
                      data directory of a --dataset form
  --dataset NAME      timm's dataset form: '' (ImageFolder or tar), hfds/imagenet-1k, tfds/imagenet2012,
                      wds/..., ... (-- --train-split / --val-split for other split names) ['']"
RECIPE_USAGE="usage: bash scripts/imagenet_efficientnet_b0.sh --data DIR [options] [-- timm-el-train flags]

ImageNet EfficientNet-B0 (EL_SPEC 4, timm's recipe as the release ran it on 2 GPUs x 384):
--model efficientnet_b0 -b 384 (768 over all GPUs) --sched step --epochs 450 --decay-epochs 2.4
--decay-rate .97 --opt rmsproptf --opt-eps .001 -j 8 --warmup-lr 1e-6 --weight-decay 1e-5
--drop 0.2 --drop-connect 0.2 --model-ema --model-ema-decay 0.9999 --aa rand-m9-mstd0.5
--remode pixel --reprob 0.2 --amp --lr .048, with the timm 0.4 defaults it relied on
(--warmup-epochs 3 --cooldown-epochs 10 --min-lr 1e-5 --smoothing 0.1); EL with log_end 0.75.
Paper: about 158 hours a run on 2 GPUs (--gpus 2)."
# shellcheck source=scripts/lib/image_recipe.sh
. "$(dirname "$0")/lib/image_recipe.sh"
recipe_main "$@"
