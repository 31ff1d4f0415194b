"""OCRBench (1,000 OCR questions over 10 kinds; score out of 1000).

Data: echo840/OCRBench, split test (lmms_eval/tasks/ocrbench/ocrbench.yaml at commit 75571cf, 2026-08, still
the authors' repo). Card not readable here; no revision pinned.
Prompt: the question alone (empty pre/post prompts); 128 new tokens.
Metric: OCRBench's official rule (Yuliang-Liu/MultimodalOCR OCRBench/example.py at f5cbec6), on the whole
answer: right when a reference answer is contained in the prediction, both lower-cased, stripped, newlines as
spaces; HME100k formulas compared with all spaces removed and case kept. lmms-eval (ocrbench/utils.py) also
folds full-width ASCII characters before comparing; the official script does not, and neither do we.
Score = right answers out of 1000. Departure, on purpose: on a --limit subset the count is scaled to 1000
(the official script prints per-data-set ratios instead) so numbers stay comparable.
"""
from collections import defaultdict

from benchmarks.base import MODEL_CARD_7B, QWEN_7B, Benchmark, parse_failure_rate, sample, to_pil


def build(row: dict, ctx) -> list[dict]:
    answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    return [sample(row["question"].strip(), [to_pil(row["image"])], [str(a) for a in answers],
                   dataset=row["dataset"], question_type=row["question_type"])]


def score(text: str, s: dict) -> dict:
    predict = str(text)
    if s["meta"]["dataset"] == "HME100k":
        pred = predict.strip().replace("\n", " ").replace(" ", "")
        hit = any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in s["target"])
    else:
        pred = predict.lower().strip().replace("\n", " ")
        hit = any(a.lower().strip().replace("\n", " ") in pred for a in s["target"])
    return {"correct": float(hit), "parsed": bool(predict.strip())}


def aggregate(records: list[dict]) -> dict:
    correct = sum(r["score"]["correct"] for r in records)
    by_type = defaultdict(int)
    for r in records:
        by_type[r["meta"]["question_type"]] += r["score"]["correct"]
    scale = 1000 / len(records) if records and len(records) != 1000 else 1.0
    return {"score": correct * scale, "correct": correct, "by_question_type": dict(sorted(by_type.items())),
            "parse_failure_rate": parse_failure_rate(records), "num_samples": len(records)}


BENCHMARK = Benchmark(
    name="ocrbench", hub_id="echo840/OCRBench", split="test",
    columns=("image", "question", "answer", "dataset", "question_type"), build=build, score=score,
    aggregate=aggregate, headline="score", unit="/1000", metric="score out of 1000", max_new_tokens=128,
    lmms_eval_task="ocrbench", official="OCRBench (MultimodalOCR) containment rule",
    # The 3B model card lists no OCRBench figure.
    published={QWEN_7B: 864}, published_source=f"{MODEL_CARD_7B} (OCRBench)")
