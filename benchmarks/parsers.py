"""Parsers shared by several benchmarks. Model outputs are untrusted text: string operations and regexes only
(never eval), and every function runs in time linear in its input.

Why linear matters: a regex with nested or adjacent unbounded quantifiers over the same characters backtracks
super-polynomially. The old letter parser took > 30 s on 'The answer' + 400 spaces + 'is the cat' (14 real
Qwen2.5 tokens, inside AI2D's 16-token cap), and cached predictions are re-scored on every run, so one such
output hung every rerun. The rules here: no two adjacent quantifiers that can match the same character,
tags found with str.find/rfind (not lazy `.*?` regexes), and at most SCAN_LIMIT characters read by the
kit's own lenient readers (answers that long are not short answers any more). The readings that follow a
benchmark's official script read the whole answer, as the script does (a cap would change its verdict on a
degenerate answer, e.g. one opening with 64 spaces), so they are written to be linear instead.
tests/test_benchmark_parsers.py times each parser on 100 KB adversarial inputs against a linear scan.
"""
from __future__ import annotations

import re
import string

SCAN_LIMIT = 16384  # characters a parser reads; lmms-eval's caps (16-512 tokens) are ~2 KB of text at most


def capped(text) -> str:
    return text[:SCAN_LIMIT] if isinstance(text, str) else ""


# ----------------------------------------------------------------------------------------------------------
# The two views of an answer: strict (raw, as the official scripts read it) and lenient (the <answer> block)
# ----------------------------------------------------------------------------------------------------------
def final_answer(text) -> str:
    """The lenient view of a completion: the last <answer>...</answer> block when there is one, else the text
    with <think>...</think> blocks removed (an unclosed <think> hides everything after it: a truncated
    trace has no answer). A model fine-tuned on the jigsaw format may keep using it on benchmarks.
    Not lmms-eval's reading: since v0.7 (2026-03, PR #1210) its CLI default --reasoning_tags removes closed
    <think>/<analysis> blocks, keeps an unclosed <think> and its text, ignores <answer>, and strips the
    result (lmms_eval/api/reasoning.py::strip_reasoning_tags at 75571cf). Linear: rfind/find only."""
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
    """Edit distance (unit insert/delete/substitute), computed with Myers' bit-parallel algorithm (Myers 1999,
    J. ACM 46(3); the global-distance form of Hyyrö 2001): one column of the classic table is held as bit
    vectors over the shorter string, so the cost is len(longer) steps of a few integer operations on
    len(shorter)-bit integers, linear in an untrusted prediction against a short reference. Same value as the
    textbook dynamic programme (tests/test_official_scorers.py compares them on random strings)."""
    if len(a) > len(b):
        a, b = b, a
    if not a:
        return len(b)
    mask, top = (1 << len(a)) - 1, 1 << (len(a) - 1)
    match_bits = {}                       # character -> positions of a where it occurs
    for i, char in enumerate(a):
        match_bits[char] = match_bits.get(char, 0) | (1 << i)
    bits_of = match_bits.get
    plus, minus, distance = mask, 0, len(a)   # vertical deltas (+1 / -1) of the current column; its last cell
    for char in b:
        eq = bits_of(char, 0)
        x_vertical = eq | minus
        x_horizontal = (((eq & plus) + plus) ^ plus) | eq
        h_plus = minus | (~(x_horizontal | plus) & mask)
        h_minus = plus & x_horizontal
        if h_plus & top:
            distance += 1
        elif h_minus & top:
            distance -= 1
        h_plus = ((h_plus << 1) | 1) & mask   # row 0 grows by one per character of b (global distance)
        h_minus = (h_minus << 1) & mask
        plus = h_minus | (~(x_vertical | h_plus) & mask)
        minus = h_plus & x_vertical
    return distance


def anls(prediction, answers: list, threshold: float = 0.5) -> float:
    """ANLS of one question as the DocVQA/RRC evaluation script computes it (Biten et al. 2019; the RRC
    script's evaluate_method, copied in QwenLM/Qwen-VL eval_mm/infographicsvqa_eval.py, and
    lmms_eval/api/metrics.py::anls): for each reference, the edit distance between the NORMALISED strings
    (stripped, lower-cased, whitespace runs collapsed) divided by the length of the RAW strings,
    max(len(answer.upper()), len(prediction.upper())) (0 when both are empty); the question scores 1 minus
    the smallest of these, or 0 when that is below `threshold` (exactly 0.5 is kept).
    Dividing by the raw lengths is the script's own choice, kept: 'ITC Limited ' (trailing space) vs 'ITC Ltd'
    is 1 - 4/12 = 0.667 there, where normalised lengths would give 1 - 4/11.
    Linear in the prediction: lev >= the difference of the normalised lengths, so a reference whose
    difference alone exceeds (1 - threshold) x length cannot be kept and is skipped; otherwise `levenshtein`
    is linear in the longer string. No references: 0 (the script would fail on min of nothing)."""
    prediction = str(prediction)
    pred = " ".join(prediction.strip().lower().split())
    pred_length = len(prediction.upper())
    values = []
    for answer in answers:
        answer = str(answer)
        ref = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), pred_length)
        if length == 0:
            values.append(0.0)
        elif abs(len(ref) - len(pred)) > (1 - threshold) * length:
            values.append(float("inf"))   # distance / length > 1 - threshold: below the threshold whatever it is
        else:
            values.append(float(levenshtein(ref, pred)) / float(length))
    if not values:
        return 0.0
    result = 1 - min(values)
    return float(result) if result >= threshold else 0.0


def most_similar(text: str, choices: list[str]) -> str:
    """The choice with the smallest edit distance to `text`, the first such on ties (MathVista's
    calculate_score.get_most_similar, Levenshtein.distance on the whole strings). Only the first SCAN_LIMIT
    characters of `text` are compared (bounded work on untrusted text); mathvista.py only passes texts of at
    most that length, so there the result is the official one."""
    text = capped(str(text))
    return min(choices, key=lambda c: levenshtein(text, str(c)))


def to_float(text) -> float | None:
    """pix2struct's relaxed_correctness._to_float: text ending in '%' -> float(text without its trailing '%'s)
    / 100, else float(text) (float() itself ignores surrounding whitespace, but ' 5% ' does not end in '%'
    and is not a number); None when float() refuses it. float() is linear in its input."""
    text = str(text)
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction, target, tolerance: float = 0.05) -> bool:
    """ChartQA relaxed accuracy (Methani et al. 2020; pix2struct/metrics.py::relaxed_correctness, which
    lmms_eval/tasks/chartqa/utils.py copies): when the prediction is a number and the target a non-zero
    number, right iff |p - t| / |t| <= 5% as computed in floating point ('105' vs '100' is right; '1.05' vs
    '1' is 0.050000000000000044 and wrong); otherwise a case-insensitive exact match of the raw strings."""
    pred_value, target_value = to_float(prediction), to_float(target)
    if pred_value is not None and target_value:
        return abs(pred_value - target_value) / abs(target_value) <= tolerance
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
