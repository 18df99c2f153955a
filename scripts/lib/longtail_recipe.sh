# Shared stages of the long-tailed recipes (sourced by scripts/longtail_small.sh and scripts/inat2018.sh; not run
# on its own).
#
# The caller sets RECIPE (a recipe of python -m timm_el.longtail_recipe), DEFAULT_WORK, DEFAULT_SEEDS (comma-
# separated) and USAGE_HEAD / USAGE_DATA / USAGE_TAIL (its --help around the common options), then calls
# `longtail_main "$@"`. Every decision (the rows' flags, the DRW epoch, skipping a finished run, resuming an
# interrupted one, the table) is python -m timm_el.longtail_recipe's; this file checks the options and
# sequences the stages prepare, train, crt and results. Running the same command again after an interruption
# continues where it stopped.

ALL_ROWS="ce,el_conservative,el_normal,el_aggressive,crt,crt_el,drw,drw_el,focal,halted_focal"

longtail_usage() {
  cat <<EOF
$USAGE_HEAD

Stages (each skips finished work; run the same command again after an interruption):
  prepare   $USAGE_PREPARE
  train     the representation runs WORK/runs/<row>-seed<seed> (python -m timm_el.train): every row of --rows
            but crt and crt_el, and the representations those need (ce, el_normal); a finished run is skipped,
            an interrupted one resumes from its last.pth.tar
  crt       the cRT runs WORK/runs/crt-seed<seed> and crt_el-seed<seed> (--crt-from the ce / el_normal run:
            features frozen, classifier re-initialised and re-trained with CE and class-balanced sampling)
  results   WORK/results: el-result/1 records (records/seed<seed>/<row>.json: metrics all, many, medium, few),
            published.csv (the paper's Table 3), el-results' results.csv, summary.csv, summary.md, longtail.md
            (the table in the paper's shape beside the paper's numbers, and whether each comparison the paper
            makes goes the paper's way) and longtail.png; skipped when the runs have not changed

Rows (--rows; Table 3 / Table 9 of the paper, EL_SPEC 6):
  ce               CE
  el_conservative  + conservative bonus (EL, log_end 0.75)
  el_normal        + normal bonus (EL, log_end 1)
  el_aggressive    + aggressive bonus (EL, log_end 1, --bonus-start 0.5: the EL release's iNaturalist command)
  crt              cRT (Kang et al. 2020) on the ce representation
  crt_el           cRT + normal bonus: cRT on the el_normal representation (EL in the representation only)
  drw              DRW (Cao et al. 2019): CE, class-balanced weights (beta 0.9999) from --drw-epoch on
  drw_el           DRW + normal bonus
  focal            focal loss (gamma 2)
  halted_focal     halted focal loss (gamma 2, halted at p = 0.5; EL_SPEC 2.5)

Options (defaults in brackets):
  --work DIR          [$DEFAULT_WORK; $DEFAULT_WORK-smoke with --smoke]
$USAGE_DATA
  --rows LIST         comma-separated rows [all ten]
  --seeds LIST        [$DEFAULT_SEEDS; 1 with --smoke]
  --epochs N          representation epochs [$USAGE_EPOCHS]
  --crt-epochs N      cRT epochs [$USAGE_CRT_EPOCHS]
  --drw-epoch E       the first re-weighted epoch (from 0) [$USAGE_DRW]
  --gpus N            GPUs (processes); more than one: torchrun, the preset's batch divided among them [1]
  --stages LIST       comma-separated: prepare,train,crt,results [all four]
  --smoke             a short run that checks the recipe, not a result (seed 1, its own work directory, the
                      records' task ending in _smoke): $USAGE_SMOKE
  -h, --help          this help
  -- FLAGS            go to timm-el-train (python -m timm_el.train) in every run of both stages, replacing the
                      preset's flag of that name (e.g. -- -j 8 --amp); EL flags go to the EL rows only, --drw-beta to
                      the DRW rows, --focal-gamma / --halt-point to the focal rows; --epochs has its own options
$USAGE_TAIL
EOF
}

longtail_die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
longtail_need() { [ $# -ge 2 ] && [ -n "$2" ] || longtail_die "$1 needs a value"; }

. "$(dirname "${BASH_SOURCE[0]}")/stage.sh"

longtail_main() {
  AGAIN="$(printf '%q ' bash "$0" "$@")"; AGAIN="${AGAIN% }"
  local work="" data="" dataset="" rows="$ALL_ROWS" seeds="" epochs="" crt_epochs="" drw_epoch="" gpus=""
  local stages="prepare,train,crt,results" smoke="" extra=() s
  while [ $# -gt 0 ]; do
    case "$1" in
      --work) longtail_need "$@"; work="$2"; shift 2 ;;
      --data) longtail_need "$@"; data="$2"; shift 2 ;;
      --dataset) [ -n "$USAGE_DATASET" ] || longtail_die "unknown option $1 (see --help)"
                 longtail_need "$@"; dataset="$2"; shift 2 ;;
      --rows) longtail_need "$@"; rows="$2"; shift 2 ;;
      --seeds) longtail_need "$@"; seeds="$2"; shift 2 ;;
      --epochs) longtail_need "$@"; epochs="$2"; shift 2 ;;
      --crt-epochs) longtail_need "$@"; crt_epochs="$2"; shift 2 ;;
      --drw-epoch) longtail_need "$@"; drw_epoch="$2"; shift 2 ;;
      --gpus) longtail_need "$@"; gpus="$2"; shift 2 ;;
      --stages) longtail_need "$@"; stages="$2"; shift 2 ;;
      --smoke) smoke="--smoke"; shift ;;
      -h|--help) longtail_usage; exit 0 ;;
      --) shift; extra=("$@"); break ;;
      *) longtail_die "unknown option $1 (see --help)" ;;
    esac
  done
  [ -n "$smoke" ] && seeds="${seeds:-1}"
  work="${work:-$DEFAULT_WORK${smoke:+-smoke}}"; seeds="${seeds:-$DEFAULT_SEEDS}"
  stages=",${stages// /,},"
  for s in ${stages//,/ }; do
    case "$s" in prepare|train|crt|results) ;;
      *) longtail_die "--stages: unknown stage '$s' (prepare, train, crt, results)" ;; esac
  done
  [ -n "${stages//,/}" ] || longtail_die "--stages: no stage given"
  for s in "epochs:$epochs" "crt-epochs:$crt_epochs" "drw-epoch:$drw_epoch" "gpus:$gpus"; do
    case "${s#*:}" in '') ;; *[!0-9]*|0*) longtail_die "--${s%%:*}: '${s#*:}' is not an integer >= 1" ;; esac
  done
  [ -z "$data" ] || [ -d "$data" ] || longtail_die "--data: directory not found: '$data'"
  [ -e "$work" ] && [ ! -d "$work" ] && longtail_die "--work: '$work' exists and is not a directory"

  local py="${PYTHON:-python}"
  local lt=("$py" -m timm_el.longtail_recipe --prog "$(basename "$0")")  # its error lines name this script
  local sel=(--work "$work" --rows "$rows" --seeds "$seeds")
  [ -n "$smoke" ] && sel+=("$smoke")
  local run=("${sel[@]}")
  [ -n "$data" ] && run+=(--data "$data")
  [ -n "$dataset" ] && run+=(--dataset "$dataset")
  [ -n "$epochs" ] && run+=(--epochs "$epochs")
  [ -n "$crt_epochs" ] && run+=(--crt-epochs "$crt_epochs")
  [ -n "$drw_epoch" ] && run+=(--drw-epoch "$drw_epoch")
  [ -n "$gpus" ] && run+=(--gpus "$gpus")
  # every option and every run's command, checked before anything is created (one line on a bad one)
  if [[ "$stages" == *,train,* || "$stages" == *,crt,* ]]; then
    "${lt[@]}" check "$RECIPE" "${run[@]}" -- "${extra[@]}" || exit $?
  fi
  mkdir -p "$work"
  local shown="${stages//,/ }"; shown="${shown# }"
  echo "== $RECIPE${smoke:+ (smoke run: not a result)}: work directory $work, stages ${shown% }, rows $rows," \
       "seeds $seeds" >&2

  if [[ "$stages" == *,prepare,* ]]; then
    local opts=(--work "$work")
    [ -n "$data" ] && opts+=(--data "$data")
    [ -n "$smoke" ] && opts+=("$smoke")
    echo "== prepare -> $work/data" >&2
    stage_step "prepare ($work/data)" "prepares it again" "${lt[@]}" prepare "$RECIPE" "${opts[@]}"
  fi
  if [[ "$stages" == *,train,* ]]; then
    echo "== train -> $work/runs" >&2
    stage_step "train ($work/runs)" "skips the finished runs and resumes an interrupted one from its last.pth.tar" \
      "${lt[@]}" train "$RECIPE" "${run[@]}" -- "${extra[@]}"
  fi
  if [[ "$stages" == *,crt,* ]]; then
    echo "== crt -> $work/runs" >&2
    stage_step "crt ($work/runs)" "skips the finished runs and resumes an interrupted one from its last.pth.tar" \
      "${lt[@]}" crt "$RECIPE" "${run[@]}" -- "${extra[@]}"
  fi
  if [[ "$stages" == *,results,* ]]; then
    echo "== results -> $work/results${smoke:+ (task <task>_smoke: a smoke run, not a result)}" >&2
    stage_step "results ($work/results)" "writes them again" \
      "${lt[@]}" results "$RECIPE" "${sel[@]}"
  fi
}
