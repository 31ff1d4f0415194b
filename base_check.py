"""Base check: can GRPO learn the jigsaw task from this model at all? Greedy exact/hit/format on held-out puzzles,
and how much the model's jigsaw answer depends on the image, MI(answer; image).

GRPO can only reinforce what the starting model already samples. A model whose jigsaw answer ignores the image
gives group rewards that differ by luck alone, and the run spends its steps on a noise gradient (measured on an
early toy base: MI 0.04 nats, 0% exact after 60 GRPO steps; docs/LOG.md). The check teacher-forces every
candidate answer after the model's own greedy think text and asks how much the answer distribution changes from
one puzzle to the next. run_all.sh's eval_base stage runs it on the base model; rft.py runs it at step 0 of a
fresh run as a guard (it stops below --min_answer_image_mi) and uses `greedy_scores` for its evaluations.

Run it:
    python base_check.py --model Qwen/Qwen2.5-VL-3B-Instruct --data runs/3b/data/jigsaw --output_dir runs/3b/base_check
    python base_check.py --model runs/toy/base/final --data runs/toy/data/jigsaw --output_dir runs/toy/base_check \\
        --max_completion_length 64 --batch_size 64 --min_answer_image_mi 0.1 --precision fp32 --min_pixels 3136 \\
        --max_pixels 12544       # the toy run's eval_base stage
Writes --output_dir/base_check.json: exact (eval_accuracy), hit, format rate, MI(answer; image) in nats, the mean
p(true answer) against chance, and the environment it ran in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

import common
import files
import jigsaw
import runs
import sequences

PROMPT_COLUMNS = {"thinking": "prompt", "answer_only": "prompt_no_think"}
# Greedy format rate under which the check warns (a warning, not a stop): GRPO can find the format by sampling,
# but until it does most groups score 0 for format (toy: a base at 1.6% format needed ~160 steps for 50% exact,
# one at 40.6% reached 73% in 80; docs/LOG.md).
LOW_FORMAT_RATE = 0.05


@dataclass
class Args:
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    """model to check: hub id or save_pretrained folder"""
    data: str = "data/jigsaw"
    """jigsaw data set folder written by jigsaw.py"""
    output_dir: str = "runs/base_check"
    """where base_check.json goes"""
    split: str = "test"
    """split whose first --eval_size puzzles are scored (rft.py's --eval_split)"""
    prompt_style: str = "thinking"
    """thinking (<think>..</think><answer>..</answer>, column prompt) or answer_only (column prompt_no_think)"""
    eval_size: int = 64
    """puzzles scored greedily (the first N of --split; rft.py's --eval_size)"""
    batch_size: int = 16
    """prompts per generate call (rft.py's --eval_batch_size)"""
    max_completion_length: int = 512
    """greedy completion cap (Jigsaw-R1: 512; use the GRPO run's cap)"""
    mi_puzzles: int = 32
    """puzzles of the MI(answer; image) measurement (0: skip it); a few dozen resolve 0.1 nats (toy: 32)"""
    mi_candidates: int = 24
    """candidate answers teacher-forced per puzzle: all n! when n! <= this (2x2: the 24 permutations), else a
    seeded sample of this many plus the true answers"""
    min_answer_image_mi: float = 0.0
    """stop with exit 2 when MI(answer; image) is below this, in nats (0: measure only). The toy preset's 0.1 is
    3% of the 2x2 maximum log(24) = 3.18; a blind toy base measured 0.04, the toy preset's base ~1.6"""
    precision: str = "auto"
    """bf16_mixed (bf16 autocast; the default on GPU), bf16, fp32 (the default on CPU), auto: as the training
    stages load the model"""
    min_pixels: int | None = None
    """image processor min_pixels (None: the processor's own)"""
    max_pixels: int | None = None
    """image processor max_pixels (None: the processor's own)"""
    attn_implementation: str | None = None
    """attention kernel (None: transformers' default)"""
    seed: int = 0
    """seed of the sampled candidate set (only beyond n! > --mi_candidates)"""
    rollout_backend: str = "hf"
    """greedy decoder: hf (sequences.generate, the reference) or vllm (vllm_engine.py, an optional install);
    the teacher-forced MI scores always come from the HF model"""


RANGES = {"eval_size": ">= 1", "batch_size": ">= 1", "max_completion_length": ">= 1", "mi_puzzles": ">= 0",
          "mi_candidates": ">= 2", "min_answer_image_mi": ">= 0", "min_pixels": ">= 0", "max_pixels": ">= 0"}


# ----------------------------------------------------------------------------------------------------------
# Greedy exact / hit / format
# ----------------------------------------------------------------------------------------------------------
def greedy(model, processor, prompts: list[str], images: list[list], max_new_tokens: int,
           autocast=contextlib.nullcontext, engine=None) -> dict:
    """sequences.generate's greedy output, from the HF model or from a vllm_engine engine holding its weights."""
    if engine is not None:
        return engine.generate(prompts, images, max_new_tokens, do_sample=False, processor=processor)
    with autocast():
        return sequences.generate(model, processor, prompts, images, max_new_tokens=max_new_tokens, do_sample=False)


@torch.no_grad()
def greedy_scores(model, processor, rows: list[dict], prompt_style: str, max_new_tokens: int, batch_size: int,
                  autocast=contextlib.nullcontext, engine=None) -> dict:
    """Greedy decoding of jigsaw rows: exact accuracy (R_acc), format rate (R_fmt) and mean hit (R_hit) of the
    shared reward (jigsaw.jigsaw_reward). Completions are untrusted text: one that makes the reward raise
    scores 0."""
    column = PROMPT_COLUMNS[prompt_style]
    totals = {"acc": 0.0, "fmt": 0.0, "hit": 0.0}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        out = greedy(model, processor, [r[column] for r in chunk], [common.row_images(r) for r in chunk],
                     max_new_tokens, autocast, engine)
        scores = jigsaw.score_completions(out["texts"], [row["answer"] for row in chunk], prompt_style == "thinking")
        for key in totals:
            for value in scores[key]:
                totals[key] += value
    n = max(1, len(rows))
    return {"eval_accuracy": totals["acc"] / n, "eval_format_rate": totals["fmt"] / n,
            "eval_hit": totals["hit"] / n, "eval_size": len(rows)}


# ----------------------------------------------------------------------------------------------------------
# MI(answer; image), teacher-forced over a shared candidate set
# ----------------------------------------------------------------------------------------------------------
def answer_candidates(answers: list[list[int]], num_candidates: int, seed: int = 0) -> tuple[list[list[int]], bool]:
    """One candidate set shared by every puzzle (so that the p_i live on one support and can be averaged):
    all n! permutations when n! <= num_candidates (2x2: the 24 permutations, the identity included), else a
    seeded sample of num_candidates distinct permutations plus every puzzle's true answer. Returns (candidates,
    exhaustive)."""
    n = len(answers[0])
    if math.factorial(n) <= num_candidates:
        return [list(p) for p in itertools.permutations(range(1, n + 1))], True
    rng = random.Random(f"{seed}/answer-candidates")
    seen, candidates = set(), []
    for answer in answers:
        if tuple(answer) not in seen:
            seen.add(tuple(answer))
            candidates.append(list(answer))
    sampled, wanted = 0, min(num_candidates, math.factorial(n) - len(candidates))  # never more than exist
    while sampled < wanted:
        perm = rng.sample(range(1, n + 1), n)
        if tuple(perm) not in seen:
            seen.add(tuple(perm))
            candidates.append(perm)
            sampled += 1
    return candidates, False


def answer_distribution_mi(probs: torch.Tensor) -> float:
    """MI(answer; image) in nats from p(answer | image_i) over a shared candidate set, [puzzles, candidates]:
    mean_i KL(p_i || p_bar) with p_bar = mean_i p_i (the answer's marginal). 0 exactly when every puzzle gets
    the same distribution; at most log(puzzles) and log(candidates).

    Example: two puzzles, two candidates. p_1 = p_2 = [0.5, 0.5] -> MI 0. p_1 = [1, 0], p_2 = [0, 1] ->
    p_bar = [0.5, 0.5], KL = log 2 each -> MI = log 2 = 0.693 nats (the answer names the image exactly)."""
    probs = probs.double()
    marginal = probs.mean(0, keepdim=True)
    terms = torch.where(probs > 0, probs * (probs.clamp_min(1e-300).log() - marginal.clamp_min(1e-300).log()),
                        torch.zeros_like(probs))
    return float(terms.sum(1).mean())


@torch.no_grad()
def answer_image_mutual_information(model, processor, rows: list[dict], thinking: bool = True,
                                    num_puzzles: int = 32, num_candidates: int = 24, max_new_tokens: int = 512,
                                    batch_size: int = 16, seed: int = 0, autocast=contextlib.nullcontext,
                                    engine=None) -> dict:
    """How much the model's jigsaw answer depends on the image, teacher-forced over candidate answers.

    For each of the first `num_puzzles` rows: with the thinking prompt, the model first writes its own greedy
    think text (everything up to and including its first </think>; "<think></think>" if it never closes one);
    then every candidate answer c is scored as the completion  think + "\n" + "<answer>\n<grid of c>\n</answer>"
    (answer-only prompt: the answer block alone), log p summed over the completion's tokens, and normalised over
    the candidates: p_i(c) = p(c | image_i, think_i) / sum_c' p(c' | image_i, think_i). Candidates: the n!
    permutations when n! <= num_candidates (2x2: all 24), else a seeded sample of num_candidates permutations
    plus the true answers of the scored puzzles (an estimate on that subset, said in the result as
    "exhaustive": false). Returns MI = mean_i KL(p_i || mean_j p_j) in nats, the mean p_i(true answer) against
    chance 1 / (number of candidates), the share of puzzles whose most likely candidate is the true answer, and
    the share of greedy think texts that closed </think>.

    Reads: MI ~ 0 means the answer is one distribution whatever the picture (GRPO would reinforce luck); an
    answer that names the pieces' homes has MI up to log(24) = 3.18 nats on 2x2.
    """
    rows = list(rows)[:num_puzzles]
    if not rows:
        raise ValueError("answer_image_mutual_information needs at least one jigsaw row.")
    tokenizer = processor.tokenizer
    column = PROMPT_COLUMNS["thinking" if thinking else "answer_only"]
    answers = [list(r["answer"]) for r in rows]
    candidates, exhaustive = answer_candidates(answers, num_candidates, seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    thinks, closed = [], 0
    try:
        if thinking:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                out = greedy(model, processor, [r[column] for r in chunk], [common.row_images(r) for r in chunk],
                             max_new_tokens, autocast, engine)
                for text in out["texts"]:
                    end = text.find("</think>")
                    closed += end >= 0
                    thinks.append(text[:end + len("</think>")].lstrip() + "\n" if end >= 0 else "<think></think>\n")
        else:
            thinks = [""] * len(rows)
        eos = tokenizer.eos_token
        logps = []
        for i, row in enumerate(rows):
            prompt = sequences.build_batch(processor, [row[column]], [common.row_images(row)])
            ids = [tokenizer(thinks[i] + jigsaw.target_answer_only(c, row["rows"], row["cols"]) + eos,
                             add_special_tokens=False)["input_ids"] for c in candidates]
            scores = []
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size]
                length = max(len(x) for x in chunk)
                completion_ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
                completion_mask = torch.zeros((len(chunk), length), dtype=torch.long)
                for j, x in enumerate(chunk):
                    completion_ids[j, :len(x)] = torch.tensor(x)
                    completion_mask[j, :len(x)] = 1
                with autocast():
                    lp = sequences.shared_prefix_logprobs(
                        model, sequences.to_device(sequences.model_inputs(prompt), device),
                        torch.zeros(len(chunk), dtype=torch.long, device=device), completion_ids.to(device),
                        completion_mask.to(device))
                scores.append(lp.float().sum(1).cpu())
            logps.append(torch.cat(scores))
    finally:
        model.train(was_training)
    probs = torch.softmax(torch.stack(logps).double(), dim=1)
    true_index = torch.tensor([candidates.index(a) for a in answers])
    p_true = probs[torch.arange(len(rows)), true_index]
    return {"answer_image_mi": answer_distribution_mi(probs), "answer_p_true": float(p_true.mean()),
            "answer_p_chance": 1.0 / len(candidates), "answer_top1_true": float((probs.argmax(1) == true_index)
                                                                                  .double().mean()),
            "answer_mi_puzzles": len(rows), "answer_mi_candidates": len(candidates),
            "answer_mi_exhaustive": exhaustive, "think_closed": closed / len(rows) if thinking else None}


# ----------------------------------------------------------------------------------------------------------
# The check: both measurements, a warning on the format, a stop on the MI
# ----------------------------------------------------------------------------------------------------------
def check(model, processor, rows: list[dict], prompt_style: str = "thinking", max_new_tokens: int = 512,
          batch_size: int = 16, mi_puzzles: int = 32, mi_candidates: int = 24, min_answer_image_mi: float = 0.0,
          seed: int = 0, autocast=contextlib.nullcontext, tag: str = "base_check", engine=None) -> dict:
    """Greedy scores and MI(answer; image) of `model` on `rows`; prints both, warns when the format rate is under
    LOW_FORMAT_RATE, and stops (common.fail, exit 2) when the MI is under `min_answer_image_mi`. With `engine` (a
    vllm_engine engine holding the model's weights) the greedy texts come from it."""
    result = greedy_scores(model, processor, rows, prompt_style, max_new_tokens, batch_size, autocast, engine)
    if mi_puzzles > 0:
        result.update(answer_image_mutual_information(
            model, processor, rows, thinking=prompt_style == "thinking", num_puzzles=mi_puzzles,
            num_candidates=mi_candidates, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
            autocast=autocast, engine=engine))
    mi = result.get("answer_image_mi")
    print(f"[{tag}] exact {result['eval_accuracy']:.3f}, hit {result['eval_hit']:.3f}, format "
          f"{result['eval_format_rate']:.3f} on {result['eval_size']} test puzzles"
          + ("" if mi is None else f"; MI(answer; image) {mi:.3f} nats, p(true answer) "
             f"{result['answer_p_true']:.3f} vs chance {result['answer_p_chance']:.3f}"), flush=True)
    if result["eval_format_rate"] < LOW_FORMAT_RATE:
        print(f"[{tag}] warning: only {result['eval_format_rate']:.1%} of the greedy answers are in the prompt's "
              f"format (< {LOW_FORMAT_RATE:.0%}); expect GRPO's first steps to go to the format. Read what it "
              f"samples in completions.jsonl, or check --prompt_style.", flush=True)
    if mi is not None and mi < min_answer_image_mi:
        common.fail(f"the model's jigsaw answer hardly depends on the image (MI(answer; image) = {mi:.3f} nats < "
                    f"--min_answer_image_mi {min_answer_image_mi}; p(true answer) {result['answer_p_true']:.3f} vs "
                    f"chance {result['answer_p_chance']:.3f}). GRPO would reinforce luck: its group rewards differ "
                    f"by chance alone. Start from a model that reads the pieces (for the toy world, rebuild the "
                    f"base: run_all.sh --from base), or pass --min_answer_image_mi 0 to train anyway.")
    return result


def main(argv=None) -> dict:
    args = common.parse_args(Args, __doc__, argv)
    common.check_ranges(args, RANGES)
    if args.prompt_style not in PROMPT_COLUMNS:
        common.fail(f"--prompt_style {args.prompt_style}: choose thinking or answer_only.")
    if args.rollout_backend != "hf":
        import vllm_engine
        vllm_engine.check_backend(args.rollout_backend)
    column = PROMPT_COLUMNS[args.prompt_style]
    test = common.load_rows(args.data, args.split, required=(column, "answer", "images"))
    if len(test) == 0:
        common.fail(f"data {args.data} split {args.split} is empty; rebuild it with jigsaw.py.")
    rows = [test[i] for i in range(min(args.eval_size, len(test)))]
    common.check_model_path(args.model)
    output_dir = Path(args.output_dir)
    runs.check_output_dir(output_dir, "base_check.py", overwrite=False)

    precision = common.resolve_precision(args.precision)
    mixed_precision, dtype = common.PRECISIONS[precision]
    accelerator = runs.make_accelerator(mixed_precision, "none", output_dir)
    model, processor = common.load_model_and_processor(args.model, dtype, args.attn_implementation,
                                                       args.min_pixels or None, args.max_pixels or None,
                                                       str(accelerator.device))
    model = model.eval()
    engine = None
    if args.rollout_backend == "vllm":   # the engine beside the HF model, which scores the MI's candidates
        import vllm_engine
        engine = vllm_engine.engine_for(args.model, args.min_pixels or None, args.max_pixels or None,
                                        dtype="bfloat16" if mixed_precision == "bf16" else dtype,
                                        max_model_len=vllm_engine.longest_prompt(processor, rows, column)
                                        + args.max_completion_length,
                                        gpu_memory_utilization=0.5)   # half: the HF model beside it scores
    result = check(model, processor, rows, args.prompt_style, args.max_completion_length, args.batch_size,
                   args.mi_puzzles, args.mi_candidates, args.min_answer_image_mi, args.seed, accelerator.autocast,
                   engine=engine)
    if accelerator.is_main_process:
        files.write_json_atomic(output_dir / "base_check.json", {**result, "model": args.model,
                                                                "settings": dataclasses.asdict(args),
                                                                "environment": runs.environment()})
        runs.mark_output_dir(output_dir, "base_check.py")
        print(f"[base_check] wrote {output_dir / 'base_check.json'}")
    return result


if __name__ == "__main__":
    main()
