r"""Evaluate one model on the jigsaw task and on the paper's prior-knowledge benchmarks; compare runs.

The paper's question is whether fine-tuning on jigsaw puzzles destroys what the model knew. So this stage
scores a model (hub id or save_pretrained folder) on
  * the held-out jigsaw test split (the new task: exact accuracy, hit rate, format rate), and
  * prior-knowledge benchmarks (RefCOCO val, DocVQA val, MME, MMStar, POPE, MMMU val as in the paper; then
    ChartQA, AI2D, OCRBench, MathVista testmini), with lmms-eval's prompts, max new tokens and metrics
    (each builder/scorer cites the lmms-eval task file it follows; the code here is our own), and
  * `toy_prior`, the toy world's held-out prior-knowledge questions, scored by the same parsers,
and writes results.json (settings, per-sample predictions, metrics). `--compare` turns several results files
into the paper's table of changes from the base model (markdown + JSON) and a bar chart.

Decoding is greedy (do_sample=False), batched with left padding (common.generate), prompts sorted by length;
answers are read by rules only (regex/string parsing, never an LLM judge). Where lmms-eval falls back to a
random choice (MMMU) or to the "most similar" option (MathVista), we count the answer wrong and report the
share of such parse failures as `parse_failure_rate`.

Run (toy world, CPU; what run_all.sh calls):
    python eval.py --model runs/toy/base --benchmarks jigsaw,toy_prior --jigsaw_data data/jigsaw_toy \
        --jigsaw_prompt thinking --toy_prior_data runs/toy/prior --output runs/toy/eval_base/results.json
Run (real model, one GPU; data sets from the hub, or --<name>_data /local/copy for offline machines):
    python eval.py --model Qwen/Qwen2.5-VL-7B-Instruct --benchmarks refcoco,docvqa,mme,mmstar,pope,mmmu \
        --output runs/eval/base/results.json --batch_size 16
    python eval.py --model runs/rft/final --benchmarks all --jigsaw_data data/jigsaw --limit 500 \
        --output runs/eval/rft/results.json       # --limit: the same seeded subset for every model
Compare (the first run is the base):
    python eval.py --compare base=runs/eval/base/results.json rft=runs/eval/rft/results.json \
        sft=runs/eval/sft/results.json --out_dir runs/eval/compare
A rerun with the same --output only computes samples/benchmarks that are missing (per-sample cache);
--recompute ignores the cache.
"""
from __future__ import annotations

import ast
import json
import math
import os
import random
import re
import string
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import common
import jigsaw

# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
# Pixel budget per image, fixed for every model so base and fine-tuned see identical inputs (a checkpoint's
# saved processor may carry other values). Min: Qwen2.5-VL's own preprocessor default (4*28*28, so small
# toy/jigsaw images are not upscaled); max: lmms-eval's Qwen2.5-VL wrapper default (2048*28*28 = 1,605,632;
# lmms_eval/models/simple/qwen2_5_vl.py). lmms-eval's min is 256*28*28; pass --min_pixels 200704 to match it.
DEFAULT_MIN_PIXELS = 4 * 28 * 28
DEFAULT_MAX_PIXELS = 2048 * 28 * 28


@dataclass
class Args:
    model: str = ""
    """hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct) or a save_pretrained folder (runs/rft/final)"""
    benchmarks: str = "jigsaw,toy_prior"
    """comma-separated benchmark names (see the list below), or 'all' (every hub benchmark, plus jigsaw and
    toy_prior when their data folders are given)"""
    output: str = ""
    """results file to write (and to resume from: cached per-sample predictions are reused)"""
    limit: int = 0
    """evaluate a fixed seeded subset of N rows per benchmark (0 = all); same N and --seed = same rows for
    every model, so quick runs stay comparable"""
    seed: int = 0
    """seed of the --limit subset"""
    batch_size: int = 16
    """prompts per generate() call (left-padded; 16 fits a 7B model with 1.6 MP images on an 80 GB GPU)"""
    window_batches: int = 8
    """rows are decoded, length-sorted and generated window by window (window = batch_size * this), so a
    9,000-image benchmark never sits in memory at once"""
    max_new_tokens: int = 0
    """override every benchmark's max new tokens (0 = each benchmark's lmms-eval value, listed below)"""
    jigsaw_prompt: str = "thinking"
    """prompt style the model was trained with: thinking (column `prompt`, <think> then <answer>) or
    answer_only (column `prompt_no_think`)"""
    dtype: str = "auto"
    """model dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32"""
    attn_implementation: str = ""
    """attention kernel (sdpa when empty; flash_attention_2 if installed)"""
    device: str = ""
    """cuda / cpu (empty: cuda when available)"""
    min_pixels: int = DEFAULT_MIN_PIXELS
    """fixed minimum pixels per image (Qwen2.5-VL preprocessor default 4*28*28)"""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """fixed maximum pixels per image (lmms-eval's Qwen2.5-VL default 2048*28*28)"""
    recompute: bool = False
    """ignore cached predictions in --output and generate everything again"""
    save_samples: bool = True
    """keep per-sample prompts/predictions in results.json (needed for the cache)"""
    compare: str = ""
    """compare mode: NAME=results.json entries (space or comma separated); the first one is the base"""
    out_dir: str = ""
    """compare mode: folder for compare.md, compare.json, compare.png"""
    export_probes: str = ""
    """write the --limit selected samples of --benchmarks (prompt, images, reference answer) to this datasets
    folder and exit: the prior-knowledge probe set of analyze.py (no model is loaded)"""
    jigsaw_data: str = ""
    """jigsaw.py data folder (save_to_disk with a test split); no hub default"""
    toy_prior_data: str = ""
    """toy.py prior-knowledge folder (save_to_disk with a test split); no hub default"""
    refcoco_data: str = ""
    """RefCOCO override: local save_to_disk folder / parquet file or folder, or a hub id (default lmms-lab/RefCOCO)"""
    docvqa_data: str = ""
    """DocVQA override (default lmms-lab/DocVQA, config DocVQA)"""
    mme_data: str = ""
    """MME override (default lmms-lab/MME)"""
    mmstar_data: str = ""
    """MMStar override (default Lin-Chen/MMStar)"""
    pope_data: str = ""
    """POPE override (default lmms-lab/POPE)"""
    mmmu_data: str = ""
    """MMMU override (default lmms-lab/MMMU)"""
    chartqa_data: str = ""
    """ChartQA override (default lmms-lab/ChartQA)"""
    ai2d_data: str = ""
    """AI2D override (default lmms-lab/ai2d)"""
    ocrbench_data: str = ""
    """OCRBench override (default echo840/OCRBench)"""
    mathvista_data: str = ""
    """MathVista override (default AI4Math/MathVista)"""


# ----------------------------------------------------------------------------------------------------------
# Answer parsing (model outputs are untrusted text: regex and string operations only, never eval)
# ----------------------------------------------------------------------------------------------------------
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def final_answer(text: str) -> str:
    """The part of a completion that holds the answer: the last <answer> block when there is one, else the
    text without <think> blocks (a model fine-tuned on the thinking format may keep using it on benchmarks;
    lmms-eval's reasoning tasks strip think tags the same way)."""
    if not isinstance(text, str):
        return ""
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    text = _THINK_BLOCK.sub("", text)
    if "<think>" in text:  # an unclosed think block (truncated): nothing after it is an answer
        text = text.split("<think>")[0]
    return text.strip()


def normalize_text(text: str) -> str:
    """Lower case, whitespace collapsed, punctuation trimmed at both ends: 'Red.' -> 'red'."""
    text = " ".join(str(text).lower().split())
    return text.strip(string.punctuation + " ")


def parse_yes_no(text: str) -> str | None:
    """'yes' / 'no' / None. First word decides ('Yes, there is' -> yes; 'No.' -> no; 'y' -> yes), else a
    lone yes or no anywhere ('The answer is no.'); both or neither -> None (unparsed, counted wrong).
    Close to MME's Otter-style parser (lmms_eval/tasks/mme/utils.py::parse_pred_ans), more forgiving than
    lmms-eval's POPE exact match (which counts 'Yes.' wrong)."""
    words = re.findall(r"[a-z]+", final_answer(text).lower())
    if not words:
        return None
    if words[0] in ("yes", "y"):
        return "yes"
    if words[0] in ("no", "n"):
        return "no"
    found = {w for w in words if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


def parse_choice_letter(text: str, letters: str = "ABCD") -> str | None:
    """The option letter a model chose, or None. Accepts 'B', '(B)', 'B.', 'B) cat', 'B: cat', 'Answer: B',
    'The answer is (C).'; a sentence naming several letters is None unless an answer phrase picks one.
    Same spirit as lmms_eval/tasks/_task_utils/mcq_extract.py (letter at start, answer phrases), no guess."""
    body = final_answer(text).strip()
    if not body:
        return None
    valid = set(letters)
    start = re.match(r"^[\s*\[(]*([A-Z])(?:[\s*\])}.:,]|$)", body)
    if start and start.group(1) in valid:
        return start.group(1)
    phrase = re.findall(r"(?:answer|option|choice)\s*(?:is|:)?\s*[:\s]*\(?\s*([A-Z])\b", body, re.IGNORECASE)
    phrase = [p.upper() for p in phrase if p.upper() in valid]
    if phrase:
        return phrase[-1]
    lone = {m for m in re.findall(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])", body) if m in valid}
    return lone.pop() if len(lone) == 1 else None


_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def parse_count(text: str) -> int | None:
    """The first integer (digits or a number word up to ten) in the answer: '3', 'three', 'There are 3.'."""
    body = final_answer(text).lower()
    match = re.search(r"-?\d+|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b", body)
    if not match:
        return None
    token = match.group(0)
    return _NUMBER_WORDS[token] if token in _NUMBER_WORDS else int(token)


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question (DocVQA; lmms_eval/api/metrics.py::anls):
    max over the reference answers of 1 - lev(a, p) / max(len(a), len(p)) on lower-cased, whitespace-collapsed
    strings, set to 0 when below `threshold` (0.5)."""
    pred = " ".join(str(prediction).strip().lower().split())
    best = 0.0
    for answer in answers:
        ref = " ".join(str(answer).strip().lower().split())
        length = max(len(ref), len(pred))
        similarity = 1.0 if length == 0 else 1.0 - levenshtein(ref, pred) / length
        best = max(best, similarity)
    return best if best >= threshold else 0.0


def _to_float(text: str) -> float | None:
    text = str(text).strip()
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA relaxed accuracy (lmms_eval/tasks/chartqa/utils.py, after Methani et al.): numbers within 5%
    relative error of a non-zero target count (the edge, exactly 5%, is right); 'x%' is read as x/100;
    anything else needs a case-insensitive exact match."""
    pred_value, target_value = _to_float(prediction), _to_float(target)
    if pred_value is not None and target_value:
        return abs(pred_value - target_value) / abs(target_value) <= tolerance + 1e-12
    return str(prediction).strip().lower() == str(target).strip().lower()


# --- RefCOCO boxes ---------------------------------------------------------------------------------------
_NUM = r"-?\d+(?:\.\d+)?"
_BBOX_2D = re.compile(r'"bbox_2d"\s*:\s*\[\s*(' + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*("
                      + _NUM + r")\s*\]")
_PLAIN_BOX = re.compile(r"[\[(]\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM
                        + r")\s*[\])]")


def parse_box(text: str) -> list[float] | None:
    """The first box [x1, y1, x2, y2] a grounding answer gives: JSON like {"bbox_2d": [x1,y1,x2,y2], ...}
    (Qwen2.5-VL's format, often inside ```json fences and a list), else a plain [x1, y1, x2, y2] or
    (x1,y1,x2,y2). Regex only; None when there is no box or x2 < x1 / y2 < y1. lmms-eval's refcoco_grounding
    keeps the best-IoU box among several (an oracle choice); we take the first one the model commits to."""
    body = final_answer(text)
    match = _BBOX_2D.search(body) or _PLAIN_BOX.search(body)
    if not match:
        return None
    box = [float(match.group(i)) for i in range(1, 5)]
    if box[2] < box[0] or box[3] < box[1]:
        return None
    return box


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (0 for empty/degenerate unions)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def resized_size(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """(width, height) of the image the model actually sees: Qwen2-VL's smart_resize (sides rounded to
    multiples of patch 14 * merge 2 = 28, pixel count clamped to [min_pixels, max_pixels])."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


def box_to_original(box: list[float], seen_w: int, seen_h: int, orig_w: int, orig_h: int) -> list[float]:
    """Coordinate convention: Qwen2.5-VL grounds in ABSOLUTE PIXELS OF THE RESIZED INPUT IMAGE (the
    smart_resize'd image, seen_w x seen_h; Qwen2.5-VL technical report and cookbook; Qwen2-VL used 0..1000
    normalised coordinates, which lmms-eval's refcoco_grounding also tries). Scale back to the original image,
    where RefCOCO's ground truth lives ([x, y, w, h] in original pixels)."""
    sx, sy = orig_w / seen_w, orig_h / seen_h
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


# --- MMMU (after MMMU's official eval_utils as used by lmms_eval/tasks/mmmu/utils.py) --------------------
def parse_mmmu_choice(response: str, options: list[str]) -> str | None:
    """Option letter of a multiple-choice MMMU answer, or None (lmms-eval draws a random letter there; we
    count it wrong). Order: '(B)'; a standalone letter ('B', 'B.', 'B:'); the option's content when the answer
    is a sentence (> 5 words); several candidates -> the one mentioned last."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    text = " " + final_answer(response).strip().strip(",.!?;:'") + " "
    candidates = [(text.rfind(f"({l})"), l) for l in letters if f"({l})" in text]
    if not candidates:
        for letter in letters:
            hits = [m.start() for m in re.finditer(rf"(?<![A-Za-z]){letter}(?=[\s.:)])", text)]
            if hits:
                candidates.append((hits[-1], letter))
    if not candidates and len(text.split()) > 5:
        lowered = text.lower()
        candidates = [(lowered.rfind(str(o).lower()), l) for l, o in zip(letters, options)
                      if str(o).strip() and str(o).lower() in lowered]
    if not candidates:
        return None
    return max(candidates)[1]


def _normalize_open(value: str) -> list:
    """A number -> [rounded float]; a string -> [lower-cased string] (a single letter padded so 'a' does not
    match inside words), as MMMU's normalize_str."""
    value = str(value).strip()
    try:
        return [round(float(value.replace(",", "")), 2)]
    except ValueError:
        value = value.lower()
        return [" " + value, value + " "] if len(value) == 1 else [value]


def mmmu_open_candidates(response: str) -> list:
    """Candidate answers of an open MMMU response: the tail after a key phrase ('so ', 'is ', 'therefore ',
    'answer ', '=' in the last sentence...) of each sentence, plus every number in them, normalised."""
    text = final_answer(response).strip().strip(".").lower()
    if not text:
        return []
    sentences = [s for s in re.split(r"\.\s|\n", text) if s.strip()]
    keys = []
    for i, sentence in enumerate(sentences):
        indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
        if i == len(sentences) - 1:
            indicators.append("=")
        tails = [sentence.split(ind)[-1].strip() for ind in indicators if ind in sentence]
        tails = [t for t in tails if t and t not in ":,.!?;'"]
        if tails:
            keys.append(min(tails, key=len))
    if not keys:
        keys = [text]
    numbers = [n for k in keys for n in re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][+-]?\d+)?", k)]
    out = []
    for item in keys + numbers:
        for value in _normalize_open(item):
            if value not in out:
                out.append(value)
    return out


def mmmu_open_correct(response: str, gold) -> bool:
    """MMMU open answer: a string gold counts when it is contained in a candidate, a number when equal."""
    golds = gold if isinstance(gold, list) else [gold]
    norm_golds = [g for item in golds for g in _normalize_open(item)]
    for candidate in mmmu_open_candidates(response):
        if isinstance(candidate, str):
            if any(isinstance(g, str) and g in candidate for g in norm_golds):
                return True
        elif candidate in norm_golds:
            return True
    return False


# --- MathVista (rule-based part of lmms_eval/tasks/mathvista/mathvista_evals.py, no GPT extraction) ------
def mathvista_extract(response: str, question_type: str, answer_type: str, choices: list | None,
                      precision: int) -> str | None:
    """Normalised MathVista answer or None. Multiple choice: the option text itself, or the option of the
    letter given; integers/floats: the number (rounded to `precision` decimals for floats); lists: the
    bracketed list. lmms-eval asks GPT to extract otherwise and then snaps to the most similar option; we
    count such answers as parse failures."""
    body = final_answer(response).strip()
    if not body:
        return None
    if question_type == "multi_choice":
        choices = [str(c) for c in (choices or [])]
        if body in choices:
            return body
        letter = parse_choice_letter(body, "".join(chr(ord("A") + i) for i in range(len(choices))))
        return choices[ord(letter) - ord("A")] if letter else None
    if answer_type == "list":
        match = re.search(r"\[[^\[\]]*\]", body)
        return " ".join(match.group(0).split()) if match else None
    numbers = re.findall(r"-?\d+(?:\.\d+)?", body.replace(",", ""))
    if not numbers:
        return None
    value = float(numbers[-1] if len(numbers) > 1 and re.search(r"answer|=", body, re.I) else numbers[0])
    if answer_type == "integer":
        return str(int(value))
    if answer_type == "float":
        return str(round(value, precision))
    return numbers[0]


# ----------------------------------------------------------------------------------------------------------
# Metric aggregation (pure functions over per-sample score dicts; tests check them by hand)
# ----------------------------------------------------------------------------------------------------------
def pct(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def parse_failure_rate(records: list[dict]) -> float:
    return pct(not r["score"]["parsed"] for r in records)


def accuracy_by(records: list[dict], key: str | None = None) -> dict:
    """Accuracy (%) overall and per value of meta[key]; parse failures counted wrong and reported."""
    out = {"accuracy": pct(r["score"]["correct"] for r in records), "parse_failure_rate": parse_failure_rate(records),
           "num_samples": len(records)}
    if key:
        groups = defaultdict(list)
        for r in records:
            groups[str(r["meta"].get(key))].append(r["score"]["correct"])
        out[f"accuracy_by_{key}"] = {k: pct(v) for k, v in sorted(groups.items())}
    return out


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(records: list[dict]) -> dict:
    """MME (lmms_eval/tasks/mme/utils.py): per subtask, acc = % of questions right, acc+ = % of images whose
    two questions (one yes, one no) are both right; subtask score = acc + acc+ (max 200). Perception = sum of
    10 subtasks (max 2000), cognition = sum of 4 (max 800), total out of 2800."""
    by_task = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_task[r["meta"]["category"]][r["meta"]["question_id"]].append(r["score"]["correct"])
    subtasks = {}
    for task, images in sorted(by_task.items()):
        answers = [c for image in images.values() for c in image]
        acc = pct(answers)
        acc_plus = pct(all(image) for image in images.values())
        subtasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "images": len(images)}
    perception = sum(v["score"] for k, v in subtasks.items() if k in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in subtasks.items() if k in MME_COGNITION)
    return {"total": perception + cognition, "perception": perception, "cognition": cognition,
            "subtasks": subtasks, "parse_failure_rate": parse_failure_rate(records), "num_samples": len(records)}


def yes_no_metrics(records: list[dict]) -> dict:
    """POPE: accuracy, precision, recall, F1 (positive class 'yes') and yes-ratio, all in %.
    yes_ratio is the share of answers that say yes (the original POPE definition; lmms-eval's pope utils
    report the ground-truth share instead). An unparsed answer is a wrong 'not yes'."""
    preds = [r["score"]["extracted"] for r in records]
    golds = [r["target"] for r in records]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, golds))
    predicted_yes = sum(p == "yes" for p in preds)
    gold_yes = sum(g == "yes" for g in golds)
    precision = 100.0 * tp / predicted_yes if predicted_yes else 0.0
    recall = 100.0 * tp / gold_yes if gold_yes else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": pct(p == g for p, g in zip(preds, golds)), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": pct(p == "yes" for p in preds), "parse_failure_rate": parse_failure_rate(records),
            "num_samples": len(records)}


def pope_metrics(records: list[dict]) -> dict:
    """POPE's three splits (adversarial, popular, random: column `category`) each scored alone, plus the mean
    over splits of each metric (lmms-eval's pope_full group)."""
    splits = defaultdict(list)
    for r in records:
        splits[r["meta"]["category"]].append(r)
    per_split = {name: yes_no_metrics(rs) for name, rs in sorted(splits.items())}
    out = {k: sum(m[k] for m in per_split.values()) / len(per_split)
           for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} if per_split else {}
    out.update(splits=per_split, parse_failure_rate=parse_failure_rate(records), num_samples=len(records))
    return out


def refcoco_metrics(records: list[dict]) -> dict:
    ious = [r["score"]["iou"] for r in records]
    return {"acc@0.5": pct(i >= 0.5 for i in ious), "mean_iou": pct(ious),
            "parse_failure_rate": parse_failure_rate(records), "num_samples": len(records)}


def ocrbench_metrics(records: list[dict]) -> dict:
    """OCRBench score: number of right answers out of its 1000 questions (lmms_eval/tasks/ocrbench/utils.py);
    on a --limit subset the count is scaled to 1000 so numbers stay comparable."""
    correct = sum(r["score"]["correct"] for r in records)
    by_type = defaultdict(int)
    for r in records:
        by_type[r["meta"]["question_type"]] += r["score"]["correct"]
    scale = 1000 / len(records) if records and len(records) != 1000 else 1.0
    return {"score": correct * scale, "correct": correct, "by_question_type": dict(sorted(by_type.items())),
            "parse_failure_rate": parse_failure_rate(records), "num_samples": len(records)}


def jigsaw_metrics(records: list[dict]) -> dict:
    return {"accuracy": pct(r["score"]["acc"] for r in records), "hit_rate": pct(r["score"]["hit"] for r in records),
            "format_rate": pct(r["score"]["fmt"] for r in records),
            "parse_failure_rate": parse_failure_rate(records), "num_samples": len(records)}


def mmmu_metrics(records: list[dict]) -> dict:
    out = accuracy_by(records, "question_type")
    out.update({k: v for k, v in accuracy_by(records, "subject").items() if k == "accuracy_by_subject"})
    return out


# ----------------------------------------------------------------------------------------------------------
# Benchmarks: loaders (row -> samples) and scorers (prediction -> score)
# ----------------------------------------------------------------------------------------------------------
def to_pil(value):
    """A datasets Image (PIL already), or a {'bytes', 'path'} dict from a parquet file without features."""
    from PIL import Image
    if isinstance(value, dict) and value.get("bytes") is not None:
        import io
        value = Image.open(io.BytesIO(value["bytes"]))
    if value is None or not hasattr(value, "convert"):
        return None
    return value.convert("RGB")


@dataclass
class Context:
    """What row builders need besides the row: the run's prompt style and the processor's pixel budget."""
    jigsaw_prompt: str = "thinking"
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS


def sample(prompt: str, images: list, target, **meta) -> dict:
    return {"prompt": prompt, "images": [im for im in images if im is not None], "target": target, "meta": meta}


# lmms-eval's default post-prompts (lmms_eval_specific_kwargs.default of each task yaml).
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


def rows_jigsaw(row: dict, ctx: Context) -> list[dict]:
    column = "prompt" if ctx.jigsaw_prompt == "thinking" else "prompt_no_think"
    return [sample(row[column], [to_pil(im) for im in row["images"]], list(row["answer"]),
                   rows=row["rows"], cols=row["cols"], thinking=ctx.jigsaw_prompt == "thinking")]


def score_jigsaw(prediction: str, s: dict) -> dict:
    reward = jigsaw.jigsaw_reward(prediction, s["target"], thinking=s["meta"]["thinking"])
    return {"correct": reward["acc"], "acc": reward["acc"], "hit": reward["hit"], "fmt": reward["fmt"],
            "parsed": reward["parsed"]}


def rows_toy_prior(row: dict, ctx: Context) -> list[dict]:
    return [sample(row["prompt"], [to_pil(im) for im in row["images"]], str(row["answer"]),
                   category=row["category"])]


def score_toy_prior(prediction: str, s: dict) -> dict:
    """The toy questions mimic the real benchmarks' styles, so each is read by that benchmark's parser:
    color -> normalised exact match, color_mc -> option letter, yesno -> POPE yes/no, count -> number,
    color_grid (training-only in toy.py, scored here if present) -> the jigsaw grid parser."""
    category, target = s["meta"]["category"], s["target"]
    if category == "color_grid":
        expected = jigsaw.parse_grid_answer(target, len(target.split()))
        extracted = jigsaw.extract_answer(prediction, len(expected or []))
        return {"correct": float(extracted is not None and extracted == expected), "parsed": extracted is not None,
                "extracted": extracted}
    if category in ("color_mc", "shape_mc"):
        extracted = parse_choice_letter(prediction, "ABCD")
        return {"correct": float(extracted == target), "parsed": extracted is not None, "extracted": extracted}
    if category == "yesno":
        extracted = parse_yes_no(prediction)
        return {"correct": float(extracted == target), "parsed": extracted is not None, "extracted": extracted}
    if category == "count":
        extracted = parse_count(prediction)
        return {"correct": float(extracted is not None and str(extracted) == target), "parsed": extracted is not None,
                "extracted": extracted}
    extracted = normalize_text(final_answer(prediction))
    return {"correct": float(extracted == normalize_text(target)), "parsed": bool(extracted), "extracted": extracted}


def rows_refcoco(row: dict, ctx: Context) -> list[dict]:
    """lmms-lab/RefCOCO: one row per annotation, `answer` a list of referring expressions (one sample each,
    as lmms-eval's refcoco_bbox_rec_preprocess_dataset explodes them), `bbox` [x, y, w, h] original pixels.
    Prompt: lmms_eval/tasks/refcoco_grounding/utils.py (JSON boxes, the form Qwen2.5-VL was trained to emit;
    the older refcoco_bbox_rec prompt asks for 0..1 floats, which Qwen2.5-VL does not use)."""
    image = to_pil(row["image"])
    seen_w, seen_h = resized_size(image.width, image.height, ctx.min_pixels, ctx.max_pixels)
    x, y, w, h = [float(v) for v in row["bbox"]]
    refs = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    return [sample(f'Locate every object that matches the description "{ref}" in the image. Report bbox '
                   "coordinates in JSON format.", [image], [x, y, x + w, y + h], ref=ref, width=image.width,
                   height=image.height, seen_width=seen_w, seen_height=seen_h, question_id=str(row["question_id"]))
            for ref in refs]


def score_refcoco(prediction: str, s: dict) -> dict:
    box = parse_box(prediction)
    if box is None:
        return {"correct": 0.0, "iou": 0.0, "parsed": False, "extracted": None}
    m = s["meta"]
    box = box_to_original(box, m["seen_width"], m["seen_height"], m["width"], m["height"])
    iou = box_iou(box, s["target"])
    return {"correct": float(iou >= 0.5), "iou": iou, "parsed": True, "extracted": [round(v, 1) for v in box]}


def rows_docvqa(row: dict, ctx: Context) -> list[dict]:
    # lmms_eval/tasks/docvqa/_default_template_docvqa_yaml: question + default post_prompt, 32 new tokens.
    return [sample(f"{row['question']}{SHORT_ANSWER}", [to_pil(row["image"])], list(row["answers"]),
                   question_id=str(row["questionId"]))]


def score_docvqa(prediction: str, s: dict) -> dict:
    body = final_answer(prediction)
    value = anls(body, s["target"])
    return {"correct": value, "anls": value, "parsed": bool(body.strip())}


def rows_mme(row: dict, ctx: Context) -> list[dict]:
    # lmms_eval/tasks/mme/utils.py::mme_doc_to_text: the question's own " Please answer yes or no." is replaced
    # by the default post_prompt.
    question = row["question"].strip().replace(" Please answer yes or no.", "")
    return [sample(f"{question}{SHORT_ANSWER}", [to_pil(row["image"])], row["answer"].strip().lower().rstrip("."),
                   category=row["category"], question_id=str(row["question_id"]))]


def score_yes_no(prediction: str, s: dict) -> dict:
    extracted = parse_yes_no(prediction)
    return {"correct": float(extracted == s["target"]), "parsed": extracted is not None, "extracted": extracted}


def rows_mmstar(row: dict, ctx: Context) -> list[dict]:
    # lmms_eval/tasks/mmstar: the question already lists the options; default post_prompt (no final period).
    return [sample(f"{row['question'].strip()}\nAnswer with the option's letter from the given choices directly",
                   [to_pil(row["image"])], str(row["answer"]).strip().upper(), category=row["category"],
                   l2_category=row["l2_category"])]


def score_letter(prediction: str, s: dict) -> dict:
    letters = s["meta"].get("letters", "ABCD")
    extracted = parse_choice_letter(prediction, letters)
    return {"correct": float(extracted == s["target"]), "parsed": extracted is not None, "extracted": extracted}


def rows_pope(row: dict, ctx: Context) -> list[dict]:
    # lmms_eval/tasks/pope/utils.py: question + default post_prompt, 128 new tokens.
    return [sample(f"{row['question'].strip()}{SHORT_ANSWER}", [to_pil(row["image"])],
                   row["answer"].strip().lower(), category=row["category"], question_id=str(row["question_id"]))]


def _literal_list(value) -> list:
    """MMMU stores options (and some open answers) as the string of a Python list: a data-set field, parsed
    with ast.literal_eval (literals only; model outputs never go through it)."""
    if isinstance(value, list):
        return value
    text = str(value).strip()
    if text.startswith("["):
        try:
            parsed = ast.literal_eval(text)
            if isinstance(parsed, list):
                return parsed
        except (ValueError, SyntaxError):
            pass
    return [text]


def rows_mmmu(row: dict, ctx: Context) -> list[dict]:
    """lmms_eval/tasks/mmmu/utils.py::construct_prompt with mmmu_val.yaml's default prompts; the images that
    the question names (<image 1>...) go first in the chat turn (common.make_messages), the <image k> marks
    stay in the text so the model can tell them apart."""
    question, qtype = row["question"], row["question_type"]
    options = _literal_list(row["options"]) if qtype == "multiple-choice" else []
    if qtype == "multiple-choice":
        listed = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))
        prompt = f"{question}\n{listed}\n\nAnswer with the option's letter from the given choices directly."
    else:
        prompt = f"{question}\n\nAnswer the question using a single word or phrase."
    names = sorted(set(re.findall(r"<image (\d+)>", prompt + " " + " ".join(map(str, options)))), key=int)
    images = [to_pil(row.get(f"image_{k}")) for k in names]
    answer = row["answer"] if qtype == "multiple-choice" else _literal_list(row["answer"])
    subject = re.sub(r"^(?:validation|dev|test)_|_\d+$", "", str(row["id"]))
    return [sample(prompt, images, answer, question_type=qtype, options=[str(o) for o in options], subject=subject,
                   question_id=str(row["id"]))]


def score_mmmu(prediction: str, s: dict) -> dict:
    if s["meta"]["question_type"] == "multiple-choice":
        extracted = parse_mmmu_choice(prediction, s["meta"]["options"])
        return {"correct": float(extracted == s["target"]), "parsed": extracted is not None, "extracted": extracted}
    candidates = mmmu_open_candidates(prediction)
    return {"correct": float(mmmu_open_correct(prediction, s["target"])), "parsed": bool(candidates),
            "extracted": [c if isinstance(c, str) else float(c) for c in candidates[:5]]}


def rows_chartqa(row: dict, ctx: Context) -> list[dict]:
    # lmms_eval/tasks/chartqa/chartqa.yaml: "Answer the question with a single word.", 16 new tokens.
    return [sample(f"{row['question']}\nAnswer the question with a single word.", [to_pil(row["image"])],
                   str(row["answer"]), type=row["type"])]


def score_chartqa(prediction: str, s: dict) -> dict:
    body = final_answer(prediction).strip().rstrip(".")
    return {"correct": float(relaxed_correct(body, s["target"])), "parsed": bool(body), "extracted": body}


def rows_ai2d(row: dict, ctx: Context) -> list[dict]:
    # lmms_eval/tasks/ai2d/utils.py (prompt_format mcq): options as "A. ..." lines; target letter of `answer`.
    options = list(row["options"])
    letters = "".join(chr(ord("A") + i) for i in range(len(options)))
    listed = "\n".join(f"{letter}. {o}" for letter, o in zip(letters, options))
    return [sample(f"{row['question']}\n{listed}{LETTER_ANSWER}", [to_pil(row["image"])], letters[int(row["answer"])],
                   letters=letters)]


def rows_ocrbench(row: dict, ctx: Context) -> list[dict]:
    # lmms_eval/tasks/ocrbench: the question alone (empty pre/post prompts), 128 new tokens.
    answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    return [sample(row["question"].strip(), [to_pil(row["image"])], [str(a) for a in answers],
                   dataset=row["dataset"], question_type=row["question_type"])]


def _fold_fullwidth(text: str) -> str:
    return "".join(chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else (" " if c == "\u3000" else c)
                   for c in text)


def score_ocrbench(prediction: str, s: dict) -> dict:
    """lmms_eval/tasks/ocrbench/utils.py: right when a reference answer is contained in the prediction
    (lower-cased, full-width folded; HME100k formulas compared without spaces, case kept)."""
    body = final_answer(prediction).strip()
    hme = s["meta"]["dataset"] == "HME100k"
    if hme:
        pred = body.replace("\n", " ").replace(" ", "")
        hit = any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in s["target"])
    else:
        pred = _fold_fullwidth(body).lower().replace("\n", " ")
        hit = any(_fold_fullwidth(a).lower().strip().replace("\n", " ") in pred for a in s["target"])
    return {"correct": float(hit and bool(body)), "parsed": bool(body)}


def rows_mathvista(row: dict, ctx: Context) -> list[dict]:
    """lmms_eval/tasks/mathvista (shot_type format-prompt, 0-shot, no caption/OCR): question (+ unit), options
    as 'A. ...' lines, then a one-line answer-format hint."""
    choices = list(row["choices"]) if row.get("choices") else []
    qtype, atype = row["question_type"], row["answer_type"]
    precision = row.get("precision")
    precision = int(precision) if isinstance(precision, (int, float)) and not math.isnan(precision) else 0
    if qtype == "multi_choice":
        hint = "Answer with the option's letter from the given choices directly."
    elif atype == "integer":
        hint = "Answer the question using a single integer number."
    elif atype == "float" and precision == 1:
        hint = "Answer the question using a single floating-point number with one decimal place."
    elif atype == "float" and precision == 2:
        hint = "Answer the question using a single floating-point number with two decimal places."
    else:
        hint = "Answer the question using a Python list."
    question = row["question"] + (f" (Unit: {row['unit']})" if row.get("unit") else "")
    parts = [question, "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices)), hint]
    image = row.get("decoded_image")
    return [sample("\n".join(p for p in parts if p), [to_pil(image)], str(row["answer"]), question_type=qtype,
                   answer_type=atype, choices=[str(c) for c in choices], precision=precision, pid=str(row["pid"]))]


def score_mathvista(prediction: str, s: dict) -> dict:
    m = s["meta"]
    extracted = mathvista_extract(prediction, m["question_type"], m["answer_type"], m["choices"], m["precision"])
    target = s["target"].strip()
    if m["answer_type"] == "list":
        target = " ".join(target.split())
    return {"correct": float(extracted is not None and extracted.strip() == target), "parsed": extracted is not None,
            "extracted": extracted}


@dataclass
class Benchmark:
    name: str
    hub_id: str | None          # default data source (None: a local folder is required)
    split: str
    columns: tuple              # columns the loader reads (checked before any model is loaded)
    build: Callable             # (row, Context) -> list of samples
    score: Callable             # (prediction, sample) -> dict(correct, parsed, ...)
    aggregate: Callable         # list of records -> metrics dict
    headline: str               # metric shown in the comparison table
    max_new_tokens: int
    metric: str                 # what the headline means, for --help and the tables
    source: str                 # where prompt/metric conventions come from
    config: str | None = None   # hub config name
    group_column: str | None = None  # --limit samples whole groups (MME: both questions of an image)
    prior: bool = True          # part of the prior-knowledge suite (the 'all' selection)


REGISTRY: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("jigsaw", None, "test", ("images", "prompt", "prompt_no_think", "answer", "rows", "cols"), rows_jigsaw,
              score_jigsaw, jigsaw_metrics, "accuracy",
              # Jigsaw-R1 / the paper's GRPO runs cap completions at 512 tokens.
              512, "exact accuracy % (+ hit rate, format rate) of jigsaw.jigsaw_reward",
              "this project's jigsaw.py (Jigsaw-R1 conventions)", prior=False),
    Benchmark("toy_prior", None, "test", ("images", "prompt", "answer", "category"), rows_toy_prior, score_toy_prior,
              lambda rs: accuracy_by(rs, "category"), "accuracy", 64,
              "accuracy % overall and per category (color/color_mc/yesno/count)", "this project's toy.py",
              prior=False),
    Benchmark("refcoco", "lmms-lab/RefCOCO", "val", ("image", "answer", "bbox", "question_id"), rows_refcoco,
              score_refcoco, refcoco_metrics, "acc@0.5", 512,
              "accuracy % at IoU >= 0.5 (Qwen2.5-VL absolute-pixel boxes)",
              "lmms-eval tasks/refcoco_grounding (prompt, 512 tokens), tasks/refcoco (ACC@0.5)"),
    Benchmark("docvqa", "lmms-lab/DocVQA", "validation", ("image", "question", "answers", "questionId"), rows_docvqa,
              score_docvqa, lambda rs: {"anls": pct(r["score"]["anls"] for r in rs),
                                        "parse_failure_rate": parse_failure_rate(rs), "num_samples": len(rs)},
              "anls", 32, "ANLS x100", "lmms-eval tasks/docvqa (docvqa_val)", config="DocVQA"),
    Benchmark("mme", "lmms-lab/MME", "test", ("image", "question", "answer", "category", "question_id"), rows_mme,
              score_yes_no, mme_scores, "total", 16,
              "perception + cognition score out of 2800 (acc + acc+ per subtask)", "lmms-eval tasks/mme",
              group_column="question_id"),
    Benchmark("mmstar", "Lin-Chen/MMStar", "val", ("image", "question", "answer", "category", "l2_category"),
              rows_mmstar, score_letter, lambda rs: accuracy_by(rs, "category"), "accuracy",
              # the task yaml sets no max_new_tokens; a letter needs a few tokens.
              32, "accuracy % overall and per category", "lmms-eval tasks/mmstar"),
    Benchmark("pope", "lmms-lab/POPE", "test", ("image", "question", "answer", "category", "question_id"), rows_pope,
              score_yes_no, pope_metrics, "accuracy", 128,
              "accuracy/precision/recall/F1/yes-ratio %, per split and mean", "lmms-eval tasks/pope (pope_full)"),
    Benchmark("mmmu", "lmms-lab/MMMU", "validation", ("id", "question", "options", "answer", "question_type",
                                                       "image_1"),
              rows_mmmu, score_mmmu, mmmu_metrics, "accuracy", 128,
              "accuracy % (multiple choice + open), per subject", "lmms-eval tasks/mmmu (mmmu_val), MMMU eval_utils"),
    Benchmark("chartqa", "lmms-lab/ChartQA", "test", ("image", "question", "answer", "type"), rows_chartqa,
              score_chartqa, lambda rs: accuracy_by(rs, "type"), "accuracy", 16, "relaxed accuracy % (5%)",
              "lmms-eval tasks/chartqa"),
    Benchmark("ai2d", "lmms-lab/ai2d", "test", ("image", "question", "options", "answer"), rows_ai2d, score_letter,
              accuracy_by, "accuracy", 16, "accuracy %", "lmms-eval tasks/ai2d"),
    Benchmark("ocrbench", "echo840/OCRBench", "test", ("image", "question", "answer", "dataset", "question_type"),
              rows_ocrbench, score_ocrbench, ocrbench_metrics, "score", 128, "score out of 1000",
              "lmms-eval tasks/ocrbench"),
    Benchmark("mathvista", "AI4Math/MathVista", "testmini", ("decoded_image", "question", "choices", "answer",
                                                              "question_type", "answer_type", "pid"),
              rows_mathvista, score_mathvista, lambda rs: accuracy_by(rs, "question_type"), "accuracy",
              # format-prompt answers are one line; lmms-eval's 16384 only matters for reasoning models.
              512, "accuracy % (rule-based extraction only)", "lmms-eval tasks/mathvista (testmini_format)"),
]}


def registry_text() -> str:
    lines = ["benchmarks (name: metric | default data | source):"]
    for b in REGISTRY.values():
        data = f"{b.hub_id} [{b.split}]" if b.hub_id else f"--{b.name}_data folder [{b.split}]"
        lines.append(f"  {b.name:<10} {b.metric} | {data} | max_new_tokens {b.max_new_tokens} | {b.source}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def open_benchmark_data(bench: Benchmark, source: str):
    """The benchmark's split from a local save_to_disk folder, a parquet file/folder (a hub snapshot), a
    .jsonl file, or a hub id; the schema is checked here, before any model is loaded."""
    from datasets import DatasetDict, load_dataset, load_from_disk
    path = Path(source).expanduser()
    flag = f"--{bench.name}_data"
    if path.exists():
        if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
            dataset = load_from_disk(str(path))
            if isinstance(dataset, DatasetDict):
                if bench.split not in dataset:
                    common.fail(f"{flag} {source}: no '{bench.split}' split (it has {list(dataset)}).")
                dataset = dataset[bench.split]
        elif path.is_dir() or path.suffix == ".parquet":
            files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
            if not files:
                common.fail(f"{flag} {source}: neither a save_to_disk folder nor a folder of .parquet files.")
            in_split = [f for f in files if re.search(rf"(^|[/_-]){re.escape(bench.split)}([-_.]|$)", str(f))]
            dataset = load_dataset("parquet", data_files=[str(f) for f in (in_split or files)], split="train")
        elif path.suffix in (".jsonl", ".json"):
            dataset = load_dataset("json", data_files=str(path), split="train")
        else:
            common.fail(f"{flag} {source}: expected a save_to_disk folder, parquet file/folder or .jsonl file.")
    elif bench.hub_id is None and not source:
        common.fail(f"benchmark {bench.name} needs {flag} (a folder made by "
                    f"{'jigsaw.py --out DIR' if bench.name == 'jigsaw' else 'toy.py --out DIR (its prior/)'}).")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        try:
            dataset = load_dataset(source, bench.config, split=bench.split) if bench.config \
                else load_dataset(source, split=bench.split)
        except Exception as err:  # offline, gated, renamed: all end the same way for the user
            common.fail(f"{bench.name}: could not load hub data set {source} (split {bench.split}): "
                        f"{err.__class__.__name__}: {str(err)[:300]}. On an offline machine, download it elsewhere "
                        f"(datasets save_to_disk or the hub's parquet files) and pass {flag} /path/to/copy.")
    else:
        common.fail(f"{flag} {source}: no such file or folder (and not a hub id like lmms-lab/POPE).")
    missing = [c for c in bench.columns if c not in dataset.column_names]
    if missing:
        common.fail(f"{bench.name} data {source}: missing column(s) {missing}; it has {dataset.column_names}. "
                    f"Point {flag} at a copy of {bench.hub_id or 'the data set'} with its original columns.")
    return dataset


def select_rows(dataset, bench: Benchmark, limit: int, seed: int) -> list[int]:
    """All row indices, or a fixed seeded subset of `limit` rows (whole groups for MME: both questions of an
    image). Seeded by (seed, benchmark), independent of the model, so every model sees the same rows."""
    n = len(dataset)
    if not limit or limit >= n:
        return list(range(n))
    rng = random.Random(f"{seed}/{bench.name}")
    if bench.group_column:
        groups = defaultdict(list)
        for i, key in enumerate(dataset[bench.group_column]):
            groups[key].append(i)
        keys = sorted(groups)
        chosen, rows = rng.sample(keys, len(keys)), []
        for key in chosen:
            if len(rows) >= limit:
                break
            rows.extend(groups[key])
        return sorted(rows)
    return sorted(rng.sample(range(n), limit))


# ----------------------------------------------------------------------------------------------------------
# Generation loop
# ----------------------------------------------------------------------------------------------------------
def prompt_length(processor, s: dict, ctx: Context) -> int:
    """Tokens of a prompt (text + image tokens after smart_resize and the 2x2 merge), for length sorting."""
    text = len(processor.tokenizer(s["prompt"], add_special_tokens=False)["input_ids"])
    image_tokens = 0
    for im in s["images"]:
        w, h = resized_size(im.width, im.height, ctx.min_pixels, ctx.max_pixels)
        image_tokens += (w // 28) * (h // 28)
    return text + image_tokens


def generate_records(model, processor, samples: list[dict], batch_size: int, max_new_tokens: int, ctx: Context,
                     progress=None) -> list[dict]:
    """Greedy completions for `samples`, longest prompts first (similar lengths share a batch, so little
    padding; the largest batch comes first, so an out-of-memory error shows up at once).

    In fp32 the predictions equal one-by-one decoding (tests/test_eval.py; also 64/64 on an H100). In bf16
    a few can differ (59/64 on the tiny random model on an H100): padded batches change the kernels' reduction
    order, and bf16 rounding then flips near-tied argmaxes. So compare models at the same --batch_size."""
    order = sorted(range(len(samples)), key=lambda i: -prompt_length(processor, samples[i], ctx))
    texts, truncated = [None] * len(samples), [False] * len(samples)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        out = common.generate(model, processor, [samples[i]["prompt"] for i in chunk],
                              [samples[i]["images"] for i in chunk], max_new_tokens=max_new_tokens, do_sample=False)
        for i, text, cut in zip(chunk, out["texts"], out["truncated"]):
            texts[i], truncated[i] = text, cut
        if progress is not None:
            progress.update(len(chunk))
    return [{"prediction": t, "truncated": c} for t, c in zip(texts, truncated)]


def score_record(bench: Benchmark, record: dict) -> dict:
    """Score one prediction; a scorer error on odd text is a parse failure, never a crashed run."""
    try:
        return bench.score(record["prediction"] or "", record)
    except Exception as err:  # noqa: BLE001 - untrusted text must not end a multi-hour run
        return {"correct": 0.0, "parsed": False, "error": f"{err.__class__.__name__}: {err}"[:200],
                **({"iou": 0.0} if bench.name == "refcoco" else {}), **({"anls": 0.0} if bench.name == "docvqa" else {}),
                **({"acc": 0.0, "hit": 0.0, "fmt": 0.0} if bench.name == "jigsaw" else {})}


# ----------------------------------------------------------------------------------------------------------
# Compare mode
# ----------------------------------------------------------------------------------------------------------
def compare_table(runs: list[tuple[str, dict]]) -> list[dict]:
    """Rows of the paper-style table: per benchmark, the headline metric of every run and its change from
    the first (base) run. Pure function over loaded results files."""
    base_name = runs[0][0]
    names = []
    for _, results in runs:
        names += [b for b in results.get("benchmarks", {}) if b not in names]
    rows = []
    for name in names:
        bench = REGISTRY.get(name)
        metric = bench.headline if bench else "accuracy"
        values, counts = {}, {}
        for run_name, results in runs:
            entry = results.get("benchmarks", {}).get(name)
            if entry and metric in entry.get("metrics", {}):
                values[run_name] = entry["metrics"][metric]
                counts[run_name] = entry["metrics"].get("num_samples")
        base = values.get(base_name)
        deltas = {k: (v - base if base is not None and v is not None else None) for k, v in values.items()
                  if k != base_name}
        rows.append({"benchmark": name, "metric": metric, "values": values, "deltas": deltas, "num_samples": counts,
                     "same_samples": len({c for c in counts.values()}) <= 1})
    return rows


def _fmt(value, digits=1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def compare_markdown(rows: list[dict], run_names: list[str]) -> str:
    base, others = run_names[0], run_names[1:]
    header = f"| benchmark | metric | {base} (base) | " + " | ".join(f"{n} | Δ {n}" for n in others) + " |"
    lines = ["# Change from the base model", "", header,
             "|" + "---|" * (3 + 2 * len(others))]
    for row in rows:
        cells = [row["benchmark"], row["metric"], _fmt(row["values"].get(base))]
        for n in others:
            delta = row["deltas"].get(n)
            cells += [_fmt(row["values"].get(n)), "-" if delta is None else f"{delta:+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    uneven = [r["benchmark"] for r in rows if not r["same_samples"]]
    lines += ["", "Metrics in % except MME (score out of 2800) and OCRBench (out of 1000). Δ = run - base "
              "(the paper's table reports these changes)."]
    if uneven:
        lines.append(f"Warning: runs were scored on different numbers of samples for {uneven} (check --limit).")
    return "\n".join(lines) + "\n"


def compare_plot(rows: list[dict], run_names: list[str], path: Path) -> None:
    """One small bar chart per benchmark (metrics have different scales: MME is out of 2800)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    others = run_names[1:] or run_names
    n = max(1, len(rows))
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.8 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, row in zip(axes.flat, rows):
        deltas = [row["deltas"].get(name) or 0.0 for name in others] if len(run_names) > 1 \
            else [row["values"].get(run_names[0]) or 0.0]
        colors = ["tab:green" if d >= 0 else "tab:red" for d in deltas]
        ax.bar(others, deltas, color=colors)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{row['benchmark']} ({row['metric']})", fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"change from {run_names[0]}" if len(run_names) > 1 else run_names[0])
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def run_compare(args: Args) -> None:
    entries = [e for e in re.split(r"[,\s]+", args.compare) if e]
    runs = []
    for entry in entries:
        if "=" not in entry:
            common.fail(f"--compare entry {entry!r}: expected NAME=path/to/results.json (e.g. base=runs/x/results.json).")
        name, path = entry.split("=", 1)
        if not Path(path).is_file():
            common.fail(f"--compare {name}: no such results file {path}.")
        try:
            results = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            common.fail(f"--compare {name}: {path} is not valid JSON ({err}).")
        if "benchmarks" not in results:
            common.fail(f"--compare {name}: {path} has no 'benchmarks' field; is it an eval.py results.json?")
        runs.append((name, results))
    if not args.out_dir:
        common.fail("--compare needs --out_dir DIR (for compare.md, compare.json, compare.png).")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in runs]
    rows = compare_table(runs)
    markdown = compare_markdown(rows, names)
    tmp = out / "compare.md.tmp"
    tmp.write_text(markdown)
    os.replace(tmp, out / "compare.md")
    common.write_json_atomic(out / "compare.json", {"base": names[0], "runs": {n: r.get("model") for n, r in runs},
                                                    "rows": rows})
    compare_plot(rows, names, out / "compare.png")
    print(markdown)
    print(f"[eval] wrote {out}/compare.md, compare.json, compare.png")


# ----------------------------------------------------------------------------------------------------------
# Main: config -> data (checked) -> model -> loop per benchmark (cached) -> save
# ----------------------------------------------------------------------------------------------------------
def export_probes(args: Args, names: list[str], datasets_: dict, ctx: Context) -> None:
    """The prior-knowledge probe set of analyze.py: the same seeded --limit subset of each benchmark that the
    evaluation scores, as rows (id, images, prompt, answer, benchmark). The answer is the benchmark's
    reference as text (the first one where there are several); analyze.py --probe_answer greedy uses the
    model's own answer instead, which suits free-form references such as RefCOCO boxes."""
    from datasets import Dataset, Features, Image as ImageFeature, List, Value
    rows = []
    for name in names:
        bench = REGISTRY[name]
        _, dataset = datasets_[name]
        for row_index in select_rows(dataset, bench, args.limit, args.seed):
            for k, s in enumerate(bench.build(dataset[row_index], ctx)):
                target = s["target"][0] if isinstance(s["target"], (list, tuple)) and s["target"] else s["target"]
                rows.append({"id": f"{name}/{row_index}/{k}", "images": s["images"], "prompt": s["prompt"],
                             "answer": str(target), "benchmark": name})
    if not rows:
        common.fail(f"--export_probes: no samples selected from {names} (check --limit and the data).")
    features = Features({"id": Value("string"), "images": List(ImageFeature()), "prompt": Value("string"),
                         "answer": Value("string"), "benchmark": Value("string")})
    common.save_dataset_atomic(Dataset.from_list(rows, features=features), args.export_probes, stage="eval.py --export_probes")
    print(f"[eval] wrote {len(rows)} probes from {', '.join(names)} to {args.export_probes}")


def _join_compare_values(argv: list[str]) -> list[str]:
    """`--compare a=x.json b=y.json` (several values) -> `--compare a=x.json,b=y.json` for the one-value parser."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--compare":
            values, i = [], i + 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            out += ["--compare", ",".join(values)]
        else:
            out.append(argv[i])
            i += 1
    return out


def weights_identity(model: str) -> list:
    """Size and modification time of a local model's weight files: a folder retrained in place (run_all.sh
    --from) must not be served the old model's cached predictions. Hub ids: the id alone."""
    folder = Path(model)
    if not folder.is_dir():
        return []
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.glob("*.safetensors"))]


def settings_fingerprint(args: Args, bench: Benchmark, source: str, max_new_tokens: int) -> dict:
    """Everything that changes a prediction; cached predictions are reused only when it matches."""
    return {"model": args.model, "weights": weights_identity(args.model), "dtype": args.dtype,
            "min_pixels": args.min_pixels, "max_pixels": args.max_pixels,
            "max_new_tokens": max_new_tokens, "data": source, "split": bench.split, "decoding": "greedy",
            "prompt_style": args.jigsaw_prompt if bench.name == "jigsaw" else "lmms-eval default"}


def main(argv=None) -> dict | None:
    argv = _join_compare_values(list(sys.argv[1:] if argv is None else argv))
    args = common.parse_args(Args, __doc__ + "\n" + registry_text(), argv)
    if args.compare:
        run_compare(args)
        return None

    # ---- config ------------------------------------------------------------------------------------------
    if not args.model and not args.export_probes:
        common.fail("--model is required (hub id or save_pretrained folder), or use --compare.")
    if not args.output and not args.export_probes:
        common.fail("--output is required (e.g. runs/eval/base/results.json).")
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    if names == ["all"]:
        names = [n for n, b in REGISTRY.items() if b.prior] + (["jigsaw"] if args.jigsaw_data else []) \
            + (["toy_prior"] if args.toy_prior_data else [])
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        common.fail(f"unknown benchmark(s) {unknown or names}; valid: {', '.join(REGISTRY)} (or 'all').\n"
                    + registry_text())
    if args.jigsaw_prompt not in ("thinking", "answer_only"):
        common.fail(f"--jigsaw_prompt {args.jigsaw_prompt}: choose thinking (column prompt) or answer_only "
                    "(column prompt_no_think), the style the model was trained with.")
    if args.batch_size < 1 or args.limit < 0:
        common.fail("--batch_size must be >= 1 and --limit >= 0.")
    if not args.export_probes:
        common.check_model_path(args.model)
    device = args.device or common.default_device()
    args.dtype = common.resolve_dtype(args.dtype, device)
    ctx = Context(args.jigsaw_prompt, args.min_pixels, args.max_pixels)

    # ---- data (every schema checked before the model is loaded) -------------------------------------------
    datasets_ = {}
    for name in names:
        bench = REGISTRY[name]
        source = getattr(args, f"{name}_data") or bench.hub_id or ""
        datasets_[name] = (source, open_benchmark_data(bench, source))

    if args.export_probes:
        export_probes(args, names, datasets_, ctx)
        return None

    # ---- cache -----------------------------------------------------------------------------------------
    output = Path(args.output)
    results = {"model": args.model, "benchmarks": {}}
    if output.exists() and not args.recompute:
        try:
            results = json.loads(output.read_text())
            results.setdefault("benchmarks", {})
        except json.JSONDecodeError:
            print(f"[eval] {output} is not valid JSON; starting afresh", file=sys.stderr)
    results.update(model=args.model, settings={"dtype": args.dtype, "min_pixels": args.min_pixels,
                                               "max_pixels": args.max_pixels, "batch_size": args.batch_size,
                                               "limit": args.limit, "seed": args.seed, "device": device})

    # ---- model (loaded only when something is missing) ---------------------------------------------------
    model = processor = None
    from tqdm.auto import tqdm
    for name in names:
        bench = REGISTRY[name]
        source, dataset = datasets_[name]
        max_new_tokens = args.max_new_tokens or bench.max_new_tokens
        fingerprint = settings_fingerprint(args, bench, source, max_new_tokens)
        entry = results["benchmarks"].get(name, {})
        if entry.get("settings") != fingerprint:
            if entry:
                print(f"[eval] {name}: settings changed since the cached run; recomputing", file=sys.stderr)
            entry = {"settings": fingerprint, "samples": {}}
        cached = entry.setdefault("samples", {})
        rows = select_rows(dataset, bench, args.limit, args.seed)
        done_rows = {r["row"] for r in cached.values()}
        missing = [i for i in rows if i not in done_rows]
        print(f"[eval] {name}: {len(rows)} rows selected, {len(rows) - len(missing)} cached, {len(missing)} to run")
        if missing:
            if model is None:
                t0 = time.time()
                model, processor = common.load_model_and_processor(
                    args.model, args.dtype, args.attn_implementation or None, args.min_pixels, args.max_pixels, device)
                model.eval()
                print(f"[eval] loaded {args.model} ({args.dtype}, {device}) in {time.time() - t0:.1f}s")
            window = args.batch_size * max(1, args.window_batches)
            progress = tqdm(total=len(missing), desc=name, unit="row", disable=None)
            for start in range(0, len(missing), window):
                samples = []
                for row_index in missing[start:start + window]:
                    row = dataset[row_index]
                    built = bench.build(row, ctx)
                    for k, s in enumerate(built):
                        s.update(id=f"{row_index}" if len(built) == 1 else f"{row_index}/{k}", row=row_index)
                        samples.append(s)
                generated = generate_records(model, processor, samples, args.batch_size, max_new_tokens, ctx)
                for s, g in zip(samples, generated):
                    record = {"id": s["id"], "row": s["row"], "prompt": s["prompt"], "target": s["target"],
                              "meta": s["meta"], **g}
                    record["score"] = score_record(bench, record)
                    cached[s["id"]] = record
                progress.update(len(missing[start:start + window]))
                entry["metrics"] = {}
                results["benchmarks"][name] = entry
                common.write_json_atomic(output, results)  # a crash loses at most one window
            progress.close()
        selected = set(rows)
        records = [r for r in cached.values() if r["row"] in selected]
        # Scores are recomputed from the stored predictions, so a fixed parser applies to cached runs too.
        for r in records:
            r["score"] = score_record(bench, r)
        metrics = bench.aggregate(records)
        metrics.setdefault("num_samples", len(records))
        metrics["truncated_rate"] = pct(r.get("truncated", False) for r in records)
        entry.update(metrics=metrics, data=source, split=bench.split, headline=bench.headline, metric=bench.metric,
                     source=bench.source, num_rows=len(rows))
        if not args.save_samples:
            entry["samples"] = {}
        results["benchmarks"][name] = entry
        common.write_json_atomic(output, results)
        shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in metrics.items()
                 if not isinstance(v, dict)}
        print(f"[eval] {name}: {shown}")
    print(f"[eval] wrote {output}")
    return results


if __name__ == "__main__":
    main()
