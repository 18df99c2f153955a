#!/usr/bin/env bash
# Imbalanced classification as in the paper (Zhao et al., AAAI 2022, Table 3 / Table 9; EL_SPEC 6): iNaturalist
# 2018, ResNet-50 from scratch with Kang et al. 2020's schedule, every row of the table (CE, the three bonuses,
# cRT, cRT + EL, DRW, DRW + EL, focal, halted focal), All / Many / Medium / Few accuracy beside the paper's. A
# multi-GPU job (see --help for the cost). Every decision is python -m timm_el.longtail_recipe's; this file checks
# the options and sequences the stages.
#
#   bash scripts/inat2018.sh --data /data/inat2018 --gpus 8 -- --amp       # the whole table, seed 1
#   bash scripts/inat2018.sh --data /data/inat2018 --gpus 8 --rows ce,el_aggressive -- --amp
#   bash scripts/inat2018.sh --data /data/inat2018 --smoke                 # checks the recipe on a tiny slice
set -euo pipefail
RECIPE=inat2018
DEFAULT_WORK=runs/inat2018
DEFAULT_SEEDS=1
USAGE_DATASET=""
USAGE_EPOCHS="200; 2 with --smoke"
USAGE_CRT_EPOCHS="30; 1 with --smoke"
USAGE_DRW="180, the EL release's; other --epochs: the same fraction"
USAGE_SMOKE="a slice of --data in WORK/data (its
                      first 10 classes, 6 training and 2 validation images of each), 64-pixel images, batch 16,
                      2 epochs (cRT 1)"
USAGE_HEAD="usage: bash scripts/inat2018.sh --data DIR [options] [-- timm-el-train flags]

The paper's setting: iNaturalist 2018 (437,513 training images of 8,142 classes, 24,426 validation images, the
evaluation set, as Kang et al.), Kang et al. 2020's representation stage (classifier-balancing,
config/iNaturalist18/feat_uniform.yaml and data/dataloader.py): ResNet-50 from scratch, SGD lr 0.2 momentum 0.9
weight decay 1e-4, batch 512 (divided among --gpus), cosine to 0, RandomResizedCrop(224) and flip only,
Resize(256) + CenterCrop(224) for evaluation, their iNaturalist mean and std; 200 epochs as the EL release's
iNaturalist runs. cRT as their cls_crt.yaml: 30 epochs, the same optimiser and schedule, features frozen,
classifier re-initialised, class-balanced sampling. DRW (Cao et al. 2019, beta 0.9999) from epoch 180, the EL
release's command. The preset is timm_el.recipe.PRESETS['inat2018'] (cRT: timm_el.longtail_recipe.RECIPES)."
USAGE_PREPARE="checks that --data holds train2018.json and val2018.json (read in place); with --smoke
            writes WORK/data, a slice of it (JSON files and links to its image folders)"
USAGE_DATA="  --data DIR          the iNaturalist 2018 root, official layout: DIR/train2018.json, DIR/val2018.json and the
                      image folder they name (DIR/train_val2018/...) [required]"
USAGE_TAIL="
Cost (a GPU job; estimates, not measured here): one epoch is 437,513 images of ResNet-50 at 224 pixels, about
7 minutes on an A100 with -- --amp (about 1,000 images/s, which needs some 16 CPU cores decoding JPEGs per GPU),
so a 200-epoch representation run is about a GPU-day; the table trains eight of them (ce, the three bonuses, drw,
drw_el, focal, halted_focal) and two cRT runs of 30 epochs (forward passes through frozen features, an hour or
two each): about 8 A100-days per seed, a day per seed on 8 GPUs (--gpus 8), two to three times that without
--amp. The images take about 130 GB of disk. The paper's numbers are single runs: one seed by default."
# shellcheck source=scripts/lib/longtail_recipe.sh
. "$(dirname "$0")/lib/longtail_recipe.sh"
longtail_main "$@"
