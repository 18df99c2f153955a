#!/usr/bin/env bash
# The paper's graph classification runs (Zhao et al., AAAI 2022, section 5.2 / Fig. 4; EL_SPEC 6): SAGPool on
# PROTEINS and NCI1, cross-entropy against the Encouraging Loss with the conservative bonus, 10 runs each, every
# run on its own random 80/10/10 split. Runs on a CPU. Every decision is python -m pyg_el.recipe's; this file
# checks the options and sequences the stages.
#
#   bash scripts/graph.sh --data ../shared/data                  # PROTEINS and NCI1, CE and EL, 10 runs each
#   bash scripts/graph.sh --datasets PROTEINS --runs 3            # downloads PROTEINS into runs/graph/data/tu
#   bash scripts/graph.sh --data ../shared/data --smoke           # checks the recipe on a slice
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash scripts/graph.sh [options] [-- pyg_el.train flags]

SAGPool (Lee et al. 2019; PyTorch Geometric's SAGPool setting: hierarchical pooling, 128 channels, pooling
ratio 0.5, dropout 0.5, Adam lr 5e-4, weight decay 1e-4, batch 128, early stopping on the valid accuracy with
patience 50) on each dataset of --datasets, trained with CE and with EL (--log-end 0.75, the conservative
bonus). Run r of both losses uses seed + r for its 80/10/10 split, initial weights and batch order, so CE and
EL are compared run by run; the metric is the test accuracy of the best-valid epoch.

Stages (each skips finished work; run the same command again after an interruption):
  prepare   WORK/data/tu/NAME.zip from --data (DIR/tu/NAME.zip or DIR/NAME.zip); without --data,
            python -m pyg_el.train downloads the dataset there (TUDataset)
  train     WORK/runs/NAME-ce and WORK/runs/NAME-el (python -m pyg_el.train --out): per dataset, for
            r = 1 .. --runs, CE then EL with --runs r (each adds run r-1), so that a recipe stopped early
            leaves CE and EL with the same runs; finished runs are skipped, an unfinished one resumes from
            its last.pt; a progress line every 10 epochs (-- --log-every N)
  results   WORK/results: el-results' summary.md / summary.csv / results.csv and plots (test accuracy per
            run, valid_acc curves), graph.md (per dataset: CE and EL mean +- std, EL - CE, the paired
            difference over runs with the same seed, EL won / tied / lost, epochs and seconds per run, a
            verdict) and graph.png (CE vs EL per run, pairs joined); skipped when the runs have not changed.
            The paper has no table for this figure (its Fig. 4 numbers are not in our copy, EL_SPEC 6): its
            claim, EL above CE on both datasets, is checked by direction

Options (defaults in brackets):
  --work DIR          [runs/graph; runs/graph-smoke with --smoke]
  --data DIR          local TU archives, DIR/tu/NAME.zip (the layout of ../shared/data) or DIR/NAME.zip
                      [none: download]
  --datasets LIST     comma-separated TU datasets: PROTEINS, NCI1, or another with NAME.zip under --data
                      [PROTEINS,NCI1; PROTEINS with --smoke]
  --runs N            runs per dataset and loss [10; 1 with --smoke]
  --seed S            seed of run 0; run r uses S + r [777, SAGPool's]
  --losses LIST       ce, el or both [ce,el]
  --log-end LE        the EL runs' --log-end, in (0, 1] [0.75]
  --threads N         CPU threads per run (also OMP_NUM_THREADS) [1]
  --stages LIST       comma-separated: prepare,train,results [all three]
  --smoke             a short run that checks the recipe, not a result: one run, --max-epochs 2
                      --patience 1, the first dataset unless --datasets is given, its own work directory
  -h, --help          this help
  -- FLAGS            go to python -m pyg_el.train in every run (e.g. -- --pooling global --log-every 1),
                      replacing the recipe's flag of that name; EL flags (--bonus-rho ...) to the EL runs only;
                      the recipe's own options (--dataset, --root, --loss, --runs, --seed, --out, --threads,
                      --log-end) are refused there

Cost (measured on this project's 2-core CPU machine, one thread per run): PROTEINS (1,113 graphs) about 0.4 s
an epoch on a free core (1.2 s with the machine shared), 61-211 epochs a run (early stopping), about 1 minute
a run; NCI1 (4,110 graphs) about 1 s an epoch (2.5 s shared), 103-203 epochs a run, about 2.5 minutes a run.
The whole recipe (2 datasets x 2 losses x 10 runs) about 1 hour on a free core. A GPU is
not needed. On a busy machine keep one thread: with two threads and the other core taken, epochs took ten
times longer in the other recipes.
EOF
}

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

. "$(dirname "$0")/lib/stage.sh"

AGAIN="$(printf '%q ' bash "$0" "$@")"; AGAIN="${AGAIN% }"
work="" data="" datasets="" runs="" seed="" losses="" log_end="" threads="" smoke="" extra=() s=""
stages="prepare,train,results"
while [ $# -gt 0 ]; do
  case "$1" in
    --work) need "$@"; work="$2"; shift 2 ;;
    --data) need "$@"; data="$2"; shift 2 ;;
    --datasets) need "$@"; datasets="$2"; shift 2 ;;
    --runs) need "$@"; runs="$2"; shift 2 ;;
    --seed) need "$@"; seed="$2"; shift 2 ;;
    --losses) need "$@"; losses="$2"; shift 2 ;;
    --log-end) need "$@"; log_end="$2"; shift 2 ;;
    --threads) need "$@"; threads="$2"; shift 2 ;;
    --stages) need "$@"; stages="$2"; shift 2 ;;
    --smoke) smoke="--smoke"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
stages=",${stages// /,},"
for s in ${stages//,/ }; do
  case "$s" in prepare|train|results) ;; *) die "--stages: unknown stage '$s' (prepare, train, results)" ;; esac
done
[ -n "${stages//,/}" ] || die "--stages: no stage given"
for s in "runs:$runs" "threads:$threads"; do
  case "${s#*:}" in '') ;; *[!0-9]*|0*) die "--${s%%:*}: '${s#*:}' is not an integer >= 1" ;; esac
done
case "$seed" in '') ;; *[!0-9]*) die "--seed: '$seed' is not a non-negative integer" ;; esac
[ -z "$data" ] || [ -d "$data" ] || die "--data: directory not found: '$data'"
work="${work:-runs/graph${smoke:+-smoke}}"
[ -e "$work" ] && [ ! -d "$work" ] && die "--work: '$work' exists and is not a directory"
threads="${threads:-1}"
export OMP_NUM_THREADS="$threads"

py="${PYTHON:-python}"
recipe=("$py" -m pyg_el.recipe --prog "$(basename "$0")")  # its error lines name this script
sel=(--work "$work")
[ -n "$datasets" ] && sel+=(--datasets "$datasets")
[ -n "$smoke" ] && sel+=("$smoke")
res=("${sel[@]}")
[ -n "$losses" ] && res+=(--losses "$losses")
[ -n "$runs" ] && res+=(--runs "$runs")
run=("${res[@]}" --threads "$threads")
[ -n "$data" ] && run+=(--data "$data")
[ -n "$seed" ] && run+=(--seed "$seed")
[ -n "$log_end" ] && run+=(--log-end "$log_end")
# every option and every run's command, checked before anything is created (one line on a bad one)
if [[ "$stages" == *,train,* ]]; then
  "${recipe[@]}" check "${run[@]}" -- "${extra[@]}" || exit $?
fi
mkdir -p "$work"
shown="${stages//,/ }"; shown="${shown# }"
echo "== graph${smoke:+ (smoke run: not a result)}: work directory $work, stages ${shown% }" >&2

if [[ "$stages" == *,prepare,* ]]; then
  opts=("${sel[@]}")
  [ -n "$data" ] && opts+=(--data "$data")
  echo "== prepare -> $work/data/tu" >&2
  stage_step "prepare ($work/data/tu)" "copies what is missing" "${recipe[@]}" prepare "${opts[@]}"
fi
if [[ "$stages" == *,train,* ]]; then
  echo "== train -> $work/runs" >&2
  stage_step "train ($work/runs)" "skips the finished runs and resumes an unfinished one from its last.pt" \
    "${recipe[@]}" train "${run[@]}" -- "${extra[@]}"
fi
if [[ "$stages" == *,results,* ]]; then
  echo "== results -> $work/results${smoke:+ (a smoke run, not a result)}" >&2
  stage_step "results ($work/results)" "writes them again" "${recipe[@]}" results "${res[@]}"
fi
