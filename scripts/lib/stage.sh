# stage_step STAGE AGAIN COMMAND...: one recipe stage's command (sourced by the recipes; not run on its own).
# If the command fails, the recipe stops with one line naming the stage, its exit status (and the signal that
# killed it) and what running the same command again does (AGAIN), the command being $AGAIN.
stage_step() {
  local stage="$1" again="$2" rc=0 how fix=""
  shift 2
  "$@" || rc=$?
  [ "$rc" -eq 0 ] && return 0
  how="exit status $rc"
  [ "$rc" -le 128 ] && fix="once the cause above is fixed, "
  if [ "$rc" -gt 128 ] && [ "$rc" -le 192 ]; then
    how+=": killed by signal $((rc - 128)) (SIG$(kill -l $((rc - 128)) 2>/dev/null))"
  fi
  echo "$(basename "$0"): error: stage $stage failed with $how; ${fix}running the same command again $again: $AGAIN" >&2
  exit "$rc"
}
