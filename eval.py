r"""Evaluate one model on the jigsaw task and on the paper's prior-knowledge benchmarks.

The paper's question is whether fine-tuning on jigsaw puzzles destroys what the model knew. This stage scores
one model (hub id or save_pretrained folder; with --checkpoints also every snapshot its training run saved) on
  * the held-out jigsaw test split (the new task: exact accuracy, hit rate, format rate), and
  * prior-knowledge benchmarks: RefCOCO val, DocVQA val, MME, MMStar, POPE, MMMU val as in the paper; then
    ChartQA, AI2D, OCRBench, MathVista testmini; and `toy_prior`, the toy world's held-out questions.
Each benchmark is one file in benchmarks/ (data, prompt, scorer, metric, unit, lmms-eval's token cap and
pixel budget, the official evaluation code its scorer follows, the published Qwen2.5-VL figures);
`python eval.py --help` lists them. This file is the loop: arguments, data, seeded subset, batched greedy
decoding, per-sample cache, results.json. report.py turns several results files into the paper's tables.

Every answer is scored twice: strict, the raw output as the benchmark's official script reads it ("metrics");
and lenient, the <answer> block (or the text without <think>) of a model trained on the jigsaw format
("metrics_lenient"). The paper's tables use strict; the gap between the two is forgetting of the answer format
rather than of the knowledge. Strict is not what lmms-eval scores today: since v0.7 (2026-03, PR #1210) its
CLI default --reasoning_tags removes closed <think>/<analysis> blocks before scoring
(lmms_eval/api/reasoning.py at 75571cf); before v0.7 (every 2025 release, the paper's time) it scored the raw
output.

Decoding is greedy (do_sample=False), batched with left padding (sequences.generate), prompts sorted by length.
--rollout_backend vllm decodes with an in-process vLLM engine instead (vllm_engine.py; no HF model is loaded),
one engine for --model and every --checkpoints snapshot, each snapshot's weights loaded into it.
Answers are read by rules only (regex/string parsing, never an LLM judge).

Run (toy world, CPU; the eval_base stage's command, once run_all.sh's base and data stages have run):
    python eval.py --model runs/toy/base/final --benchmarks jigsaw,toy_prior --prompt_style thinking \
        --data jigsaw=runs/toy/data/jigsaw,toy_prior=runs/toy/toy/prior --batch_size 64 --max_completion_length 320 \
        --min_pixels 3136 --max_pixels 12544 --output_dir runs/toy/eval/base
Run (real model, one GPU; data sets from the hub, run folders of the 3b and 7b presets):
    python eval.py --model Qwen/Qwen2.5-VL-7B-Instruct --benchmarks refcoco,docvqa,mme,mmstar,pope,mmmu \
        --output_dir runs/7b/eval/base --batch_size 16
    python eval.py --model runs/3b/rft/final --benchmarks all --data jigsaw=runs/3b/data/jigsaw --limit 500 \
        --output_dir runs/3b/eval/rft       # --limit: the same seeded subset for every model
    python eval.py --model runs/3b/rft/final --benchmarks all --data jigsaw=runs/3b/data/jigsaw --limit 500 \
        --checkpoints --checkpoint_limit 100 --output_dir runs/3b/eval/rft   # + runs/3b/rft/checkpoint-N/ snapshots
Offline copies (save_to_disk folders, hub parquet snapshots or .jsonl) of any benchmark:
    python eval.py --model Qwen/Qwen2.5-VL-3B-Instruct --benchmarks mme,pope \
        --data mme=/copies/MME,pope=/copies/POPE --output_dir runs/3b/eval/base
Tables of changes from the base model: report.py (reads every eval/<method>/results.json of a run).

A rerun with the same --output_dir only generates what is missing or changed: a cached prediction is reused only
when its key (model weights' content hash, prompt text, image bytes, decode settings) matches; an interrupted
run resumes from what it wrote. --recompute ignores the cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import benchmarks
import common
import files
import runs
import sequences
from benchmarks import parsers
from benchmarks.base import Benchmark, Context, pct, resized_size  # noqa: F401  (Context: bench/ uses it)

REGISTRY = benchmarks.REGISTRY
STAGE = "eval.py"
# eval.py's pixel budget for the jigsaw task when --min_pixels/--max_pixels are 0 (benchmarks/jigsaw_task.py).
DEFAULT_MIN_PIXELS = benchmarks.jigsaw_task.MIN_PIXELS
DEFAULT_MAX_PIXELS = benchmarks.jigsaw_task.MAX_PIXELS
MAX_IMAGES_PER_PROMPT = 7   # the vllm engine's limit: MMMU's questions name up to 7 images (<image 1>..<image 7>)


@dataclass
class Args:
    model: str = ""
    """hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct) or a save_pretrained folder (runs/rft/final)"""
    benchmarks: str = "jigsaw,toy_prior"
    """comma-separated benchmark names (listed below), or 'all' (every hub benchmark, plus jigsaw and toy_prior
    when --data gives them)"""
    data: str = ""
    """local copies, NAME=PATH,...: a save_to_disk folder, a hub parquet snapshot or a .jsonl file per benchmark.
    jigsaw and toy_prior have no hub copy and need one (jigsaw=data/jigsaw,toy_prior=runs/toy/toy/prior)"""
    output_dir: str = ""
    """folder for results.json (and the cache a rerun resumes from)"""
    overwrite: bool = False
    """write into --output_dir even when another stage (or no stage of this kit) made it"""
    limit: int = 0
    """evaluate a fixed seeded subset of N rows per benchmark (0 = all); the same N and --seed give the same rows
    for every model, so quick runs stay comparable"""
    seed: int = 0
    """seed of the --limit subset"""
    checkpoints: bool = False
    """also evaluate every checkpoint-N/ snapshot of the training run --model belongs to (its final/ folder's
    parent), each into OUTPUT_DIR/checkpoint-N/, in this one process: the points of the accuracy/forgetting
    curve (report.py's equal-skill comparison)"""
    checkpoint_limit: int = 0
    """with --checkpoints: the seeded subset of N rows per benchmark for the snapshots (0 = all)"""
    batch_size: int = 16
    """prompts per generate() call (left-padded; 16 fits a 7B model with 1.6 MP images on an 80 GB GPU)"""
    window_batches: int = 8
    """rows are decoded, length-sorted and generated window by window (window = batch_size * this), so a
    9,000-image benchmark never sits in memory at once and a crash loses at most one window"""
    max_completion_length: int = 512
    """token cap of a jigsaw completion (Jigsaw-R1 / the paper's GRPO: 512)"""
    benchmark_max_completion_length: int = 0
    """token cap of every prior-knowledge benchmark (0 = each benchmark's own lmms-eval cap, listed below)"""
    prompt_style: str = "thinking"
    """jigsaw prompt the model was trained with: thinking (column prompt: <think> then <answer>) or answer_only
    (column prompt_no_think)"""
    precision: str = "auto"
    """weights dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32"""
    attn_implementation: str = ""
    """attention kernel (sdpa when empty; flash_attention_2 if installed)"""
    device: str = ""
    """cuda / cpu (empty: cuda when available)"""
    min_pixels: int = 0
    """jigsaw task: minimum pixels per image, as the training stages take it (0 = 4*28*28, Qwen2.5-VL's own)"""
    max_pixels: int = 0
    """jigsaw task: maximum pixels per image, as the training stages take it (0 = 2048*28*28, lmms-eval's)"""
    benchmark_min_pixels: int = 0
    """prior-knowledge benchmarks: minimum pixels (0 = each benchmark's default: lmms-eval's 256*28*28)"""
    benchmark_max_pixels: int = 0
    """prior-knowledge benchmarks: maximum pixels (0 = each benchmark's default: lmms-eval's 2048*28*28)"""
    recompute: bool = False
    """ignore cached predictions in --output_dir and generate everything again"""
    save_samples: bool = True
    """keep per-sample prompts/predictions in results.json (needed for the cache and for reading outputs)"""
    rollout_backend: str = "hf"
    """greedy decoder: hf (sequences.generate, the reference) or vllm (vllm_engine.py, an optional install;
    its predictions are cached apart from hf's)"""


RANGES = {"limit": ">= 0", "checkpoint_limit": ">= 0", "seed": ">= 0", "batch_size": ">= 1",
          "window_batches": ">= 1", "max_completion_length": ">= 1", "benchmark_max_completion_length": ">= 0",
          "min_pixels": ">= 0", "max_pixels": ">= 0", "benchmark_min_pixels": ">= 0", "benchmark_max_pixels": ">= 0"}


def benchmark_settings(args: Args, bench: Benchmark) -> dict:
    """Token cap and pixel budget of one benchmark: the jigsaw task takes the run's flags (the settings it was
    trained at); every other benchmark keeps its own lmms-eval values unless the user sets the benchmark_ flags."""
    if bench.name == "jigsaw":
        return {"max_new_tokens": args.max_completion_length, "min_pixels": args.min_pixels or bench.min_pixels,
                "max_pixels": args.max_pixels or bench.max_pixels, "prompt_style": args.prompt_style}
    return {"max_new_tokens": args.benchmark_max_completion_length or bench.max_new_tokens,
            "min_pixels": args.benchmark_min_pixels or bench.min_pixels,
            "max_pixels": args.benchmark_max_pixels or bench.max_pixels}


# ----------------------------------------------------------------------------------------------------------
# Cache keys: what determines a prediction
# ----------------------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model: str, previous: dict | None = None) -> dict:
    """Content hash of a model folder's files (weights, config, processor), each file's hash reused from the
    previous run when its size and modification time are unchanged (a 7 GB folder is hashed once). A hub id:
    the id and, when the hub cache holds it, the snapshot commit it resolves to."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        known = (previous or {}).get("files", {})
        hashes = {}
        for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name not in runs.NOT_OUTPUTS):
            stat = path.stat()
            old = known.get(path.name, {})
            same = old.get("size") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns and old.get("sha256")
            hashes[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                 "sha256": old["sha256"] if same else file_sha256(path)}
        digest = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in hashes.items()}, sort_keys=True).encode())
        return {"path": str(folder.resolve()), "files": hashes, "digest": digest.hexdigest()}
    commit = None
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str) and "/snapshots/" in cached:
            commit = cached.split("/snapshots/")[1].split("/")[0]
    except Exception:  # noqa: BLE001 - no cache, old huggingface_hub: the id alone identifies it
        pass
    return {"hub_id": model, "commit": commit, "digest": hashlib.sha256(f"{model}@{commit}".encode()).hexdigest()}


def image_hash(image) -> str:
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def sample_key(model_digest: str, s: dict, decode: dict) -> str:
    """Key of one prediction: the model's content, the prompt text, the images' bytes, the decode settings."""
    payload = {"model": model_digest, "prompt": s["prompt"], "images": [image_hash(im) for im in s["images"]],
               "decode": decode}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Generation and scoring
# ----------------------------------------------------------------------------------------------------------
def set_pixel_budget(processor, min_pixels: int, max_pixels: int) -> None:
    """The processor resizes every image into [min_pixels, max_pixels] (Qwen2-VL smart_resize)."""
    size = dict(processor.image_processor.size)
    size.update(shortest_edge=min_pixels, longest_edge=max_pixels)
    processor.image_processor.size = size


def prompt_length(processor, s: dict, ctx: Context) -> int:
    """Tokens of a prompt (text + image tokens after smart_resize and the 2x2 merge), for length sorting."""
    text = len(processor.tokenizer(s["prompt"], add_special_tokens=False)["input_ids"])
    image_tokens = 0
    for im in s["images"]:
        w, h = resized_size(im.width, im.height, ctx.min_pixels, ctx.max_pixels)
        image_tokens += (w // 28) * (h // 28)
    return text + image_tokens


def generate_records(model, processor, samples: list[dict], batch_size: int, max_new_tokens: int, ctx: Context,
                     progress=None, engine=None) -> list[dict]:
    """Greedy completions for `samples`, longest prompts first (similar lengths share a batch, so little
    padding; the largest batch comes first, so an out-of-memory error shows up at once).

    In fp32 the predictions equal one-by-one decoding (tests/test_eval.py; also 64/64 on an H100). In bf16
    a few can differ (59/64 on the tiny random model on an H100): padded batches change the kernels' reduction
    order, and bf16 rounding then flips near-tied argmaxes. So compare models at the same --batch_size."""
    order = sorted(range(len(samples)), key=lambda i: -prompt_length(processor, samples[i], ctx))
    texts, truncated = [None] * len(samples), [False] * len(samples)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        prompts, images = [samples[i]["prompt"] for i in chunk], [samples[i]["images"] for i in chunk]
        if engine is None:
            out = sequences.generate(model, processor, prompts, images, max_new_tokens=max_new_tokens, do_sample=False)
        else:
            out = engine.generate(prompts, images, max_new_tokens, do_sample=False, processor=processor)
        for i, text, cut in zip(chunk, out["texts"], out["truncated"]):
            texts[i], truncated[i] = text, cut
        if progress is not None:
            progress.update(len(chunk))
    return [{"prediction": t, "truncated": c} for t, c in zip(texts, truncated)]


# Keys every aggregate may read; a scorer that fails on odd text still leaves them (all zero).
_FAILED_SCORE = {"correct": 0.0, "parsed": False, "extracted": None, "iou": 0.0, "anls": 0.0, "acc": 0.0,
                 "hit": 0.0, "fmt": 0.0}


def score_text(bench: Benchmark, text: str, record: dict) -> dict:
    """One score; a scorer error on odd text is a parse failure, never a crashed run."""
    try:
        return bench.score(text or "", record)
    except Exception as err:  # noqa: BLE001 - untrusted text must not end a multi-hour run
        return {**_FAILED_SCORE, "error": f"{err.__class__.__name__}: {err}"[:200]}


def score_record(bench: Benchmark, record: dict) -> dict:
    """The strict score: the raw answer, as the official scripts read it (lmms-eval >= 0.7 strips think blocks)."""
    return score_text(bench, record.get("prediction") or "", record)


def score_both(bench: Benchmark, record: dict) -> None:
    """Strict (raw text) and lenient (the <answer> block / text without <think>) scores of one record. The
    jigsaw reward reads the <answer> block itself: one score, used for both."""
    record["score"] = score_record(bench, record)
    if bench.name == "jigsaw":
        record["score_lenient"] = record["score"]
    else:
        record["score_lenient"] = score_text(bench, parsers.final_answer(record.get("prediction") or ""), record)


def aggregate(bench: Benchmark, records: list[dict], lenient: bool = False) -> dict:
    scored = [{**r, "score": r["score_lenient"]} for r in records] if lenient else records
    metrics = bench.aggregate(scored)
    metrics.setdefault("num_samples", len(records))
    metrics["truncated_rate"] = pct(r.get("truncated", False) for r in records)
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Main: config -> data (checked) -> model (only if needed) -> loop per benchmark, window by window -> save
# ----------------------------------------------------------------------------------------------------------
def read_previous(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text())
        return previous if isinstance(previous, dict) else {}
    except ValueError:  # not JSON, or not UTF-8 text (UnicodeDecodeError): only the cache is lost
        print(f"[eval] {path} is not valid JSON; starting afresh", file=sys.stderr)
        return {}


def kept_note(out_path: Path) -> str:
    """What a results.json write that failed (a full disk) kept."""
    before = "the predictions of the windows written before" if out_path.exists() else "none yet"
    return (f"{out_path} keeps its previous complete version ({before}); free space and rerun the same command: "
            "it reuses every cached prediction.")


def main(argv=None) -> dict:
    args = common.parse_args(Args, __doc__ + "\n" + benchmarks.registry_text(), argv)

    # ---- config (every check before any data set or model is loaded) --------------------------------------
    common.check_ranges(args, RANGES)
    if not args.model:
        common.fail("--model is required (hub id or save_pretrained folder).")
    if not args.output_dir:
        common.fail("--output_dir is required (e.g. runs/eval/base; results.json goes there).")
    if args.prompt_style not in ("thinking", "answer_only"):
        common.fail(f"--prompt_style {args.prompt_style}: choose thinking (column prompt) or answer_only "
                    "(column prompt_no_think), the style the model was trained with.")
    if args.precision not in ("auto", "bf16", "fp16", "fp32"):
        common.fail(f"--precision {args.precision}: choose auto, bf16, fp16 or fp32.")
    if args.rollout_backend != "hf":
        import vllm_engine
        vllm_engine.check_backend(args.rollout_backend)
    for low, high in (("min_pixels", "max_pixels"), ("benchmark_min_pixels", "benchmark_max_pixels")):
        if getattr(args, low) and getattr(args, high) and getattr(args, low) > getattr(args, high):
            common.fail(f"--{low} {getattr(args, low)} is larger than --{high} {getattr(args, high)}.")
    data = benchmarks.parse_data_flag(args.data)
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    if names == ["all"]:
        names = [n for n, b in REGISTRY.items() if b.prior] + [n for n in ("jigsaw", "toy_prior") if n in data]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        common.fail(f"unknown benchmark(s) {unknown or names}; valid: {', '.join(REGISTRY)} (or 'all').\n"
                    + benchmarks.registry_text())
    unused = [n for n in data if n not in names]
    if unused:
        print(f"[eval] note: --data gives {unused}, which --benchmarks {args.benchmarks} does not evaluate",
              file=sys.stderr)
    common.check_attn_implementation(args.attn_implementation)
    common.check_model_path(args.model)
    output_dir = Path(args.output_dir)
    # (model, output folder, --limit): --model, then its run's snapshots (every folder checked before any work)
    jobs = [(args.model, output_dir, args.limit)]
    if args.checkpoints:
        run_dir = Path(args.model).expanduser().parent
        snapshots = runs.list_checkpoints(run_dir, include_final=False) if Path(args.model).is_dir() else []
        if not snapshots and not (run_dir / runs.RUN_FILE).exists():
            common.fail(f"--checkpoints: --model {args.model} is not in a training run's folder ({run_dir} has no "
                        f"{runs.RUN_FILE} and no checkpoint-N/ snapshots; expected RUN/final beside RUN/checkpoint-N/ "
                        "as sft.py and rft.py write them). Point --model at a run's final/ folder, or drop "
                        "--checkpoints to evaluate this model alone.")
        if not snapshots:
            print(f"[eval] note: --checkpoints: the run {run_dir} saved no checkpoint-N/ snapshots; only --model "
                  "is evaluated", file=sys.stderr)
        jobs += [(str(path), output_dir / label, args.checkpoint_limit) for _, label, path in snapshots]
    for model_path, folder, _ in jobs:
        common.check_model_path(model_path)  # a snapshot cut short is found now, not after the first model's hours
        runs.check_output_dir(folder, STAGE, args.overwrite)
    for _, folder, _ in jobs:  # one writer per folder: a second eval.py on one stops here (made: evaluate_model)
        files.lock_output_dir(folder, STAGE, create=False)
    device = args.device or common.default_device()
    dtype = common.resolve_dtype(args.precision, device, "--precision")

    # ---- data (every schema checked before the model is loaded) -------------------------------------------
    datasets_ = {name: benchmarks.open_data(REGISTRY[name], data.get(name)) for name in names}
    empty = [name for name, dataset in datasets_.items() if len(dataset) == 0]
    if empty:
        common.fail(f"benchmark data of {empty} has no rows (split {[REGISTRY[n].split for n in empty]}); "
                    "check the --data copy.")

    first = None
    for model_path, folder, limit in jobs:
        results = evaluate_model(args, model_path, folder, limit, names, data, datasets_, device, dtype)
        first = first or results
    return first


def evaluate_model(args: Args, model_path: str, output_dir: Path, limit: int, names: list[str], data: dict,
                   datasets_: dict, device: str, dtype: str) -> dict:
    """One model on every benchmark of --benchmarks into output_dir/results.json (resuming from its cache)."""
    # ---- cache: what an earlier run into this folder wrote -------------------------------------------------
    files.lock_output_dir(output_dir, STAGE)
    out_path = output_dir / "results.json"
    with files.write_guard(output_dir, str(output_dir / runs.OUTPUT_MARKER), kept_note(out_path)):
        runs.mark_output_dir(output_dir, STAGE)
    previous = {} if args.recompute else read_previous(out_path)
    identity = model_identity(model_path, previous.get("model_identity"))
    settings = {**dataclasses.asdict(args), "model": model_path, "output_dir": str(output_dir), "limit": limit,
                "dtype": dtype, "device": device}
    results = {"model": model_path, "model_identity": identity, "settings": settings,
               "environment": runs.environment(), "benchmarks": previous.get("benchmarks", {})}

    # ---- loop per benchmark: windows of rows -> samples -> keys -> generate what is missing -> score -------
    model = processor = engine = None
    from tqdm.auto import tqdm
    for name in names:
        bench, dataset = REGISTRY[name], datasets_[name]
        bench_settings = benchmark_settings(args, bench)
        decode = {**{k: v for k, v in bench_settings.items() if k != "prompt_style"}, "dtype": dtype,
                  "decoding": "greedy", "attn_implementation": args.attn_implementation or "sdpa",
                  **({"rollout_backend": args.rollout_backend} if args.rollout_backend != "hf" else {})}
        ctx = Context(args.prompt_style, bench_settings["min_pixels"], bench_settings["max_pixels"])
        cached = results["benchmarks"].get(name, {}).get("samples", {})
        rows = benchmarks.select_rows(dataset, bench, limit, args.seed)
        entry = {"headline": bench.headline, "unit": bench.unit, "metric": bench.metric,
                 "source": f"lmms-eval task {bench.lmms_eval_task}; scorer: {bench.official}",
                 "data": data.get(name) or bench.hub_id, "split": bench.split, "config": bench.config,
                 "settings": {**bench_settings, "limit": limit, "seed": args.seed, "dtype": dtype},
                 "published": bench.published, "published_source": bench.published_source,
                 "published_note": bench.published_note, "paper_base": bench.paper_base,
                 "num_rows": len(rows), "complete": False, "metrics": {}, "metrics_lenient": {}, "samples": {}}
        window = args.batch_size * args.window_batches
        reused = generated = 0
        progress = tqdm(total=len(rows), desc=name, unit="row", disable=None)
        for start in range(0, len(rows), window):
            samples, todo = [], []
            for row_index in rows[start:start + window]:
                built = bench.build(dataset[row_index], ctx)
                for k, s in enumerate(built):
                    s.update(id=f"{row_index}" if len(built) == 1 else f"{row_index}/{k}", row=row_index,
                             key=sample_key(identity["digest"], s, decode))
                    old = cached.get(s["id"])
                    if old and old.get("key") == s["key"] and "prediction" in old:
                        samples.append((s, {"prediction": old["prediction"], "truncated": old.get("truncated", False)}))
                    else:
                        samples.append((s, None))
                        todo.append(s)
            if todo:
                if model is None and engine is None and args.rollout_backend == "vllm":
                    import vllm_engine
                    t0 = time.time()
                    processor = common.load_processor(model_path)
                    # Every benchmark's largest images and the model's own length limit (the hf backend has no
                    # other); each request carries its benchmark's pixel budget. vLLM's default share of the GPU:
                    # no HF model is loaded.
                    engine = vllm_engine.engine_for(
                        model_path, max_pixels=max(benchmark_settings(args, REGISTRY[n])["max_pixels"] for n in names),
                        dtype=dtype, max_model_len=None, max_images_per_prompt=MAX_IMAGES_PER_PROMPT,
                        gpu_memory_utilization=0.9)
                    print(f"[eval] vllm engine on {model_path} ({dtype}) in {time.time() - t0:.1f}s")
                elif model is None and engine is None:   # the hf backend
                    t0 = time.time()
                    model, processor = common.load_model_and_processor(
                        model_path, dtype, args.attn_implementation or None, device=device)
                    model.eval()
                    print(f"[eval] loaded {model_path} ({dtype}, {device}) in {time.time() - t0:.1f}s")
                set_pixel_budget(processor, ctx.min_pixels, ctx.max_pixels)
                fresh = iter(generate_records(model, processor, todo, args.batch_size,
                                              bench_settings["max_new_tokens"], ctx, engine=engine))
                samples = [(s, out if out is not None else next(fresh)) for s, out in samples]
            generated += len(todo)
            reused += len(samples) - len(todo)
            for s, out in samples:
                record = {"id": s["id"], "row": s["row"], "key": s["key"], "prompt": s["prompt"],
                          "target": s["target"], "meta": s["meta"], **out}
                score_both(bench, record)
                entry["samples"][s["id"]] = record
            progress.update(len(rows[start:start + window]))
            if todo:  # a crash loses at most one window: the next run reuses what is written here
                results["benchmarks"][name] = {**entry, "samples": {**cached, **entry["samples"]}}
                with files.write_guard(output_dir, str(out_path), kept_note(out_path)):
                    files.write_json_atomic(out_path, results)
        progress.close()
        # Scores are recomputed from the stored predictions on every run, so a fixed parser applies to cached
        # runs too.
        records = list(entry["samples"].values())
        entry.update(metrics=aggregate(bench, records), metrics_lenient=aggregate(bench, records, lenient=True),
                     num_samples=len(records), complete=True)
        if not args.save_samples:
            entry["samples"] = {}
        results["benchmarks"][name] = entry
        with files.write_guard(output_dir, str(out_path), kept_note(out_path)):
            files.write_json_atomic(out_path, results)
        shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in entry["metrics"].items()
                 if not isinstance(v, dict)}
        print(f"[eval] {name}: {len(rows)} rows, {reused} samples cached, {generated} generated; strict {shown}; "
              f"lenient {bench.headline} {entry['metrics_lenient'].get(bench.headline)}")
    print(f"[eval] wrote {out_path}")
    return results


if __name__ == "__main__":
    main()
