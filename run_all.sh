#!/usr/bin/env bash
# The whole paper, end to end: base model -> jigsaw data -> base evaluation -> RFT pilot (GPU presets) ->
# SFT-Non-Rea -> RFT (GRPO) -> the SFT data sources -> SFT on each source -> evaluation of every model and
# checkpoint -> learning dynamics -> report.md.
#
#   bash run_all.sh                    # 3b where its plan fits the GPU, 3b_40gb on a 40 GB card, else toy
#   PRESET=7b bash run_all.sh          # Qwen2.5-VL-7B-Instruct (presets/7b.env says what it needs)
#   PRESET=smoke bash run_all.sh       # a few steps of every stage (what the tests run)
#   PRESET=rehearsal bash run_all.sh   # the 3b preset's stages and flags on a CPU, against a local fake mirror
#   bash run_all.sh --list             # the plan: per stage, GPU-hours (CPU minutes) and disk; nothing runs
#   bash run_all.sh --from rft         # redo a stage and all later ones from scratch
#   bash run_all.sh --only report      # one stage
#   bash run_all.sh --until rft        # the stages up to rft (finished ones skipped, an interrupted one resumed)
#   SEEDS=3 bash run_all.sh            # the training stages with three seeds; the report shows the spread
#   PRESET=3b BENCH_DIR=/data/mirror bash run_all.sh --download   # login node: fetch what the preset reads
#   PRESET=3b BENCH_DIR=/data/mirror bash run_all.sh              # compute node: read only from the mirror
#   RFT_STEPS=500 LR_RFT=2e-6 bash run_all.sh   # any preset variable can be set from the environment
#
# Presets are files, presets/<PRESET>.env: every variable a stage reads, one per line with the reason for its
# value (experiment.py lists them; a preset that misses one, or an environment variable that looks like a typo
# of one, stops the run before anything starts). The methods and their data sources come from experiment.py.
# A finished stage is skipped on rerun; an interrupted training stage resumes from its last checkpoint. Each stage
# logs to $RUN/logs/STAGE.log and records its settings in $RUN/settings/STAGE.json.

# The whole script is one { ... } block: bash parses it completely before running any of it, so editing this
# file during a long run cannot change what the running instance does.
{
set -euo pipefail
cd "$(dirname "$0")"

FROM="" ; ONLY="" ; UNTIL="" ; LIST=0 ; DOWNLOAD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --until) UNTIL="$2"; shift 2 ;;
    --list) LIST=1; shift ;;
    --download) DOWNLOAD=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (use --from STAGE, --only STAGE, --until STAGE, --list, --download)" >&2; exit 2 ;;
  esac
done

# Run-level variables (not part of a preset): where the run goes and how it is run.
PY=${PY:-python}
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
if [ -z "${PRESET:-}" ]; then
  # 3b where its memory plan fits the GPU, 3b_40gb on a 40 GB card, else toy (plan.py gpu --choose says why)
  PRESET=$($PY plan.py gpu --choose) || exit 2
fi
if [ ! -f "presets/$PRESET.env" ]; then
  echo "run_all.sh: PRESET=$PRESET unknown: no presets/$PRESET.env (presets: $(cd presets && ls *.env | sed 's/\.env$//' | tr '\n' ' '))" >&2
  exit 2
fi
: "${RUN:=runs/$PRESET}"              # the run folder
: "${SEEDS:=1}" ; : "${SEED:=0}"      # SEEDS=N: the training stages again with seeds 1..N-1 in $RUN/seed<k>/
: "${SHARED_RUN:=$RUN}"               # a seed run shares the base model, the data and the benchmarks of $SHARED_RUN
: "${BENCH_DIR:=}"                    # offline mirror (mirror.py): when set, every data set and the model come from it
: "${IGNORE_DISK_PLAN:=0}"            # 1: run even when the plan says the run folder's disk is too small
: "${IGNORE_PILOT:=0}"                # 1: go on after a pilot whose accuracy trend does not reach PILOT_MIN_GAIN
: "${CPU_THREADS:=$(nproc 2>/dev/null || echo 1)}"   # threads shared by a stage's JOBS

# The preset, then the experiment's table (experiment.py): the methods, their sources, the variables.
. "presets/$PRESET.env"
eval "$($PY experiment.py shell)"
DATA=$SHARED_RUN/data
SOURCES=$RUN/data/sources   # the sampled sources come from this seed's RFT run
if [ "$BUILD_TOY_BASE" = 1 ]; then MODEL=$SHARED_RUN/base/final; fi   # the toy world makes its base model

# ============================================================================================================
# The experiment: one function per stage, in the order they run
# ============================================================================================================
PIX=(--min_pixels "$MIN_PIXELS" --max_pixels "$MAX_PIXELS")
# sft.py and rft.py run under the preset's LAUNCH (e.g. accelerate launch with FSDP over several GPUs); the other
# stages decode with one bf16 copy of the model on one GPU and stay plain $PY processes.
TRAIN=${LAUNCH:-$PY}
SFT_COMMON=(--precision "$PRECISION" --optimizer "$OPTIMIZER" --batch_size "$BATCH_SIZE" "${PIX[@]}" --resume)
[ "$GRADIENT_CHECKPOINTING" = 1 ] && SFT_COMMON+=(--gradient_checkpointing)
# rft.py checkpoints by default (one GPU); the preset's choice holds for both stages (the toy: off, 1M parameters)
RFT_GC=(--no_gradient_checkpointing) ; [ "$GRADIENT_CHECKPOINTING" = 1 ] && RFT_GC=(--gradient_checkpointing)
eval_data() {  # eval.py --data: local copies (the jigsaw data, the toy benchmark, the mirror's benchmarks)
  echo "jigsaw=$DATA/jigsaw$BENCH_DATA$([ "$BUILD_TOY_BASE" != 1 ] || echo ",toy_prior=$SHARED_RUN/toy/prior")"
}
method_folder() {  # method_folder NAME: the model a method's evaluation reads
  if [ "$1" = base ]; then echo "$MODEL"; else echo "$RUN/$1/final"; fi
}
sampled_checkpoint() {  # sampled_checkpoint FROM: the model a sampled source comes from (experiment.SAMPLED_FROM)
  case "$1" in
    rft_final) echo "$RUN/rft/final" ;;
    rft_early) echo "$RUN/rft/checkpoint-$RFT_EARLY_STEP" ;;   # the paper: an early checkpoint, accuracy < 5%
    base) echo "$MODEL" ;;
    *) echo "run_all.sh: experiment.py names an unknown checkpoint '$1'" >&2; return 2 ;;
  esac
}

sampled_step() {  # sampled_step FROM: the RFT step whose rollouts predict that checkpoint's samples (none: base)
  case "$1" in rft_final) echo "$RFT_STEPS" ;; rft_early) echo "$RFT_EARLY_STEP" ;; *) echo "" ;; esac
}

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
  $TRAIN sft.py --model "$1" --data "$RUN/toy/prior" --split "$2" --prompt_column prompt --completion_column completion \
    --output_dir "$3" --max_steps "$4" --lr "$5" --warmup_ratio 0.05 --min_lr_ratio 0.1 --save_steps "$4" \
    "${SFT_COMMON[@]}" --batch_size $(( BASE_BATCH / BASE_GRAD_ACCUM )) --grad_accum "$BASE_GRAD_ACCUM" --sort_by_length
}

stage_data() {
  $PY jigsaw.py --source "$SOURCE" --grid "$GRID" --train "$N_TRAIN" --test "$N_TEST" --output_dir "$DATA/jigsaw" \
    --image_size "$JIGSAW_IMAGE_SIZE" --max_side "$JIGSAW_IMAGE_SIZE"
}

eval_model() {  # eval_model NAME FOLDER PROMPT_STYLE [EXTRA EVAL.PY FLAGS]. The jigsaw task at the training
  # stages' pixel budget and JIGSAW_MAX_COMPLETION_LENGTH; every prior-knowledge benchmark keeps its own lmms-eval
  # settings (benchmarks/<name>.py)
  $PY eval.py --model "$2" --benchmarks "jigsaw,$BENCHMARKS" --prompt_style "$3" --batch_size "$EVAL_BATCH_SIZE" \
    --limit "$EVAL_LIMIT" --data "$(eval_data)" "${PIX[@]}" --max_completion_length "$JIGSAW_MAX_COMPLETION_LENGTH" \
    --rollout_backend "$ROLLOUT_BACKEND" --output_dir "$RUN/eval/$1" "${@:4}"
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
  # Can GRPO learn from this model at all? Greedy exact/hit/format and MI(answer; image) (base_check.py; stops
  # below MIN_ANSWER_IMAGE_MI, the same check rft.py runs at its step 0).
  $PY base_check.py --model "$MODEL" --data "$DATA/jigsaw" --output_dir "$RUN/base_check" \
    --max_completion_length "$RFT_MAX_COMPLETION_LENGTH" --batch_size "$EVAL_BATCH_SIZE" \
    --min_answer_image_mi "$MIN_ANSWER_IMAGE_MI" --precision "$PRECISION" "${PIX[@]}" --rollout_backend "$ROLLOUT_BACKEND"
}

stage_sft_non_rea() {  # SFT-Non-Rea: the ground-truth answer alone, straight from the jigsaw data
  fresh "$RUN/sft_non_rea"
  $TRAIN sft.py --model "$MODEL" --data "$DATA/jigsaw" --prompt_column prompt_no_think --completion_column target_non_rea \
    --output_dir "$RUN/sft_non_rea" --max_steps "$SFT_STEPS" --lr "$LR_SFT" --save_steps "$SAVE_STEPS" \
    --save_at "$SFT_SAVE_AT" "${SFT_COMMON[@]}" --seed "$SEED"
}

rft_run() {  # rft_run MAX_STEPS EVAL_STEPS: the one RFT run, GRPO with R = R_hit + R_acc + R_fmt. The pilot starts
  # it, the rft stage continues it (--resume with the full --max_steps: with a constant lr the same trajectory)
  $TRAIN rft.py --model "$MODEL" --data "$DATA/jigsaw" --output_dir "$RUN/rft" --max_steps "$1" \
    --batch_size "$RFT_BATCH" --num_generations "$GROUP_SIZE" --lr "$LR_RFT" --beta "$BETA" --temperature "$TEMPERATURE" \
    --max_completion_length "$RFT_MAX_COMPLETION_LENGTH" --save_steps "$RFT_SAVE_STEPS" \
    --min_answer_image_mi "$MIN_ANSWER_IMAGE_MI" --save_at "$RFT_EARLY_STEP${RFT_SAVE_AT:+,$RFT_SAVE_AT}" \
    --eval_steps "$2" --eval_size "$RFT_EVAL_SIZE" --eval_batch_size "$EVAL_BATCH_SIZE" \
    --micro_batch_size "$RFT_MICRO_BATCH" "${RFT_GC[@]}" --save_total_limit 0 --precision "$PRECISION" \
    --optimizer "$OPTIMIZER" "${PIX[@]}" --rollout_backend "$ROLLOUT_BACKEND" --resume --seed "$SEED"
}
stage_pilot() {  # Can RFT learn the task in this budget? Its first PILOT_STEPS steps, evaluated every PILOT_EVAL_STEPS
  # on RFT_EVAL_SIZE test puzzles, then pilot.py: seconds per step, the accuracy trend, the plan recomputed with
  # them; it stops the run (before SFT and the sources spend anything) when the trend does not reach PILOT_MIN_GAIN
  # points over the base by RFT_STEPS, and says what would. IGNORE_PILOT=1 goes on anyway.
  (( PILOT_STEPS > 0 )) || { echo "no pilot (PILOT_STEPS=0)"; return 0; }
  fresh "$RUN/rft"
  rft_run "$PILOT_STEPS" "$PILOT_EVAL_STEPS"
  settings_lines | $PY pilot.py --run "$RUN" --stages "${STAGES[*]}" --summary "$RUN/logs/pilot.summary" \
    $([ "$IGNORE_PILOT" = 1 ] && echo --ignore)
}

stage_rft() {  # RFT: the pilot's run continued to RFT_STEPS. Asked for alone (--from rft, --only rft) it starts over
  # from step 0, the pilot's steps included, without the gate.
  { (( PILOT_STEPS > 0 )) && selected pilot; } || fresh "$RUN/rft"
  rft_run "$RFT_STEPS" "$RFT_EVAL_STEPS"
}

sampled_source() {  # sampled_source NAME CHECKPOINT STEP: a source made of the checkpoint's own samples. Before any
  # decoding, RFT's own rollout accuracy at STEP (its metrics.jsonl) predicts the rows kept: too few stops here.
  local guard=()
  [ -z "$3" ] || guard=(--sampler_metrics "$RUN/rft/metrics.jsonl" --sampler_step "$3" --min_rows "$MIN_SOURCE_ROWS")
  if $PY rollout_sft.py --source "$1" --data "$DATA/jigsaw" --model "$2" --num_generations "$ROLLOUT_K" \
      --temperature "$TEMPERATURE" --max_completion_length "$RFT_MAX_COMPLETION_LENGTH" --max_rows "$ROLLOUT_TARGET_ROWS" \
      --batch_size "$ROLLOUT_BATCH_SIZE" --limit "$ROLLOUT_LIMIT" "${PIX[@]}" --rollout_backend "$ROLLOUT_BACKEND" \
      --output_dir "$SOURCES/$1" --seed "$SEED" "${guard[@]}"; then
    return 0
  fi
  # The smoke preset's models are trained for a few steps and never solve a puzzle, so these sources would
  # be empty; to exercise the later stages it copies the first unsampled source in their place and says so.
  # Never set for a real run: an empty source there is an error to fix (train longer, sample more).
  [ "$PLACEHOLDER_SOURCES" = 1 ] || return 1
  local stand_in=${UNSAMPLED_SOURCES[-1]}
  echo "PLACEHOLDER: $1 replaced by a copy of $stand_in (PLACEHOLDER_SOURCES=1: smoke and rehearsal presets only)"
  rm -rf "${SOURCES:?}/$1" && cp -r "$SOURCES/$stand_in" "$SOURCES/$1"
  echo "{\"placeholder\": \"copy of $stand_in (a few-step run: no correct samples)\"}" > "$SOURCES/$1/stats.json"
}
stage_sources() {  # every SFT data source of experiment.py: first those made without a model, then the sampled
  fresh "$SOURCES"
  local name
  local teacher=()   # the paper's SFT-Rea-4o: a real teacher's traces (key from $OPENAI_API_KEY, never recorded)
  [ -z "$TEACHER_URL" ] || teacher=(--teacher_url "$TEACHER_URL" --teacher_model "$TEACHER_MODEL")
  for name in "${UNSAMPLED_SOURCES[@]}"; do
    local extra=()
    [[ " ${TEACHER_SOURCES[*]} " != *" $name "* ]] || extra=("${teacher[@]}")
    job "$name" $PY rollout_sft.py --source "$name" --data "$DATA/jigsaw" --output_dir "$SOURCES/$name" "${extra[@]}"
  done
  jobs_done
  for name in "${SAMPLED_SOURCES[@]}"; do
    job "$name" sampled_source "$name" "$(sampled_checkpoint "${SAMPLED_FROM[$name]}")" \
      "$(sampled_step "${SAMPLED_FROM[$name]}")"
  done
  jobs_done
}

stage_sft_sources() {  # SFT on each reasoning source (the longest rows, rea_external's, first)
  local name
  for name in "${SFT_SOURCES[@]}"; do fresh "$RUN/sft_$name"; done
  for name in "${SFT_SOURCES[@]}"; do
    job "sft_$name" $TRAIN sft.py --model "$MODEL" --data "$SOURCES/$name" --prompt_column prompt --completion_column completion \
      --output_dir "$RUN/sft_$name" --max_steps "$SFT_STEPS" --lr "$LR_SFT" --save_steps "$SAVE_STEPS" \
      --save_at "$SFT_SAVE_AT" "${SFT_COMMON[@]}" --seed "$SEED"
  done
  jobs_done
}

stage_eval() {  # every model, and every checkpoint a training run saved (forgetting is compared at equal skill)
  local name along
  for name in base "${TRAINING_ORDER[@]}"; do
    [ "$name" = base ] && [ "$SEED" != 0 ] && continue   # a seed run shares the base model's evaluation
    # every model-only snapshot (checkpoint-N/) is scored too, on the CHECKPOINT_EVAL_LIMIT subset, so report.py can
    # read each method's prior knowledge at the jigsaw accuracies all methods reached (RL's Razor's frontier)
    along=()
    [ "$name" = base ] || along=(--checkpoints --checkpoint_limit "$CHECKPOINT_EVAL_LIMIT")
    job "$name" eval_model "$name" "$(method_folder "$name")" "${METHOD_STYLE[$name]}" "${along[@]}"
  done
  jobs_done
  for name in "${THINKING_RUNS[@]}"; do think_check "$name"; done
}

stage_analyze() {  # learning dynamics of every source; probe log-probs and the KL on the new task along every run
  local probes=(--probes "$SHARED_RUN/toy/prior") probe_answer=reference sources=() tracked=() name
  if [ "$BUILD_TOY_BASE" != 1 ]; then
    # Probes: questions of each prior-knowledge benchmark (drawn from the seeded EVAL_LIMIT subset eval.py
    # scores), answered by the base model itself (greedy), since references such as RefCOCO boxes are not in
    # the model's own words. PROBES=folder overrides them with a probe set of your own.
    if [ -n "${PROBES:-}" ]; then probes=(--probes "$PROBES"); else
      probes=(--probes "benchmarks:$BENCHMARKS" --probe_limit "$EVAL_LIMIT" --probe_data "$(eval_data)"); fi
    probe_answer=greedy
  fi
  for name in "${SOURCE_NAMES[@]}"; do sources+=("$name=$SOURCES/$name"); done
  for name in "${TRAINING_ORDER[@]}"; do
    tracked+=("$name=$RUN/$name$([ "${METHOD_STYLE[$name]}" = thinking ] || echo ":${METHOD_STYLE[$name]}")")
  done
  $PY analyze.py --model "$MODEL" --output_dir "$RUN/analysis" --n_train "$ANALYZE_N" --n_probe "$ANALYZE_N" "${PIX[@]}" \
    --proj_dim "$ANALYZE_PROJ_DIM" --probe_answer "$probe_answer" --sources "$(IFS=,; echo "${sources[*]}")" \
    "${probes[@]}" --kl_data "$DATA/jigsaw" --kl_puzzles "$KL_PUZZLES" --kl_samples "$KL_SAMPLES" \
    --kl_max_completion_length "$RFT_MAX_COMPLETION_LENGTH" --rollout_backend "$ROLLOUT_BACKEND" \
    --runs "$(IFS=,; echo "${tracked[*]}")"
}

stage_report() {  # report.py reads what the stages wrote (tables, figures, the seeds' spread)
  $PY report.py --run_dir "$RUN" --preset "$PRESET"
}

# ============================================================================================================
# Plumbing: the mirror, the checks and the plan, the lock, the stage runner, jobs, the loop
# ============================================================================================================
# STAGES, in their order, come from experiment.py with the methods (eval above).
# Folders a training stage writes (their resume/ is deleted when the stage is done and KEEP_RESUME_STATE=0).
declare -A STAGE_RUN_DIRS=([base]="base_pretrain base" [sft_non_rea]="sft_non_rea" [rft]="rft"
  [sft_sources]="${SFT_SOURCE_RUNS[*]}")

# The offline mirror (mirror.py). --download writes it; BENCH_DIR=... makes the run read only from it.
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

settings_lines() {  # settings_lines: NAME<TAB>VALUE of every variable that is set (plan.py reads them on stdin)
  local v
  for v in $($PY experiment.py names); do [ -n "${!v+set}" ] && printf '%s\t%s\n' "$v" "${!v}"; done
  return 0
}
# Every preset variable set, in range and spelled right (environment too), before anything else happens.
settings_lines | $PY plan.py check --preset "$PRESET"
# The GPU check: the GPU torch will use (nvidia-smi listing a GPU torch cannot see is an error naming the torch
# build to install), and the preset's memory plan against it, before anything is loaded; a preset that does not
# fit stops here naming presets that do. GPU_MEMORY_GB=N plans for N GiB; IGNORE_GPU_PLAN=1 runs anyway.
settings_lines | $PY plan.py gpu --preset "$PRESET" $([ "$LIST" = 1 ] && echo --warn_only) || exit 2

selected() {
  local stage=$1
  # a seed run (SEEDS > 1) repeats only the stages that depend on the seed
  if [ -n "${SEED_STAGES:-}" ] && [[ " $SEED_STAGES " != *" $stage "* ]]; then return 1; fi
  if [ -n "$UNTIL" ]; then   # nothing after --until's stage
    local past=0 s; for s in "${STAGES[@]}"; do [ "$s" = "$stage" ] && break; [ "$s" = "$UNTIL" ] && past=1; done
    [ $past = 0 ] || return 1
  fi
  if [ -n "$ONLY" ]; then [ "$stage" = "$ONLY" ]; return; fi
  if [ -n "$FROM" ]; then
    local on=0; for s in "${STAGES[@]}"; do [ "$s" = "$FROM" ] && on=1; [ "$s" = "$stage" ] && { [ $on = 1 ]; return; }; done
  fi
  return 0
}
for s in $ONLY $FROM $UNTIL; do
  [[ " ${STAGES[*]} " == *" $s "* ]] || { echo "run_all.sh: no stage '$s'; stages: ${STAGES[*]}" >&2; exit 2; }
done
stage_state() {
  if ! selected "$1"; then echo "not selected"
  elif [ -f "$RUN/.done/$1" ] && [ -z "$ONLY" ] && [ -z "$FROM" ]; then echo "done, skipped"
  else echo "to run"; fi
}

# The plan, before anything runs (plan.py: the formulas and the constants with their sources).
STATES=""; for s in "${STAGES[@]}"; do STATES+="$s=$(stage_state "$s");"; done
PLAN_ARGS=(plan --run "$RUN" --stages "${STAGES[*]}" --states "$STATES")
echo "[run_all] preset $PRESET, run folder $RUN"
if [ "$LIST" = 1 ]; then settings_lines | $PY plan.py "${PLAN_ARGS[@]}"; exit $?; fi

# One writer per run folder: run_all.sh takes an exclusive flock on $RUN/.lock, and every stage it starts
# inherits the open file, so the lock lasts until the last process of the run exits, even when run_all.sh itself
# is killed with -9 while a stage goes on.
mkdir -p "$RUN/logs" "$RUN/.done" "$RUN/settings"
LOCK=$RUN/.lock
command -v flock > /dev/null || { echo "run_all.sh: needs flock (util-linux) to lock $RUN" >&2; exit 2; }
exec 9>> "$LOCK"
if ! flock -n 9; then
  echo "run_all.sh: $RUN is in use by another run (lock file $LOCK, held by $(cat "$LOCK.pid" 2>/dev/null || echo '?')," \
    "or by a stage it left running). Wait for it to finish or stop it; a second run on the same folder would mix two runs." >&2
  exit 2
fi
echo "$$" > "$LOCK.pid"
STAGE_PID=""
cleanup() {  # on any exit: stop the running stage's whole process group
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$STAGE_PID" ] && kill -0 -- "-$STAGE_PID" 2>/dev/null; then
    echo "[run_all] stopping the running stage (process group $STAGE_PID)" >&2
    kill -TERM -- "-$STAGE_PID" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- "-$STAGE_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$STAGE_PID" 2>/dev/null || true
  fi
  [ "$(cat "$LOCK.pid" 2>/dev/null)" = "$$" ] && rm -f "$LOCK.pid"
  exit $rc
}
trap cleanup EXIT
trap 'echo "[run_all] interrupted" >&2; exit 130' INT
trap 'echo "[run_all] terminated" >&2; exit 143' TERM

settings_lines | $PY plan.py "${PLAN_ARGS[@]}" $([ "$IGNORE_DISK_PLAN" = 1 ] || echo --check_disk) || exit 2
echo "[run_all] settings are recorded per stage in $RUN/settings/STAGE.json"

FORCE=0; [ -n "$ONLY$FROM" ] && FORCE=1
fresh() {  # fresh DIR...: a stage asked for again with --from/--only starts over instead of resuming
  if [ "$FORCE" = 1 ]; then rm -rf "$@"; fi
}
run_stage() {  # run_stage NAME: skip when done, log to $RUN/logs/NAME.log, time it, record its settings
  local name=$1
  selected "$name" || return 0
  if [ -f "$RUN/.done/$name" ] && [ -z "$ONLY" ] && [ -z "$FROM" ]; then echo "[run_all] $name: done, skipped"; return 0; fi
  rm -f "$RUN/.done/$name" "$RUN/settings/$name.json" "$RUN/logs/$name.summary"
  echo "[run_all] $name: running (log: $RUN/logs/$name.log)"
  local start=$SECONDS rc
  # The stage runs as a background job of a job-control shell (set -m), hence in its own process group, which
  # cleanup() stops as a whole. `wait` returns early when a signal arrives, so Ctrl-C/kill are handled at once.
  # Not `if ! ( ... )` nor `( ... ) || ...`: in a condition or an && / || list bash ignores set -e, even inside
  # the subshell, and a stage would go on past a failed command.
  set -m
  ( set -euo pipefail; STAGE_NAME=$name; "stage_$name" ) > "$RUN/logs/$name.log" 2>&1 < /dev/null &
  STAGE_PID=$!
  set +m
  set +e
  wait "$STAGE_PID"
  rc=$?
  set -e
  STAGE_PID=""
  if [ $rc -ne 0 ]; then
    if [ -f "$RUN/logs/$name.summary" ]; then   # a stage that explains its own stop (the pilot's gate)
      echo "[run_all] $name FAILED ($RUN/logs/$name.log):" >&2
      cat "$RUN/logs/$name.summary" >&2
    else
      echo "[run_all] $name FAILED; last lines of $RUN/logs/$name.log:" >&2
      tail -n 25 "$RUN/logs/$name.log" >&2
    fi
    exit 1
  fi
  [ ! -f "$RUN/logs/$name.summary" ] || cat "$RUN/logs/$name.summary"
  if [ "$KEEP_RESUME_STATE" != 1 ]; then
    for d in ${STAGE_RUN_DIRS[$name]:-}; do rm -rf "$RUN/$d/resume"; done
  fi
  echo $(( SECONDS - start )) > "$RUN/.done/$name.seconds"
  settings_lines | $PY plan.py record --run "$RUN" --stage "$name" --seconds $(( SECONDS - start ))
  touch "$RUN/.done/$name"
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

for s in "${STAGES[@]}"; do run_stage "$s"; done
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
if [ -n "$UNTIL" ]; then echo "[run_all] stages up to $UNTIL done: $RUN"
elif [ "$SEED" = 0 ]; then echo "[run_all] finished: $RUN/report.md"
else echo "[run_all] seed $SEED finished: $RUN (its numbers are in the seed-0 folder's report.md)"; fi
exit 0
}
