"""MMMU val (college-level multi-discipline questions, 900): the paper's MMMU (7B absolute: base 51.3, RFT 50.0,
SFT-Non-Rea 22.4, SFT-Rea-4o 46.1, SFT-Rea-GRPO-Rollout 48.8).

Data: lmms_eval/tasks/mmmu/mmmu_val.yaml at commit 75571cf (2026-08): dataset_path lmms-lab-encoder/MMMU (the
old lmms-lab/MMMU redirects there), split validation. Card not readable here; no revision pinned.
Prompt: lmms_eval/tasks/mmmu/utils.py::construct_prompt with mmmu_val.yaml's default prompts; the images the
question names (<image 1>...) go first in the chat turn, the marks stay in the text.
Answer reading: MMMU's official eval_utils.py (MMMU-Benchmark/MMMU, as lmms-eval copies it):
  multiple choice (parse_multi_choice_response): '(B)' anywhere; else ' B ' as a word (after stripping
  ,.!?;:' at the ends); else, for answers of more than 5 words, an option's text; several candidates -> the
  one that occurs last; none -> a RANDOM letter. We keep the random guess (it is part of the official number:
  a model that answers nonsense scores ~1/n, not 0), seeded by the question id so reruns agree, and count it
  as a parse failure.
  open (parse_open_response + eval_open): the tail after a key phrase of each line, plus its numbers,
  normalised (numbers rounded to 2 decimals, a single letter padded); right when a string gold is contained
  in a candidate or a number equals it. The official splitter `re.split(r'\\.\\s(?=[A-Z])|\\n')` runs on
  lower-cased text, so only newlines split; kept as is.
"""
import ast
import random
import re

from benchmarks import parsers
from benchmarks.base import MODEL_CARD_3B, MODEL_CARD_7B, QWEN_3B, QWEN_7B, Benchmark, accuracy_by, sample, to_pil


def literal_list(value) -> list:
    """MMMU stores options (and some open answers) as the string of a Python list: a DATA-SET field, parsed
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


def build(row: dict, ctx) -> list[dict]:
    question, qtype = row["question"], row["question_type"]
    options = literal_list(row["options"]) if qtype == "multiple-choice" else []
    if qtype == "multiple-choice":
        listed = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))
        prompt = f"{question}\n{listed}\n\nAnswer with the option's letter from the given choices directly."
    else:
        prompt = f"{question}\n\nAnswer the question using a single word or phrase."
    names = sorted(set(re.findall(r"<image (\d+)>", prompt + " " + " ".join(map(str, options)))), key=int)
    images = [to_pil(row.get(f"image_{k}")) for k in names]
    answer = row["answer"] if qtype == "multiple-choice" else literal_list(row["answer"])
    subject = re.sub(r"^(?:validation|dev|test)_|_\d+$", "", str(row["id"]))
    return [sample(prompt, images, answer, question_type=qtype, options=[str(o) for o in options], subject=subject,
                   question_id=str(row["id"]))]


def parse_choice(response, options: list[str], question_id: str = "") -> tuple[str, bool]:
    """(letter, parsed): MMMU's parse_multi_choice_response; parsed False when the letter is the random guess."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    text = parsers.capped(str(response))
    for char in (",", ".", "!", "?", ";", ":", "'"):
        text = text.strip(char)
    text = " " + text + " "
    candidates = [(text.rfind(f"({l})"), l) for l in letters if f"({l})" in text]
    if not candidates:
        candidates = [(text.rfind(f" {l} "), l) for l in letters if f" {l} " in text]
    if not candidates and len(text.split()) > 5:
        lowered = text.lower()
        candidates = [(lowered.rfind(str(o).lower()), l) for l, o in zip(letters, options) if str(o).lower() in lowered]
    if not candidates:
        return (random.Random(f"mmmu/{question_id}").choice(letters) if letters else ""), False
    return max(candidates)[1], True


def normalize(value) -> list:
    """MMMU's normalize_str: a number -> [float rounded to 2 decimals]; a string -> [lower-cased] (one letter
    padded with a space on either side, so 'a' does not match inside words)."""
    value = str(value).strip()
    try:
        return [round(float(value.replace(",", "")), 2)]
    except (ValueError, OverflowError):
        value = value.lower()
        return [" " + value, value + " "] if len(value) == 1 else [value]


# One greedy token that starts at a digit: a match always succeeds once started, so nothing is rescanned.
_NUMBER_TOKEN = re.compile(r"-?\.?\d[\d.,]*(?:[eE][+-]?\d+)?")
_COMMA_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+")
_SIMPLE_NUMBER = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+)")


def extract_numbers(text: str) -> list[str]:
    """MMMU's extract_numbers (comma-grouped, scientific and plain numbers), read token by token so that a
    long run of digits is scanned once (the official three findall patterns backtrack quadratically there)."""
    numbers = []
    for token in _NUMBER_TOKEN.findall(text):
        token = token.strip(".,")
        if _COMMA_NUMBER.fullmatch(token) or re.fullmatch(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", token):
            numbers.append(token)
        else:
            numbers += [part for part in token.split(",") if _SIMPLE_NUMBER.fullmatch(part)][-1:]
    return numbers


INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def open_candidates(response) -> list:
    text = parsers.capped(str(response)).strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", text)   # official; on lower-cased text only '\n' splits
    keys = []
    for i, line in enumerate(lines):
        indicators = INDICATORS + (("=",) if i == len(lines) - 1 else ())
        tails = [line.split(ind)[-1].strip() for ind in indicators if ind in line]
        if tails:
            shortest = min(tails, key=len)
            if shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
                keys.append(shortest)
    if not keys:
        keys = [text]
    out = []
    for item in keys + [n for k in keys for n in extract_numbers(k)]:
        for value in normalize(item):
            if value not in out:
                out.append(value)
    return out


def open_correct(candidates: list, gold) -> bool:
    golds = [g for item in (gold if isinstance(gold, list) else [gold]) for g in normalize(item)]
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(g, str) and g in candidate for g in golds):
                return True
        elif candidate in golds:
            return True
    return False


def score(text: str, s: dict) -> dict:
    m = s["meta"]
    if m["question_type"] == "multiple-choice":
        letter, parsed = parse_choice(text, m["options"], m.get("question_id", ""))
        return {"correct": float(letter == s["target"]), "parsed": parsed, "extracted": letter}
    candidates = open_candidates(text) if str(text).strip() else []
    return {"correct": float(open_correct(candidates, s["target"])), "parsed": bool(candidates),
            "extracted": [c if isinstance(c, str) else float(c) for c in candidates[:5]]}


def aggregate(records: list[dict]) -> dict:
    out = accuracy_by(records, "question_type")
    out["accuracy_by_subject"] = accuracy_by(records, "subject")["accuracy_by_subject"]
    return out


BENCHMARK = Benchmark(
    name="mmmu", hub_id="lmms-lab-encoder/MMMU", split="validation",
    columns=("id", "question", "options", "answer", "question_type", "image_1"), build=build, score=score,
    aggregate=aggregate, headline="accuracy", unit="%", metric="accuracy % (multiple choice + open), per subject",
    max_new_tokens=128,  # mmmu_val.yaml generation_kwargs (lmms-eval suggests 512 for Qwen2.5-VL reasoning)
    lmms_eval_task="mmmu_val", official="MMMU eval_utils.py (parse_multi_choice_response, parse_open_response)",
    published={QWEN_3B: 53.1, QWEN_7B: 58.6}, published_source=f"{MODEL_CARD_3B}; {MODEL_CARD_7B} (MMMU_val)",
    published_note="Qwen's evaluation (VLMEvalKit)",
    paper_base={QWEN_7B: 51.3})
