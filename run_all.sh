#!/usr/bin/env bash
# The whole paper, end to end: data -> base eval -> SFT-Non-Rea -> RFT -> SFT data sources -> SFT on each
# source -> evaluation of every model -> learning-dynamics analysis -> report.md.
#
#   bash run_all.sh                    # toy preset without a CUDA GPU, 3b with one
#   PRESET=7b bash run_all.sh          # Qwen2.5-VL-7B-Instruct (presets/7b.env says what it needs)
#   PRESET=smoke bash run_all.sh       # a few steps of every stage (what CI runs)
#   PRESET=rehearsal bash run_all.sh   # the 3b preset's stages and flags on a CPU, against a local fake mirror
#   bash run_all.sh --list             # the plan: per stage, GPU-hours (CPU minutes) and disk; nothing runs
#   bash run_all.sh --from rft         # redo a stage and all later ones from scratch
#   bash run_all.sh --only report      # one stage
#   PRESET=3b BENCH_DIR=/data/mirror bash run_all.sh --download   # login node: fetch what the preset reads
#   PRESET=3b BENCH_DIR=/data/mirror bash run_all.sh              # compute node: read only from the mirror
#   RFT_STEPS=500 LR_RFT=2e-6 bash run_all.sh   # any preset variable can be set from the environment
#
# Presets are files, presets/<PRESET>.env, one value per line with the reason for it. A finished stage is
# skipped on rerun (marker in $RUN/.done/); a training stage that was interrupted resumes from its last
# checkpoint. Each stage logs to $RUN/logs/STAGE.log and, when it finishes, records the settings it ran with in
# $RUN/settings/STAGE.json. Before the first stage the plan is printed and checked against the free disk of
# $RUN (IGNORE_DISK_PLAN=1 runs anyway). One run_all.sh per run folder ($RUN/.lock); every stage runs in its
# own process group and is stopped with run_all.sh (Ctrl-C, kill, or a failure).

# The whole script is one { ... } block: bash parses it completely before running any of it, so editing this
# file during a long run cannot change what the running instance does.
{
set -euo pipefail
cd "$(dirname "$0")"

FROM="" ; ONLY="" ; LIST=0 ; DOWNLOAD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --list) LIST=1; shift ;;
    --download) DOWNLOAD=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (use --from STAGE, --only STAGE, --list, --download)" >&2; exit 2 ;;
  esac
done

PY=${PY:-python}
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
if [ -z "${PRESET:-}" ]; then
  if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PRESET=3b; echo "[run_all] CUDA GPU found: preset 3b (Qwen2.5-VL-3B-Instruct). PRESET=toy for the offline toy world."
  else
    PRESET=toy; echo "[run_all] no CUDA GPU: preset toy (tiny Qwen2.5-VL built locally, offline, on the CPU)."
  fi
fi

# ------------------------------------------------------------------------------------------------------------
# The preset: presets/$PRESET.env. Every line there is `: "${VAR:=value}"`, so the environment always wins.
# ------------------------------------------------------------------------------------------------------------
if [ ! -f "presets/$PRESET.env" ]; then
  echo "run_all.sh: PRESET=$PRESET unknown: no presets/$PRESET.env (presets: $(cd presets && ls *.env | sed 's/\.env$//' | tr '\n' ' '))" >&2
  exit 2
fi
. "presets/$PRESET.env"
: "${RUN:=runs/$PRESET}"
: "${PLAN_DEVICE:=gpu}"               # which throughput constants plan.py uses: gpu (README H100) or cpu (toy)
: "${BENCH_DIR:=}"                    # offline mirror (mirror.py): when set, every data set and the model come from it
: "${IGNORE_DISK_PLAN:=0}"            # 1: run even when the plan says the run folder's disk is too small
: "${KEEP_RESUME_STATE:=1}"           # 0: delete a training stage's resume/ state once the stage is done
: "${PLACEHOLDER_SOURCES:=0}" ; : "${GRADIENT_CHECKPOINTING:=0}" ; : "${ROLLOUT_TARGET_ROWS:=0}"
: "${SFT_SAVE_AT:=}" ; : "${RFT_SAVE_AT:=}"   # extra snapshot steps (comma list; sft.py/rft.py --save_at): the
                                                # early points of the accuracy/forgetting curves
if (( RFT_EARLY_STEP < 1 || RFT_EARLY_STEP >= RFT_STEPS )); then   # rea_self_generated samples checkpoint-$RFT_EARLY_STEP
  echo "run_all.sh: RFT_EARLY_STEP ($RFT_EARLY_STEP) must be between 1 and RFT_STEPS - 1 ($((RFT_STEPS - 1)))" >&2; exit 2
fi
: "${RFT_MICRO_BATCH:=2}"          # rft.py --micro_batch_size: sequences per forward/backward (2: measured on the H100)
: "${MIN_ANSWER_IMAGE_MI:=0}"      # rft.py's step-0 check, MI(answer; image) in nats: always logged; a threshold
                                   # is calibrated on the toy world only (toy.env: 0.1), so other presets report it
: "${KL_PUZZLES:=16}" ; : "${KL_SAMPLES:=4}"   # RL's Razor's KL on the new task: test puzzles x samples per checkpoint
: "${JOBS:=1}"   # independent runs of one stage at once (sources, sft_sources, eval), each with
                # $CPU_THREADS / JOBS torch threads. 1: in order (one GPU holds one run). The toy preset: 2.
: "${CPU_THREADS:=$(nproc 2>/dev/null || echo 1)}"
if (( JOBS < 1 )); then echo "run_all.sh: JOBS ($JOBS) must be at least 1" >&2; exit 2; fi
: "${BASE_GRAD_ACCUM:=1}"   # toy base stage: BASE_BATCH rows per step in this many length-sorted micro-batches
if [ "${BUILD_TOY_BASE:-0}" = 1 ] && (( BASE_GRAD_ACCUM < 1 || BASE_BATCH % BASE_GRAD_ACCUM != 0 )); then
  echo "run_all.sh: BASE_BATCH ($BASE_BATCH) must be a multiple of BASE_GRAD_ACCUM ($BASE_GRAD_ACCUM)" >&2; exit 2
fi
# SEEDS=N repeats the training stages (and their evaluation) with seeds 1..N-1 in $RUN/seed<k>/, sharing the base
# model, the data and the benchmarks of $RUN (SHARED_RUN); the report shows mean and spread over the seeds.
: "${SEEDS:=1}" ; : "${SEED:=0}" ; : "${SHARED_RUN:=$RUN}"
DATA=$SHARED_RUN/data
SOURCES=$RUN/data/sources   # the sampled sources come from this seed's RFT run

# ------------------------------------------------------------------------------------------------------------
# The offline mirror (mirror.py). --download writes it; BENCH_DIR=... makes the run read only from it.
# ------------------------------------------------------------------------------------------------------------
if [ "$DOWNLOAD" = 1 ]; then
  [ -n "$BENCH_DIR" ] || { echo "run_all.sh --download: set BENCH_DIR=/folder/for/the/mirror" >&2; exit 2; }
  exec $PY mirror.py --download "$BENCH_DIR" --model "$MODEL" --benchmarks "$BENCHMARKS" --source "$SOURCE" \
    --coco_images $(( N_TRAIN + N_TEST )) --preset "$PRESET"
fi
BENCH_DATA=""   # eval.py --data entries pointing every benchmark at the mirror: the one place that maps BENCH_DIR
if [ -n "$BENCH_DIR" ]; then
  if [ "${FAKE_MIRROR:-0}" = 1 ] && [ ! -f "$BENCH_DIR/mirror.json" ]; then
    $PY mirror.py --fake "$BENCH_DIR" --model "$MODEL" --benchmarks "$BENCHMARKS" --coco_images $(( N_TRAIN + N_TEST + 4 ))
  fi
  if ! $PY mirror.py --check "$BENCH_DIR" --model "$MODEL" --benchmarks "$BENCHMARKS" --source "$SOURCE" \
      --preset "$PRESET"; then
    [ "$LIST" = 1 ] || exit 2   # --list still prints the plan
  fi
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1   # nothing else may be read
  [ "$BUILD_TOY_BASE" = 1 ] || [ ! -f "$BENCH_DIR/model/config.json" ] || MODEL=$BENCH_DIR/model
  [ "$SOURCE" = procedural ] || SOURCE=$BENCH_DIR/coco
  for b in ${BENCHMARKS//,/ }; do BENCH_DATA+=",$b=$BENCH_DIR/$b"; done
fi

# ------------------------------------------------------------------------------------------------------------
# Stage machinery
# ------------------------------------------------------------------------------------------------------------
STAGES=(base data eval_base sft_non_rea rft sources sft_sources eval analyze report)
# What each stage runs with (recorded in $RUN/settings/STAGE.json when it finishes); a stage not listed records
# every variable. COMMON: what every stage depends on.
COMMON_SETTINGS="PRESET MODEL BUILD_TOY_BASE PRECISION OPTIMIZER GRADIENT_CHECKPOINTING MIN_PIXELS MAX_PIXELS BENCH_DIR KEEP_RESUME_STATE SEED"
declare -A STAGE_SETTINGS=(
  [base]="TOY_SIZE PRIOR_PRETRAIN PRIOR_TRAIN PRIOR_TEST TOY_FORMAT_SHARE BASE_PRETRAIN_STEPS BASE_STEPS BASE_BATCH BASE_GRAD_ACCUM LR_BASE_PRETRAIN LR_BASE"
  [data]="SOURCE GRID JIGSAW_IMAGE_SIZE N_TRAIN N_TEST"
  [eval_base]="BENCHMARKS EVAL_BATCH_SIZE EVAL_LIMIT JIGSAW_MAX_COMPLETION_LENGTH MIN_ANSWER_IMAGE_MI RFT_MAX_COMPLETION_LENGTH"
  [sft_non_rea]="SFT_STEPS BATCH_SIZE LR_SFT SAVE_STEPS SFT_SAVE_AT"
  [rft]="RFT_STEPS RFT_BATCH GROUP_SIZE LR_RFT BETA TEMPERATURE RFT_MAX_COMPLETION_LENGTH RFT_SAVE_STEPS RFT_SAVE_AT RFT_EARLY_STEP RFT_MICRO_BATCH MIN_ANSWER_IMAGE_MI"
  [sources]="ROLLOUT_K ROLLOUT_LIMIT ROLLOUT_BATCH_SIZE ROLLOUT_TARGET_ROWS TEMPERATURE RFT_MAX_COMPLETION_LENGTH RFT_EARLY_STEP PLACEHOLDER_SOURCES JOBS CPU_THREADS"
  [sft_sources]="SFT_STEPS BATCH_SIZE LR_SFT SAVE_STEPS SFT_SAVE_AT JOBS CPU_THREADS"
  [eval]="BENCHMARKS EVAL_BATCH_SIZE EVAL_LIMIT CHECKPOINT_EVAL_LIMIT JIGSAW_MAX_COMPLETION_LENGTH JOBS CPU_THREADS"
  [analyze]="ANALYZE_N ANALYZE_PROJ_DIM KL_PUZZLES KL_SAMPLES RFT_MAX_COMPLETION_LENGTH EVAL_LIMIT"
  [report]="")
ALL_SETTINGS="$COMMON_SETTINGS $(printf '%s ' "${STAGE_SETTINGS[@]}") PLAN_DEVICE"
# Folders a training stage writes (resume/ deleted there when KEEP_RESUME_STATE=0).
declare -A STAGE_RUN_DIRS=([base]="base_pretrain base" [sft_non_rea]="sft_non_rea" [rft]="rft"
  [sft_sources]="sft_rea_external sft_rea_grpo_rollout sft_rea_self_generated")

selected() {
  local stage=$1
  # a seed run (SEEDS > 1) repeats only the stages that depend on the seed
  if [ -n "${SEED_STAGES:-}" ] && [[ " $SEED_STAGES " != *" $stage "* ]]; then return 1; fi
  if [ -n "$ONLY" ]; then [ "$stage" = "$ONLY" ]; return; fi
  if [ -n "$FROM" ]; then
    local on=0; for s in "${STAGES[@]}"; do [ "$s" = "$FROM" ] && on=1; [ "$s" = "$stage" ] && { [ $on = 1 ]; return; }; done
  fi
  return 0
}
for s in $ONLY $FROM; do
  [[ " ${STAGES[*]} " == *" $s "* ]] || { echo "run_all.sh: no stage '$s'; stages: ${STAGES[*]}" >&2; exit 2; }
done
stage_state() {
  if ! selected "$1"; then echo "not selected"
  elif [ -f "$RUN/.done/$1" ] && [ -z "$ONLY" ] && [ -z "$FROM" ]; then echo "done, skipped"
  else echo "to run"; fi
}
settings_json() {  # settings_json VAR...: {"VAR": "value", ...} of the current shell values
  local v; for v in "$@"; do printf '%s\t%s\n' "$v" "${!v:-}"; done | $PY -c "
import json, sys
print(json.dumps(dict(line.rstrip('\\n').split('\\t', 1) for line in sys.stdin if '\\t' in line), indent=2))"
}

# The base model: a hub id (or the mirror's copy) for real presets; for the toy world, made by the base stage.
if [ "$BUILD_TOY_BASE" = 1 ]; then MODEL=$SHARED_RUN/base/final; fi

# The plan, before anything runs (plan.py: the formulas and the constants with their sources).
PLAN_SETTINGS=$(mktemp "${TMPDIR:-/tmp}/run_all_plan.XXXXXX")
settings_json $ALL_SETTINGS > "$PLAN_SETTINGS"
STATES=""; for s in "${STAGES[@]}"; do STATES+="$s=$(stage_state "$s");"; done
PLAN_ARGS=(--settings "$PLAN_SETTINGS" --run "$RUN" --stages "${STAGES[*]}" --states "$STATES")
echo "[run_all] preset $PRESET, run folder $RUN"
if [ "$LIST" = 1 ]; then $PY plan.py "${PLAN_ARGS[@]}"; rc=$?; rm -f "$PLAN_SETTINGS"; exit $rc; fi

mkdir -p "$RUN/logs" "$RUN/.done" "$RUN/settings"
# One run_all.sh per run folder: the lock holds the PID of the run_all.sh that owns $RUN.
LOCK=$RUN/.lock
take_lock() {
  if ( set -o noclobber; echo "$$" > "$LOCK" ) 2>/dev/null; then return 0; fi
  local other; other=$(cat "$LOCK" 2>/dev/null || true)
  if [ -n "$other" ] && kill -0 "$other" 2>/dev/null && { [ ! -r "/proc/$other/cmdline" ] || tr '\0' ' ' < "/proc/$other/cmdline" | grep -q run_all; }; then
    echo "run_all.sh: $RUN is in use by another run_all.sh (PID $other; lock file $LOCK). Wait for it to finish" \
      "or stop it (kill $other); a second run on the same folder would mix two runs." >&2
    exit 2
  fi
  echo "[run_all] removing stale lock $LOCK (PID ${other:-?} is not running)"
  rm -f "$LOCK"
  ( set -o noclobber; echo "$$" > "$LOCK" ) 2>/dev/null || { echo "run_all.sh: could not take $LOCK" >&2; exit 2; }
}
take_lock
STAGE_PID=""
cleanup() {  # on any exit: stop the running stage's whole process group, release the lock
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$STAGE_PID" ] && kill -0 -- "-$STAGE_PID" 2>/dev/null; then
    echo "[run_all] stopping the running stage (process group $STAGE_PID)" >&2
    kill -TERM -- "-$STAGE_PID" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- "-$STAGE_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$STAGE_PID" 2>/dev/null || true
  fi
  [ "$(cat "$LOCK" 2>/dev/null)" = "$$" ] && rm -f "$LOCK"
  rm -f "$PLAN_SETTINGS"
  exit $rc
}
trap cleanup EXIT
trap 'echo "[run_all] interrupted" >&2; exit 130' INT
trap 'echo "[run_all] terminated" >&2; exit 143' TERM

if ! $PY plan.py "${PLAN_ARGS[@]}" $([ "$IGNORE_DISK_PLAN" = 1 ] || echo --check_disk); then
  exit 2
fi
echo "[run_all] settings are recorded per stage in $RUN/settings/STAGE.json"

FORCE=0; [ -n "$ONLY$FROM" ] && FORCE=1
fresh() {  # fresh DIR...: a stage asked for again with --from/--only starts over instead of resuming
  if [ "$FORCE" = 1 ]; then rm -rf "$@"; fi
}
write_stage_settings() {  # write_stage_settings NAME SECONDS: $RUN/settings/NAME.json, what the stage ran with
  local name=$1 vars
  if [ -n "${STAGE_SETTINGS[$name]+set}" ]; then vars="$COMMON_SETTINGS ${STAGE_SETTINGS[$name]}"; else vars=$ALL_SETTINGS; fi
  settings_json $vars | $PY -c "
import json, subprocess, sys, time
settings = json.load(sys.stdin)
try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], capture_output=True, text=True).stdout.strip())
except OSError:
    commit, dirty = '', False
record = {'stage': sys.argv[1], 'preset': sys.argv[2], 'seconds': int(sys.argv[3]),
          'finished_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'git_commit': commit, 'git_dirty': dirty,
          'settings': settings}
tmp = sys.argv[4] + '.tmp'
open(tmp, 'w').write(json.dumps(record, indent=2) + '\n')
__import__('os').replace(tmp, sys.argv[4])" "$name" "$PRESET" "$2" "$RUN/settings/$name.json"
}
merge_settings() {  # $RUN/settings.json: one value per variable; a value that differs between stages lists each
  $PY -c "
import json, sys
from pathlib import Path
merged = {}
for stage in sys.argv[2:]:
    path = Path(sys.argv[1]) / 'settings' / f'{stage}.json'
    if path.is_file():
        for key, value in json.loads(path.read_text())['settings'].items():
            merged.setdefault(key, {}).setdefault(value, []).append(stage)
flat = {k: next(iter(v)) if len(v) == 1 else ' / '.join(f'{val} ({\", \".join(st)})' for val, st in v.items())
        for k, v in merged.items()}
tmp = Path(sys.argv[1]) / 'settings.json.tmp'
tmp.write_text(json.dumps(flat, indent=2) + '\n')
tmp.replace(Path(sys.argv[1]) / 'settings.json')" "$RUN" "${STAGES[@]}"
}
run_stage() {  # run_stage NAME FUNCTION: skip when done, log to $RUN/logs/NAME.log, time it
  local name=$1 fn=$2
  selected "$name" || return 0
  if [ -f "$RUN/.done/$name" ] && [ -z "$ONLY" ] && [ -z "$FROM" ]; then echo "[run_all] $name: done, skipped"; return 0; fi
  rm -f "$RUN/.done/$name" "$RUN/settings/$name.json"
  echo "[run_all] $name: running (log: $RUN/logs/$name.log)"
  local start=$SECONDS rc
  # The stage runs as a background job of a job-control shell (set -m), hence in its own process group, which
  # cleanup() stops as a whole. `wait` returns early when a signal arrives, so Ctrl-C/kill are handled at once.
  # Not `if ! ( ... )` nor `( ... ) || ...`: in a condition or an && / || list bash ignores set -e, even inside
  # the subshell, and a stage would go on past a failed command.
  set -m
  ( set -euo pipefail; STAGE_NAME=$name; $fn ) > "$RUN/logs/$name.log" 2>&1 < /dev/null &
  STAGE_PID=$!
  set +m
  set +e
  wait "$STAGE_PID"
  rc=$?
  set -e
  STAGE_PID=""
  if [ $rc -ne 0 ]; then
    echo "[run_all] $name FAILED; last lines of $RUN/logs/$name.log:" >&2
    tail -n 25 "$RUN/logs/$name.log" >&2
    exit 1
  fi
  if [ "$KEEP_RESUME_STATE" != 1 ]; then
    for d in ${STAGE_RUN_DIRS[$name]:-}; do rm -rf "$RUN/$d/resume"; done
  fi
  echo $(( SECONDS - start )) > "$RUN/.done/$name.seconds"
  write_stage_settings "$name" $(( SECONDS - start ))
  touch "$RUN/.done/$name"
  merge_settings
  echo "[run_all] $name: done in $(( SECONDS - start )) s"
}

# Independent runs inside a stage: `job LABEL FUNCTION ARGS...` starts one (at most $JOBS at once), `jobs_done`
# waits for them all and fails the stage if one failed. With JOBS=1 a job runs at once, in the stage's log. With
# more, each job logs to $RUN/logs/STAGE.LABEL.log and gets CPU_THREADS/JOBS threads: two 1-thread runs on 2
# cores did 1.5x the work of one 2-thread run after the other (toy SFT, measured). The jobs stay in the stage's
# process group, so stopping run_all.sh stops them too.
JOB_LOGS=()
job_label() { local name=${1##*/}; name=${name%.log}; echo "${name#"$STAGE_NAME".}"; }   # logs/STAGE.LABEL.log -> LABEL
job() {
  local label=$1; shift
  if (( JOBS <= 1 )); then "$@"; return; fi
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n 2>/dev/null || true; done
  local log=$RUN/logs/$STAGE_NAME.$label.log earlier
  for earlier in "${JOB_LOGS[@]}"; do
    if [ -f "$earlier.failed" ]; then   # stop early: wait for the running jobs, show what failed
      echo "[run_all] $STAGE_NAME: $(job_label "$earlier") failed; not starting $label" >&2
      jobs_done || true
      return 1
    fi
  done
  rm -f "$log.failed"
  JOB_LOGS+=("$log")
  echo "[run_all] $STAGE_NAME: $label started (log: $log)"
  # The job itself runs as a background child (not in an || list, where bash would ignore its set -e), and the
  # wrapper records a failure for jobs_done.
  (
    export OMP_NUM_THREADS=$(( CPU_THREADS / JOBS > 0 ? CPU_THREADS / JOBS : 1 ))
    ( set -euo pipefail; "$@" ) > "$log" 2>&1 < /dev/null &
    wait $! || echo "exit status $?" > "$log.failed"
  ) &
}
jobs_done() {
  wait
  local log failed=0
  for log in "${JOB_LOGS[@]}"; do
    if [ -f "$log.failed" ]; then
      failed=1
      echo "[run_all] $STAGE_NAME: $(job_label "$log") FAILED ($(cat "$log.failed")); last lines of $log:" >&2
      tail -n 25 "$log" >&2
      rm -f "$log.failed"
    else
      echo "[run_all] $STAGE_NAME: $(job_label "$log") done"
    fi
  done
  JOB_LOGS=()
  return $failed
}

PIX=(--min_pixels "$MIN_PIXELS" --max_pixels "$MAX_PIXELS")
SFT_COMMON=(--precision "$PRECISION" --optimizer "$OPTIMIZER" --batch_size "$BATCH_SIZE" "${PIX[@]}" --resume)
[ "${GRADIENT_CHECKPOINTING:-0}" = 1 ] && SFT_COMMON+=(--gradient_checkpointing)
# rft.py checkpoints by default (one GPU); the preset's choice holds for both stages (the toy: off, 1M parameters)
RFT_GC=(--no_gradient_checkpointing) ; [ "${GRADIENT_CHECKPOINTING:-0}" = 1 ] && RFT_GC=(--gradient_checkpointing)
# eval.py: the jigsaw task at the training stages' pixel budget (PIX) and JIGSAW_MAX_COMPLETION_LENGTH; every
# prior-knowledge benchmark keeps its own lmms-eval settings (benchmarks/<name>.py). Local copies: --data.
EVAL_DATA="jigsaw=$DATA/jigsaw$BENCH_DATA"
[ "$BUILD_TOY_BASE" = 1 ] && EVAL_DATA+=",toy_prior=$SHARED_RUN/toy/prior"
EVAL_COMMON=(--batch_size "$EVAL_BATCH_SIZE" --limit "$EVAL_LIMIT" --data "$EVAL_DATA" "${PIX[@]}")
# name | model folder | jigsaw prompt style | training steps (for the report)
MODELS=(
  "base|$MODEL|thinking"
  "sft_non_rea|$RUN/sft_non_rea/final|answer_only"
  "rft|$RUN/rft/final|thinking"
  "sft_rea_external|$RUN/sft_rea_external/final|thinking"
  "sft_rea_grpo_rollout|$RUN/sft_rea_grpo_rollout/final|thinking"
  "sft_rea_self_generated|$RUN/sft_rea_self_generated/final|thinking"
)

# ------------------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------------------
stage_base() {
  [ "$BUILD_TOY_BASE" = 1 ] || { echo "base model: $MODEL (from the hub)"; return 0; }
  fresh "$RUN/toy" "$RUN/base_pretrain" "$RUN/base"
  $PY toy.py --output_dir "$RUN/toy" --size "$TOY_SIZE" --prior_pretrain "$PRIOR_PRETRAIN" --prior_train "$PRIOR_TRAIN" \
    --prior_test "$PRIOR_TEST" --format_share "$TOY_FORMAT_SHARE"
  # Two SFT runs, like a real MLLM: perception first (direct questions), then instruction tuning (think format,
  # answer grids, jigsaw-format rows). From random init on the mix alone, the model learns the text and reads
  # the image late (toy.build_prior_dataset says what we measured).
  base_sft "$RUN/toy/init" pretrain "$RUN/base_pretrain" "$BASE_PRETRAIN_STEPS" "$LR_BASE_PRETRAIN"
  base_sft "$RUN/base_pretrain/final" train "$RUN/base" "$BASE_STEPS" "$LR_BASE"
}
base_sft() {  # base_sft FROM SPLIT OUT STEPS LR: one sft.py run on a split of the toy prior-knowledge data
  $PY sft.py --model "$1" --data "$RUN/toy/prior" --split "$2" --prompt_column prompt --completion_column completion \
    --output_dir "$3" --max_steps "$4" --lr "$5" --warmup_ratio 0.05 --min_lr_ratio 0.1 --save_steps "$4" \
    "${SFT_COMMON[@]}" --batch_size $(( BASE_BATCH / BASE_GRAD_ACCUM )) --grad_accum "$BASE_GRAD_ACCUM" --sort_by_length
}
stage_data() {
  $PY jigsaw.py --source "$SOURCE" --grid "$GRID" --train "$N_TRAIN" --test "$N_TEST" --output_dir "$DATA/jigsaw" \
    --image_size "$JIGSAW_IMAGE_SIZE" --max_side "$JIGSAW_IMAGE_SIZE"
}
eval_model() {  # eval_model NAME FOLDER PROMPT_STYLE [EXTRA EVAL.PY FLAGS]
  $PY eval.py --model "$2" --benchmarks "jigsaw,$BENCHMARKS" --prompt_style "$3" "${EVAL_COMMON[@]}" \
    --max_completion_length "$JIGSAW_MAX_COMPLETION_LENGTH" --output_dir "$RUN/eval/$1" "${@:4}"
}
think_check() {  # think_check NAME: the toy world only. Is NAME's think text true of the pieces, does its answer
  # follow it (toy.py --think_check, from the completions eval.py saved; writes $RUN/eval/NAME/think_check.json).
  # Not in a seed run (SEEDS > 1): the report of the seed-0 folder shows its own checks only.
  [ "$BUILD_TOY_BASE" = 1 ] && [ "$RUN" = "$SHARED_RUN" ] || return 0
  $PY toy.py --think_check "$RUN/eval/$1/results.json" --jigsaw_data "$DATA/jigsaw"
}
stage_eval_base() {
  eval_model base "$MODEL" thinking
  think_check base
  # Does the base model's jigsaw answer depend on the image at all? GRPO can only reinforce what varies with
  # it (rft.py's step-0 check: greedy exact/hit/format and MI(answer; image); stops below MIN_ANSWER_IMAGE_MI).
  $PY rft.py --model "$MODEL" --data "$DATA/jigsaw" --output_dir "$RUN/base_check" --overwrite --max_steps 0 --beta 0 \
    --max_completion_length "$RFT_MAX_COMPLETION_LENGTH" --eval_batch_size "$EVAL_BATCH_SIZE" \
    --min_answer_image_mi "$MIN_ANSWER_IMAGE_MI" --precision "$PRECISION" "${PIX[@]}"
}
stage_sft_non_rea() {
  fresh "$RUN/sft_non_rea"
  $PY sft.py --model "$MODEL" --data "$DATA/jigsaw" --prompt_column prompt_no_think --completion_column target_non_rea \
    --output_dir "$RUN/sft_non_rea" --max_steps "$SFT_STEPS" --lr "$LR_SFT" --save_steps "$SAVE_STEPS" --save_at "$SFT_SAVE_AT" "${SFT_COMMON[@]}" \
    --seed "$SEED"
}
stage_rft() {
  fresh "$RUN/rft"
  $PY rft.py --model "$MODEL" --data "$DATA/jigsaw" --output_dir "$RUN/rft" --max_steps "$RFT_STEPS" \
    --batch_size "$RFT_BATCH" --num_generations "$GROUP_SIZE" --lr "$LR_RFT" --beta "$BETA" --temperature "$TEMPERATURE" \
    --max_completion_length "$RFT_MAX_COMPLETION_LENGTH" --save_steps "$RFT_SAVE_STEPS" --min_answer_image_mi "$MIN_ANSWER_IMAGE_MI" \
    --save_at "$RFT_EARLY_STEP${RFT_SAVE_AT:+,$RFT_SAVE_AT}" --micro_batch_size "$RFT_MICRO_BATCH" "${RFT_GC[@]}" --save_total_limit 0 --precision "$PRECISION" --optimizer "$OPTIMIZER" "${PIX[@]}" --resume --seed "$SEED"
}
sampled_source() {  # sampled_source NAME CHECKPOINT K: a source made of the checkpoint's own samples
  if $PY rollout_sft.py --source "$1" --data "$DATA/jigsaw" --model "$2" --num_generations "$3" --temperature "$TEMPERATURE" \
      --max_completion_length "$RFT_MAX_COMPLETION_LENGTH" --max_rows "$ROLLOUT_TARGET_ROWS" --batch_size "$ROLLOUT_BATCH_SIZE" --limit "$ROLLOUT_LIMIT" "${PIX[@]}" \
      --output_dir "$SOURCES/$1" --seed "$SEED"; then
    return 0
  fi
  # The smoke preset's models are trained for a few steps and never solve a puzzle, so these sources would
  # be empty; to exercise the later stages it copies rea_external in their place and says so. Never set for
  # a real run: an empty source there is an error to fix (train longer, sample more).
  [ "${PLACEHOLDER_SOURCES:-0}" = 1 ] || return 1
  echo "PLACEHOLDER: $1 replaced by a copy of rea_external (PLACEHOLDER_SOURCES=1: smoke and rehearsal presets only)"
  rm -rf "$SOURCES/$1" && cp -r "$SOURCES/rea_external" "$SOURCES/$1"
  echo '{"placeholder": "copy of rea_external (a few-step run: no correct rollouts)"}' > "$SOURCES/$1/stats.json"
}
stage_sources() {
  local src=$SOURCES
  fresh "$src"
  job non_rea $PY rollout_sft.py --source non_rea --data "$DATA/jigsaw" --output_dir "$src/non_rea"
  job rea_external $PY rollout_sft.py --source rea_external --data "$DATA/jigsaw" --output_dir "$src/rea_external"
  jobs_done   # (PLACEHOLDER_SOURCES copies rea_external)
  job rea_grpo_rollout sampled_source rea_grpo_rollout "$RUN/rft/final" "$ROLLOUT_K"
  # The early checkpoint's own reasoning with the right answer attached (the paper: accuracy < 5%).
  job rea_self_generated sampled_source rea_self_generated "$RUN/rft/checkpoint-$RFT_EARLY_STEP" "$ROLLOUT_K"
  jobs_done
}
stage_sft_sources() {
  fresh "$RUN/sft_rea_external" "$RUN/sft_rea_grpo_rollout" "$RUN/sft_rea_self_generated"
  for s in rea_external rea_grpo_rollout rea_self_generated; do   # rea_external first: its rows are the longest
    job "sft_$s" $PY sft.py --model "$MODEL" --data "$SOURCES/$s" --prompt_column prompt --completion_column completion \
      --output_dir "$RUN/sft_$s" --max_steps "$SFT_STEPS" --lr "$LR_SFT" --save_steps "$SAVE_STEPS" --save_at "$SFT_SAVE_AT" "${SFT_COMMON[@]}" \
      --seed "$SEED"
  done
  jobs_done
}
stage_eval() {
  for entry in "${MODELS[@]}"; do
    IFS='|' read -r name folder style <<< "$entry"
    [ "$name" = base ] && [ "$SEED" != 0 ] && continue   # a seed run shares the base model's evaluation
    # Forgetting is compared at equal skill: every model-only snapshot a training run saved (checkpoint-N/) is
    # scored too (eval.py --checkpoints, one process per run), on the CHECKPOINT_EVAL_LIMIT subset, so report.py
    # can read each method's prior knowledge at the jigsaw accuracies all methods reached (RL's Razor's frontier).
    local along=()
    [ "$name" = base ] || along=(--checkpoints --checkpoint_limit "$CHECKPOINT_EVAL_LIMIT")
    job "$name" eval_model "$name" "$folder" "$style" "${along[@]}"
  done
  jobs_done
  for name in rft sft_rea_external sft_rea_grpo_rollout sft_rea_self_generated; do think_check "$name"; done
}
stage_analyze() {
  local src=$SOURCES probes=(--probes "$SHARED_RUN/toy/prior") probe_answer=reference
  if [ "$BUILD_TOY_BASE" != 1 ]; then
    # Probes: questions of each prior-knowledge benchmark (drawn from the seeded EVAL_LIMIT subset eval.py
    # scores), answered by the base model itself (greedy), since references such as RefCOCO boxes are not in
    # the model's own words. PROBES=folder overrides them with a probe set of your own.
    if [ -n "${PROBES:-}" ]; then probes=(--probes "$PROBES"); else
      probes=(--probes "benchmarks:$BENCHMARKS" --probe_limit "$EVAL_LIMIT" --probe_data "$EVAL_DATA"); fi
    probe_answer=greedy
  fi
  $PY analyze.py --model "$MODEL" --output_dir "$RUN/analysis" --n_train "$ANALYZE_N" --n_probe "$ANALYZE_N" "${PIX[@]}" \
    --proj_dim "$ANALYZE_PROJ_DIM" --probe_answer "$probe_answer" \
    --sources "non_rea=$src/non_rea,rea_external=$src/rea_external,rea_grpo_rollout=$src/rea_grpo_rollout,rea_self_generated=$src/rea_self_generated" \
    "${probes[@]}" \
    --kl_data "$DATA/jigsaw" --kl_puzzles "$KL_PUZZLES" --kl_samples "$KL_SAMPLES" --kl_max_completion_length "$RFT_MAX_COMPLETION_LENGTH" \
    --runs "sft_non_rea=$RUN/sft_non_rea:answer_only,rft=$RUN/rft,sft_rea_external=$RUN/sft_rea_external,sft_rea_grpo_rollout=$RUN/sft_rea_grpo_rollout,sft_rea_self_generated=$RUN/sft_rea_self_generated"
}
stage_report() {  # report.py reads every $RUN/eval/<method>/results.json itself (tables, compare.png)
  $PY report.py --run_dir "$RUN" --preset "$PRESET"
}

for s in "${STAGES[@]}"; do run_stage "$s" "stage_$s"; done
if (( SEEDS > 1 )) && [ "$SEED" = 0 ]; then
  # The other seeds: the same training stages and their evaluation, each in its own folder (its own lock,
  # settings and resume rule), then the report again, now with the seeds' spread.
  for (( k = 1; k < SEEDS; k++ )); do
    echo "[run_all] seed $k of $(( SEEDS - 1 )) more: $RUN/seed$k"
    SEED=$k SHARED_RUN=$SHARED_RUN RUN=$RUN/seed$k MODEL=$MODEL SEED_STAGES="sft_non_rea rft sources sft_sources eval" \
      IGNORE_DISK_PLAN=$IGNORE_DISK_PLAN bash "$0"
  done
  $PY report.py --run_dir "$RUN" --preset "$PRESET" > "$RUN/logs/report_seeds.log" 2>&1 || { cat "$RUN/logs/report_seeds.log" >&2; exit 1; }
fi
if [ "$SEED" = 0 ]; then echo "[run_all] finished: $RUN/report.md"
else echo "[run_all] seed $SEED finished: $RUN (its numbers are in the seed-0 folder's report.md)"; fi
exit 0
}
