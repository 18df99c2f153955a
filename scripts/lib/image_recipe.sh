# Shared stages of the image recipes (sourced by scripts/imagenet_efficientnet_b0.sh,
# scripts/imagenet_resnet50.sh, scripts/cifar.sh and scripts/mnist.sh; not run on its own).
#
# The caller sets PRESET (a preset of python -m timm_el.recipe), DEFAULT_SEEDS,
# DEFAULT_DATASET and DEFAULT_MODEL (shown in --help; empty: the preset's), DATA_HELP
# and RECIPE_USAGE, may define recipe_default_work DATASET MODEL (the default --work)
# and recipe_default_data WORK (the default --data), then calls `recipe_main "$@"`.
# Every decision (the paper's flags, the batch per GPU, skipping a finished run,
# resuming an interrupted one, torchrun) is python -m timm_el.recipe's; this file
# checks the options and sequences the runs. Running the recipe again after an
# interruption continues where it stopped.

recipe_usage() {
  cat <<EOF
$RECIPE_USAGE

Options (defaults in brackets):
  --work DIR          where runs/<loss>-seed<seed>/ and results/ go [$(recipe_default_work "$DEFAULT_DATASET" "$DEFAULT_MODEL")]
  --stages LIST       comma-separated, in order: train,results [both]
  --losses LIST       space- or comma-separated: ce el [ce el]
  --seeds LIST        [$DEFAULT_SEEDS]
$DATA_HELP
  --download          let torch/ datasets download into --data
  --log-end X         EL's log_end [0.75]
  --gpus N            GPUs (processes) per machine; more than one goes through torchrun [1]
  --nodes N           machines; with N > 1 run the script on each with --node-rank, WORK on shared storage [1]
  --node-rank R       this machine's rank [0]
  --master-addr HOST  the rank-0 machine [127.0.0.1]
  --master-port PORT  [29500]
  --smoke             a short run that checks the recipe, not a result: the preset's smoke flags (1 epoch, a
                      small batch, a narrower model or smaller images: timm_el.recipe.PRESETS['$PRESET'].smoke),
                      seed ${DEFAULT_SEEDS%% *} only unless --seeds says otherwise, in its own work directory
                      (default: the real one's with -smoke); its records and tables name the task <task>_smoke
  -h, --help          this help
  -- FLAGS            everything after -- goes to timm-el-train (python -m timm_el.train), replacing the
                      preset's flag of that name; -b sets the batch per GPU (default: the paper's batch
                      divided by GPUs x machines); EL flags (--bonus-rho, ...) go to the el runs only

A finished run (its eval/last.json exists) is skipped; an interrupted one continues from its
last.pth.tar (--resume). Delete WORK/runs/<loss>-seed<seed> to train a run again. The results
stage writes WORK/results: results.csv, summary.csv, summary.md (mean +- std over seeds, EL - CE)
and PNGs (top-1 per seed; eval_top1 per epoch from each run's summary.csv).
EOF
}

recipe_die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

# the defaults a caller may replace
if ! declare -F recipe_default_work >/dev/null; then
  recipe_default_work() { echo "runs/$PRESET"; }
fi
if ! declare -F recipe_default_data >/dev/null; then
  recipe_default_data() { echo ""; }
fi

recipe_main() {
  local work="" stages="train,results" losses="ce el" seeds="$DEFAULT_SEEDS" data="" dataset="" model=""
  local download="" log_end="" gpus=1 nodes=1 node_rank=0 master_addr=127.0.0.1 master_port=29500 extra=()
  local dataset_set="" model_set="" smoke="" seeds_set=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --work) work="${2:?--work needs a value}"; shift 2 ;;
      --stages) stages="${2:?--stages needs a value}"; shift 2 ;;
      --losses) losses="${2:?--losses needs a value}"; shift 2 ;;
      --seeds) seeds="${2:?--seeds needs a value}"; seeds_set=1; shift 2 ;;
      --data) data="${2:?--data needs a value}"; shift 2 ;;
      --dataset) dataset="${2?--dataset needs a value}"; dataset_set=1; shift 2 ;;
      --model) model="${2:?--model needs a value}"; model_set=1; shift 2 ;;
      --download) download="--download"; shift ;;
      --log-end) log_end="${2:?--log-end needs a value}"; shift 2 ;;
      --gpus) gpus="${2:?--gpus needs a value}"; shift 2 ;;
      --nodes) nodes="${2:?--nodes needs a value}"; shift 2 ;;
      --node-rank) node_rank="${2:?--node-rank needs a value}"; shift 2 ;;
      --master-addr) master_addr="${2:?--master-addr needs a value}"; shift 2 ;;
      --master-port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
      --smoke) smoke="--smoke"; shift ;;
      -h|--help) recipe_usage; exit 0 ;;
      --) shift; extra=("$@"); break ;;
      *) recipe_die "unknown option $1 (see --help)" ;;
    esac
  done
  [ -n "$smoke" ] && [ -z "$seeds_set" ] && seeds="${DEFAULT_SEEDS%% *}"
  losses="${losses//,/ }"; seeds="${seeds//,/ }"; stages=",${stages// /,},"
  local s
  for s in ${stages//,/ }; do
    case "$s" in train|results) ;; *) recipe_die "--stages: unknown stage '$s' (train, results)" ;; esac
  done
  [ -n "${losses// /}" ] || recipe_die "--losses: no loss given (ce, el)"
  for s in $losses; do
    case "$s" in ce|el) ;; *) recipe_die "--losses: unknown loss '$s' (ce, el)" ;; esac
  done
  [ -n "${seeds// /}" ] || recipe_die "--seeds: no seed given"
  for s in $seeds; do
    case "$s" in ''|*[!0-9]*) recipe_die "--seeds: '$s' is not a non-negative integer" ;; esac
  done
  for s in "gpus:$gpus" "nodes:$nodes" "node-rank:$node_rank" "master-port:$master_port"; do
    case "${s#*:}" in ''|*[!0-9]*) recipe_die "--${s%%:*}: '${s#*:}' is not a non-negative integer" ;; esac
  done
  [ -n "$log_end" ] && [[ " $losses " != *" el "* ]] && recipe_die "--log-end applies to the el runs, but --losses is '$losses'"

  # a smoke run's default work directory is the real one's with -smoke; its default data stays the real one's
  local base_work="${work:-$(recipe_default_work "${dataset:-$DEFAULT_DATASET}" "${model:-$DEFAULT_MODEL}")}"
  [ -n "$data" ] || data="$(recipe_default_data "$base_work")"
  [ -n "$work" ] || work="$base_work${smoke:+-smoke}"
  local py="${PYTHON:-python}" loss seed
  local opts=(--work "$work" --gpus "$gpus" --nodes "$nodes" --node-rank "$node_rank"
              --master-addr "$master_addr" --master-port "$master_port")
  [ -n "$data" ] && opts+=(--data "$data")
  [ -n "$dataset_set" ] && opts+=(--dataset "$dataset")
  [ -n "$model_set" ] && opts+=(--model "$model")
  [ -n "$download" ] && opts+=("$download")
  [ -n "$log_end" ] && opts+=(--log-end "$log_end")
  [ -n "$smoke" ] && opts+=("$smoke")

  if [[ "$stages" == *,train,* ]]; then
    [ -n "$data" ] || recipe_die "--data: the dataset directory is required (see --help)"
    # every option and every run's command, checked before anything is created
    "$py" -m timm_el.recipe check "$PRESET" "${opts[@]}" --losses "$losses" --seeds "$seeds" -- "${extra[@]}" \
      || exit $?
  fi
  mkdir -p "$work"
  echo "== $PRESET${smoke:+ (smoke run: not a result)}: work directory $work, stages ${stages//,/ }, losses $losses, seeds $seeds" >&2

  if [[ "$stages" == *,train,* ]]; then
    for loss in $losses; do
      for seed in $seeds; do
        echo "== train $loss seed $seed -> $work/runs/$loss-seed$seed" >&2
        "$py" -m timm_el.recipe train "$PRESET" "${opts[@]}" --loss "$loss" --seed "$seed" -- "${extra[@]}"
      done
    done
  fi
  if [ "$node_rank" != 0 ]; then
    echo "== node rank $node_rank: the results stage runs on rank 0" >&2
    return 0
  fi
  if [[ "$stages" == *,results,* ]]; then
    echo "== results -> $work/results${smoke:+ (tasks <task>_smoke: a smoke run, not a result)}" >&2
    "$py" -m encouraging_loss.tools.results "$work/runs" --out "$work/results" --force
  fi
}
