"""MME (perception + cognition, yes/no questions): the paper's MME total (7B: RFT -8, SFT-Non-Rea -1854).

Data: lmms_eval/tasks/mme/mme.yaml at commit 75571cf (2026-08): dataset_path lmms-lab-encoder/MME (the old
lmms-lab/MME redirects there), split test. Data set card not readable here; no revision pinned.
Prompt: lmms_eval/tasks/mme/utils.py::mme_doc_to_text: the question's own " Please answer yes or no." is
replaced by the default post-prompt; 16 new tokens.
Answer reading: MME's official eval_tool/calculation.py::parse_pred_ans (BradyFU/Awesome-Multimodal-Large-
Language-Models, branch Evaluation at dd29509, tools/eval_tool.zip) on the lower-cased answer: exactly
'yes'/'no', else the FIRST FOUR CHARACTERS decide: 'yes' in them -> yes, else 'no' in them -> no, else other
(wrong). So 'None', 'nope' and 'Not that I can see.' are "no" there, and here. lmms-eval's copy ("brought from
Otter eval") also strips whitespace, deletes '.', and reads a lone 'y'/'n'; we follow the official script (a
lone 'y' is "other" there). The script reads answers from tab-separated .txt lines (each keeps its '\n', which
changes no verdict); an answer holding a tab or newline would break that file, we read the text itself.
Metric: per subtask acc (% of questions) + acc+ (% of images with both questions right), max 200; perception
= 10 subtasks (max 2000), cognition = 4 (max 800); headline total out of 2800 (not a percentage: the report
keeps it out of the mean of percentages). Departure, on purpose: the script pairs consecutive lines as an
image's two questions; we pair by question_id (the image), so a --limit subset keeps whole pairs.
"""
from collections import defaultdict

from benchmarks.base import Benchmark, parse_failure_rate, pct, sample, to_pil

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def build(row: dict, ctx) -> list[dict]:
    question = row["question"].strip().replace(" Please answer yes or no.", "")
    return [sample(f"{question}{SHORT_ANSWER}", [to_pil(row["image"])], row["answer"].strip().lower().rstrip("."),
                   category=row["category"], question_id=str(row["question_id"]))]


def parse_official(text) -> str:
    """'yes' / 'no' / 'other' as MME's calculation.py reads an answer (first four characters)."""
    answer = str(text).lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def score(text: str, s: dict) -> dict:
    extracted = parse_official(text)
    return {"correct": float(extracted == s["target"]), "parsed": extracted != "other", "extracted": extracted}


def aggregate(records: list[dict]) -> dict:
    by_task = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_task[r["meta"]["category"]][r["meta"]["question_id"]].append(r["score"]["correct"])
    subtasks = {}
    for task, images in sorted(by_task.items()):
        acc = pct(c for image in images.values() for c in image)
        acc_plus = pct(all(image) for image in images.values())
        subtasks[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "images": len(images)}
    perception = sum(v["score"] for k, v in subtasks.items() if k in PERCEPTION)
    cognition = sum(v["score"] for k, v in subtasks.items() if k in COGNITION)
    return {"total": perception + cognition, "perception": perception, "cognition": cognition,
            "subtasks": subtasks, "parse_failure_rate": parse_failure_rate(records), "num_samples": len(records)}


BENCHMARK = Benchmark(
    name="mme", hub_id="lmms-lab-encoder/MME", split="test",
    columns=("image", "question", "answer", "category", "question_id"), build=build, score=score,
    aggregate=aggregate, headline="total", unit="/2800",
    metric="perception + cognition score out of 2800 (acc + acc+ per subtask)", max_new_tokens=16,
    lmms_eval_task="mme", official="MME eval_tool/calculation.py (parse_pred_ans, acc + acc+)",
    group_column="question_id",
    # Neither Qwen2.5-VL model card nor the technical report gives an MME sum for 3B/7B (Qwen2-VL-7B's card
    # gave 2326.8; not the same model). Left unknown.
    published={}, published_source="not published for Qwen2.5-VL-3B/7B")
