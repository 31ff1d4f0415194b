"""POPE (object hallucination; adversarial / popular / random splits of 3,000 yes/no questions each): the
paper's POPE (7B: RFT -0.2, SFT-Non-Rea -69.9).

Data: lmms_eval/tasks/pope/pope.yaml at commit 75571cf (2026-08): dataset_path lmms-lab-encoder/POPE (the old
lmms-lab/POPE redirects there), split test, column `category` = the split. Card not readable here.
Prompt: question + lmms-eval's default post-prompt; 128 new tokens.
Answer reading: POPE's official evaluate.py (AoiDragon/POPE at 08d957b), on the whole answer: keep the text
before the first '.', drop commas, split on spaces; 'No', 'no' or 'not' among the words -> no, anything else
-> yes ('Not at all', and 'no' followed by a newline, are yes there, and here). lmms-eval (pope/utils.py)
instead needs the whole answer to equal 'yes'/'no' after lower()+strip(), so 'Yes.' or 'Yes, there is a dog'
count wrong there; we follow the official script.
Metric: accuracy, precision, recall, F1 (positive class yes) and yes-ratio (share of answers read as yes, as
the official script prints it; lmms-eval reports the ground truth's share), per split.
Departures, on purpose: the official script scores one split file at a time; the headline is the mean
accuracy over the three splits (lmms-eval's pope_full grouping). Precision/recall are 0 where the script
would divide by zero (no yes predicted / no yes in the gold). An empty answer is read as yes, as officially,
and is also counted in parse_failure_rate.
"""
from collections import defaultdict

from benchmarks.base import Benchmark, parse_failure_rate, pct, sample, to_pil

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def build(row: dict, ctx) -> list[dict]:
    return [sample(f"{row['question'].strip()}{SHORT_ANSWER}", [to_pil(row["image"])],
                   row["answer"].strip().lower(), category=row["category"], question_id=str(row["question_id"]))]


def parse_official(text) -> str:
    """POPE's evaluate.py on the whole answer: 'Not at all.' -> yes ('Not' is none of its words), 'no' and a
    newline -> yes (words are split on spaces only), 'There is no dog.' -> no."""
    first_sentence = str(text).partition(".")[0].replace(",", "")
    words = first_sentence.split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def score(text: str, s: dict) -> dict:
    extracted = parse_official(text)
    # The official reading has no "unparsed" answer (silence is a yes); an empty answer is reported as a
    # parse failure so that a model that stopped answering shows up in parse_failure_rate.
    return {"correct": float(extracted == s["target"]), "parsed": bool(str(text).strip()), "extracted": extracted}


def yes_no_metrics(records: list[dict]) -> dict:
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


def aggregate(records: list[dict]) -> dict:
    splits = defaultdict(list)
    for r in records:
        splits[r["meta"]["category"]].append(r)
    per_split = {name: yes_no_metrics(rs) for name, rs in sorted(splits.items())}
    out = {k: sum(m[k] for m in per_split.values()) / len(per_split)
           for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} if per_split else {}
    out.update(splits=per_split, parse_failure_rate=parse_failure_rate(records), num_samples=len(records))
    return out


BENCHMARK = Benchmark(
    name="pope", hub_id="lmms-lab-encoder/POPE", split="test",
    columns=("image", "question", "answer", "category", "question_id"), build=build, score=score,
    aggregate=aggregate, headline="accuracy", unit="%",
    metric="accuracy % (mean over adversarial/popular/random), + precision/recall/F1/yes-ratio",
    max_new_tokens=128, lmms_eval_task="pope (pope_full grouping)", official="POPE evaluate.py (AoiDragon/POPE)",
    # Not in the Qwen2.5-VL model cards or technical report: unknown.
    published={}, published_source="not published for Qwen2.5-VL-3B/7B")
