"""DocVQA val (document OCR/QA): the paper's OCR benchmark (7B: RFT 0.0, SFT-Non-Rea -27.4).

Data: lmms_eval/tasks/docvqa/docvqa_val.yaml at commit 75571cf (2026-08): dataset_path lmms-lab-encoder/DocVQA
(the old lmms-lab/DocVQA redirects there), config DocVQA, split validation. Data set card not readable here
(no hub access); no revision pinned.
Prompt: question + lmms-eval's default post-prompt; 32 new tokens (_default_template_docvqa_yaml).
Metric: ANLS (Biten et al. 2019), x100, exactly as the RRC evaluation script computes it (its evaluate_method,
as copied in QwenLM/Qwen-VL eval_mm/infographicsvqa_eval.py at e6bbb9d; lmms_eval/api/metrics.py::anls at
75571cf is the same formula): edit distance of the normalised strings divided by the length of the RAW strings
(parsers.anls says why that matters). No departure from the script.
Published figures are on the TEST split (Qwen's model cards: DocVQA_test), evaluated on the RRC server;
val is the split with public answers, so a measured val score is expected near, not at, the test figure.
"""
from benchmarks import parsers
from benchmarks.base import MODEL_CARD_3B, MODEL_CARD_7B, QWEN_3B, QWEN_7B, Benchmark, pct, parse_failure_rate, \
    sample, to_pil

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def build(row: dict, ctx) -> list[dict]:
    return [sample(f"{row['question']}{SHORT_ANSWER}", [to_pil(row["image"])], list(row["answers"]),
                   question_id=str(row["questionId"]))]


def score(text: str, s: dict) -> dict:
    value = parsers.anls(text, s["target"])
    return {"correct": value, "anls": value, "parsed": bool(str(text).strip())}


def aggregate(records: list[dict]) -> dict:
    return {"anls": pct(r["score"]["anls"] for r in records), "parse_failure_rate": parse_failure_rate(records),
            "num_samples": len(records)}


BENCHMARK = Benchmark(
    name="docvqa", hub_id="lmms-lab-encoder/DocVQA", config="DocVQA", split="validation",
    columns=("image", "question", "answers", "questionId"), build=build, score=score, aggregate=aggregate,
    headline="anls", unit="%", metric="ANLS x100", max_new_tokens=32, lmms_eval_task="docvqa_val",
    official="DocVQA ANLS (RRC evaluation script; Biten et al. 2019, threshold 0.5)",
    published={QWEN_3B: 93.9, QWEN_7B: 95.7}, published_source=f"{MODEL_CARD_3B}; {MODEL_CARD_7B} (DocVQA_test)",
    published_note="test split (ours: validation)")
