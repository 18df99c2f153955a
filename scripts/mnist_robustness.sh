#!/usr/bin/env bash
# MNIST adversarial robustness (Zhao et al., AAAI 2022, section 5.4 and appendix C; EL_SPEC 6): TorchAttacks'
# MNIST CNN trained with CE and EL over seeds, plainly (column clean) and adversarially (columns fgsm, pgd,
# pgd_l2), attacked as in the paper, the accuracies beside the paper's Table 11 (clean, AutoAttack) and Table 7
# (adversarial training, each column attacked by its own attack). Every decision is python -m
# timm_el.robustness's (training through python -m timm_el.recipe train mnist_robustness, attacks through
# el-analyze --attack, tables through el-results); this file checks the options and sequences the stages.
#
#   bash scripts/mnist_robustness.sh --data ../shared/data               # everything, seeds 1-3 (days on a CPU)
#   bash scripts/mnist_robustness.sh --data ../shared/data --columns clean --seeds 1
#   bash scripts/mnist_robustness.sh --data ../shared/data --smoke       # checks the recipe, no AutoAttack
set -euo pipefail

usage() {
  cat <<EOF
usage: bash scripts/mnist_robustness.sh [options] [-- timm-el-train flags]

Stages (each skips finished work; run the same command again after an interruption):
  prepare   WORK/data: MNIST in torchvision's layout (python -m timm_el.mnist_ood prepare), from --data or
            downloaded with torchvision; a prepared WORK/data is kept
  train     per column, loss and seed WORK/<column>/runs/<loss>-seed<seed> (python -m timm_el.recipe train
            mnist_robustness: TorchAttacks' CNN, Adam 1e-3, batch 128, 5 epochs; the columns fgsm, pgd, pgd_l2
            add -- --adv-train <column>); finished runs are skipped, an interrupted one resumes
  attack    per column and seed one el-analyze run, the CE and EL checkpoints side by side, into
            WORK/<column>/attacks/seed<seed>/report.json, on the paper's eps grids (Linf 0 .05 .1 .15 .2 .25 .3,
            L2 0 .3 1 3 10 30 100): clean by fgsm, pgd, pgd_l2, apgd_dlr, apgd_dlr_l2, autoattack, autoattack_l2
            (the paper's Table 11: AutoAttack); fgsm by fgsm, pgd by pgd, pgd_l2 by pgd_l2 (Table 7), each
            also by apgd_dlr of the same norm (the gradient-masking check); skipped when its report is
            complete (delete the folder to attack again)
  results   WORK/results: el-result/1 records (records/<column>/seed<seed>/<loss>__<attack>.json; task
            mnist_robustness_<column>, checkpoint = attack, metrics acc@<eps> and zero_grad_fraction),
            published.csv (the paper's numbers), el-results' results.csv, summary.csv, summary.md (mean +- std
            over seeds beside the paper's), robustness.md (one table per paper table, eps by row) and
            robustness_<column>.png (accuracy against eps per attack, CE/EL mean with a std band, the paper
            dashed); skipped when the reports have not changed

Options (defaults in brackets):
  --work DIR          [runs/mnist_robustness; runs/mnist_robustness-smoke with --smoke]
  --data DIR          local copy of MNIST: the project's layout (DIR/mnist/ and DIR/fashion-mnist/ with the
                      original .gz files) or torchvision's (DIR/MNIST/raw, DIR/FashionMNIST/raw); default:
                      keep a prepared WORK/data, else download with torchvision into WORK/data/download
  --columns LIST      comma-separated: clean, fgsm, pgd, pgd_l2 [clean,fgsm,pgd,pgd_l2]
  --seeds LIST        [1,2,3; 1 with --smoke]
  --losses LIST       ce, el [ce,el]
  --log-end X         EL's log_end [0.75, the mnist presets']
  --train-limit N     train on the first N MNIST training images only [all; 1000 with --smoke]
  --test-limit N      keep the first N MNIST test images [all; 200 with --smoke]
  --max-samples N     el-analyze: attack a fixed seeded subset of N test images [all; 100 with --smoke]
  --aa-max-samples N  el-analyze: AutoAttack and APGD-DLR on a fixed seeded subset of N of them [1000; 10 with
                      --smoke]
  --device DEV        el-analyze's device [cuda when there is one, else cpu]; training takes timm's
  --stages LIST       comma-separated: prepare,train,attack,results [all four]
  --smoke             a short CPU run that checks the recipe, not a result: 1 epoch (the preset's smoke flags),
                      the small defaults above, seed 1, its own work directory; records' tasks end in _smoke
  -h, --help          this help
  -- FLAGS            go to timm-el-train (after --adv-train <column>), e.g. -- --adv-eps 0.2

Costs (2 CPU cores shared with other work; a GPU takes minutes for what takes hours here):
  train     a clean run about 10 min (5 epochs of 60,000 images, ~2 min each); adversarial training costs a
            forward and backward pass more per attack step: fgsm about 2x, pgd (7 steps) about 8x, pgd_l2
            (10 steps) about 11x. All four columns, CE and EL, 3 seeds: about 3 days.
  attack    per clean seed (two models): FGSM about 5 min, PGD and PGD-L2 (10 steps) about 40 min each on all
            10,000 images, APGD-DLR a few minutes on --aa-max-samples; AutoAttack (APGD-CE, APGD-T, FAB-T,
            Square with 5,000 queries) about a second per still robust image and eps, and at least about a
            minute per eps and model however few images survive: about 1 h per norm with 1,000 images. An
            adversarial column's seed: about an hour. --max-samples and --aa-max-samples scale these.
  --smoke   leaves AutoAttack out (timm_el.robustness.SMOKE_SKIPS: with it, 30 of the smoke run's 40 minutes
            went to AutoAttack's minimum per eps and model); APGD-DLR stays as the scale-free check.
EOF
}

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }
is_count() { case "$1" in ''|*[!0-9]*) return 1 ;; 0*) return 1 ;; *) return 0 ;; esac; }

# shellcheck source=scripts/lib/stage.sh
. "$(dirname "$0")/lib/stage.sh"

AGAIN="$(printf '%q ' bash "$0" "$@")"; AGAIN="${AGAIN% }"
work="" data="" columns="clean,fgsm,pgd,pgd_l2" seeds="" losses="ce,el" log_end="" train_limit="" test_limit=""
max_samples="" aa_max_samples="" device="" stages="prepare,train,attack,results" smoke="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --work) need "$@"; work="$2"; shift 2 ;;
    --data) need "$@"; data="$2"; shift 2 ;;
    --columns) need "$@"; columns="$2"; shift 2 ;;
    --seeds) need "$@"; seeds="$2"; shift 2 ;;
    --losses) need "$@"; losses="$2"; shift 2 ;;
    --log-end) need "$@"; log_end="$2"; shift 2 ;;
    --train-limit) need "$@"; train_limit="$2"; shift 2 ;;
    --test-limit) need "$@"; test_limit="$2"; shift 2 ;;
    --max-samples) need "$@"; max_samples="$2"; shift 2 ;;
    --aa-max-samples) need "$@"; aa_max_samples="$2"; shift 2 ;;
    --device) need "$@"; device="$2"; shift 2 ;;
    --stages) need "$@"; stages="$2"; shift 2 ;;
    --smoke) smoke="--smoke"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
if [ -n "$smoke" ]; then  # the smoke run's defaults: its own work directory, seed 1, few images
  work="${work:-runs/mnist_robustness-smoke}"; seeds="${seeds:-1}"; train_limit="${train_limit:-1000}"
  test_limit="${test_limit:-200}"; max_samples="${max_samples:-100}"; aa_max_samples="${aa_max_samples:-10}"
fi
work="${work:-runs/mnist_robustness}"; seeds="${seeds:-1,2,3}"; aa_max_samples="${aa_max_samples:-1000}"
columns="${columns//,/ }"; seeds="${seeds//,/ }"; losses="${losses//,/ }"; stages=",${stages// /,},"

for s in ${stages//,/ }; do
  case "$s" in prepare|train|attack|results) ;; *) die "--stages: unknown stage '$s' (prepare, train, attack, results)" ;; esac
done
[ -n "${stages//,/}" ] || die "--stages: no stage given"
[ -n "${columns// /}" ] || die "--columns: no column given (clean, fgsm, pgd, pgd_l2)"
seen=" "
for s in $columns; do
  case "$s" in clean|fgsm|pgd|pgd_l2) ;; *) die "--columns: unknown column '$s' (clean, fgsm, pgd, pgd_l2)" ;; esac
  [[ "$seen" != *" $s "* ]] || die "--columns: '$s' given twice"; seen+="$s "
done
[ -n "${losses// /}" ] || die "--losses: no loss given (ce, el)"
seen=" "
for s in $losses; do
  case "$s" in ce|el) ;; *) die "--losses: unknown loss '$s' (ce, el)" ;; esac
  [[ "$seen" != *" $s "* ]] || die "--losses: '$s' given twice"; seen+="$s "
done
[ -n "${seeds// /}" ] || die "--seeds: no seed given"
seen=" "
for s in $seeds; do
  case "$s" in ''|*[!0-9]*) die "--seeds: '$s' is not a non-negative integer" ;; esac
  [[ "$seen" != *" $s "* ]] || die "--seeds: '$s' given twice"; seen+="$s "
done
for s in "train-limit:$train_limit" "test-limit:$test_limit" "max-samples:$max_samples" \
         "aa-max-samples:$aa_max_samples"; do
  [ -z "${s#*:}" ] || is_count "${s#*:}" || die "--${s%%:*}: '${s#*:}' is not an integer >= 1"
done
if [ -n "$log_end" ]; then
  [[ "$log_end" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || die "--log-end: '$log_end' is not a number"
  [[ " $losses " == *" el "* ]] || die "--log-end applies to the el runs, but --losses is '$losses'"
fi
[ -z "$data" ] || [ -d "$data" ] || die "--data: directory not found: '$data'"
[ -e "$work" ] && [ ! -d "$work" ] && die "--work: '$work' exists and is not a directory"

py="${PYTHON:-python}"
csv() { local x="$*"; echo "${x// /,}"; }
mkdir -p "$work"
shown="${stages//,/ }"; shown="${shown# }"
echo "== mnist_robustness${smoke:+ (smoke run: not a result)}: work directory $work, stages ${shown% }," \
     "columns $columns, losses $losses, seeds $seeds" >&2
common=(--work "$work" --columns "$(csv $columns)" --seeds "$(csv $seeds)" --losses "$(csv $losses)")

if [[ "$stages" == *,prepare,* ]]; then
  opts=(--work "$work")
  [ -n "$data" ] && opts+=(--data "$data")
  [ -n "$train_limit" ] && opts+=(--train-limit "$train_limit")
  [ -n "$test_limit" ] && opts+=(--test-limit "$test_limit")
  echo "== prepare -> $work/data" >&2
  stage_step "prepare ($work/data)" "prepares it again" "$py" -m timm_el.robustness prepare "${opts[@]}"
fi

if [[ "$stages" == *,train,* ]]; then
  opts=("${common[@]}")
  [ -n "$log_end" ] && opts+=(--log-end "$log_end")
  [ -n "$smoke" ] && opts+=("$smoke")
  echo "== train -> $work/<column>/runs" >&2
  stage_step "train ($work/<column>/runs)" \
    "skips the finished runs and resumes an interrupted one from its last.pth.tar" \
    "$py" -m timm_el.robustness train "${opts[@]}" -- "${extra[@]}"
fi

if [[ "$stages" == *,attack,* ]]; then
  opts=("${common[@]}" --aa-max-samples "$aa_max_samples")
  [ -n "$max_samples" ] && opts+=(--max-samples "$max_samples")
  [ -n "$device" ] && opts+=(--device "$device")
  [ -n "$smoke" ] && opts+=("$smoke")
  echo "== attack -> $work/<column>/attacks" >&2
  stage_step "attack ($work/<column>/attacks)" \
    "skips the complete reports and attacks the rest (an interrupted one from the start)" \
    "$py" -m timm_el.robustness attack "${opts[@]}"
fi

if [[ "$stages" == *,results,* ]]; then
  opts=("${common[@]}")
  [ -n "$smoke" ] && opts+=("$smoke")
  echo "== results -> $work/results${smoke:+ (tasks mnist_robustness_<column>_smoke: a smoke run, not a result)}" >&2
  stage_step "results ($work/results)" "writes them again" "$py" -m timm_el.robustness results "${opts[@]}"
fi
