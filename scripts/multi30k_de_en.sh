#!/usr/bin/env bash
# Multi30k German-English (29,000 pairs): where most users first try EL on
# translation, minutes per run on one GPU. Reference point, stock fairseq on one
# H100: sacreBLEU on test2016 40.2 +- 0.6 (CE) and 40.5 +- 0.4 (EL, log_end 0.5),
# 3 seeds, last checkpoint, beam 5.
#
#   bash scripts/multi30k_de_en.sh
#   bash scripts/multi30k_de_en.sh --prep-args "--raw ../shared/data/multi30k-de-en"
set -euo pipefail
TASK=multi30k_de_en
PREP_MODULE=prep_multi30k
DEFAULT_SEEDS="1 2 3"
AVG_LAST=0
RECIPE_USAGE="usage: bash scripts/multi30k_de_en.sh [options] [-- fairseq-train flags]

Multi30k De-En: joint sentencepiece BPE 8k, transformer 3+3 layers, 256 dims,
1024 FFN, 4 heads, --share-all-embeddings, dropout 0.3, lr 1e-3, warmup 500,
8192 tokens, 2,400 updates, fp16 on GPU; the last checkpoint is evaluated.
The data is downloaded from the official repository (--prep-args
\"--raw DIR\" for a local copy)."
# shellcheck source=scripts/lib/translation_recipe.sh
. "$(dirname "$0")/lib/translation_recipe.sh"
recipe_main "$@"
