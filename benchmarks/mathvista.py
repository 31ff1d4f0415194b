"""MathVista testmini (1,000 visual math questions: multiple choice and free form).

Data: AI4Math/MathVista, split testmini (lmms_eval/tasks/mathvista/*.yaml at commit 75571cf, 2026-08, still the
authors' repo); the image is `decoded_image`. Card not readable here; no revision pinned.
Prompt: lmms-eval's mathvista_testmini_format (shot_type format-prompt, 0-shot, no caption/OCR): question
(+ unit), options as 'A. ...' lines, then a one-line answer-format hint.
Answer reading, after MathVista's official code (lupantech/MathVista at 53d5258, evaluation/):
  extraction (extract_answer.py::extract_answer), its deterministic steps on the answer as it is: an empty
  answer -> ''; a multiple-choice answer that is exactly an option -> itself; an integer question's answer
  that int() reads -> str(int(answer)); a float question's answer that float() reads -> str(float(answer))
  (so '.67' is 0.67). Departure, on purpose: everything else goes to GPT-4 there; there is no LLM here, so a
  rule stands in for that step (on the stripped answer): the option letter of a multiple-choice answer, the
  number of a free-form one (the one after 'answer'/'=' when several), a bracketed list.
  normalisation (calculate_score.py::normalize_extracted_answer), as officially: multiple choice: '(b)' ->
  'B'; a letter -> its option; any other text -> the MOST SIMILAR option (edit distance; so an empty answer
  still picks an option); integer -> str(int(float(x))); float -> str(round(float(x), int(precision)));
  list -> str(x); None when that fails.
  lmms-eval's mathvista_evals.py passes the data set's float precision (1.0, 2.0) to round() unconverted:
  round(x, 1.0) raises TypeError, caught as "no answer", so every float question is wrong there. We follow
  the official int(precision).
  comparison (safe_equal): prediction == answer, exactly.
A multiple-choice answer snapped to the most similar option, and a free-form answer with no number, count as
parse failures (parse_failure_rate) while keeping the official score.
"""
import math
import re

from benchmarks import parsers
from benchmarks.base import MODEL_CARD_3B, MODEL_CARD_7B, QWEN_3B, QWEN_7B, Benchmark, accuracy_by, sample, to_pil

_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_LIST = re.compile(r"\[[^\[\]]*\]")
_PAREN_LETTER = re.compile(r"\(([a-zA-Z])\)")


def build(row: dict, ctx) -> list[dict]:
    choices = list(row["choices"]) if row.get("choices") else []
    qtype, atype = row["question_type"], row["answer_type"]
    precision = row.get("precision")
    precision = int(precision) if isinstance(precision, (int, float)) and not math.isnan(precision) else None
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
    return [sample("\n".join(p for p in parts if p), [to_pil(row.get("decoded_image"))], str(row["answer"]),
                   question_type=qtype, answer_type=atype, choices=[str(c) for c in choices], precision=precision,
                   pid=str(row["pid"]))]


def extract(text, question_type: str, answer_type: str, choices: list[str]) -> tuple[str, bool]:
    """(extraction, found): extract_answer.py's deterministic steps, then the rule that stands in for GPT."""
    response = str(text)
    if response == "":
        return "", False
    if question_type == "multi_choice" and response in choices:
        return response, True
    if answer_type == "integer":
        try:
            return str(int(response)), True
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response)), True
        except ValueError:
            pass
    # --- the stand-in for GPT-4 extraction (not official) ---
    response = parsers.capped(response).strip()
    if not response:
        return "", False
    if question_type == "multi_choice":
        if response in choices:
            return response, True
        letter = parsers.parse_choice_letter(response, "".join(chr(ord("A") + i) for i in range(len(choices))))
        return (letter, True) if letter else (response, False)
    if answer_type == "list":
        match = _LIST.search(response)
        return (match.group(0), True) if match else (response, False)
    numbers = _NUMBER.findall(response.replace(",", ""))
    if not numbers:
        return response, False
    tail = len(numbers) > 1 and re.search(r"answer|=", response, re.IGNORECASE)
    return (numbers[-1] if tail else numbers[0]), True


def normalize(extraction, choices: list[str], question_type: str, answer_type: str, precision) -> str | None:
    """MathVista's normalize_extracted_answer (official; see the module docstring for lmms-eval's round bug)."""
    if question_type == "multi_choice":
        extraction = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = _PAREN_LETTER.search(extraction)
        if letter:
            extraction = letter.group(1).upper()
        sequential = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in sequential:
            return choices[sequential.index(extraction)]
        return parsers.most_similar(extraction, choices) if choices else None
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))
    except (TypeError, ValueError, OverflowError):
        return None
    return str(extraction)


def safe_equal(prediction, answer) -> bool:
    """calculate_score.py::safe_equal: plain ==, no stripping ('[1,2]' is not '[1, 2]'; None is never right)."""
    return prediction == answer


def score(text: str, s: dict) -> dict:
    m = s["meta"]
    extraction, found = extract(text, m["question_type"], m["answer_type"], m["choices"])
    prediction = normalize(extraction, m["choices"], m["question_type"], m["answer_type"], m["precision"])
    correct = safe_equal(prediction, s["target"])
    return {"correct": float(correct), "parsed": found and prediction is not None,
            "extracted": None if prediction is None else str(prediction)[:64]}


BENCHMARK = Benchmark(
    name="mathvista", hub_id="AI4Math/MathVista", split="testmini",
    columns=("decoded_image", "question", "choices", "answer", "question_type", "answer_type", "pid"),
    build=build, score=score, aggregate=lambda records: accuracy_by(records, "question_type"), headline="accuracy",
    unit="%", metric="accuracy % (official normalisation; rule-based extraction instead of GPT-4)",
    # lmms-eval's testmini yamls set 16384 for reasoning models; format-prompt answers are one line.
    max_new_tokens=512, lmms_eval_task="mathvista_testmini_format",
    official="MathVista evaluation/extract_answer.py + calculate_score.py (GPT extraction replaced by rules)",
    published={QWEN_3B: 62.3, QWEN_7B: 68.2}, published_source=f"{MODEL_CARD_3B}; {MODEL_CARD_7B} (MathVista_testmini)",
    published_note="Qwen's evaluation with GPT answer extraction")
