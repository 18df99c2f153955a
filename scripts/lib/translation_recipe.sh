# Shared stages of the translation recipes (sourced by scripts/iwslt14_de_en.sh,
# scripts/iwslt17_fr_en.sh and scripts/multi30k_de_en.sh; not run on its own).
#
# The caller sets TASK (a preset of python -m fairseq_el.train), PREP_MODULE
# (python -m fairseq_el.<module> prepares the data), DEFAULT_SEEDS, AVG_LAST
# (checkpoints averaged for evaluation, 0 = evaluate checkpoint_last.pt) and
# RECIPE_USAGE, then calls `recipe_main "$@"`. Every stage is one of the
# project's Python commands; each skips work that is already done, so the
# whole recipe can be run again after an interruption.

recipe_usage() {
  cat <<EOF
$RECIPE_USAGE

Options (defaults in brackets):
  --work DIR          where prep/, runs/<loss>-seed<seed>/ and results/ go [runs/$TASK; runs/$TASK-smoke with --smoke]
  --stages LIST       comma-separated, in order: prep,train,average,eval,results [all of them]
  --losses LIST       space- or comma-separated: ce el [ce el]
  --seeds LIST        [$DEFAULT_SEEDS]
  --log-end X         EL's log_end [0.5]
  --gpus N            GPUs per machine [1]
  --nodes N           machines; with N > 1 run the script on each with --node-rank [1]
  --node-rank R       this machine's rank [0]
  --master-addr HOST  the rank-0 machine [127.0.0.1]
  --master-port PORT  [29500]
  --avg-last N        checkpoints to average, 0 = use checkpoint_last.pt [$AVG_LAST]
  --prep-args "..."   more arguments for python -m fairseq_el.$PREP_MODULE (data source, slices)
  --eval-args "..."   more arguments for python -m fairseq_el.evaluate (e.g. "--max-tokens 8000",
                      "-- --lenpen 1.2" for fairseq-generate)
  --smoke             a smoke run on the CPU (Multi30k: about 2-3 minutes on 2 cores), not a result: the data prepared with --smoke (a
                      2,000-piece vocabulary, the first few thousand pairs, 500 test sentences), a 2+2-layer
                      128-dim model, warmup 100, 2 epochs of about 150 updates (python -m fairseq_el.train
                      --smoke; the settings: fairseq_el.train.SMOKE and fairseq_el.$PREP_MODULE.SMOKE), hypotheses
                      capped at 1.2 x source + 10 tokens (fairseq_el.evaluate.SMOKE_GENERATE), seed ${DEFAULT_SEEDS%% *}
                      only and at most 2 checkpoints averaged unless --seeds / --avg-last say otherwise; its
                      records and tables name the task ${TASK}_smoke
  --force             redo finished work (training continues from checkpoint_last.pt)
  --verbose           show fairseq-train's whole output instead of a progress line per --log-interval updates
                      (the whole output always goes to runs/<loss>-seed<seed>/train.log)
  -h, --help          this help
  -- FLAGS            everything after -- goes to fairseq-train (replacing the preset's flag of that name)
EOF
}

recipe_die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }


# recipe_step STAGE RUN COMMAND...: one stage's command. If it fails, the recipe stops with one line naming the
# stage, its exit status (and signal) and what the same command again does; RUN is the training run's directory
# (a rerun resumes from its checkpoint_last.pt), empty for the other stages.
recipe_step() {
  local stage="$1" run="$2" rc=0 how again fix=""
  shift 2
  "$@" || rc=$?
  [ "$rc" -eq 0 ] && return 0
  how="exit status $rc"
  [ "$rc" -le 128 ] && fix="once the cause above is fixed, "
  if [ "$rc" -gt 128 ] && [ "$rc" -le 192 ]; then
    how+=": killed by signal $((rc - 128)) (SIG$(kill -l $((rc - 128)) 2>/dev/null))"
  elif [ "$rc" -gt 192 ]; then  # a Python program that returned a child's -N
    how+=": a process killed by signal $((256 - rc)) (SIG$(kill -l $((256 - rc)) 2>/dev/null))"
  fi
  if [ -n "$run" ] && [ -f "$run/checkpoint_last.pt" ]; then
    again="running the same command again resumes this run from $run/checkpoint_last.pt and skips finished work"
  elif [ -n "$run" ]; then
    again="running the same command again starts this run over (no checkpoint was saved) and skips finished work"
  else
    again="running the same command again redoes this stage and skips finished work"
  fi
  echo "$(basename "$0"): error: stage $stage failed with $how; $fix$again: $RECIPE_AGAIN" >&2
  exit "$rc"
}

recipe_main() {
  local work="" stages="prep,train,average,eval,results" losses="ce el" seeds="" avg_last=""
  local log_end="" gpus=1 nodes=1 node_rank=0 master_addr=127.0.0.1 master_port=29500
  local prep_args="" eval_args="" force="" smoke="" verbose="" extra=()
  RECIPE_AGAIN="$(printf '%q ' bash "$0" "$@")"; RECIPE_AGAIN="${RECIPE_AGAIN% }"
  while [ $# -gt 0 ]; do
    case "$1" in
      --work) work="${2:?--work needs a value}"; shift 2 ;;
      --stages) stages="${2:?--stages needs a value}"; shift 2 ;;
      --losses) losses="${2:?--losses needs a value}"; shift 2 ;;
      --seeds) seeds="${2:?--seeds needs a value}"; shift 2 ;;
      --log-end) log_end="${2:?--log-end needs a value}"; shift 2 ;;
      --gpus) gpus="${2:?--gpus needs a value}"; shift 2 ;;
      --nodes) nodes="${2:?--nodes needs a value}"; shift 2 ;;
      --node-rank) node_rank="${2:?--node-rank needs a value}"; shift 2 ;;
      --master-addr) master_addr="${2:?--master-addr needs a value}"; shift 2 ;;
      --master-port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
      --avg-last) avg_last="${2:?--avg-last needs a value}"; shift 2 ;;
      --prep-args) prep_args="${2?--prep-args needs a value}"; shift 2 ;;
      --eval-args) eval_args="${2?--eval-args needs a value}"; shift 2 ;;
      --force) force="--force"; shift ;;
      --verbose) verbose="--verbose"; shift ;;
      --smoke) smoke="--smoke"; shift ;;
      -h|--help) recipe_usage; exit 0 ;;
      --) shift; extra=("$@"); break ;;
      *) recipe_die "unknown option $1 (see --help)" ;;
    esac
  done
  if [ -n "$smoke" ]; then  # the smoke run's defaults: its own work directory, one seed, 2 checkpoints averaged
    work="${work:-runs/$TASK-smoke}"; seeds="${seeds:-${DEFAULT_SEEDS%% *}}"
    avg_last="${avg_last:-$(( AVG_LAST < 2 ? AVG_LAST : 2 ))}"
  fi
  work="${work:-runs/$TASK}"; seeds="${seeds:-$DEFAULT_SEEDS}"; avg_last="${avg_last:-$AVG_LAST}"
  losses="${losses//,/ }"; seeds="${seeds//,/ }"; stages=",${stages// /,},"
  local s
  for s in ${stages//,/ }; do
    case "$s" in prep|train|average|eval|results) ;; *) recipe_die "--stages: unknown stage '$s' (prep, train, average, eval, results)" ;; esac
  done
  for s in $losses; do
    case "$s" in ce|el) ;; *) recipe_die "--losses: unknown loss '$s' (ce, el)" ;; esac
  done
  for s in $seeds; do
    case "$s" in ''|*[!0-9]*) recipe_die "--seeds: '$s' is not a non-negative integer" ;; esac
  done
  case "$avg_last" in ''|*[!0-9]*) recipe_die "--avg-last: '$avg_last' is not a non-negative integer" ;; esac
  [ -n "$log_end" ] && [[ " $losses " != *" el "* ]] && recipe_die "--log-end applies to the el runs, but --losses is '$losses'"

  local py="${PYTHON:-python}" prep="$work/prep" loss seed run ckpt tag
  mkdir -p "$work"
  echo "== $TASK${smoke:+ (smoke run: not a result)}: work directory $work, stages ${stages//,/ }, losses $losses, seeds $seeds" >&2

  if [[ "$stages" == *,prep,* ]] && [ "$node_rank" != 0 ]; then
    [ -f "$prep/prep.json" ] || recipe_die "node rank $node_rank: $prep is not prepared; run --stages prep on one machine first"
  elif [[ "$stages" == *,prep,* ]]; then
    echo "== prep" >&2
    # shellcheck disable=SC2086
    recipe_step "prep ($prep)" "" "$py" -m "fairseq_el.$PREP_MODULE" --out "$prep" $prep_args $force $smoke
  fi
  if [[ "$stages" == *,train,* ]]; then
    for loss in $losses; do
      for seed in $seeds; do
        run="$work/runs/$loss-seed$seed"
        echo "== train $loss seed $seed -> $run" >&2
        local le=()
        [ "$loss" = el ] && [ -n "$log_end" ] && le=(--log-end "$log_end")
        recipe_step "train (loss $loss, seed $seed, run $run)" "$run" \
          "$py" -m fairseq_el.train --preset "$TASK" --data "$prep" --save-dir "$run" --loss "$loss" --seed "$seed" \
          "${le[@]}" --gpus "$gpus" --nodes "$nodes" --node-rank "$node_rank" --master-addr "$master_addr" \
          --master-port "$master_port" $force $smoke $verbose -- "${extra[@]}"
      done
    done
  fi
  if [ "$node_rank" != 0 ]; then
    echo "== node rank $node_rank: the remaining stages run on rank 0" >&2
    return 0
  fi
  for loss in $losses; do
    for seed in $seeds; do
      run="$work/runs/$loss-seed$seed"
      if [[ "$stages" == *,average,* ]] && [ "$avg_last" -gt 0 ]; then
        ckpt="$run/avg_last$avg_last.pt"
        if [ -e "$ckpt" ] && [ -z "$force" ]; then
          echo "== average $run: $ckpt exists, skipping" >&2
        else
          echo "== average the last $avg_last epoch checkpoints of $run" >&2
          recipe_step "average (loss $loss, seed $seed, run $run)" "" \
            "$py" -m fairseq_el.average_checkpoints --run-dir "$run" --last "$avg_last" --epochs --output "$ckpt" $force
        fi
      fi
      if [[ "$stages" == *,eval,* ]]; then
        echo "== eval $run" >&2
        recipe_step "eval (loss $loss, seed $seed, run $run: curve.csv)" "" \
          "$py" -m fairseq_el.logs "$run/train.log" --csv "$run/curve.csv"
        local evals=("best:$run/checkpoint_best.pt")
        if [ "$avg_last" -gt 0 ]; then evals+=("avg_last$avg_last:$run/avg_last$avg_last.pt")
        else evals+=("last:$run/checkpoint_last.pt"); fi
        for tag in "${evals[@]}"; do
          ckpt="${tag#*:}"; tag="${tag%%:*}"
          # shellcheck disable=SC2086
          recipe_step "eval (loss $loss, seed $seed, run $run, checkpoint $tag)" "" \
            "$py" -m fairseq_el.evaluate --data "$prep" --checkpoint "$ckpt" --tag "$tag" --loss "$loss" \
            --seed "$seed" --run "$loss-seed$seed" --output "$run/eval/$tag.json" --curve ../curve.csv \
            $force $eval_args
        done
      fi
    done
  done
  if [[ "$stages" == *,results,* ]]; then
    echo "== results -> $work/results${smoke:+ (task ${TASK}_smoke: a smoke run, not a result)}" >&2
    recipe_step "results ($work/results)" "" \
      "$py" -m encouraging_loss.tools.results "$work/runs" --out "$work/results" --force
  fi
}
