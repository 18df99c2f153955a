#!/usr/bin/env bash
# IWSLT14 German-English, the paper's translation row (BLEU 35.09 +- 0.07 CE,
# 35.50 +- 0.11 EL over 5 seeds): data preparation as fairseq's
# prepare-iwslt14.sh, CE and EL runs over seeds with stock fairseq-train,
# averaging of the last 10 epoch checkpoints, fairseq-generate (beam 5),
# tokenized BLEU and sacreBLEU, results table and plots.
#
#   bash scripts/iwslt14_de_en.sh                       # everything, 1 GPU, 5 seeds
#   bash scripts/iwslt14_de_en.sh --prep-args "--archive /data/de-en.tgz" --gpus 2
#   bash scripts/iwslt14_de_en.sh --stages results       # only the table
set -euo pipefail
TASK=iwslt14_de_en
PREP_MODULE=prep_iwslt14
DEFAULT_SEEDS="1 2 3 4 5"
AVG_LAST=10
RECIPE_USAGE="usage: bash scripts/iwslt14_de_en.sh [options] [-- fairseq-train flags]

IWSLT14 De-En (EL_SPEC 4): transformer_iwslt_de_en, adam, inverse_sqrt 4000,
lr 1e-3, dropout 0.4, 4096 tokens x update-freq 4, 20,000 updates, fp16 on
GPU; EL with log_end 0.5. The data comes from the original archive
(downloaded; --prep-args \"--archive PATH\" for a local copy, or
\"--tokenized DIR\" for fairseq's tokenized text)."
# shellcheck source=scripts/lib/translation_recipe.sh
. "$(dirname "$0")/lib/translation_recipe.sh"
recipe_main "$@"
