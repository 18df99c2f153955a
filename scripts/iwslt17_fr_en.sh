#!/usr/bin/env bash
# IWSLT17 French-English, the paper's second translation row (BLEU 37.10 +- 0.06
# CE, 37.73 +- 0.17 EL): cased text, joint sentencepiece BPE 16k, shared
# embeddings, CE and EL runs over seeds with stock fairseq-train, averaging of
# the last 10 epoch checkpoints, fairseq-generate (beam 5, --remove-bpe
# sentencepiece), tokenized BLEU and sacreBLEU on the official IWSLT17 test set
# (tst2017, 1,455 pairs, what `sacrebleu -t iwslt17 -l fr-en` scores), results
# table and plots.
#
#   bash scripts/iwslt17_fr_en.sh
#   bash scripts/iwslt17_fr_en.sh --prep-args "--archive /data/fr-en.tgz" --seeds "1 2 3"
#   bash scripts/iwslt17_fr_en.sh --prep-args "--test-set tst2010-2015"   # the earlier split
set -euo pipefail
TASK=iwslt17_fr_en
PREP_MODULE=prep_iwslt17
DEFAULT_SEEDS="1 2 3 4 5"
AVG_LAST=10
RECIPE_USAGE="usage: bash scripts/iwslt17_fr_en.sh [options] [-- fairseq-train flags]

IWSLT17 Fr-En (EL_SPEC 4): transformer_iwslt_de_en with 2+2 layers,
--share-all-embeddings, adam, inverse_sqrt 4000, lr 5e-4, dropout 0.3,
weight decay 0.001, 4096 tokens, 100,000 updates, fp16 on GPU; EL with
log_end 0.5. The data comes from the IWSLT17 training archive and, for the
test set, the IWSLT17 evaluation archives (downloaded; --prep-args
\"--archive PATH --test-archives FR_EN EN_FR\" for local copies, or
\"--raw DIR --train ...\" for line-aligned raw text). Test set: the official
IWSLT17.TED.tst2017 (1,455 pairs), valid: dev2010 + tst2010-2015 (fairseq's
IWSLT17 example); --prep-args \"--test-set tst2010-2015\" tests on
tst2010-2015 concatenated (valid dev2010) instead. prep/prep.json records
which (test_set)."
# shellcheck source=scripts/lib/translation_recipe.sh
. "$(dirname "$0")/lib/translation_recipe.sh"
recipe_main "$@"
