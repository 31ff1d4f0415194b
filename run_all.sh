#!/usr/bin/env bash
# The whole paper, end to end: data -> base eval -> SFT-Non-Rea -> RFT -> SFT data sources -> SFT on each
# source -> evaluation of every model -> learning-dynamics analysis -> report.md.
#
#   bash run_all.sh                    # toy preset without a CUDA GPU, 3b with one
#   PRESET=7b bash run_all.sh          # Qwen2.5-VL-7B-Instruct
#   PRESET=smoke bash run_all.sh       # a few steps of every stage (what CI runs)
#   bash run_all.sh --from rft         # redo a stage and all later ones from scratch
#   bash run_all.sh --only report      # one stage
#   bash run_all.sh --list             # the stages, with an estimated time each
#   RFT_STEPS=500 LR_RFT=2e-6 bash run_all.sh   # any variable below can be set from the environment
#
# A finished stage is skipped on rerun (marker in $RUN/.done/); a training stage that was interrupted resumes
# from its last checkpoint. Each stage logs to $RUN/logs/STAGE.log.
set -euo pipefail
cd "$(dirname "$0")"

FROM="" ; ONLY="" ; LIST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --list) LIST=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (use --from STAGE, --only STAGE, --list)" >&2; exit 2 ;;
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
# Presets. Every value is a plain variable: edit it here or set it in the environment.
# ------------------------------------------------------------------------------------------------------------
case "$PRESET" in
  toy|smoke)
    # The offline toy world (toy.py): a tiny random Qwen2.5-VL taught "prior knowledge" by sft.py itself.
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    : "${BUILD_TOY_BASE:=1}"              # make the base model with sft.py on the toy prior-knowledge data
    : "${TOY_SIZE:=small}"                # toy model size (toy.py MODEL_SIZES)
    : "${MODEL:=}"                        # set by the toy base stage (runs/<preset>/base/final)
    : "${SOURCE:=procedural}"             # jigsaw images: PIL-drawn gradients whose pieces a small model can place
    : "${GRID:=2x2}"
    : "${BENCHMARKS:=toy_prior}"          # prior-knowledge benchmarks (the toy world's held-out questions)
    : "${PRECISION:=fp32}"
    : "${OPTIMIZER:=adamw}"
    : "${MIN_PIXELS:=3136}" ; : "${MAX_PIXELS:=12544}"   # 56x56 .. 112x112 (toy.py)
    : "${JIGSAW_IMAGE_SIZE:=112}"         # 2x2 pieces of 56x56 = 2x2 merged vision tokens each
    : "${BATCH_SIZE:=16}" ; : "${EVAL_BATCH_SIZE:=64}"
    : "${MAX_NEW_TOKENS:=320}"            # rea_external targets run to ~260 tokens; the rest stop far earlier
    : "${RFT_MAX_NEW_TOKENS:=64}"         # toy rollouts are ~32 tokens; at 320, one sample that lost the format
                                          # held up its whole batch (toy RFT stage 256 s instead of ~140 s)
    : "${LR_SFT:=1e-3}"                   # a random-init 1M-parameter model needs a far larger lr than 1e-5
    : "${LR_BASE_PRETRAIN:=1e-3}"         # toy base, perception stage (at 4e-3 colour questions stayed at chance)
    : "${LR_BASE:=2e-3}"                  # toy base, instruction stage: sharp enough that T=1 samples keep the format
    : "${LR_RFT:=1e-4}"                   # a tenth of the toy SFT lr, like the real presets (at 5e-4 the RFT model lost the format: 6% of samples)
    : "${GROUP_SIZE:=8}" ; : "${RFT_BATCH:=4}" ; : "${BETA:=0.04}" ; : "${TEMPERATURE:=1.0}"
    : "${ROLLOUT_K:=8}"
    : "${ROLLOUT_LIMIT:=128}"             # puzzles sampled for the rollout sources (0 = all training puzzles)
    if [ "$PRESET" = toy ]; then
      : "${MIN_ANSWER_IMAGE_MI:=0.1}"     # rft.py stops at step 0 below this: the old blind base 0.04, this base 1.38
      : "${PRIOR_PRETRAIN:=3000}" ; : "${PRIOR_TRAIN:=3000}" ; : "${PRIOR_TEST:=300}"
      : "${BASE_PRETRAIN_STEPS:=200}" ; : "${BASE_STEPS:=300}" ; : "${BASE_BATCH:=32}"
      : "${N_TRAIN:=512}" ; : "${N_TEST:=64}"
      : "${SFT_STEPS:=120}" ; : "${RFT_STEPS:=60}" ; : "${RFT_EARLY_STEP:=5}" ; : "${SAVE_STEPS:=30}"
      : "${EVAL_LIMIT:=0}" ; : "${ANALYZE_N:=12}" ; : "${ANALYZE_PROJ_DIM:=0}"
    else
      : "${PRIOR_PRETRAIN:=64}" ; : "${PRIOR_TRAIN:=64}" ; : "${PRIOR_TEST:=16}"
      : "${BASE_PRETRAIN_STEPS:=2}" ; : "${BASE_STEPS:=4}" ; : "${BASE_BATCH:=4}"
      : "${N_TRAIN:=16}" ; : "${N_TEST:=8}"
      : "${SFT_STEPS:=2}" ; : "${RFT_STEPS:=4}" ; : "${RFT_EARLY_STEP:=2}" ; : "${SAVE_STEPS:=2}"
      : "${EVAL_LIMIT:=0}" ; : "${ANALYZE_N:=3}" ; : "${ANALYZE_PROJ_DIM:=0}" ; TOY_SIZE=tiny ; ROLLOUT_K=2 ; GROUP_SIZE=2 ; RFT_BATCH=2
      MAX_NEW_TOKENS=16 ; RFT_MAX_NEW_TOKENS=16 ; BATCH_SIZE=4 ; PLACEHOLDER_SOURCES=1 ; : "${MIN_ANSWER_IMAGE_MI:=0}" ; : "${KL_PUZZLES:=4}" ; : "${KL_SAMPLES:=2}"
    fi
    ;;
  3b|7b)
    : "${BUILD_TOY_BASE:=0}"
    if [ "$PRESET" = 3b ]; then : "${MODEL:=Qwen/Qwen2.5-VL-3B-Instruct}"; else : "${MODEL:=Qwen/Qwen2.5-VL-7B-Instruct}"; fi
    : "${SOURCE:=detection-datasets/coco}"  # COCO images (Jigsaw-R1 used COCO train2014)
    : "${GRID:=3x3}"                         # the paper's puzzle
    : "${BENCHMARKS:=refcoco,docvqa,mme,mmstar,pope,mmmu}"   # the paper's prior-knowledge benchmarks
    : "${PRECISION:=bf16_mixed}"            # fp32 master weights + bf16 autocast (sft.py explains why)
    : "${OPTIMIZER:=adamw8bit}"
    : "${GRADIENT_CHECKPOINTING:=1}"       # sft.py: what the measured 36.5 GiB (3B, batch 4) assumes
    : "${MIN_PIXELS:=3136}" ; : "${MAX_PIXELS:=200704}"   # up to 448x448 puzzles: 256 vision tokens
    : "${JIGSAW_IMAGE_SIZE:=448}"
    : "${N_TRAIN:=20000}" ; : "${N_TEST:=500}"
    : "${BATCH_SIZE:=4}" ; : "${EVAL_BATCH_SIZE:=16}"
    : "${MAX_NEW_TOKENS:=512}"               # Jigsaw-R1: max completion 512
    : "${LR_SFT:=1e-5}" ; : "${LR_RFT:=1e-6}" # paper.md: SFT typically 1e-5; GRPO on this task 1e-6
    : "${GROUP_SIZE:=8}" ; : "${RFT_BATCH:=8}" ; : "${BETA:=0.04}" ; : "${TEMPERATURE:=1.0}"
    : "${ROLLOUT_K:=8}" ; : "${ROLLOUT_LIMIT:=0}"
    : "${SFT_STEPS:=400}" ; : "${RFT_STEPS:=2000}" ; : "${RFT_EARLY_STEP:=100}" ; : "${SAVE_STEPS:=100}"
    : "${EVAL_LIMIT:=500}" ; : "${ANALYZE_N:=32}"
    : "${ANALYZE_PROJ_DIM:=8}"   # LoGra-style r x r projection: full per-sample gradients of 3B/7B do not fit
    ;;
  *) echo "run_all.sh: PRESET=$PRESET unknown; use toy, smoke, 3b or 7b" >&2; exit 2 ;;
esac
: "${RFT_MAX_NEW_TOKENS:=$MAX_NEW_TOKENS}"  # GRPO rollouts and the sources sampled from RFT checkpoints
# Rows the SFT stages read from a sampled source (SFT_STEPS x BATCH_SIZE), plus a 10% margin: sampling stops
# there (rollout_sft.py --max_rows) instead of walking every training puzzle.
: "${ROLLOUT_MAX_ROWS:=$(( SFT_STEPS * BATCH_SIZE * 11 / 10 ))}"
: "${RFT_SAVE_STEPS:=$RFT_EARLY_STEP}"   # rft.py checkpoints every N steps; the early one feeds rea_self_generated
if (( RFT_EARLY_STEP % RFT_SAVE_STEPS != 0 )); then
  echo "run_all.sh: RFT_EARLY_STEP ($RFT_EARLY_STEP) must be a multiple of RFT_SAVE_STEPS ($RFT_SAVE_STEPS)" >&2; exit 2
fi
: "${MIN_ANSWER_IMAGE_MI:=0}"  # rft.py's step-0 check, MI(answer; image) in nats: logged at step 0 always; a
                                 # threshold is calibrated on the toy world only (toy: 0.1), so real presets just report it
: "${CURVE_LIMIT:=$EVAL_LIMIT}"   # rows per benchmark when scoring the checkpoints along training (0: all)
: "${KL_PUZZLES:=16}" ; : "${KL_SAMPLES:=4}"   # RL's Razor's KL on the new task: test puzzles x samples per checkpoint
: "${RUN:=runs/$PRESET}"
DATA=$RUN/data
mkdir -p "$RUN/logs" "$RUN/.done"


# ------------------------------------------------------------------------------------------------------------
# Stage machinery
# ------------------------------------------------------------------------------------------------------------
STAGES=(base data eval_base sft_non_rea rft sources sft_sources eval analyze report)
declare -A ESTIMATE=(   # seconds on a 2-core CPU (toy), a few on one H100 (3b); replaced by this machine's last run
  [toy:base]=300 [toy:data]=15 [toy:eval_base]=30 [toy:sft_non_rea]=90 [toy:rft]=240 [toy:sources]=60
  [toy:sft_sources]=240 [toy:eval]=120 [toy:analyze]=90 [toy:report]=10
  [3b:base]=0 [3b:data]=600 [3b:eval_base]=1800 [3b:sft_non_rea]=1800 [3b:rft]=36000 [3b:sources]=3600
  [3b:sft_sources]=10800 [3b:eval]=9000 [3b:analyze]=1800 [3b:report]=10)
estimate() {  # last measured duration on this machine, else the table above
  local f="$RUN/.done/$1.seconds"
  if [ -f "$f" ]; then cat "$f"; else
    local key="$PRESET"; [ "$key" = smoke ] && key=toy; [ "$key" = 7b ] && key=3b
    local s=${ESTIMATE[$key:$1]:-60}; [ "$PRESET" = smoke ] && s=$(( s / 10 + 1 )); [ "$PRESET" = 7b ] && s=$(( s * 2 ))
    echo "$s"
  fi
}
selected() {
  local stage=$1
  if [ -n "$ONLY" ]; then [ "$stage" = "$ONLY" ]; return; fi
  if [ -n "$FROM" ]; then
    local on=0; for s in "${STAGES[@]}"; do [ "$s" = "$FROM" ] && on=1; [ "$s" = "$stage" ] && { [ $on = 1 ]; return; }; done
  fi
  return 0
}
for s in $ONLY $FROM; do
  [[ " ${STAGES[*]} " == *" $s "* ]] || { echo "run_all.sh: no stage '$s'; stages: ${STAGES[*]}" >&2; exit 2; }
done

echo "[run_all] preset $PRESET, run folder $RUN. Stages:"
total=0
for s in "${STAGES[@]}"; do
  if selected "$s"; then
    if [ -f "$RUN/.done/$s" ] && [ -z "$ONLY" ] && [ -z "$FROM" ]; then state="done, skipped"; else state="~$(estimate "$s") s"; total=$(( total + $(estimate "$s") )); fi
  else state="not selected"; fi
  printf "  %-12s %s\n" "$s" "$state"
done
echo "  estimated total: ~$(( total / 60 )) min"
[ "$LIST" = 1 ] && exit 0

FORCE=0; [ -n "$ONLY$FROM" ] && FORCE=1
fresh() {  # fresh DIR...: a stage asked for again with --from/--only starts over instead of resuming
  if [ "$FORCE" = 1 ]; then rm -rf "$@"; fi
}
run_stage() {  # run_stage NAME FUNCTION: skip when done, log to $RUN/logs/NAME.log, time it
  local name=$1 fn=$2
  selected "$name" || return 0
  if [ -f "$RUN/.done/$name" ] && [ -z "$ONLY" ] && [ -z "$FROM" ]; then echo "[run_all] $name: done, skipped"; return 0; fi
  rm -f "$RUN/.done/$name"
  echo "[run_all] $name: running (log: $RUN/logs/$name.log)"
  local start=$SECONDS
  # Not `if ! ( ... )` nor `( ... ) || ...`: in a condition or an && / || list bash ignores set -e, even inside
  # the subshell, and a stage would go on past a failed command.
  local rc
  set +e
  ( set -euo pipefail; $fn ) > "$RUN/logs/$name.log" 2>&1
  rc=$?
  set -e
  if [ $rc -ne 0 ]; then
    echo "[run_all] $name FAILED; last lines of $RUN/logs/$name.log:" >&2
    tail -n 25 "$RUN/logs/$name.log" >&2
    exit 1
  fi
  echo $(( SECONDS - start )) > "$RUN/.done/$name.seconds"
  touch "$RUN/.done/$name"
  echo "[run_all] $name: done in $(( SECONDS - start )) s"
}

# The base model: a hub id for real presets; for the toy world, made here by toy.py + sft.py.
if [ "$BUILD_TOY_BASE" = 1 ]; then MODEL=$RUN/base/final; fi
SETTINGS=(PRESET MODEL BUILD_TOY_BASE TOY_SIZE SOURCE GRID N_TRAIN N_TEST BENCHMARKS PRECISION OPTIMIZER GRADIENT_CHECKPOINTING MIN_PIXELS
  MAX_PIXELS BATCH_SIZE MAX_NEW_TOKENS RFT_MAX_NEW_TOKENS LR_SFT LR_RFT GROUP_SIZE RFT_BATCH BETA TEMPERATURE ROLLOUT_K SFT_STEPS RFT_STEPS
  RFT_EARLY_STEP RFT_SAVE_STEPS SAVE_STEPS ROLLOUT_LIMIT EVAL_LIMIT ANALYZE_N ANALYZE_PROJ_DIM PRIOR_PRETRAIN PRIOR_TRAIN PRIOR_TEST BASE_PRETRAIN_STEPS BASE_STEPS BASE_BATCH LR_BASE_PRETRAIN LR_BASE)
for v in "${SETTINGS[@]}"; do printf '%s\t%s\n' "$v" "${!v:-}"; done | $PY -c "
import json, sys
print(json.dumps(dict(line.rstrip('\\n').split('\\t', 1) for line in sys.stdin), indent=2))" > "$RUN/settings.json"
PIX=(--min_pixels "$MIN_PIXELS" --max_pixels "$MAX_PIXELS")
SFT_COMMON=(--precision "$PRECISION" --optimizer "$OPTIMIZER" --batch_size "$BATCH_SIZE" "${PIX[@]}" --resume)
[ "${GRADIENT_CHECKPOINTING:-0}" = 1 ] && SFT_COMMON+=(--gradient_checkpointing)
# eval.py: the jigsaw task at the training stages' pixel budget (PIX) and token cap (MAX_NEW_TOKENS); every
# prior-knowledge benchmark keeps its own lmms-eval settings (benchmarks/<name>.py).
EVAL_DATA="jigsaw=$DATA/jigsaw"
[ "$BUILD_TOY_BASE" = 1 ] && EVAL_DATA+=",toy_prior=$RUN/toy/prior"
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
    --prior_test "$PRIOR_TEST"
  # Two SFT runs, like a real MLLM: perception first (direct questions), then instruction tuning (think format,
  # answer grids, jigsaw-format rows). From random init on the mix alone, the model learns the text and reads
  # the image late (toy.build_prior_dataset says what we measured).
  base_sft "$RUN/toy/init" pretrain "$RUN/base_pretrain" "$BASE_PRETRAIN_STEPS" "$LR_BASE_PRETRAIN"
  base_sft "$RUN/base_pretrain/final" train "$RUN/base" "$BASE_STEPS" "$LR_BASE"
}
base_sft() {  # base_sft FROM SPLIT OUT STEPS LR: one sft.py run on a split of the toy prior-knowledge data
  $PY sft.py --model "$1" --data "$RUN/toy/prior" --split "$2" --prompt_column prompt --completion_column completion \
    --output_dir "$3" --max_steps "$4" --lr "$5" --warmup_ratio 0.05 --min_lr_ratio 0.1 --save_steps "$4" \
    "${SFT_COMMON[@]}" --batch_size "$BASE_BATCH"
}
stage_data() {
  $PY jigsaw.py --source "$SOURCE" --grid "$GRID" --train "$N_TRAIN" --test "$N_TEST" --output_dir "$DATA/jigsaw" \
    --image_size "$JIGSAW_IMAGE_SIZE" --max_side "$JIGSAW_IMAGE_SIZE"
}
eval_model() {  # eval_model NAME FOLDER PROMPT_STYLE
  $PY eval.py --model "$2" --benchmarks "jigsaw,$BENCHMARKS" --prompt_style "$3" "${EVAL_COMMON[@]}" \
    --max_completion_length "$MAX_NEW_TOKENS" --output_dir "$RUN/eval/$1"
}
stage_eval_base() {
  eval_model base "$MODEL" thinking
  # Does the base model's jigsaw answer depend on the image at all? GRPO can only reinforce what varies with
  # it (rft.py's step-0 check: greedy exact/hit/format and MI(answer; image); stops below MIN_ANSWER_IMAGE_MI).
  $PY rft.py --model "$MODEL" --data "$DATA/jigsaw" --output_dir "$RUN/base_check" --overwrite --max_steps 0 --beta 0 \
    --max_completion_length "$RFT_MAX_NEW_TOKENS" --eval_batch_size "$EVAL_BATCH_SIZE" \
    --min_answer_image_mi "$MIN_ANSWER_IMAGE_MI" --precision "$PRECISION" "${PIX[@]}"
}
stage_sft_non_rea() {
  fresh "$RUN/sft_non_rea"
  $PY sft.py --model "$MODEL" --data "$DATA/jigsaw" --prompt_column prompt_no_think --completion_column target_non_rea \
    --output_dir "$RUN/sft_non_rea" --max_steps "$SFT_STEPS" --lr "$LR_SFT" --save_steps "$SAVE_STEPS" "${SFT_COMMON[@]}"
}
stage_rft() {
  fresh "$RUN/rft"
  $PY rft.py --model "$MODEL" --data "$DATA/jigsaw" --output_dir "$RUN/rft" --max_steps "$RFT_STEPS" \
    --batch_size "$RFT_BATCH" --num_generations "$GROUP_SIZE" --lr "$LR_RFT" --beta "$BETA" --temperature "$TEMPERATURE" \
    --max_completion_length "$RFT_MAX_NEW_TOKENS" --save_steps "$RFT_SAVE_STEPS" --min_answer_image_mi "$MIN_ANSWER_IMAGE_MI" \
    --save_total_limit 0 --precision "$PRECISION" --optimizer "$OPTIMIZER" "${PIX[@]}" --resume
}
sampled_source() {  # sampled_source NAME CHECKPOINT K: a source made of the checkpoint's own samples
  if $PY rollout_sft.py --source "$1" --data "$DATA/jigsaw" --model "$2" --num_generations "$3" --temperature "$TEMPERATURE" \
      --max_completion_length "$RFT_MAX_NEW_TOKENS" --max_rows "$ROLLOUT_MAX_ROWS" --batch_size "$EVAL_BATCH_SIZE" --limit "$ROLLOUT_LIMIT" "${PIX[@]}" \
      --output_dir "$DATA/sources/$1"; then
    return 0
  fi
  # The smoke preset's models are trained for a few steps and never solve a puzzle, so these sources would
  # be empty; to exercise the later stages it copies rea_external in their place and says so. Never set for
  # a real run: an empty source there is an error to fix (train longer, sample more).
  [ "${PLACEHOLDER_SOURCES:-0}" = 1 ] || return 1
  echo "PLACEHOLDER: $1 replaced by a copy of rea_external (PLACEHOLDER_SOURCES=1, smoke preset only)"
  rm -rf "$DATA/sources/$1" && cp -r "$DATA/sources/rea_external" "$DATA/sources/$1"
  echo '{"placeholder": "copy of rea_external (smoke preset: no correct rollouts)"}' > "$DATA/sources/$1/stats.json"
}
stage_sources() {
  local src=$DATA/sources
  fresh "$src"
  $PY rollout_sft.py --source non_rea --data "$DATA/jigsaw" --output_dir "$src/non_rea"
  $PY rollout_sft.py --source rea_external --data "$DATA/jigsaw" --output_dir "$src/rea_external"
  sampled_source rea_grpo_rollout "$RUN/rft/final" "$ROLLOUT_K"
  # The early checkpoint's own reasoning with the right answer attached (the paper: accuracy < 5%).
  sampled_source rea_self_generated "$RUN/rft/checkpoint-$RFT_EARLY_STEP" "$ROLLOUT_K"
}
stage_sft_sources() {
  fresh "$RUN/sft_rea_external" "$RUN/sft_rea_grpo_rollout" "$RUN/sft_rea_self_generated"
  for s in rea_external rea_grpo_rollout rea_self_generated; do
    $PY sft.py --model "$MODEL" --data "$DATA/sources/$s" --prompt_column prompt --completion_column completion \
      --output_dir "$RUN/sft_$s" --max_steps "$SFT_STEPS" --lr "$LR_SFT" --save_steps "$SAVE_STEPS" "${SFT_COMMON[@]}"
  done
}
stage_eval() {
  for entry in "${MODELS[@]}"; do
    IFS='|' read -r name folder style <<< "$entry"
    eval_model "$name" "$folder" "$style"
    # Forgetting is compared at equal skill: every model-only snapshot a training run saved (checkpoint-N/) is
    # scored too, on the CURVE_LIMIT subset, so report.py can read each method's prior knowledge at the jigsaw
    # accuracies all methods reached (RL's Razor's frontier plot).
    [ "$name" = base ] && continue
    for ckpt in "$(dirname "$folder")"/checkpoint-*; do
      [ -f "$ckpt/config.json" ] || continue
      $PY eval.py --model "$ckpt" --benchmarks "jigsaw,$BENCHMARKS" --prompt_style "$style" "${EVAL_COMMON[@]}" \
        --limit "$CURVE_LIMIT" --max_completion_length "$MAX_NEW_TOKENS" --output_dir "$RUN/eval/$name/$(basename "$ckpt")"
    done
  done
}
stage_analyze() {
  local src=$DATA/sources probes=(--probes "$RUN/toy/prior") probe_answer=reference
  if [ "$BUILD_TOY_BASE" != 1 ]; then
    # Probes: questions of each prior-knowledge benchmark (drawn from the seeded EVAL_LIMIT subset eval.py
    # scores), answered by the base model itself (greedy), since references such as RefCOCO boxes are not in
    # the model's own words. PROBES=folder overrides them with a probe set of your own.
    if [ -n "${PROBES:-}" ]; then probes=(--probes "$PROBES"); else
      probes=(--probes "benchmarks:$BENCHMARKS" --probe_limit "$EVAL_LIMIT"); fi
    probe_answer=greedy
  fi
  $PY analyze.py --model "$MODEL" --output_dir "$RUN/analysis" --n_train "$ANALYZE_N" --n_probe "$ANALYZE_N" "${PIX[@]}" \
    --proj_dim "$ANALYZE_PROJ_DIM" --probe_answer "$probe_answer" \
    --sources "non_rea=$src/non_rea,rea_external=$src/rea_external,rea_grpo_rollout=$src/rea_grpo_rollout,rea_self_generated=$src/rea_self_generated" \
    "${probes[@]}" \
    --kl_data "$DATA/jigsaw" --kl_puzzles "$KL_PUZZLES" --kl_samples "$KL_SAMPLES" --kl_max_completion_length "$RFT_MAX_NEW_TOKENS" \
    --runs "sft_non_rea=$RUN/sft_non_rea:answer_only,rft=$RUN/rft,sft_rea_external=$RUN/sft_rea_external,sft_rea_grpo_rollout=$RUN/sft_rea_grpo_rollout,sft_rea_self_generated=$RUN/sft_rea_self_generated"
}
stage_report() {  # report.py reads every $RUN/eval/<method>/results.json itself (tables, compare.png)
  $PY report.py --run_dir "$RUN" --preset "$PRESET"
}

for s in "${STAGES[@]}"; do run_stage "$s" "stage_$s"; done
echo "[run_all] finished: $RUN/report.md"
