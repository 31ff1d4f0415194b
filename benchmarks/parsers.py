"""Parsers shared by several benchmarks. Model outputs are untrusted text: string operations and regexes only
(never eval), and every function runs in time linear in its input.

Why linear matters: a regex with nested or adjacent unbounded quantifiers over the same characters backtracks
super-polynomially. The old letter parser took > 30 s on 'The answer' + 400 spaces + 'is the cat' (14 real
Qwen2.5 tokens, inside AI2D's 16-token cap), and cached predictions are re-scored on every run, so one such
output hung every rerun. The rules here: no two adjacent quantifiers that can match the same character,
tags found with str.find/rfind (not lazy `.*?` regexes), and at most SCAN_LIMIT characters read by any
parser that searches inside an answer (answers that long are not short answers any more).
tests/test_benchmark_parsers.py times each parser on 100 KB adversarial inputs against a linear scan.
"""
from __future__ import annotations

import re
import string

SCAN_LIMIT = 16384  # characters a parser reads; lmms-eval's caps (16-512 tokens) are ~2 KB of text at most


def capped(text) -> str:
    return text[:SCAN_LIMIT] if isinstance(text, str) else ""


# ----------------------------------------------------------------------------------------------------------
# The two views of an answer: strict (raw, as lmms-eval reads it) and lenient (the <answer> block)
# ----------------------------------------------------------------------------------------------------------
def final_answer(text) -> str:
    """The lenient view of a completion: the last <answer>...</answer> block when there is one, else the text
    with <think>...</think> blocks removed (an unclosed <think> hides everything after it: a truncated
    trace has no answer). A model fine-tuned on the jigsaw format may keep using it on benchmarks;
    lmms-eval's reasoning tasks strip think tags the same way. Linear: rfind/find only."""
    if not isinstance(text, str):
        return ""
    end = text.rfind("</answer>")
    if end != -1:
        start = text.rfind("<answer>", 0, end)
        if start != -1:
            return text[start + len("<answer>"):end].strip()
    kept, position = [], 0
    while True:
        start = text.find("<think>", position)
        if start == -1:
            kept.append(text[position:])
            break
        kept.append(text[position:start])
        end = text.find("</think>", start + len("<think>"))
        if end == -1:
            break
        position = end + len("</think>")
    return "".join(kept).strip()


def normalize_text(text) -> str:
    """Lower case, whitespace collapsed, punctuation trimmed at both ends: 'Red.' -> 'red'."""
    text = " ".join(capped(str(text)).lower().split())
    return text.strip(string.punctuation + " ")


# ----------------------------------------------------------------------------------------------------------
# Yes/no, letters, counts (the toy world's questions and the lenient readers)
# ----------------------------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z]+")


def parse_yes_no(text) -> str | None:
    """'yes' / 'no' / None: the first word decides ('Yes, there is' -> yes; 'No.' -> no; 'y' -> yes), else a
    lone yes or no anywhere ('The answer is no.'); both or neither -> None (counted wrong). The toy world's
    yes/no reader; MME and POPE use their official parsers (benchmarks/mme.py, benchmarks/pope.py)."""
    words = _WORD.findall(capped(text).lower())
    if not words:
        return None
    if words[0] in ("yes", "y"):
        return "yes"
    if words[0] in ("no", "n"):
        return "no"
    found = {w for w in words if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


# Each quantifier below is followed by a character it cannot match, so no position is tried twice.
_LETTER_AT_START = re.compile(r"[\s*\[(]*([A-Za-z])(?=[\s*\])}.:,]|$)")
_ANSWER_PHRASE = re.compile(r"(?:answer|option|choice)(?:\s+is\b)?[\s:]*\(?([A-Za-z])\b", re.IGNORECASE)
_LONE_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")


def parse_choice_letter(text, letters: str = "ABCD", lower_case: bool = True) -> str | None:
    """The option letter a model chose, or None. Accepts 'B', '(B)', 'B.', 'B) cat', 'B: cat', 'Answer: B',
    'The answer is (C).', and 'b' when `lower_case` (AI2D and MMStar's official readers lower-case the
    answer); a sentence naming several letters is None unless an answer phrase picks one."""
    body = capped(text).strip()
    if not body:
        return None
    valid = set(letters)
    start = _LETTER_AT_START.match(body)
    if start:
        letter = start.group(1)
        if letter in valid or (lower_case and letter.upper() in valid and letter.islower()):
            # A lone lower-case word such as 'a cat' is an article, not option (a): only 'a' alone or 'a.'.
            if letter.isupper() or len(body) <= 3:
                return letter.upper()
    phrase = [p.upper() for p in _ANSWER_PHRASE.findall(body) if p.upper() in valid]
    if phrase:
        return phrase[-1]
    lone = {m for m in _LONE_LETTER.findall(body) if m in valid}
    return lone.pop() if len(lone) == 1 else None


_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_COUNT = re.compile(r"-?\d+|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b")


def parse_count(text) -> int | None:
    """The first integer (digits, or a number word up to ten) in the answer: '3', 'three', 'There are 3.'."""
    match = _COUNT.search(capped(text).lower())
    if not match:
        return None
    token = match.group(0)
    if token in _NUMBER_WORDS:
        return _NUMBER_WORDS[token]
    return int(token) if len(token) < 20 else None


# ----------------------------------------------------------------------------------------------------------
# Strings and numbers
# ----------------------------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    """Edit distance, O(len(a) * len(b)): callers bound the lengths (see anls, most_similar)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction, answers: list, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question (DocVQA; Biten et al. 2019, the RRC
    evaluation script and lmms_eval/api/metrics.py::anls): max over the references of
    1 - lev(a, p) / max(len(a), len(p)) on lower-cased, whitespace-collapsed strings, 0 when below
    `threshold` (a similarity of exactly 0.5 is kept, as in both scripts).
    Linear in the prediction: lev(a, p) >= len(p) - len(a), so a prediction longer than twice a reference
    scores below 0.5 on it (0) without running the quadratic edit distance; references are data-set text."""
    pred = " ".join(str(prediction).strip().lower().split())
    best = 0.0
    for answer in answers:
        ref = " ".join(str(answer).strip().lower().split())
        length = max(len(ref), len(pred))
        if length == 0:
            similarity = 1.0
        elif len(pred) > 2 * len(ref) + 1:
            continue
        else:
            similarity = 1.0 - levenshtein(ref, pred) / length
        best = max(best, similarity)
    return best if best >= threshold else 0.0


def most_similar(text: str, choices: list[str], limit: int = 1024) -> str:
    """The choice with the smallest edit distance to `text` (MathVista's calculate_score.get_most_similar).
    Only the first `limit` characters are compared: an option is a short phrase, and a longer text is no
    closer to any of them (bounds the quadratic edit distance on untrusted text)."""
    text = str(text)[:limit]
    return min(choices, key=lambda c: levenshtein(text, str(c)[:limit]))


def to_float(text) -> float | None:
    """ChartQA's _to_float: 'x%' -> x / 100, a number -> float, else None."""
    text = str(text).strip()
    if len(text) > 64:
        return None
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction, target, tolerance: float = 0.05) -> bool:
    """ChartQA relaxed accuracy (Methani et al. 2020; ChartQA's and pix2struct's relaxed_correctness, as in
    lmms_eval/tasks/chartqa/utils.py): numbers within 5% relative error of a non-zero target count (exactly
    5% is right); 'x%' reads as x/100; anything else needs a case-insensitive exact match."""
    pred_value, target_value = to_float(prediction), to_float(target)
    if pred_value is not None and target_value:
        return abs(pred_value - target_value) / abs(target_value) <= tolerance + 1e-12
    return str(prediction).lower() == str(target).lower()


# --- boxes (RefCOCO) -------------------------------------------------------------------------------------
_NUM = r"-?\d+(?:\.\d+)?"
_SEP = r"\s*,\s*"
_BBOX_2D = re.compile(r'"bbox_2d"\s*:\s*\[\s*(' + _NUM + ")" + _SEP + "(" + _NUM + ")" + _SEP + "(" + _NUM + ")"
                      + _SEP + "(" + _NUM + r")\s*\]")
_PLAIN_BOX = re.compile(r"[\[(]\s*(" + _NUM + ")" + _SEP + "(" + _NUM + ")" + _SEP + "(" + _NUM + ")" + _SEP
                        + "(" + _NUM + r")\s*[\])]")


def parse_box(text) -> list[float] | None:
    """The first box [x1, y1, x2, y2] of a grounding answer: JSON like {"bbox_2d": [x1,y1,x2,y2], ...}
    (Qwen2.5-VL's format, often inside ```json fences and a list), else a plain [x1, y1, x2, y2] or
    (x1,y1,x2,y2). None when there is no box or x2 < x1 / y2 < y1."""
    body = capped(text)
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
