"""ChartQA test (chart question answering, human + augmented splits).

Data: lmms_eval/tasks/chartqa/chartqa.yaml at commit 75571cf (2026-08): dataset_path lmms-lab-encoder/ChartQA
(the old lmms-lab/ChartQA redirects there), split test. Card not readable here; no revision pinned.
Prompt: question + "\nAnswer the question with a single word."; 16 new tokens.
Metric: relaxed accuracy (ChartQA, Masry et al. 2022, after Methani et al. 2020), exactly as
pix2struct/metrics.py::relaxed_correctness (google-research/pix2struct at 945f27e) computes it, and as
lmms-eval's chartqa/utils.py (75571cf) copies it: a number within 5% of a non-zero target (the float
comparison as written, so '1.05' vs '1' is out), else an exact (case-insensitive) match of the raw strings:
'Yes.' does not match 'yes' there, and neither here. No departure from the script: the whole answer is read.
"""
from benchmarks import parsers
from benchmarks.base import MODEL_CARD_7B, QWEN_7B, Benchmark, accuracy_by, sample, to_pil


def build(row: dict, ctx) -> list[dict]:
    return [sample(f"{row['question']}\nAnswer the question with a single word.", [to_pil(row["image"])],
                   str(row["answer"]), type=row["type"])]


def score(text: str, s: dict) -> dict:
    answer = str(text)
    return {"correct": float(parsers.relaxed_correct(answer, s["target"])), "parsed": bool(answer.strip()),
            "extracted": answer[:64]}


BENCHMARK = Benchmark(
    name="chartqa", hub_id="lmms-lab-encoder/ChartQA", split="test", columns=("image", "question", "answer", "type"),
    build=build, score=score, aggregate=lambda records: accuracy_by(records, "type"), headline="accuracy",
    unit="%", metric="relaxed accuracy % (5%)", max_new_tokens=16, lmms_eval_task="chartqa",
    official="pix2struct relaxed_correctness (ChartQA relaxed accuracy, 5% relative tolerance)",
    # The 3B model card lists no ChartQA figure.
    published={QWEN_7B: 87.3}, published_source=f"{MODEL_CARD_7B} (ChartQA_test)")
