"""SFT data sources of the paper's table, each a `datasets` folder that sft.py trains on directly.

The paper's central claim is about data: SFT forgets when it trains on text far from the model's own
distribution, and forgets little on the model's own correct rollouts. This script makes each data source a
reproducible artefact (names as in the paper's table):

    non_rea             ground-truth answer only (prompt_no_think -> "<answer>..grid..</answer>")   SFT-Non-Rea
    rea_external        reasoning someone else wrote + the ground-truth answer                      SFT-Rea-4o
    rea_grpo_rollout    correct rollouts (reasoning + answer) sampled from the final RFT model      SFT-Rea-GRPO-Rollout
    rea_self_generated  the <think> text of an early RFT checkpoint (accuracy < 5%) + the true answer
                                                                                                    SFT-Rea-Self-Generated

Every row of every source has a correct answer in a valid format (jigsaw.jigsaw_reward: acc == 1, fmt == 1).
Columns: id, images, prompt, completion, answer, rows, cols, reward, source_checkpoint, logprob (sum log-prob of
the completion under the sampling checkpoint, null where no model was involved). Saved as a DatasetDict with one
split (--split), plus stats.json inside the folder.

Worked example (2x2 puzzle whose answer is 3 1 / 4 2, K = 3 samples of the RFT model):
    "<think>top left is blue..</think><answer>3 1\\n4 2</answer>"   acc 1 fmt 1  -> kept
    "<think>top left is blue..</think><answer>3 1\\n4 2</answer>"   duplicate    -> dropped
    "<answer>3 1\\n2 4</answer>"                                     acc 0        -> dropped
  with --max_per_puzzle 1 one row is kept; sampler accuracy 2/3; the puzzle counts as "has a correct rollout".

Rollout generation is resumable: puzzles are processed in fixed chunks (in data order), each chunk seeded from
(--seed, its first puzzle id), and each finished chunk is appended to OUT.shard.jsonl with write + fsync. A
crash keeps every finished chunk; rerunning the same command skips the done puzzles and gives the same rows as
an uninterrupted run. The data set folder is built from the shard at the end (atomic swap).

    # the four sources, in the 3b preset's folders (run_all.sh's sources stage adds its sampling settings)
    python rollout_sft.py --source non_rea --data runs/3b/data/jigsaw --output_dir runs/3b/data/sources/non_rea
    python rollout_sft.py --source rea_external --data runs/3b/data/jigsaw \\
        --output_dir runs/3b/data/sources/rea_external
    python rollout_sft.py --source rea_grpo_rollout --data runs/3b/data/jigsaw --model runs/3b/rft/final \\
        --num_generations 4 --max_completion_length 512 --max_rows 880 \\
        --output_dir runs/3b/data/sources/rea_grpo_rollout
    #   run_all.sh adds a prediction from RFT's own rollouts, checked before any decoding (too few rows: stop):
    #   --sampler_metrics runs/3b/rft/metrics.jsonl --sampler_step 500 --min_rows 200
    python rollout_sft.py --source rea_self_generated --data runs/3b/data/jigsaw --model runs/3b/rft/checkpoint-48 \\
        --num_generations 4 --max_rows 880 --output_dir runs/3b/data/sources/rea_self_generated
    # rea_external from reasoning written elsewhere
    python rollout_sft.py --source rea_external --data runs/3b/data/jigsaw --output_dir runs/3b/data/sources/rea_4o \\
        --traces gpt4o_traces.jsonl             # JSONL of {"id": puzzle id, "reasoning": text}
    # rea_external with a real teacher (the paper's GPT-4o; key in $OPENAI_API_KEY, never on the command line):
    # resumable (OUT.teacher.jsonl), tokens and estimated cost in stats.json (teacher.py has the prompt)
    python rollout_sft.py --source rea_external --data runs/3b/data/jigsaw --output_dir runs/3b/data/sources/rea_4o \\
        --teacher_url https://api.openai.com/v1 --teacher_model gpt-4o --teacher_concurrency 8
    #   or a local OpenAI-compatible server (vllm serve Qwen/Qwen2.5-VL-72B-Instruct):
    #   --teacher_url http://localhost:8000/v1 --teacher_model Qwen/Qwen2.5-VL-72B-Instruct \\
    #   --teacher_prompt_price 0 --teacher_completion_price 0
    # then, for each: python sft.py --model BASE --data runs/3b/data/sources/NAME --output_dir runs/3b/sft_NAME ...
    # (analyze.py measures each source's perplexity under the base model)

    # on the CPU, after `bash run_all.sh` made the toy run (runs/toy/): its self-generated source as run_all.sh
    # makes it, from RFT's early checkpoint (RFT_EARLY_STEP 10)
    python rollout_sft.py --source rea_self_generated --data runs/toy/data/jigsaw --model runs/toy/rft/checkpoint-10 \\
        --num_generations 8 --max_completion_length 64 --batch_size 64 --limit 128 --min_pixels 3136 \\
        --max_pixels 12544 --output_dir runs/toy/data/sources/rea_self_generated

Without a usable source (a checkpoint that gets nothing right, traces that match no puzzle) the script stops
with counts; it never hands sft.py an empty data set. A sparse source samples its whole --limit (its first chunks
may keep nothing); whether that budget can keep --min_rows is predicted before any decoding (--sampler_metrics).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import common
import experiment
import files
import jigsaw
import runs
import sequences

SOURCES = experiment.SOURCE_NAMES        # the sources and what each keeps: experiment.py's table
NEEDS_MODEL = tuple(s.name for s in experiment.SOURCES if s.sampled)
JIGSAW_COLUMNS = ("id", "images", "prompt", "prompt_no_think", "answer", "rows", "cols", "target_non_rea")
OUT_COLUMNS = ("id", "images", "prompt", "completion", "answer", "rows", "cols", "reward", "source_checkpoint",
               "logprob")
# Fields of the shard's meta file that change what is sampled: a resume with other values would mix two
# different samplers in one data set, so it is refused. (--batch_size and --limit may change on resume.)
SHARD_KEYS = ("source", "data", "split", "model", "num_generations", "temperature", "top_p", "max_completion_length",
              "max_per_puzzle", "seed", "precision", "rollout_backend")
SHARD_DEFAULTS = {"rollout_backend": "hf"}   # what a shard written before the field existed was sampled with


@dataclass
class Args:
    source: str = ""
    """which data set to build: non_rea | rea_external | rea_grpo_rollout | rea_self_generated"""
    data: str = ""
    """jigsaw data set folder (python jigsaw.py --output_dir DIR)"""
    split: str = "train"
    """split of --data whose puzzles are used; the output is saved as a DatasetDict with this one split"""
    model: str = ""
    """checkpoint that samples (rea_grpo_rollout: the final RFT model; rea_self_generated: an early RFT
    checkpoint with task accuracy < 5%): any save_pretrained folder or hub id"""
    output_dir: str = ""
    """output data set folder (save_to_disk, with stats.json inside)"""
    overwrite: bool = False
    """replace --output_dir even when rollout_sft.py did not make it"""
    num_generations: int = 8
    """samples per puzzle (GRPO group size 8 in public Jigsaw GRPO work; the paper's value is unknown)"""
    temperature: float = 1.0
    """sampling temperature (1.0 as in GRPO rollouts, so kept rows follow the RFT policy's own distribution);
    0 means greedy"""
    top_p: float = 1.0
    """nucleus sampling (1.0: plain sampling, as GRPO rollouts)"""
    max_completion_length: int = 512
    """completion length limit (512, the public Jigsaw GRPO max completion length)"""
    max_per_puzzle: int = 1
    """most rows kept per puzzle (1: every source then has at most one row per puzzle, so their sizes compare;
    the paper does not say)"""
    batch_size: int = 64
    """sequences per generate / forward call (64 = 8 puzzles x 8 samples: decoding is memory-bound, so a GPU
    runs 64 sequences nearly as fast as 16); a chunk holds max(1, batch_size // num_generations) puzzles. May
    change on resume (later chunks are then drawn differently, equally valid)"""
    limit: int = 0
    """use only the first N puzzles of the split (0: all)"""
    max_rows: int = 0
    """stop sampling once this many rows are kept (0: sample every puzzle): the SFT stage reads
    max_steps x batch_size rows, so sampling more is GPU time thrown away"""
    traces: str = ""
    """rea_external: JSONL of reasoning traces keyed by puzzle id (fields id, reasoning), e.g. written by
    GPT-4o; empty: a programmatic reasoning text made from the ground truth (the offline stand-in)"""
    teacher_url: str = ""
    """rea_external: base URL of an OpenAI-compatible chat-completions server whose model writes the reasoning
    (POST URL/chat/completions; https://api.openai.com/v1 for the paper's GPT-4o, or a local vLLM/SGLang,
    e.g. http://localhost:8000/v1); the reply is capped at --max_new_tokens. See teacher.py"""
    teacher_model: str = ""
    """the teacher's model name on that server (the paper: GPT-4o, i.e. gpt-4o)"""
    teacher_api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the API key (never a flag, so it is in no command line or file; unset:
    no Authorization header, as a local server needs)"""
    teacher_concurrency: int = 8
    """requests in flight at once (8: a modest load, about one gpt-4o request a second; the lowest OpenAI
    tiers may still answer 429 at times, which is retried; raise it for a local server or a higher tier). Halved
    while the run goes when a request times out as the server answers others (a server that runs fewer at once,
    e.g. transformers serve runs one: the rest would wait in its queue on their timeout)"""
    teacher_max_retries: int = 8
    """retries per puzzle on 429 / 5xx / timeouts / dropped connections, with exponential backoff (1 s doubling
    to 60 s, jitter) or the server's Retry-After; then the puzzle is given up for this run (openai-python
    retries 2 times; a batch of thousands of requests meets rate limits more often). The run itself stops, with
    the flag to fix, when its first 3 requests all fail or no reply comes for 10 minutes (teacher.py)"""
    teacher_timeout_s: float = 120.0
    """seconds from sending a request to the end of its reply before it counts as timed out and is retried (a
    512-token gpt-4o reply takes seconds; openai-python's default of 600 s would hide a hung connection for 10
    minutes). Raise it for a local server that loads the model on its first request"""
    teacher_prompt_price: float = 2.5
    """USD per 1M prompt tokens (image tokens included) for the cost estimate: GPT-4o's list price on
    openai.com/api/pricing (gpt-4o-2024-08-06; prices change, check the page; 0 for a local server)"""
    teacher_completion_price: float = 10.0
    """USD per 1M completion tokens for the cost estimate: GPT-4o's list price (as above)"""
    seed: int = 0
    """base seed; each chunk is seeded with hash(seed, first puzzle id of the chunk)"""
    precision: str = "auto"
    """sampler precision: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32"""
    attn_implementation: str = ""
    """attention kernel (e.g. flash_attention_2, sdpa); empty: the transformers default"""
    min_pixels: int = 0
    """processor min_pixels (0: as saved with the processor)"""
    max_pixels: int = 0
    """processor max_pixels (0: as saved with the processor)"""
    max_checkpoint_accuracy: float = 0.05
    """rea_self_generated: warn when the checkpoint's task accuracy is above this (the paper: < 5%)"""
    rollout_backend: str = "hf"
    """sampler: hf (sequences.generate, the reference) or vllm (vllm_engine.py, an optional install); the kept
    rows' log-probs always come from the HF model"""
    sampler_metrics: str = ""
    """the metrics.jsonl of the training run --model comes from (rft.py's): its rollout accuracy (format rate for
    rea_self_generated) over the --sampler_window steps up to --sampler_step predicts the rows this source keeps,
    before any decoding; with --min_rows, too few stops here (empty: no prediction)"""
    sampler_step: int = 0
    """the training step of --model (rft.py's step of that checkpoint; run_all.sh: RFT_STEPS or RFT_EARLY_STEP)"""
    sampler_window: int = 20
    """training steps averaged for the prediction (20 x B x G rollouts: the accuracy of one step is noisy)"""
    min_rows: int = 0
    """stop before decoding when the predicted rows are fewer (0: never). run_all.sh: MIN_SOURCE_ROWS (3b: 200 of the
    800 rows SFT reads, so no row is read more than ~4 times)"""


RANGES = {"num_generations": ">= 1", "temperature": ">= 0", "top_p": "(0, 1]", "max_completion_length": ">= 1",
          "max_per_puzzle": ">= 1", "batch_size": ">= 1", "limit": ">= 0", "max_rows": ">= 0",
          "min_pixels": ">= 0", "max_pixels": ">= 0", "max_checkpoint_accuracy": "[0, 1]", "sampler_step": ">= 0",
          "sampler_window": ">= 1", "min_rows": ">= 0"}


def log(message: str) -> None:
    print(f"[rollout_sft] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Pure pieces: targets and selection (tests check these by hand)
# ----------------------------------------------------------------------------------------------------------
_TAG_RE = re.compile(r"</?(think|answer)>")


def think_text(completion: str) -> str | None:
    """The text inside the first <think>...</think> of a completion, or None when there is no usable block
    (none, empty, or holding another think/answer tag). Untrusted text: str.find, linear (a lazy
    '<think>(.*?)</think>' search rescans the rest of the text from every '<think>' when none is closed:
    quadratic, ~6 s on 10,000 tags). Same block as that search: the first '<think>' and the first
    '</think>' after it."""
    if not isinstance(completion, str):
        return None
    start = completion.find("<think>")
    if start == -1:
        return None
    start += len("<think>")
    end = completion.find("</think>", start)
    if end == -1:
        return None
    inner = completion[start:end]
    if not inner.strip() or _TAG_RE.search(inner):
        return None
    return inner.strip()


def reasoning_target(reasoning: str, answer: list[int], rows: int, cols: int) -> str:
    """The reasoning sources' target: <think>reasoning</think> then the ground-truth grid."""
    return f"<think>{reasoning}</think>\n" + jigsaw.target_answer_only(answer, rows, cols)


def position_name(position: int, rows: int, cols: int) -> str:
    """1-based row-major position -> 'position 4 (row 2, column 1)'."""
    return f"position {position} (row {(position - 1) // cols + 1}, column {(position - 1) % cols + 1})"


def programmatic_reasoning(answer: list[int], rows: int, cols: int, convention: str = "position_to_index") -> str:
    """Reasoning written from the ground truth, piece by piece: the offline stand-in for the paper's GPT-4o
    traces. What matters for the experiment is that the model did not write it (its wording is a template, not
    the model's own distribution); it is not a claim about how GPT-4o reasons.

    2x2, answer 3 1 / 4 2 ->  "... The piece now at position 1 (row 1, column 1) shows the part of the picture
    that belongs at position 3 (row 2, column 1). ... "
    """
    lines = [f"The picture is cut into a {rows}x{cols} grid. I look at the colours, edges and shapes of each "
             f"piece and how they continue into the pieces next to it."]
    for index, value in enumerate(answer, start=1):
        if convention == "index_to_position":
            lines.append(f"The piece that belongs at {position_name(index, rows, cols)} now stands at "
                         f"{position_name(value, rows, cols)}.")
        else:
            lines.append(f"The piece now at {position_name(index, rows, cols)} shows the part of the picture that "
                         f"belongs at {position_name(value, rows, cols)}.")
    lines.append("Writing these positions row by row gives the grid.")
    return "\n".join(lines)


def default_reward(completion: str, answer: list[int]) -> dict:
    """The shared task reward with thinking format (what RFT was trained on)."""
    return jigsaw.jigsaw_reward(completion, answer, thinking=True)


def is_correct(scores: dict) -> bool:
    """A kept row: the exact permutation and the exact format."""
    return scores["acc"] == 1 and scores["fmt"] == 1


def select_completions(source: str, texts: list[str], row: dict, reward_fn: Callable, max_per_puzzle: int
                       ) -> tuple[list[dict], dict]:
    """From one puzzle's K sampled texts, the rows to keep and the counts behind them.

    rea_grpo_rollout keeps a sample as written when reward_fn says it is correct (acc 1, fmt 1).
    rea_self_generated keeps the sample's own <think> text and replaces the rest by the ground-truth answer
    (samples without a usable think block are skipped and counted). Both drop exact duplicates (after strip)
    and keep the first `max_per_puzzle` in sample order. Counts: samples, acc (the sampler's accuracy),
    fmt, correct (acc and fmt), no_think, duplicates, kept.
    """
    answer, rows, cols = list(row["answer"]), int(row["rows"]), int(row["cols"])
    counts = {"samples": len(texts), "acc": 0, "fmt": 0, "correct": 0, "no_think": 0, "duplicates": 0,
              "invalid_target": 0, "kept": 0}
    kept, seen = [], set()
    for text in texts:
        scores = reward_fn(text, answer)
        counts["acc"] += int(scores["acc"] == 1)
        counts["fmt"] += int(scores["fmt"] == 1)
        counts["correct"] += int(is_correct(scores))
        keeps = experiment.source(source).keeps
        if keeps == "correct_sample":
            if not is_correct(scores):
                continue
            target, target_scores = text.strip(), scores
        elif keeps == "own_think":
            reasoning = think_text(text)
            if reasoning is None:
                counts["no_think"] += 1
                continue
            target = reasoning_target(reasoning, answer, rows, cols)
            target_scores = reward_fn(target, answer)
            if not is_correct(target_scores):  # e.g. a think text that breaks the format
                counts["invalid_target"] += 1
                continue
        else:
            raise ValueError(f"select_completions does not sample for source {source!r}")
        if target in seen:
            counts["duplicates"] += 1
            continue
        seen.add(target)
        if len(kept) < max_per_puzzle:
            kept.append({"completion": target, "reward": float(target_scores["reward"])})
    counts["kept"] = len(kept)
    return kept, counts


def chunk_seed(base_seed: int, puzzle_id: str) -> int:
    """Seed of a chunk from the base seed and the chunk's first puzzle id (stable across runs and machines,
    unlike Python's salted hash())."""
    return int(hashlib.sha256(f"{base_seed}/{puzzle_id}".encode()).hexdigest()[:8], 16)


# ----------------------------------------------------------------------------------------------------------
# Model: sampling and completion log-probs
# ----------------------------------------------------------------------------------------------------------
def check_processor(model: str) -> None:
    """A local checkpoint must carry its processor (tokenizer + image processor): without it the chat
    template and image tokens would silently differ from the model's. Checked before loading weights."""
    folder = Path(model)
    if not folder.is_dir():
        return  # a hub id: the hub repo holds the processor
    files = sorted(p.name for p in folder.iterdir())
    has_image_processor = any(name in files for name in ("processor_config.json", "preprocessor_config.json"))
    has_tokenizer = any(name in files for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if not (has_image_processor and has_tokenizer):
        common.fail(f"--model {model}: the folder has no processor ({len(files)} files: {', '.join(files[:12])}"
                    f"{', ...' if len(files) > 12 else ''}; image processor config found: {has_image_processor}, "
                    f"tokenizer found: {has_tokenizer}). Point at a save_pretrained folder (a training run's final/ "
                    f"or checkpoint-N/model), or copy the base model's processor into it: python -c \"from "
                    f"transformers import AutoProcessor; AutoProcessor.from_pretrained('BASE').save_pretrained("
                    f"'{model}')\"")


def load_sampler(args: Args):
    common.check_model_path(args.model)
    check_processor(args.model)
    device = common.default_device()
    dtype = common.resolve_dtype(args.precision, device, "--precision")
    model, processor = common.load_model_and_processor(
        args.model, dtype, args.attn_implementation or None, args.min_pixels or None, args.max_pixels or None, device)
    model.eval()
    return model, processor


def sample_completions(model, processor, rows: list[dict], args: Args, engine=None) -> list[list[str]]:
    """K sampled texts per row, max(1, --batch_size // K) puzzles per sequences.generate call: each puzzle is
    prefilled once and its cache copied K times (num_samples), left padding, images in row order. With a vLLM
    engine, the same calls seeded with the chunk's seed (a redrawn chunk draws the same samples)."""
    per_call = max(1, args.batch_size // args.num_generations)
    texts = []
    for start in range(0, len(rows), per_call):
        chunk = rows[start:start + per_call]
        prompts, images = [row["prompt"] for row in chunk], [common.row_images(row) for row in chunk]
        sampling = dict(temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
                        do_sample=args.temperature > 0, num_samples=args.num_generations)
        if engine is None:
            out = sequences.generate(model, processor, prompts, images, args.max_completion_length, **sampling)
        else:
            out = engine.generate(prompts, images, args.max_completion_length, processor=processor,
                                  seed=chunk_seed(args.seed, rows[0]["id"]) + start * args.num_generations, **sampling)
        texts += out["texts"]
    return [texts[i * args.num_generations:(i + 1) * args.num_generations] for i in range(len(rows))]


# ----------------------------------------------------------------------------------------------------------
# Shard: append-only JSONL of finished puzzles (write + fsync), the resume state
# ----------------------------------------------------------------------------------------------------------
def shard_paths(out: str) -> tuple[Path, Path]:
    out_path = Path(out)
    return out_path.with_name(out_path.name + ".shard.jsonl"), out_path.with_name(out_path.name + ".shard.json")


def check_shard_meta(meta_path: Path, shard: Path, meta: dict) -> None:
    """Refuse to resume a shard drawn with other sampling settings; a meta file without any finished chunk
    (a run that stopped before its first chunk) is simply replaced."""
    if meta_path.exists() and shard.exists() and shard.stat().st_size > 0:
        old = common.read_json(meta_path, f"Delete {meta_path} and {shard} to start over.")
        # --data and --model by what they hold (runs.data_fingerprint / model_fingerprint): a rebuilt data set
        # under the same name is refused (its puzzle ids repeat, its puzzles do not), a moved one resumes
        old.update({key: old.get(key, SHARD_DEFAULTS.get(key)) for key in SHARD_KEYS})  # keys added since
        diff, same_content = [], set()
        for key in ("data", "model"):
            before, now = old.get(f"{key}_fingerprint"), meta.get(f"{key}_fingerprint")
            if before is not None and before != now:
                diff.append(f"--{key} {meta.get(key)!r} holds other content than when the shard was drawn "
                            f"(fingerprint {before} -> {now}: rebuilt or replaced)")
            elif before is not None:
                same_content.add(key)
        diff += [f"{key}: shard {old.get(key)!r} vs now {meta.get(key)!r}" for key in SHARD_KEYS
                 if key not in same_content and old.get(key) != meta.get(key)]
        if diff:
            common.fail(f"{meta_path} was written by a run with other settings ({'; '.join(diff)}). Rerun with "
                        f"the same flags to resume, or delete {meta_path} and {shard} to start over.")
    else:
        files.write_json_atomic(meta_path, meta)


def generate_to_shard(dataset, args: Args, shard: Path, sample_fn: Callable, reward_fn: Callable,
                      score_fn: Callable | None) -> dict[str, dict]:
    """Sample, select and score every puzzle not yet in the shard, one chunk at a time.

    Chunks are fixed by puzzle order (chunk c = puzzles [c*n, (c+1)*n)) and seeded from their first puzzle
    id, so a resumed run draws exactly what the uninterrupted run would have drawn. A chunk with any puzzle
    missing is redrawn whole (same seed, same batch) and only the missing puzzles are written.
    """
    done = files.read_shard(shard)
    per_chunk = max(1, args.batch_size // max(1, args.num_generations))
    ids = dataset["id"]
    chunks = [list(range(start, min(start + per_chunk, len(ids)))) for start in range(0, len(ids), per_chunk)]
    todo = [chunk for chunk in chunks if any(ids[i] not in done for i in chunk)]
    if done:
        log(f"resuming from {shard}: {sum(i in done for i in ids)} of {len(ids)} puzzles done, "
            f"{len(todo)} chunk(s) to go")
    for chunk in tqdm(todo, desc=f"sampling {args.source}", unit="chunk", file=sys.stdout):
        rows = [dataset[i] for i in chunk]
        torch.manual_seed(chunk_seed(args.seed, rows[0]["id"]))
        samples = sample_fn(rows, args)
        records = []
        for row, texts in zip(rows, samples):
            if row["id"] in done:
                continue
            kept, counts = select_completions(args.source, texts, row, reward_fn, args.max_per_puzzle)
            records.append({"id": row["id"], "counts": counts, "kept": kept})
        if score_fn is not None:
            flat = [(row, item) for row, rec in zip([r for r in rows if r["id"] not in done], records)
                    for item in rec["kept"]]
            if flat:
                scores = score_fn([row["prompt"] for row, _ in flat], [common.row_images(row) for row, _ in flat],
                                  [item["completion"] for _, item in flat])
                for (_, item), (logprob, tokens) in zip(flat, scores):
                    item["logprob"], item["tokens"] = logprob, tokens
        with files.write_guard(shard.parent, str(shard), f"{shard} keeps every chunk finished before (a line cut short "
                              "is dropped when it is read); free space and rerun the same command to continue."):
            files.append_shard(shard, records)
        done.update({r["id"]: r for r in records})
        kept_rows = sum(len(r["kept"]) for r in done.values())
        # A sparse source samples its whole budget: at ~1% per sample the first chunk often keeps nothing while the
        # budget keeps enough. Whether it can is decided before any decoding (expected_rows); an empty source
        # stops at save_source, with the counts.
        if args.max_rows and kept_rows >= args.max_rows:
            log(f"{kept_rows} rows kept (>= --max_rows {args.max_rows}) after {len(done)} of {len(ids)} puzzles: "
                "stopping early")
            break
    return done


def kept_per_puzzle(p: float, k: int, max_per_puzzle: int) -> float:
    """Expected rows one puzzle keeps when each of its k samples is usable with probability p, independently:
    E[min(max_per_puzzle, Binomial(k, p))]. Independence is the optimistic case (a trained policy's right answers
    cluster on its easy puzzles), so the prediction is an upper bound. p 0.005, k 4, one row per puzzle: 0.0199."""
    return sum(min(max_per_puzzle, j) * math.comb(k, j) * p ** j * (1 - p) ** (k - j) for j in range(k + 1))


def expected_rows(args: Args, puzzles: int) -> dict:
    """The rows this source should keep, predicted from the sampling checkpoint's own training rollouts (same
    temperature and token cap): rft.py logs each step's share of right answers ("accuracy") and of well-formed
    ones ("format_rate"); rea_grpo_rollout keeps right samples, rea_self_generated samples with a think block."""
    path = Path(args.sampler_metrics)
    if not path.is_file():
        common.fail(f"--sampler_metrics {path}: no such file (the metrics.jsonl of the training run --model comes "
                    "from); drop the flag to sample without a prediction.")
    first, last = args.sampler_step - args.sampler_window, args.sampler_step
    records = files.read_jsonl(path, "Point --sampler_metrics at the training run's metrics.jsonl, or drop the flag.")
    steps = [r for r in records if "reward" in r and first < r.get("step", -1) <= last]
    if not steps:
        common.fail(f"--sampler_metrics {path}: no training step in ({args.sampler_step - args.sampler_window}, "
                    f"{args.sampler_step}]; give the step of --model as --sampler_step.")
    keeps = experiment.source(args.source).keeps
    key = "accuracy" if keeps == "correct_sample" else "format_rate"
    rate = sum(float(r.get(key, 0.0)) for r in steps) / len(steps)
    per_puzzle = kept_per_puzzle(rate, args.num_generations, args.max_per_puzzle)
    return {"key": key, "rate": rate, "first_step": steps[0]["step"], "last_step": steps[-1]["step"],
            "per_puzzle": per_puzzle, "puzzles": puzzles, "expected_rows": puzzles * per_puzzle}


def check_expected_rows(args: Args, puzzles: int, available: int) -> dict:
    """Stop before any decoding, naming the numbers, when the prediction is below --min_rows."""
    e = expected_rows(args, puzzles)
    what = "right" if e["key"] == "accuracy" else "well-formed"
    log(f"predicted: {e['expected_rows']:.0f} rows from {puzzles} puzzles (training rollouts {what} "
        f"{100 * e['rate']:.2f}% of the time at steps {e['first_step']}-{e['last_step']} of {args.sampler_metrics})")
    if args.min_rows and e["expected_rows"] < args.min_rows:
        need = math.ceil(args.min_rows / e["per_puzzle"]) if e["per_puzzle"] > 0 else None
        common.fail(
            f"source {args.source}: too few rows expected, stopped before any decoding. The sampling checkpoint's "
            f"training rollouts (steps {e['first_step']}-{e['last_step']} of {args.sampler_metrics}, the same "
            f"temperature and token cap) were {what} {100 * e['rate']:.2f}% of the time; with --num_generations "
            f"{args.num_generations} a puzzle keeps a row with probability {100 * e['per_puzzle']:.2f}%, so "
            f"{puzzles} puzzles give about {e['expected_rows']:.0f} rows, below --min_rows {args.min_rows} (SFT "
            f"would read each row {args.min_rows / max(1.0, e['expected_rows']):.0f}x as often as planned). "
            + (f"At this rate {need:,} puzzles would be needed (the split has {available:,}: ROLLOUT_LIMIT / "
               "--limit); " if need else "At this rate no number of puzzles is enough; ")
            + "or train RFT further (a later checkpoint: the pilot's trend says how far), or lower --min_rows.")
    return e


# ----------------------------------------------------------------------------------------------------------
# Sources without sampling
# ----------------------------------------------------------------------------------------------------------
def read_traces(path: str, known_ids: set[str]) -> tuple[dict[str, list[str]], dict]:
    """{puzzle id: [reasoning, ...]} from a JSONL of {"id", "reasoning"}; fails on a malformed line or when
    no id matches a puzzle."""
    p = Path(path)
    if not p.is_file():
        common.fail(f"--traces {path}: no such file (a JSONL with one {{\"id\": ..., \"reasoning\": ...}} per line).")
    traces, lines, unmatched = {}, 0, []
    for number, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        lines += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            common.fail(f"--traces {path} line {number}: not JSON ({err.msg}).")
        if not isinstance(record, dict) or not isinstance(record.get("reasoning"), str) or "id" not in record:
            common.fail(f"--traces {path} line {number}: needs fields 'id' and 'reasoning' (a string).")
        puzzle_id = str(record["id"])
        if puzzle_id not in known_ids:
            unmatched.append(puzzle_id)
            continue
        traces.setdefault(puzzle_id, []).append(record["reasoning"])
    if not traces:
        common.fail(f"--traces {path}: {lines} trace(s), none of whose ids match the {len(known_ids)} puzzles of "
                    f"this --data/--split (trace ids look like {unmatched[:3]}, puzzle ids like "
                    f"{sorted(known_ids)[:3]}). Use traces written for these puzzles, or the right --split.")
    if unmatched:
        log(f"warning: {len(unmatched)} of {lines} traces match no puzzle (e.g. {unmatched[:3]}); ignored")
    return traces, {"trace_lines": lines, "traces_unmatched": len(unmatched), "puzzles_with_trace": len(traces)}


def fixed_source_records(dataset, args: Args) -> tuple[dict[str, dict], dict]:
    """non_rea / rea_external: one record per puzzle, no model involved (logprob stays null)."""
    stats = {}
    keeps = experiment.source(args.source).keeps
    if keeps == "trace" and args.traces:
        traces, stats = read_traces(args.traces, set(dataset["id"]))
    elif keeps == "trace" and args.teacher_url:  # the paper's GPT-4o traces, asked for (teacher.py)
        import teacher
        traces, stats = teacher.collect_traces(dataset, teacher.config_from_args(args), args.output_dir, args.data,
                                               args.split)
    records = {}
    columns = dataset.select_columns(["id", "answer", "rows", "cols"]
                                     + (["convention"] if "convention" in dataset.column_names else []))
    for row in columns:
        answer, rows, cols = list(row["answer"]), int(row["rows"]), int(row["cols"])
        counts = {"samples": 0, "invalid_target": 0, "duplicates": 0, "kept": 0}
        if keeps == "answer":
            candidates = [jigsaw.target_answer_only(answer, rows, cols)]
            thinking = False
        elif args.traces or args.teacher_url:
            candidates = [reasoning_target(text.strip(), answer, rows, cols)
                          for text in traces.get(row["id"], [])]
            thinking = True
        else:
            candidates = [reasoning_target(programmatic_reasoning(answer, rows, cols,
                                                                  row.get("convention") or "position_to_index"),
                                           answer, rows, cols)]
            thinking = True
        kept, seen = [], set()
        for target in candidates:
            counts["samples"] += 1
            scores = jigsaw.jigsaw_reward(target, answer, thinking=thinking)
            if not is_correct(scores):  # e.g. a trace that writes its own <answer> tags
                counts["invalid_target"] += 1
            elif target in seen:
                counts["duplicates"] += 1
            elif len(kept) < args.max_per_puzzle:
                seen.add(target)
                kept.append({"completion": target, "reward": float(scores["reward"]), "logprob": None})
        counts["kept"] = len(kept)
        records[row["id"]] = {"id": row["id"], "counts": counts, "kept": kept}
    return records, stats


# ----------------------------------------------------------------------------------------------------------
# Save: the data set sft.py reads, and its statistics
# ----------------------------------------------------------------------------------------------------------
EMPTY_HINTS = {   # by what the source keeps (experiment.Source.keeps)
    "correct_sample": "The checkpoint got no puzzle right: sample more (--num_generations), use a later "
                        "checkpoint, or check --max_completion_length (truncated completions have no answer).",
    "own_think": "No sample had a usable <think>...</think> block: the checkpoint must have learnt the "
                 "format (use a later early checkpoint or a larger --num_generations).",
    "trace": "With --teacher_url: every reply was dropped (teacher_wrong_answer / teacher_no_answer / "
             "teacher_no_think above); read a few replies in OUTPUT_DIR.teacher.jsonl."}


def summarize(records: dict[str, dict], ids: list[str]) -> dict:
    totals: dict[str, int] = {}
    for puzzle_id in ids:
        for key, value in records[puzzle_id]["counts"].items():
            totals[key] = totals.get(key, 0) + value
    samples = totals.get("samples", 0)
    stats = {"puzzles": len(ids), "rows_kept": totals.get("kept", 0),
             "puzzles_with_rows": sum(records[i]["counts"]["kept"] > 0 for i in ids), **totals}
    if "acc" in totals:  # sampled sources
        stats["sampler_accuracy"] = totals["acc"] / max(1, samples)
        stats["sampler_format_rate"] = totals["fmt"] / max(1, samples)
        stats["sampler_correct_rate"] = totals["correct"] / max(1, samples)
        stats["share_puzzles_with_correct"] = sum(records[i]["counts"]["correct"] > 0 for i in ids) / max(1, len(ids))
    return stats


def save_source(dataset, records: dict[str, dict], args: Args, source_checkpoint: str, stats: dict) -> None:
    """Rows of the jigsaw split selected by index (images stay Arrow bytes: nothing is decoded), plus the new
    columns; saved atomically as DatasetDict({split: ...}) with stats.json inside."""
    from datasets import DatasetDict, Value
    ids = dataset["id"]
    indices, completions, rewards, logprobs = [], [], [], []
    for index, puzzle_id in enumerate(ids):
        for item in records.get(puzzle_id, {"kept": []})["kept"]:  # puzzles after an early stop: not sampled
            indices.append(index)
            completions.append(item["completion"])
            rewards.append(item["reward"])
            logprobs.append(item.get("logprob"))
    if not indices:
        common.fail(f"source {args.source} gave 0 rows from {len(ids)} puzzles of {args.data} ({args.split}): "
                    f"{json.dumps({k: v for k, v in stats.items() if isinstance(v, (int, float))})}. "
                    + EMPTY_HINTS.get(experiment.source(args.source).keeps, "Nothing usable in the input."))
    rows = dataset.select(indices)
    prompt_column = "prompt_no_think" if experiment.source(args.source).prompt_style == "answer_only" else "prompt"
    rows = rows.select_columns(["id", "images", prompt_column, "answer", "rows", "cols"])
    if prompt_column != "prompt":
        rows = rows.rename_column(prompt_column, "prompt")
    rows = rows.add_column("completion", completions, feature=Value("string"))
    rows = rows.add_column("reward", rewards, feature=Value("float64"))
    rows = rows.add_column("source_checkpoint", [source_checkpoint] * len(indices), feature=Value("string"))
    rows = rows.add_column("logprob", logprobs, feature=Value("float64"))
    rows = rows.select_columns(list(OUT_COLUMNS))
    kept = f"{args.output_dir} was not replaced (its previous version, if any, is intact). Free space and rerun " + (
        f"the same command: it builds the folder from {shard_paths(args.output_dir)[0]} without sampling again."
        if experiment.source(args.source).sampled else "the same command.")
    with files.write_guard(Path(args.output_dir).parent, args.output_dir, kept):
        runs.save_dataset_atomic(DatasetDict({args.split: rows}), args.output_dir, stage="rollout_sft.py",
                                 overwrite=args.overwrite)
        files.write_json_atomic(Path(args.output_dir) / "stats.json", stats)


def print_stats(stats: dict) -> None:
    log("statistics:")
    for key, value in stats.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        print(f"  {key:<28} {value}")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(argv=None, reward_fn: Callable | None = None, sample_fn: Callable | None = None) -> dict:
    """CLI entry. `reward_fn(completion, answer) -> dict(reward, acc, fmt, ...)` and
    `sample_fn(model, processor, rows, args) -> [[text] * K per row]` may be injected (tests)."""
    args = common.parse_args(Args, __doc__, argv)

    # ---------------- config: every check before any model is loaded ----------------
    if args.source not in SOURCES:
        common.fail(f"--source {args.source!r} unknown; choose one of {', '.join(SOURCES)}.")
    if not args.data or not args.output_dir:
        common.fail("--data (a jigsaw data set folder) and --output_dir (the output folder) are required.")
    if args.source in NEEDS_MODEL and not args.model:
        common.fail(f"--source {args.source} samples from a checkpoint: give --model (a save_pretrained folder or "
                    "hub id).")
    common.check_ranges(args, RANGES)
    common.check_attn_implementation(args.attn_implementation)
    if args.rollout_backend != "hf" and args.source in NEEDS_MODEL:
        import vllm_engine
        vllm_engine.check_backend(args.rollout_backend)
    # Before any model is loaded: never replace a folder this script did not make, and one writer at a time.
    # The lock file lies beside the output folder, with the shards (the folder is swapped in whole at the end).
    runs.check_output_dir(args.output_dir, "rollout_sft.py", args.overwrite)
    out = Path(args.output_dir)
    files.lock_output_dir(out, "rollout_sft.py", lock_path=out.with_name(out.name + ".lock"))
    if args.traces and experiment.source(args.source).keeps != "trace":
        common.fail("--traces only applies to a source of a teacher's traces (--source rea_external).")
    if args.teacher_url:
        import teacher
        teacher.config_from_args(args)  # every --teacher_* check before the data is read
    reward_fn = reward_fn or default_reward

    # ---------------- data ----------------
    dataset = full_split = common.load_rows(args.data, args.split, required=JIGSAW_COLUMNS)
    if args.limit:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    if len(dataset) == 0:
        common.fail(f"data {args.data} split {args.split} has no puzzles.")
    ids = dataset["id"]
    if len(set(ids)) != len(ids):
        common.fail(f"data {args.data} split {args.split}: {len(ids) - len(set(ids))} duplicate puzzle id(s); the "
                    "resume state is keyed by id. Rebuild the data set with jigsaw.py.")

    # ---------------- sources without a model ----------------
    if args.source not in NEEDS_MODEL:
        records, extra = fixed_source_records(dataset, args)
        checkpoint = "ground_truth" if experiment.source(args.source).keeps == "answer" else (
            args.traces or (f"teacher:{args.teacher_model}" if args.teacher_url else "programmatic"))
        stats = {"source": args.source, "source_checkpoint": checkpoint, **summarize(records, ids), **extra}
        save_source(dataset, records, args, checkpoint, stats)
        print_stats(stats)
        log(f"wrote {args.output_dir} ({stats['rows_kept']} rows)")
        return stats

    # ---------------- will it keep enough rows? (before any model is loaded) ----------------
    prediction = check_expected_rows(args, len(ids), len(full_split)) if args.sampler_metrics else None

    # ---------------- model ----------------
    common.check_model_path(args.model)
    check_processor(args.model)
    shard, meta_path = shard_paths(args.output_dir)
    meta = {key: getattr(args, key) for key in SHARD_KEYS}
    meta.update(data_fingerprint=runs.data_fingerprint(args.data), model_fingerprint=runs.model_fingerprint(args.model))
    Path(args.output_dir).parent.mkdir(parents=True, exist_ok=True)
    check_shard_meta(meta_path, shard, meta)
    model = processor = engine = None
    if not all(i in files.read_shard(shard) for i in ids):
        model, processor = load_sampler(args)
        if args.rollout_backend == "vllm":   # beside the HF model, which scores the kept rows
            import vllm_engine
            engine = vllm_engine.engine_for(
                args.model, args.min_pixels or None, args.max_pixels or None, seed=args.seed,
                dtype=common.resolve_dtype(args.precision, common.default_device(), "--precision"),
                max_model_len=vllm_engine.longest_prompt(processor, dataset) + args.max_completion_length,
                gpu_memory_utilization=0.5)   # half: the HF model beside it scores the kept rows
    sampler = sample_fn or (lambda model, processor, rows, a: sample_completions(model, processor, rows, a, engine))

    # ---------------- rollout: chunks appended to the shard ----------------
    records = generate_to_shard(
        dataset, args, shard,
        sample_fn=lambda rows, a: sampler(model, processor, rows, a),
        reward_fn=reward_fn,
        score_fn=lambda prompts, images, completions: sequences.sequence_logprobs(model, processor, prompts, images,
                                                                               completions, args.batch_size))

    # ---------------- save ----------------
    sampled = [i for i in ids if i in records]
    stats = {"source": args.source, "source_checkpoint": args.model, "num_generations": args.num_generations,
             "temperature": args.temperature, "puzzles_available": len(ids), **summarize(records, sampled)}
    if prediction:
        stats["predicted_rows"] = prediction["expected_rows"]
    if experiment.source(args.source).made_from == "rft_early" and stats["sampler_accuracy"] >= args.max_checkpoint_accuracy:
        log(f"warning: the checkpoint's task accuracy is {stats['sampler_accuracy']:.1%} (the paper's early "
            f"checkpoint: < {args.max_checkpoint_accuracy:.0%}); pick an earlier checkpoint for this source.")
    print_stats(stats)
    save_source(dataset, records, args, args.model, stats)
    log(f"wrote {args.output_dir} ({stats['rows_kept']} rows); raw samples' record: {shard}")
    return stats


if __name__ == "__main__":
    main()
