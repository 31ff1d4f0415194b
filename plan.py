r"""The cost plan of a run_all.sh run: per stage, the time it will take and the disk it will occupy.

run_all.sh calls this before any stage runs (and `bash run_all.sh --list` prints it alone), so that a run which
cannot finish on the rented machine says so before any GPU time is spent. Everything is computed from the
preset's own numbers (steps, batch, group size, token caps, rows sampled, checkpoints kept, the model's parameter
count) and the throughput constants below, each with the place it was measured. It is a plan, not a promise:
the GPU constants come from one H100 with random weights (README, bench/bench_real_arch.py).

    PRESET=3b bash run_all.sh --list          # what run_all.sh does (it pipes the preset's variables in)
    python plan.py plan --run runs/3b --settings runs/3b/settings.json   # the table from a run's settings

Disk model: the checkpoint layout of sft.py / rft.py. Every SAVE_STEPS before the last step a model-only `checkpoint-N/` folder
(save_pretrained: 2 B/param in bf16 on GPU presets, 4 B/param in fp32 on CPU presets), one `resume/` state
replaced at each save (fp32 weights 4 B/param + optimizer states: 8-bit AdamW 2 B/param, fp32 AdamW 8 B/param),
and `final/` (same dtype as the checkpoints). While `resume/` is replaced the old and new copies coexist, so the
peak adds one more resume state. Data sets hold each puzzle as a PNG (datasets' default encoding of a PIL image
without a file format); the PNG size is measured here on the run's own images when they are local.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------
# Throughput constants (GPU presets). README "Memory (one GPU)": Qwen2.5-VL-3B architecture, random weights,
# one H100, bench/bench_real_arch.py. Other GPUs and the 7B model are scaled from these (see scale_for_model).
# ----------------------------------------------------------------------------------------------------------
REF_PARAMS = 3_754_622_976          # the 3B model the constants were measured on (configs/..._3b_instruct.json)
SFT_STEP_S = 1.7                    # sft.py, batch 4, ~340-token sequences, gradient checkpointing on
SFT_STEP_ROWS, SFT_STEP_TOKENS = 4, 340
GRPO_GEN_S = (18.0, 32.0)           # rft.py generation per step, B=4 x G=8 = 32 sequences, 256-token completions
GRPO_GEN_SEQS, GRPO_GEN_TOKENS = 32, 256
GRPO_TRAIN_S = (12.0, 13.0)         # rft.py training per step on those 32 sequences (micro-batch 2) ...
GRPO_TRAIN_CHECKPOINTING = 4 / 3    # ... measured without gradient checkpointing acting (docs/LOG.md):
# checkpointing recomputes each layer's forward in backward, about one forward on top of forward + backward
# (~2 forwards), so the plan multiplies by 4/3 until bench_real_arch.py is rerun.
GRPO_PROMPT_TOKENS = 256 + 150      # the bench's prompts: a 448x448 puzzle (256 merged vision tokens) + text
# Decoding: the measured generation time per decode step (all sequences of the call advance one token) is taken
# as constant up to 32 sequences and linear above (larger calls are expected to be cheaper per sequence, but that
# was not measured, so the plan assumes no gain). The plan uses the middle of the measured range.
DECODE_STEP_S = sum(GRPO_GEN_S) / 2 / GRPO_GEN_TOKENS
# A forward pass (prefill) per token: SFT's step is forward + backward (~2 forwards) + recompute (1 forward).
PREFILL_TOKEN_S = SFT_STEP_S / (SFT_STEP_ROWS * SFT_STEP_TOKENS) / 4
# The decoding backend of the rollouts (ROLLOUT_BACKEND: rft.py's GRPO samples and rollout_sft.py's sources).
# hf: the decode loop above (sequences.generate), measured. vllm: ESTIMATES, not measured with this kit (no GPU
# with vLLM has run it yet); the pilot replaces them with the run's own seconds per step. Public figures they rest
# on: EasyR1's baselines (hiyouga/EasyR1 assets/baselines.md at 55b40c8; examples/config.yaml: 512 prompts x 5
# samples, responses <= 2,048 tokens) ran Qwen2.5-VL-3B GRPO with vLLM rollouts on 8 H100 at 1,800 tokens/s per
# GPU over the whole step (rollout + training + reference), 120 s per step; vLLM 0.10.2's offline throughput on one
# A800 (nano-vllm-triton issue #1, github.com/cosmoliu2002/nano-vllm-triton/issues/1) was 17.7k tokens/s for
# Qwen2.5-0.5B and 12.6k for Llama-3.2-1B. Decoding is memory-bound: a 3B model reads ~3x the 1B's weights per
# token step on an H100 with ~1.6x the A800's bandwidth (~7k tokens/s), and the generation phase of EasyR1's step
# must run faster than its whole-step 1.8k. The plan takes 4,000 tokens/s, between the two.
VLLM_DECODE_TOKENS_S = 4000.0       # (est.) generated tokens per second, 3B, one H100, colocated with training
VLLM_SYNC_S = 2.0                   # (est.) per GRPO step: the policy's new weights pushed into the engine
# (7.5 GB of bf16 weights copied on the GPU; TRL's colocate mode does the same per step)
BACKENDS = ("hf", "vllm")
MIN_EVAL_PUZZLES = 200              # jigsaw puzzles per evaluation in a GPU preset (plan.py check)
JIGSAW_BUILD_S = 0.05               # jigsaw.py per puzzle from a hub stream or folder (decode, resize, PNG):
# an assumption (not measured with COCO here); the toy builds 576 procedural puzzles in ~10 s.
SECONDS_OTHER_STAGE = 120           # report, the base stage of a hub model: a few minutes of wall time

# Benchmarks: split size of the hub copy, and image tokens at lmms-eval's pixel budget (rough: a 640x480 COCO photo
# is ~390 tokens, a DocVQA page ~2,000). The token cap is the one eval.py decodes to: the registry's max_new_tokens
# (benchmarks/<name>.py, lmms-eval's cap; 128 for a name the registry does not know).
BENCHMARKS = {   # name: (rows of the split, image tokens per sample)
    "refcoco": (8811, 390), "docvqa": (5349, 2000), "mme": (2374, 700), "mmstar": (1500, 500),
    "pope": (9000, 390), "mmmu": (900, 800), "chartqa": (2500, 700), "ai2d": (3088, 600),
    "ocrbench": (1000, 500), "mathvista": (1000, 600), "toy_prior": (300, 16),
}
# Answers of the prior benchmarks are a few tokens; a batch decodes until its longest answer stops, and a model
# that forgot the format may write to the cap. The plan takes the cap, except for RefCOCO (a JSON box is ~40
# tokens; 512 is lmms-eval's generic cap) where it takes 128.
BENCH_DECODE_TOKENS = {"refcoco": 128}

# Bytes (disk model). Processor files saved next to every model folder: Qwen2.5-VL's tokenizer.json (7.0 MB),
# vocab.json (2.8 MB), merges.txt (1.7 MB) and small configs, sizes from the hub's file list; the toy's ~0.1 MB.
PROCESSOR_BYTES_REAL, PROCESSOR_BYTES_TOY = 11.6e6, 0.1e6
PHOTO_PNG_BYTES_PER_PIXEL = 1.8     # natural photos as PNG: ~60% of raw RGB (assumption; measured instead
# whenever the run's images are local: a folder source or the toy's procedural images)
TEXT_BYTES_PER_TOKEN = 4            # English BPE text: ~4 characters per token
CHAT_TEMPLATE_TOKENS = 20           # system turn + role markers of the Qwen chat template
THINK_TARGET_TOKENS = 300           # reasoning sources' targets (rea_external ~260 tokens in the toy)
RESULT_SAMPLE_BYTES = 1500          # results.json per sample besides the prediction: prompt text, target, scores
ANALYSIS_BYTES, REPORT_BYTES = 0.5e6, 0.2e6   # JSON tables and PNG figures (smoke run: 0.24 MB and 0.08 MB)

# CPU presets: the run's own last times in $RUN/.done/<stage>.seconds when present, else these. Toy: README's
# toy run on 2 free cores of an AVX2 AMD EPYC (914 s of stages, fresh clone of cd5c6ba, JOBS=2, 2026-12-03).
# Smoke/rehearsal: their runs on the 2-core development machine shared with other jobs (smoke 6-10 min,
# rehearsal ~8 min of stages; about 3 min alone).
TOY_SECONDS = {"base": 245, "data": 10, "eval_base": 22, "sft_non_rea": 39, "rft": 205, "sources": 34,
               "sft_sources": 145, "eval": 118, "analyze": 92, "report": 4}
# The steps TOY_SECONDS' training stages were measured at (presets/toy.env): a toy run with other step counts
# scales those stages by steps (their time is per step; the fixed start-up is a few seconds).
TOY_MEASURED_STEPS = {"sft_non_rea": ("SFT_STEPS", 120), "sft_sources": ("SFT_STEPS", 120), "rft": ("RFT_STEPS", 160)}
SMALL_CPU_SECONDS = {"base": 50, "data": 12, "eval_base": 20, "pilot": 20, "sft_non_rea": 20, "rft": 25,
                     "sources": 70, "sft_sources": 100, "eval": 150, "analyze": 50, "report": 25}


# ----------------------------------------------------------------------------------------------------------
# Parameter count (from a config.json: configs/*.json for hub models, the toy's own config)
# ----------------------------------------------------------------------------------------------------------
def count_params(config: dict) -> dict:
    """Parameters of a Qwen2.5-VL config, by layer shapes (checked against the model built on the meta device
    in tests/test_plan.py: 3B 3,754,622,976, 7B 8,292,166,656)."""
    t = config.get("text_config") or config
    v = config["vision_config"]
    h, layers, heads, kv = t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"]
    inter, vocab = t["intermediate_size"], t.get("vocab_size", config.get("vocab_size"))
    tied = t.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    hd = t.get("head_dim") or h // heads
    layer = (h * heads * hd + heads * hd) + 2 * (h * kv * hd + kv * hd) + heads * hd * h + 3 * h * inter + 2 * h
    text = vocab * h + layers * layer + h + (0 if tied else vocab * h)
    vh, vi, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
    merge, out = v.get("spatial_merge_size", 2), v.get("out_hidden_size", h)
    patch = v.get("in_chans", v.get("in_channels", 3)) * v.get("temporal_patch_size", 2) * v["patch_size"] ** 2 * vh
    block = 2 * vh + (vh * 3 * vh + 3 * vh) + (vh * vh + vh) + 2 * (vh * vi + vi) + (vi * vh + vh)
    ctx = vh * merge ** 2
    merger = vh + (ctx * ctx + ctx) + (ctx * out + out)
    vision = patch + depth * block + merger
    return {"total": text + vision, "vision": vision, "layer": layer, "ends": vocab * h * (1 if tied else 2) + h}


def model_config(settings: dict) -> tuple[dict, str]:
    """The config the run will train: a local model folder's config.json, configs/ for a known hub id, or the
    toy model's shapes (toy.MODEL_SIZES) when the base stage has not made it yet."""
    model = settings.get("MODEL", "")
    if model and (Path(model) / "config.json").is_file():
        return json.loads((Path(model) / "config.json").read_text()), f"{model}/config.json"
    match = re.search(r"Qwen2\.5-VL-(\d+)B", model)
    if match and (ROOT / f"configs/qwen2_5_vl_{match.group(1)}b_instruct.json").is_file():
        path = ROOT / f"configs/qwen2_5_vl_{match.group(1)}b_instruct.json"
        return json.loads(path.read_text()), str(path.relative_to(ROOT))
    if settings.get("BUILD_TOY_BASE") == "1" or not model:
        import toy
        s = toy.MODEL_SIZES[settings.get("TOY_SIZE") or "small"]
        vocab = len(toy.build_tokenizer())      # the toy's own tokenizer (built in milliseconds)
        return ({"text_config": dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                     num_key_value_heads=s["kv_heads"], intermediate_size=s["intermediate"],
                                     vocab_size=vocab, tie_word_embeddings=True),
                 "vision_config": dict(depth=s["vision_depth"], hidden_size=s["vision_hidden"],
                                       intermediate_size=s["vision_intermediate"], patch_size=14, out_hidden_size=s["hidden"])},
                f"toy.MODEL_SIZES[{settings.get('TOY_SIZE') or 'small'!r}]")
    raise SystemExit(f"plan.py: cannot tell the parameter count of MODEL={model}: not a folder with config.json "
                     "and not a Qwen2.5-VL-<N>B hub id with a configs/ file.")


# ----------------------------------------------------------------------------------------------------------
# Sizes of the run's data
# ----------------------------------------------------------------------------------------------------------
def _png_bytes(image) -> int:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.tell()


def puzzle_png_bytes(settings: dict) -> tuple[float, str]:
    """Bytes of one puzzle image as the data set stores it, measured on the run's own images when local."""
    import jigsaw
    rows, cols = jigsaw.parse_grid(settings.get("GRID", "3x3"))
    side = int(settings.get("JIGSAW_IMAGE_SIZE", 448))
    source = settings.get("SOURCE", "")
    images = []
    if source == "procedural":
        images = [jigsaw.procedural_image(seed, side) for seed in range(3)]
    elif source and Path(source).is_dir():
        from PIL import Image
        files = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in jigsaw.IMAGE_SUFFIXES)[:4]
        for path in files:
            with Image.open(path) as im:
                images.append(jigsaw._resize(im.convert("RGB"), side))
    if images:
        sizes = [_png_bytes(jigsaw.make_puzzle(im, rows, cols, seed=i).images[0]) for i, im in enumerate(images)]
        return sum(sizes) / len(sizes), f"PNG measured on {len(sizes)} of the run's images"
    width, height, _ = puzzle_size(settings)
    return PHOTO_PNG_BYTES_PER_PIXEL * width * height, \
        f"{width}x{height} PNG assumed {PHOTO_PNG_BYTES_PER_PIXEL} B/pixel (photos)"


PHOTO_ASPECT = (4, 3)                # COCO's usual 640x480 landscape: 448 wide -> 448x336, 16x12 = 192 merged tokens


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """(height, width) the Qwen2-VL processor feeds the model: sides rounded to multiples of `factor`, the pixel
    count clamped to [min_pixels, max_pixels], the aspect kept (the rule of transformers' qwen2_vl
    image_processing_qwen2_vl.smart_resize, written here because importing transformers costs --list seconds)."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def puzzle_size(settings: dict) -> tuple[int, int, str]:
    """(width, height, where from) of a puzzle image as jigsaw.py writes it: procedural images are square; photos
    are resized to JIGSAW_IMAGE_SIZE on their longer side (measured on the run's own images when they are local,
    else COCO's 4:3) and cropped to a multiple of the grid."""
    import jigsaw
    rows, cols = jigsaw.parse_grid(settings.get("GRID", "3x3"))
    side = int(settings.get("JIGSAW_IMAGE_SIZE", 448))
    source = settings.get("SOURCE", "")
    if source == "procedural":
        width, height, where = side, side, "square procedural images"
    else:
        width, height = side, round(side * PHOTO_ASPECT[1] / PHOTO_ASPECT[0])
        where = f"photos assumed {PHOTO_ASPECT[0]}:{PHOTO_ASPECT[1]} (COCO)"
        files = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in jigsaw.IMAGE_SUFFIXES)[:4] \
            if source and Path(source).is_dir() else []
        if files:
            from PIL import Image
            sizes = []
            for path in files:
                with Image.open(path) as im:
                    sizes.append(jigsaw._resize(im, side).size)
            width, height = (round(sum(v) / len(v)) for v in zip(*sizes))
            where = f"measured on {len(files)} of the run's images"
    return width - width % cols, height - height % rows, where


def prompt_tokens(settings: dict) -> int:
    """Tokens of a jigsaw prompt: merged vision tokens of the puzzle image (after the processor's resize) + the
    prompt text + the template. A 448x336 COCO puzzle: 16 x 12 = 192 vision tokens."""
    import jigsaw
    rows, cols = jigsaw.parse_grid(settings.get("GRID", "3x3"))
    width, height, _ = puzzle_size(settings)
    max_pixels = int(settings.get("MAX_PIXELS") or width * height)
    min_pixels = int(settings.get("MIN_PIXELS") or 3136)
    h, w = smart_resize(height, width, min_pixels, max_pixels)
    vision = max(1, (h // 28) * (w // 28))
    return vision + len(jigsaw.build_prompt(rows, cols, True)) // TEXT_BYTES_PER_TOKEN + CHAT_TEMPLATE_TOKENS


# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------
def _i(settings, name, default=0) -> int:
    value = settings.get(name, "")
    return int(value) if str(value).strip() not in ("", "None") else default


def checkpoints(steps: int, save_steps: int, save_at: str = "") -> int:
    """Model-only checkpoint-N/ folders a training run keeps: one every save_steps and one at each save_at step,
    before the last step (the last step is final/; runs.snapshot_due, checked on the smoke run)."""
    due = {n for n in range(save_steps, steps, save_steps)} if save_steps > 0 else set()
    due |= {int(n) for n in str(save_at).split(",") if n.strip().isdigit() and 0 < int(n) < steps}
    return len(due)


def launcher(settings: dict) -> dict | None:
    """What LAUNCH (the prefix of sft.py / rft.py in run_all.sh) starts: None for plain processes, else the accelerate
    config it names, parsed ({"config", "processes", "distributed_type", "fsdp_version", "fsdp"}). --num_processes
    on the command line wins over the file's num_processes, as in accelerate launch. Raises ValueError naming the
    problem (plan.py check turns it into an error before anything runs)."""
    import shlex
    words = shlex.split(settings.get("LAUNCH", "") or "")
    if not words:
        return None

    def flag(name):
        for i, word in enumerate(words):
            if word == name and i + 1 < len(words):
                return words[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
        return None
    config, path = {}, flag("--config_file")
    if path:
        full = Path(path) if Path(path).is_absolute() else ROOT / path
        if not full.is_file():
            raise ValueError(f"LAUNCH names --config_file {path}, which does not exist (the kit ships "
                             "configs/accelerate_fsdp2.yaml).")
        import yaml
        try:
            config = yaml.safe_load(full.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"LAUNCH's --config_file {path} is not valid YAML ({err}).") from None
    processes = flag("--num_processes") or config.get("num_processes", 1)
    try:
        processes = int(processes)
    except (TypeError, ValueError):
        raise ValueError(f"LAUNCH: --num_processes {processes!r} is not a number.") from None
    kind = str(config.get("distributed_type", "FSDP" if "--use_fsdp" in words else "MULTI_GPU"))
    fsdp = kind == "FSDP"
    version = int((config.get("fsdp_config") or {}).get("fsdp_version", flag("--fsdp_version") or 1)) if fsdp else None
    return {"config": path, "processes": processes, "distributed_type": kind, "fsdp_version": version, "fsdp": fsdp}


def rft_step_seconds(settings: dict, measured: dict | None = None) -> dict:
    """Planned seconds of one GRPO step of the run's settings and of one evaluation along training:
    {"generation", "training", "eval"} (the pilot compares what it measured with these to rescale the plan)."""
    return plan(settings, ["rft"], measured)["rft_step"]


def eval_points(start: int, stop: int, every: int) -> int:
    """In-training evaluations rft.py runs at steps in (start, stop]: every `every` steps and at the last step."""
    if stop <= start:
        return 0
    due = {n for n in range(every * (start // every + 1), stop + 1, every)} if every > 0 else set()
    return len(due | {stop})


def plan(settings: dict, stages: list[str], measured: dict | None = None) -> dict:
    """The plan of a preset; `measured` rescales it by what the pilot measured: {"rollout": x, "train": y,
    "eval": z}, each the ratio of measured to planned seconds (rollout decoding, GRPO training, greedy
    evaluation), applied wherever the same kind of work comes again."""
    s = settings
    launch = launcher(s)
    processes = launch["processes"] if launch else 1
    scale = {"rollout": 1.0, "train": 1.0, "eval": 1.0, **(measured or {})}
    backend = s.get("ROLLOUT_BACKEND") or "hf"
    gpu = s.get("PLAN_DEVICE", "gpu") == "gpu"
    config, config_source = model_config(s)
    params = count_params(config)["total"]
    ratio = params / REF_PARAMS
    half = s.get("PRECISION", "") in ("bf16_mixed", "bf16")
    snapshot_bpp = 2 if half else 4
    eight_bit = "8bit" in s.get("OPTIMIZER", "") and not (launch and launch["fsdp"])   # FSDP: torch AdamW
    resume_bpp = (2 if s.get("PRECISION") == "bf16" else 4) + (2 if eight_bit else 8)
    processor = PROCESSOR_BYTES_TOY if s.get("BUILD_TOY_BASE") == "1" or params < 1e8 else PROCESSOR_BYTES_REAL
    snapshot = params * snapshot_bpp + processor
    resume = params * resume_bpp
    png, png_source = puzzle_png_bytes(s)
    puzzle_row = png + 2 * len("x" * 1200)          # two prompt columns and the small fields, ~2.4 KB
    prompt = prompt_tokens(s)

    n_train, n_test = _i(s, "N_TRAIN"), _i(s, "N_TEST")
    batch, sft_steps, save = _i(s, "BATCH_SIZE", 4), _i(s, "SFT_STEPS"), _i(s, "SAVE_STEPS")
    rft_steps, rft_batch, group = _i(s, "RFT_STEPS"), _i(s, "RFT_BATCH", 4), _i(s, "GROUP_SIZE", 8)
    rft_save, rollout_cap = _i(s, "RFT_SAVE_STEPS"), _i(s, "RFT_MAX_COMPLETION_LENGTH", 512)
    jigsaw_cap = _i(s, "JIGSAW_MAX_COMPLETION_LENGTH", 512)
    k, rollout_batch = _i(s, "ROLLOUT_K", 8), _i(s, "ROLLOUT_BATCH_SIZE", 64)
    rollout_puzzles = min(_i(s, "ROLLOUT_LIMIT") or n_train, n_train)
    eval_batch, eval_limit, ckpt_limit = _i(s, "EVAL_BATCH_SIZE", 16), _i(s, "EVAL_LIMIT"), _i(s, "CHECKPOINT_EVAL_LIMIT")
    benches = [b for b in s.get("BENCHMARKS", "").split(",") if b]
    keep_resume = s.get("KEEP_RESUME_STATE", "1") == "1"
    resume_knob = " or KEEP_RESUME_STATE=0" if keep_resume else ""

    def bench_info(name):
        import benchmarks
        size, image_tokens = BENCHMARKS.get(name, (1000, 600))
        registered = benchmarks.get(name)
        cap = registered.max_new_tokens if registered else 128
        if name == "toy_prior":   # the toy world's own held-out questions
            size = _i(s, "PRIOR_TEST", size)
        return size, cap, image_tokens

    def train_disk(steps, save_steps, save_at=""):
        n = checkpoints(steps, save_steps, save_at)
        kept = (n + 1) * snapshot + (resume if keep_resume else 0)
        return kept, 2 * resume, f"{n} checkpoints + final, {gb(snapshot)} each" + \
            (f" + resume {gb(resume)}" if keep_resume else f" (resume {gb(resume)} deleted when done)")

    def sft_seconds(steps, target_tokens):
        tokens = batch * (prompt + target_tokens)
        return steps * SFT_STEP_S * ratio * tokens / (SFT_STEP_ROWS * SFT_STEP_TOKENS)

    def decode_seconds(sequences, call_size, tokens, prompt_len, engine="hf", samples_per_prompt=1):
        """hf: calls of `call_size` sequences, each decoding to the cap at the measured step time (constant up to
        32 sequences, linear above). vllm: continuous batching, so the generated tokens at the estimated rate.
        Both prefill a prompt once for its samples (sequences.generate copies the cache; vLLM's prefix cache)."""
        prefill = sequences / samples_per_prompt * prompt_len * PREFILL_TOKEN_S * ratio
        if engine == "vllm":
            return (sequences * tokens / VLLM_DECODE_TOKENS_S * ratio + prefill) * scale["rollout"]
        calls = math.ceil(sequences / max(1, call_size))
        per_step = DECODE_STEP_S * ratio * max(1.0, min(call_size, sequences) / GRPO_GEN_SEQS)
        return (calls * tokens * per_step + prefill) * (scale["rollout"] if engine == "rollout_hf" else scale["eval"])

    def eval_seconds(limit, with_prior=True):
        rows = min(limit or n_test, n_test)
        total = decode_seconds(rows, eval_batch, jigsaw_cap, prompt)
        for b in (benches if with_prior else []):
            size, cap, image_tokens = bench_info(b)
            n = min(limit or size, size)
            total += decode_seconds(n, eval_batch, min(cap, BENCH_DECODE_TOKENS.get(b, cap)), image_tokens + 60)
        return total

    def eval_bytes(limit):
        """results.json keeps every sample's prompt text and prediction (the per-sample cache)."""
        samples = min(limit or n_test, n_test) * (RESULT_SAMPLE_BYTES + TEXT_BYTES_PER_TOKEN * jigsaw_cap)
        for b in benches:
            size, cap, _ = bench_info(b)
            samples += min(limit or size, size) * (RESULT_SAMPLE_BYTES + TEXT_BYTES_PER_TOKEN * cap)
        return samples

    import experiment
    sampled_sources = sum(src.sampled for src in experiment.SOURCES)
    sft_runs = [src for src in experiment.SOURCES if not src.own_stage]      # the sft_sources stage's runs
    trained = len(experiment.TRAINING_ORDER)                                 # final models besides the base
    non_rea_tokens = 3 * _grid_cells(s) + 10
    sft_at, rft_at = s.get("SFT_SAVE_AT", ""), f"{s.get('RFT_EARLY_STEP', '')},{s.get('RFT_SAVE_AT', '')}"
    sft_ckpts = checkpoints(sft_steps, save, sft_at)
    rft_ckpts = checkpoints(rft_steps, rft_save, rft_at)
    rows = {}

    def row(stage, seconds, disk, peak, note, knob):
        rows[stage] = {"seconds": seconds, "disk": disk, "peak": peak, "note": note, "knob": knob}

    # base: the toy world builds its model; a hub model costs nothing here (downloaded by the first stage).
    if s.get("BUILD_TOY_BASE") == "1":
        prior = _i(s, "PRIOR_PRETRAIN") + _i(s, "PRIOR_TRAIN") + _i(s, "PRIOR_TEST")
        base_steps = (_i(s, "BASE_PRETRAIN_STEPS"), _i(s, "BASE_STEPS"))
        disk = snapshot + prior * (png / 2 + 400)   # toy scenes: ~half a puzzle's PNG, short questions
        peak = 0
        for steps in base_steps:
            kept, p, _ = train_disk(steps, steps)
            disk += kept
            peak = max(peak, p)
        row("base", 0, disk, peak, f"toy model {params / 1e6:.2f}M params, {prior} prior-knowledge rows, "
            f"2 sft.py runs", "PRIOR_TRAIN / BASE_STEPS")
    else:
        row("base", SECONDS_OTHER_STAGE, 0, 0, f"model {s.get('MODEL')} ({params / 1e6:,.1f}M params), read by the stages", "")
    row("data", (n_train + n_test) * JIGSAW_BUILD_S, (n_train + n_test) * puzzle_row, 0,
        f"{n_train + n_test} puzzles x {png / 1e3:.0f} KB ({png_source})", "N_TRAIN")
    row("eval_base", eval_seconds(eval_limit), eval_bytes(eval_limit), 0,
        f"jigsaw {min(eval_limit or n_test, n_test)} + {len(benches)} benchmarks at --limit {eval_limit}", "EVAL_LIMIT")
    kept, peak, note = train_disk(sft_steps, save, sft_at)
    row("sft_non_rea", sft_seconds(sft_steps, non_rea_tokens), kept, peak, f"{sft_steps} steps x batch {batch}; {note}",
        "SAVE_STEPS (fewer checkpoints)" + resume_knob)
    # RFT: a step is a rollout (the backend's decoding, plus the weight push of vllm) and an update (training at
    # the measured tokens/s, every completion counted at the cap); the greedy evaluations of --eval_size puzzles
    # along the way decode with transformers. The pilot is the run's first PILOT_STEPS steps.
    rollout_engine = "vllm" if backend == "vllm" else "rollout_hf"
    step_gen = decode_seconds(rft_batch * group, rft_batch * group, rollout_cap, prompt, rollout_engine, group) \
        + (VLLM_SYNC_S * scale["rollout"] if backend == "vllm" else 0.0)
    train_tokens = rft_batch * group * (prompt + rollout_cap)
    step_train = sum(GRPO_TRAIN_S) / 2 * GRPO_TRAIN_CHECKPOINTING * ratio * \
        train_tokens / (GRPO_GEN_SEQS * (GRPO_PROMPT_TOKENS + GRPO_GEN_TOKENS)) * scale["train"]
    rft_eval_size = min(_i(s, "RFT_EVAL_SIZE"), n_test)
    one_eval = decode_seconds(rft_eval_size, eval_batch, rollout_cap, prompt) if rft_eval_size else 0.0
    pilot_steps = min(_i(s, "PILOT_STEPS"), rft_steps)
    pilot_evals = 1 + eval_points(0, pilot_steps, _i(s, "PILOT_EVAL_STEPS", 1)) if pilot_steps else 0
    rft_evals = eval_points(pilot_steps, rft_steps, _i(s, "RFT_EVAL_STEPS")) + (0 if pilot_steps else 1)
    load = SECONDS_OTHER_STAGE    # loading the policy and the reference, the step-0 MI check
    prompts = rft_steps * rft_batch
    rft_total = f"RFT {rft_steps} steps x {rft_batch} puzzles = {prompts:,} prompts x {group} completions"
    est = " (est.)" if backend == "vllm" and not measured else ""
    kept, peak, note = train_disk(rft_steps, rft_save, rft_at)
    pilot_disk = 0.0
    if pilot_steps:
        pilot_kept = (checkpoints(pilot_steps, rft_save, rft_at) + 1) * snapshot + resume   # its resume/ is kept
        pilot_disk = min(pilot_kept, kept + resume)
        replaced = resume if rft_save and pilot_steps > rft_save else 0.0   # a resume state replaced in the pilot
        row("pilot", pilot_steps * (step_gen + step_train) + pilot_evals * one_eval + load, pilot_disk, replaced,
            f"RFT's first {pilot_steps} steps ({backend} rollouts{est}) + {pilot_evals} evaluations of "
            f"{rft_eval_size} test puzzles; then the gate: projected gain >= {s.get('PILOT_MIN_GAIN', '?')} points",
            "PILOT_STEPS")
    with_pilot = f" ({pilot_steps} in the pilot)" if pilot_steps else ""
    row("rft", (rft_steps - pilot_steps) * (step_gen + step_train) + rft_evals * one_eval + load,
        max(0.0, kept + rft_steps * 2e4 - pilot_disk), peak,
        f"{rft_total}{with_pilot}, {backend} rollouts{est} <= {rollout_cap} tokens; {rft_evals} evaluations "
        f"of {rft_eval_size} puzzles; {note}",
        "RFT_SAVE_STEPS (fewer checkpoints)" + resume_knob)
    sampled = sampled_sources * decode_seconds(rollout_puzzles * k, rollout_batch, rollout_cap, prompt, rollout_engine,
                                               k)
    source_rows = (len(experiment.SOURCES) - sampled_sources) * n_train + sampled_sources * rollout_puzzles
    perplexity = source_rows * (prompt + THINK_TARGET_TOKENS) * PREFILL_TOKEN_S * ratio
    row("sources", sampled + perplexity + 60, source_rows * (puzzle_row + 2e3), 0,
        f"{sampled_sources} x {rollout_puzzles} puzzles x k {k} sampled ({backend}{est}"
        f"{'' if backend == 'vllm' else f' calls of {rollout_batch}'}); {len(experiment.SOURCES)} sources <= "
        f"{source_rows} rows", "ROLLOUT_LIMIT")
    kept, peak, note = train_disk(sft_steps, save, sft_at)
    row("sft_sources", len(sft_runs) * sft_seconds(sft_steps, THINK_TARGET_TOKENS), len(sft_runs) * kept, peak,
        f"{len(sft_runs)} runs x {sft_steps} steps; {note} each", "SAVE_STEPS (fewer checkpoints)" + resume_knob)
    # Checkpoints along training, every checkpoint-N/ scored on CHECKPOINT_EVAL_LIMIT rows for the accuracy/forgetting
    # frontier (run_all.sh stage_eval).
    n_ckpt = (trained - 1) * sft_ckpts + rft_ckpts
    row("eval", trained * eval_seconds(eval_limit) + n_ckpt * eval_seconds(ckpt_limit or eval_limit),
        trained * eval_bytes(eval_limit) + n_ckpt * eval_bytes(ckpt_limit or eval_limit), 0,
        f"{trained} models at --limit {eval_limit} + {n_ckpt} checkpoints at --limit {ckpt_limit}",
        "CHECKPOINT_EVAL_LIMIT / EVAL_LIMIT")
    analyze_n = _i(s, "ANALYZE_N", 12)
    grads = analyze_n * (len(experiment.SOURCES) + 1) + analyze_n * (1 + n_ckpt)  # per-sample gradients of the
    # sources and the probes; probe scores at every checkpoint
    kl_sequences = _i(s, "KL_PUZZLES", 16) * _i(s, "KL_SAMPLES", 4)   # RL's Razor KL: sampled at each checkpoint
    kl = (n_ckpt + trained) * decode_seconds(kl_sequences, kl_sequences, rollout_cap, prompt)
    row("analyze", grads * SFT_STEP_S / SFT_STEP_ROWS * ratio * (prompt + THINK_TARGET_TOKENS) / SFT_STEP_TOKENS + kl + 300,
        ANALYSIS_BYTES, 0, f"{analyze_n} training x {analyze_n} probe samples, KL of {kl_sequences} samples, {n_ckpt + trained + 1} models",
        "ANALYZE_N")
    row("report", 30, REPORT_BYTES, 0, "tables and figures", "")

    if not pilot_steps:
        row("pilot", 0, 0, 0, "no pilot (PILOT_STEPS=0)", "")
    if not gpu:   # CPU presets: the run's own last stage times, else the README's toy run (smaller presets: less)
        toy = s.get("PRESET") == "toy"
        for stage in rows:
            if stage == "pilot" and not pilot_steps:
                continue
            seconds = (TOY_SECONDS if toy else SMALL_CPU_SECONDS).get(stage, 60)
            if toy and stage in TOY_MEASURED_STEPS:
                variable, measured_at = TOY_MEASURED_STEPS[stage]
                seconds *= _i(s, variable, measured_at) / measured_at
            rows[stage]["seconds"] = seconds
    if gpu and processes > 1:   # GPU-hours: every process holds a GPU for the stage's whole wall time
        for stage in experiment.PRESET_VARIABLES["LAUNCH"][0]:   # the stages run_all.sh runs under LAUNCH
            if stage in rows and (stage != "base" or s.get("BUILD_TOY_BASE") == "1"):   # a hub base trains nothing
                rows[stage]["seconds"] *= processes
                rows[stage]["note"] += f"; x {processes} GPUs"
    return {"rows": {st: rows[st] for st in stages if st in rows}, "params": params, "config_source": config_source,
            "launch": launch, "gpu": gpu, "snapshot_bytes": snapshot, "resume_bytes": resume, "puzzle_bytes": png,
            "prompt_tokens": prompt, "backend": backend, "rft_prompts": prompts,
            "rft_step": {"generation": step_gen, "training": step_train, "eval": one_eval}, "measured": measured}


def experiment_stages() -> tuple[str, ...]:
    import experiment
    return experiment.STAGES


def _grid_cells(settings: dict) -> int:
    import jigsaw
    rows, cols = jigsaw.parse_grid(settings.get("GRID", "3x3"))
    return rows * cols


def measured_seconds(run: Path, stage: str) -> float | None:
    path = run / ".done" / f"{stage}.seconds"
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged user on the file system holding `path` (its nearest existing parent)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def gb(value: float) -> str:
    return f"{value / 1e12:.2f} TB" if value >= 1e12 else f"{value / 1e9:.1f} GB" if value >= 1e8 else \
        f"{value / 1e6:.1f} MB"


def render(result: dict, settings: dict, run: Path, states: dict) -> tuple[str, dict]:
    gpu = result["gpu"]
    unit = "GPU-h" if gpu else "CPU min"
    lines = [f"[run_all] plan for preset {settings.get('PRESET')}: {result['params'] / 1e6:,.1f}M parameters "
             f"({result['config_source']}); "
             + ("times from the README's H100 figures (plan.py constants)" if gpu
                else "times from this run's last stage times, else the README's toy run"),
             f"  {'stage':<12} {'state':<13} {unit:>8} {'disk':>10}  what"]
    launch = result.get("launch")
    if launch:
        kind = f"FSDP{launch['fsdp_version']}" if launch["fsdp"] else launch["distributed_type"]
        lines.insert(1, f"  sft.py and rft.py run as: {settings.get('LAUNCH')} ({kind}, {launch['processes']} "
                        f"processes{', config ' + launch['config'] if launch['config'] else ''}; per-process batch "
                        "sizes; GPU-hours count every GPU; FSDP's gathers are not in the time model)")
    if gpu:
        lines.insert(1, "  " + constants_line(result))
    total_s = total_disk = 0.0
    peak = 0.0
    to_run = []
    for stage, r in result["rows"].items():
        state = states.get(stage, "to run")
        seconds = r["seconds"]
        if not gpu:
            seconds = measured_seconds(run, stage) or seconds
        shown = f"{seconds / 3600:.2f}" if gpu else f"{seconds / 60:.1f}"
        if state == "to run":
            total_s += seconds
            total_disk += r["disk"]
            peak = max(peak, r["peak"])
            to_run.append((stage, r))
        lines.append(f"  {stage:<12} {state:<13} {shown:>8} {gb(r['disk']):>10}  {r['note']}")
    shown = f"{total_s / 3600:.1f}" if gpu else f"{total_s / 60:.1f}"
    lines.append(f"  {'total':<12} {'(to run)':<13} {shown:>8} {gb(total_disk):>10}  "
                 f"+ up to {gb(peak)} while a resume state is replaced")
    summary = {"seconds": total_s, "disk": total_disk, "peak": peak, "to_run": to_run}
    return "\n".join(lines), summary


def constants_line(result: dict) -> str:
    """Which time constants the plan's GPU-hours rest on, measured or estimated (the `(est.)` in a row)."""
    measured = result.get("measured")
    if measured:
        return ("constants: measured by this run's pilot (rollout x{rollout:.2f}, training x{train:.2f}, evaluation "
                "x{eval:.2f} of the plan's own figures for the same work); SFT and the other stages as below"
                ).format(**{"rollout": 1.0, "train": 1.0, "eval": 1.0, **measured})
    text = ("constants: measured on one H100 (3B architecture, random weights): transformers decoding "
            f"({DECODE_STEP_S:.3f} s per token step of up to {GRPO_GEN_SEQS} sequences), GRPO training, SFT steps; "
            "estimated: the PNG size of a photo puzzle, the puzzle build time")
    if result.get("backend") == "vllm":
        text += (f", and every (est.) row's vLLM rollouts ({VLLM_DECODE_TOKENS_S:,.0f} tokens/s, {VLLM_SYNC_S:.0f} s "
                 "weight push per GRPO step: public figures, not measured with this kit; the pilot measures them)")
    return text


def disk_verdict(summary: dict, run: Path, free: int) -> str | None:
    """None when the stages to run fit the free disk, else the message naming the stage, the gap and the knob."""
    used = 0.0
    for stage, r in summary["to_run"]:
        if used + r["disk"] + r["peak"] > free:
            short = used + r["disk"] + r["peak"] - free
            knob = f"change {r['knob']}" if r["knob"] else "free some disk"
            return (f"run_all.sh: not enough disk in {run}: stage {stage} would run out, short by {gb(short)} "
                    f"(the stages to run need {gb(summary['disk'] + summary['peak'])}, free {gb(free)}). "
                    f"{stage}: {r['note']}. To fit: {knob}, set RUN to a larger disk, or IGNORE_DISK_PLAN=1 to "
                    "run anyway.")
        used += r["disk"]
    return None


# ----------------------------------------------------------------------------------------------------------
# run_all.sh's helpers: the settings check before a run, and the record of what each stage ran with
# ----------------------------------------------------------------------------------------------------------
def read_settings(stream) -> dict:
    """NAME<TAB>VALUE lines (run_all.sh's settings_lines: every variable that is set) as a dict of strings."""
    return dict(line.rstrip("\n").split("\t", 1) for line in stream if "\t" in line)


def preset_names(preset: str) -> list[tuple[str, str]]:
    """(variable, file) of every `: "${VAR:=...}"` line of presets/<preset>.env and the presets it sources."""
    found, todo, seen = [], [ROOT / "presets" / f"{preset}.env"], set()
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())   # comments aside
        found += [(name, path.name) for name in re.findall(r'\$\{([A-Za-z_][A-Za-z0-9_]*):=', text)]
        todo += [ROOT / f for f in re.findall(r"^\s*\.\s+(presets/[\w.-]+\.env)", text, re.M)]
    return found


def check_settings(settings: dict, preset: str, environ: dict) -> list[str]:
    """Every problem a run's variables have, as messages naming the variable and the fix (empty: none):
    a preset variable no preset file sets, a name in a preset file or the environment that is a near miss of a
    known one (a typo), a number out of range, and the rules that tie two variables together."""
    import difflib
    import experiment
    known = {**{k: r for k, (_, r) in experiment.PRESET_VARIABLES.items()}, **experiment.RUN_VARIABLES}
    problems = []
    toy_base = settings.get("BUILD_TOY_BASE") == "1"
    for name in experiment.PRESET_VARIABLES:
        if name not in settings and (toy_base or name not in experiment.TOY_BASE_VARIABLES):
            problems.append(f"{name} is not set: presets/{preset}.env (or a preset it sources) must set it, e.g. "
                            f': "${{{name}:=value}}" with the reason for the value (experiment.py lists every variable).')

    def near_miss(name: str, where: str) -> None:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if name not in known and close:
            problems.append(f"{name} ({where}) is not a variable of this kit; did you mean {close[0]}? A misspelt "
                            "variable would be ignored silently.")
    for name, file in preset_names(preset):
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            problems.append(f"{name} (presets/{file}) is not a variable of this kit"
                            + (f"; did you mean {close[0]}?" if close else "; experiment.py lists every variable."))
    for name in environ:
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            near_miss(name, "in the environment")
    for name, spec in known.items():
        value = settings.get(name, "")
        if spec is None or value.strip() == "":
            continue
        try:
            number = float(value)
        except ValueError:
            problems.append(f"{name}={value!r} must be a number {spec}.")
            continue
        if not experiment.in_range(number, spec):
            problems.append(f"{name}={value} must be {spec.replace(' ', '')}.")
    launch = None
    try:
        launch = launcher(settings)
    except ValueError as err:
        problems.append(str(err))
    if not problems:
        rft_steps, early = int(float(settings["RFT_STEPS"])), int(float(settings["RFT_EARLY_STEP"]))
        if not 1 <= early < rft_steps:
            problems.append(f"RFT_EARLY_STEP={early} must be between 1 and RFT_STEPS - 1 = {rft_steps - 1} "
                            "(rea_self_generated samples checkpoint-RFT_EARLY_STEP).")
        if settings["ROLLOUT_BACKEND"] not in BACKENDS:
            problems.append(f"ROLLOUT_BACKEND={settings['ROLLOUT_BACKEND']} must be one of {', '.join(BACKENDS)} "
                            "(the decoding of GRPO's rollouts and of the sampled sources).")
        if settings["ROLLOUT_BACKEND"] == "vllm" and launch and launch["processes"] > 1:
            problems.append(f"ROLLOUT_BACKEND=vllm with LAUNCH's {launch['processes']} processes: the vLLM backend runs "
                            "one in-process engine (vllm_engine.py); set ROLLOUT_BACKEND=hf under several processes.")
        pilot = int(float(settings["PILOT_STEPS"]))
        if pilot >= rft_steps:
            problems.append(f"PILOT_STEPS={pilot} must be below RFT_STEPS={rft_steps} (the pilot is the run's first "
                            "steps; 0 for no pilot).")
        if bool(settings["TEACHER_URL"]) != bool(settings["TEACHER_MODEL"]):
            problems.append("TEACHER_URL and TEACHER_MODEL go together (the server and the model it serves, e.g. "
                            "https://api.openai.com/v1 and gpt-4o; the key comes from $OPENAI_API_KEY); set both "
                            "or neither.")
        if settings.get("PLAN_DEVICE", "gpu") == "gpu":
            # A real preset's accuracies must resolve the equal-skill comparison: at 200 puzzles one puzzle is 0.5
            # points and the standard error at 10% accuracy is 2.1 points (report.py's gate).
            n_test = int(float(settings["N_TEST"]))
            checked = {"N_TEST": n_test,
                       "CHECKPOINT_EVAL_LIMIT": min(int(float(settings["CHECKPOINT_EVAL_LIMIT"])) or n_test, n_test)}
            if pilot:
                checked["RFT_EVAL_SIZE"] = min(int(float(settings["RFT_EVAL_SIZE"])), n_test)
            for name, puzzles in checked.items():
                if puzzles < MIN_EVAL_PUZZLES:
                    problems.append(f"{name}={settings[name]} gives {puzzles} jigsaw puzzles per evaluation; a GPU "
                                    f"preset needs at least {MIN_EVAL_PUZZLES} (one puzzle = "
                                    f"{100 / max(1, puzzles):.1f} points) to tell a learning run from noise.")
        if toy_base and int(settings["BASE_BATCH"]) % int(settings["BASE_GRAD_ACCUM"]):
            problems.append(f"BASE_BATCH={settings['BASE_BATCH']} must be a multiple of BASE_GRAD_ACCUM="
                            f"{settings['BASE_GRAD_ACCUM']}.")
    return problems


def record_stage(run: Path, stage: str, seconds: int, settings: dict) -> None:
    """<run>/settings/<stage>.json (the variables the stage ran with, the commit, the time), then
    <run>/settings.json, the flat merge: one value per variable, or `2 (sft_non_rea) / 7 (sft_sources)` where the
    stages that ran differ."""
    import experiment
    import files
    import subprocess
    import time
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=ROOT).stdout.strip())
    except OSError:
        commit, dirty = "", False
    names = experiment.stage_variables(stage)
    files.write_json_atomic(run / "settings" / f"{stage}.json", {
        "stage": stage, "preset": settings.get("PRESET"), "seconds": seconds,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": commit, "git_dirty": dirty,
        "settings": {name: settings.get(name, "") for name in names}})
    merged = {}
    for name in experiment.STAGES:
        path = run / "settings" / f"{name}.json"
        if path.is_file():
            for key, value in json.loads(path.read_text())["settings"].items():
                merged.setdefault(key, {}).setdefault(value, []).append(name)
    flat = {k: next(iter(v)) if len(v) == 1 else " / ".join(f"{val} ({', '.join(st)})" for val, st in v.items())
            for k, v in merged.items()}
    files.write_json_atomic(run / "settings.json", flat)


def preset_settings(preset: str, overrides: dict | None = None) -> dict:
    """The variables presets/<preset>.env sets (in a clean bash, with `overrides` in its environment first), as
    strings: how run_all.sh would read them, without running it."""
    import subprocess
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(overrides or {})}
    out = subprocess.run(["bash", "-c", f'set -a; . "presets/{preset}.env" >/dev/null; env -0'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"plan.py: presets/{preset}.env could not be read: {out.stderr.strip()}")
    import experiment
    known = set(experiment.PRESET_VARIABLES) | set(experiment.RUN_VARIABLES)
    values = dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)
    return {**{k: v for k, v in values.items() if k in known}, "PRESET": preset}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("plan", help="the plan of a run (settings on stdin, as run_all.sh writes them)")
    show.add_argument("--run", required=True, help="the run folder (its free disk is checked)")
    show.add_argument("--stages", default="", help="stages in order, space separated (default: all)")
    show.add_argument("--states", default="", help="STAGE=STATE;... (e.g. 'done, skipped'); others: to run")
    show.add_argument("--check_disk", action="store_true", help="exit 2 when the stages to run do not fit")
    show.add_argument("--json", default="", help="also write the plan as JSON here")
    show.add_argument("--settings", default="", help="a run's settings.json instead of the settings on stdin")
    check = commands.add_parser("check", help="exit 2, naming each problem, when a run's variables are incomplete, "
                                              "out of range or misspelt (settings on stdin)")
    check.add_argument("--preset", required=True, help="the preset whose files set them")
    gpu = commands.add_parser("gpu", help="the preset's memory plan against the GPU found (settings on stdin); "
                                          "exit 2 when it does not fit, naming presets that do")
    gpu.add_argument("--preset", default="", help="the preset whose settings are on stdin")
    gpu.add_argument("--warn_only", action="store_true", help="print the problems as warnings (run_all.sh --list)")
    gpu.add_argument("--choose", action="store_true", help="print the preset to run on this machine (stdin unused)")
    commands.add_parser("cards", help="every GPU preset against every Colab GPU: memory verdict and GPU-hours")
    record = commands.add_parser("record", help="write <run>/settings/<stage>.json and <run>/settings.json")
    record.add_argument("--run", required=True)
    record.add_argument("--stage", required=True)
    record.add_argument("--seconds", type=int, required=True)
    args = parser.parse_args(argv)
    import gpus   # the GPU check (gpus.py imports this module)
    if args.command == "cards":
        print(gpus.cards_table(sorted(p.stem for p in (ROOT / "presets").glob("*.env"))))
        return 0
    if args.command == "gpu" and args.choose:
        try:
            name, why = gpus.choose_preset(os.environ)
        except SystemExit as err:   # a preset file that cannot be read
            print(err, file=sys.stderr)
            return 2
        found = gpus.find_gpu(os.environ)
        if found["listed"] and found["gpu"] is None and os.environ.get("IGNORE_GPU_PLAN") != "1":
            print("error: " + gpus.torch_build_advice(found["listed"]), file=sys.stderr)
            return 2
        print(f"[run_all] {why}", file=sys.stderr)
        print(name)
        return 0
    if getattr(args, "settings", ""):
        settings = {k: str(v) for k, v in json.loads(Path(args.settings).read_text()).items()}
    else:
        settings = read_settings(sys.stdin)
    if args.command == "gpu":
        return gpus.gpu_check(settings, args.preset or settings.get("PRESET", "?"), os.environ, args.warn_only)

    if args.command == "check":
        problems = check_settings(settings, args.preset, os.environ)
        for problem in problems:
            print(f"run_all.sh: {problem}", file=sys.stderr)
        return 2 if problems else 0
    if args.command == "record":
        record_stage(Path(args.run), args.stage, args.seconds, settings)
        return 0
    stages = args.stages.split() or list(experiment_stages())
    states = dict(item.split("=", 1) for item in args.states.split(";") if "=" in item)
    run = Path(args.run)
    result = plan(settings, stages)
    text, summary = render(result, settings, run, states)
    free = free_bytes(run)
    print(text)
    print(f"  free disk for {run}: {gb(free)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, **{k: v for k, v in result.items()},
                                               "summary": {k: v for k, v in summary.items() if k != "to_run"},
                                               "free_bytes": free}, indent=2, default=str))
    verdict = disk_verdict(summary, run, free)
    if verdict and args.check_disk:
        print(verdict, file=sys.stderr)
        return 2
    if verdict:
        print("  " + verdict.replace("run_all.sh: ", "warning: "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
