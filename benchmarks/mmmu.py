"""MMMU val (college-level multi-discipline questions, 900): the paper's MMMU (7B absolute: base 51.3, RFT 50.0,
SFT-Non-Rea 22.4, SFT-Rea-4o 46.1, SFT-Rea-GRPO-Rollout 48.8).

Data: lmms_eval/tasks/mmmu/mmmu_val.yaml at commit 75571cf (2026-08): dataset_path lmms-lab-encoder/MMMU (the
old lmms-lab/MMMU redirects there), split validation. Card not readable here; no revision pinned.
Prompt: lmms_eval/tasks/mmmu/utils.py::construct_prompt with mmmu_val.yaml's default prompts; the images the
question names (<image 1>...) go first in the chat turn, the marks stay in the text.
Answer reading: MMMU's official mmmu/utils/eval_utils.py (MMMU-Benchmark/MMMU at bb0b95a), on the whole answer:
  multiple choice (parse_multi_choice_response): '(B)' anywhere; else ' B ' as a word (after stripping
  ,.!?;:' at the ends); else, for answers of more than 5 words, an option's text; several candidates -> the
  one that occurs last (the first candidate on a tie, as np.argmax); none -> a RANDOM letter.
  open (parse_open_response + eval_open): the tail after a key phrase of each line (the shortest; an empty
  tail is replaced by the next phrase's, and a line whose tail stays empty gives none), '=' on the last line
  only; no tail anywhere -> the whole answer; plus every number the three official regexes find in the tails
  (so '1,400' also gives 400 and '1.5e3' also gives 1 and 3); all normalised (numbers rounded to 2 decimals, a
  single letter padded); right when a string gold is contained in a candidate or a number equals it. The
  official splitter `re.split(r'\\.\\s(?=[A-Z])|\\n')` runs on lower-cased text, so only newlines split; kept.
Departures, on purpose:
  * the random letter is seeded by the question id (official: one global random.seed(42) stream, so a
    question's guess depends on the order of evaluation); it stays in the score (a model that answers nonsense
    scores ~1/n, as officially) and counts as a parse failure.
  * the number regexes are the official ones made linear (possessive quantifiers and a no-digit-before
    guard where the official patterns restart inside a run of digits, quadratic on long ones): same matches.
lmms-eval (mmmu/utils.py at 75571cf) copies these functions, but its mmmu_process_results keeps only
str(first open candidate) and then eval_open iterates over that string's characters; we follow MMMU.
"""
import random
import re

from benchmarks import parsers
from benchmarks.base import MODEL_CARD_3B, MODEL_CARD_7B, QWEN_3B, QWEN_7B, Benchmark, accuracy_by, sample, to_pil

# ----------------------------------------------------------------------------------------------------------
# Data-set fields: options and some open answers are stored as the text of a Python list
# ----------------------------------------------------------------------------------------------------------
MAX_NESTING = 32   # a data-set list never nests; Python's own parser stops at 200 levels


def literal_list(value) -> list:
    """MMMU stores options (and some open answers) as the string of a Python list, e.g. "['$5', '6 m']":
    a DATA-SET field, never a model output. Read by `read_list_literal` (no eval, no recursion); anything
    that is not a list literal is one answer: "14" -> ['14']."""
    if isinstance(value, list):
        return value
    text = str(value).strip()
    if text.startswith("["):
        parsed = read_list_literal(text)
        if parsed is not None:
            return parsed
    return [text]


_SIMPLE_ESCAPES = {"\n": "", "\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n",
                   "r": "\r", "t": "\t", "v": "\v"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_NUMBER = re.compile(r"[+-]?[ \t]*(?:\d(?:_?\d)*(?:\.(?:\d(?:_?\d)*)?)?|\.\d(?:_?\d)*)(?:[eE][+-]?\d(?:_?\d)*)?")
_NAMES = {"None": None, "True": True, "False": False}
_BLANK = " \t\f\r\n"


def _read_string(text: str, i: int) -> tuple[str, int] | None:
    """One Python string literal starting at text[i] (optional r/u prefix, ' or ", single or triple quoted,
    escapes as Python decodes them) -> (value, index after it), or None if it is not one. Linear."""
    raw = False
    if text[i] in "rRuU" and i + 1 < len(text) and text[i + 1] in "'\"":
        raw, i = text[i] in "rR", i + 1
    if i >= len(text) or text[i] not in "'\"":
        return None
    quote = text[i] * 3 if text.startswith(text[i] * 3, i) else text[i]
    i += len(quote)
    parts = []
    while True:
        # the next quote character, backslash or newline; everything before it is kept as it is
        j = i
        while j < len(text) and text[j] not in "\\\n" + quote[0]:
            j += 1
        parts.append(text[i:j])
        if j >= len(text):
            return None                                     # never closed
        char = text[j]
        if char == "\n":
            if len(quote) == 1:
                return None                                 # a plain string cannot span lines
            parts.append("\n")
            i = j + 1
        elif char == quote[0]:
            if text.startswith(quote, j):
                return "".join(parts), j + len(quote)
            parts.append(char)                              # a lone quote inside a triple-quoted string
            i = j + 1
        elif j + 1 >= len(text):
            return None
        elif raw:
            parts.append(text[j:j + 2])                     # r'...': the backslash stays, the quote is kept
            i = j + 2
        else:
            escape = text[j + 1]
            i = j + 2
            if escape in _SIMPLE_ESCAPES:
                parts.append(_SIMPLE_ESCAPES[escape])
            elif escape in "01234567":
                k = i
                while k < len(text) and k < i + 2 and text[k] in "01234567":
                    k += 1
                parts.append(chr(int(text[i - 1:k], 8)))
                i = k
            elif escape in _HEX_DIGITS:
                digits = text[i:i + _HEX_DIGITS[escape]]
                if len(digits) != _HEX_DIGITS[escape] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    return None
                if int(digits, 16) > 0x10FFFF:
                    return None
                parts.append(chr(int(digits, 16)))
                i += len(digits)
            elif escape == "N":
                import unicodedata
                close = text.find("}", i)
                if not text.startswith("{", i) or close == -1:
                    return None
                try:
                    parts.append(unicodedata.lookup(text[i + 1:close]))
                except KeyError:
                    return None
                i = close + 1
            else:
                parts.append("\\" + escape)                  # an unknown escape keeps its backslash, as in Python


def read_list_literal(text: str) -> list | None:
    """The list a Python list literal denotes, or None when `text` is not one: lists (nested up to
    MAX_NESTING), strings (adjacent ones joined), decimal int/float with one sign, None/True/False; anything
    else (tuples, dicts, names, expressions) is not an option list. One left-to-right pass with an explicit
    stack of open lists: no recursion, no eval, linear in len(text). Same value as ast.literal_eval on such
    text (tests/test_official_scorers.py compares them)."""
    if "\x00" in text:
        return None                                         # Python refuses source with NUL bytes
    stack: list[list] = []
    i, n = 0, len(text)
    expect = "value"            # value | value_or_close | comma_or_close | end
    while True:
        while i < n and text[i] in _BLANK:
            i += 1
        if i >= n:
            return None                                     # ended inside a list
        char = text[i]
        if expect == "end":
            return None                                     # text after the closing bracket
        if char == "]" and expect in ("value_or_close", "comma_or_close"):
            done = stack.pop()
            i += 1
            if not stack:
                while i < n and text[i] in _BLANK:
                    i += 1
                return done if i == n else None
            stack[-1].append(done)
            expect = "comma_or_close"
            continue
        if expect == "comma_or_close":
            if char != ",":
                return None
            expect, i = "value_or_close", i + 1
            continue
        # a value
        if char == "[":
            if len(stack) >= MAX_NESTING:
                return None
            stack.append([])
            expect, i = "value_or_close", i + 1
            continue
        if not stack:
            return None                                     # the text must open with a list
        if char in "'\"" or (char in "rRuU" and i + 1 < n and text[i + 1] in "'\""):
            pieces = []
            while i < n and (text[i] in "'\"" or (text[i] in "rRuU" and i + 1 < n and text[i + 1] in "'\"")):
                read = _read_string(text, i)
                if read is None:
                    return None
                pieces.append(read[0])
                i = read[1]
                while i < n and text[i] in _BLANK:
                    i += 1
            value = "".join(pieces)
        else:
            number = _NUMBER.match(text, i)
            word = re.match(r"[A-Za-z_]\w*", text[i:i + 6])
            if number:
                token, i = number.group(0).replace(" ", "").replace("\t", ""), number.end()
                if i < n and (text[i].isalnum() or text[i] in "_.'\""):
                    return None                              # 1.2.3, 12abc, 0x1F, 1j: not a plain number
                digits = token.lstrip("+-")
                try:
                    if any(c in digits for c in ".eE"):
                        value = float(token)
                    elif digits.strip("0_") and digits[0] == "0":
                        return None                          # 012: Python refuses leading zeros
                    else:
                        value = int(token)
                except ValueError:
                    return None
            elif word and word.group(0) in _NAMES and not (i + len(word.group(0)) < n and (
                    text[i + len(word.group(0))].isalnum() or text[i + len(word.group(0))] == "_")):
                value, i = _NAMES[word.group(0)], i + len(word.group(0))
            else:
                return None
        stack[-1].append(value)
        expect = "comma_or_close"


# ----------------------------------------------------------------------------------------------------------
# Prompt
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# Answer reading (MMMU's eval_utils.py, see the module docstring)
# ----------------------------------------------------------------------------------------------------------
def parse_choice(response, options: list[str], question_id: str = "") -> tuple[str, bool]:
    """(letter, parsed): MMMU's parse_multi_choice_response; parsed False when the letter is the random guess.
    'A is wrong, so (B) it is; not (A)' -> A (the bracket that occurs last)."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    text = str(response)
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
    # The one that occurs last; on a tie (one option's text inside another's) the first candidate, as np.argmax.
    last = max(range(len(candidates)), key=lambda k: candidates[k][0])
    return candidates[last][1], True


def normalize(value) -> list:
    """MMMU's normalize_str: a number -> [float rounded to 2 decimals]; a string -> [lower-cased] (one letter
    padded with a space on either side, so 'a' does not match inside words)."""
    value = str(value).strip()
    try:
        return [round(float(value.replace(",", "")), 2)]
    except ValueError:
        value = value.lower()
        return [" " + value, value + " "] if len(value) == 1 else [value]


# MMMU's three number patterns, with the same matches but linear: a possessive run of digits (\d++ never gives
# digits back; giving them back cannot help these patterns) and (?<!\d) where the official pattern would start
# again one digit further into a run whose start already failed (the official ones are quadratic in the
# length of such a run). The comma pattern is official as is: it only starts after a non-word character.
_COMMA_NUMBER = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_SCIENTIFIC_NUMBER = re.compile(r"-?(?<!\d)\d++(?:\.\d++)?[eE][+-]?\d++")
_SIMPLE_NUMBER = re.compile(r"-?(?:(?<!\d)\d++\.\d++|\.\d++|(?<!\d)\d++\b)(?![eE][+-]?\d)(?![,\d])")


def extract_numbers(text: str) -> list[str]:
    """MMMU's extract_numbers: every comma-grouped number, then every scientific one, then every plain one,
    each list in order. A number can be found twice: '1,400' -> ['1,400', '400']; '1.5e3' -> ['1.5e3', '1',
    '3']; '.5' -> ['.5']."""
    return _COMMA_NUMBER.findall(text) + _SCIENTIFIC_NUMBER.findall(text) + _SIMPLE_NUMBER.findall(text)


INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
TRIVIAL_TAILS = (":", ",", ".", "!", "?", ";", "'")


def open_candidates(response) -> list:
    """MMMU's parse_open_response: the normalised candidates of an open answer (see the module docstring).
    'The answer is 3.14.' -> ['3.14', 3.14]; 'Thus \n14' -> ['thus \n14', 14.0] (no line has a tail)."""
    text = str(response).strip().strip(".").lower()
    lines = re.split(r"\.\s(?=[A-Z])|\n", text)   # official; on lower-cased text only '\n' splits
    keys = []
    for index, line in enumerate(lines):
        indicators = INDICATORS + (("=",) if index == len(lines) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                # As officially: an empty (falsy) tail so far is replaced by the next one, whatever its length.
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in TRIVIAL_TAILS:
            keys.append(shortest)
    if not keys:
        keys = [text]
    out, seen = [], set()
    for item in keys + [number for key in keys for number in extract_numbers(key)]:
        for value in normalize(item):
            if value not in seen:   # the official list(set(...)): order does not matter to eval_open
                seen.add(value)
                out.append(value)
    return out


def open_correct(candidates: list, gold) -> bool:
    """MMMU's eval_open: a string gold contained in a string candidate, or a number equal to a number."""
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
    candidates = open_candidates(text)
    return {"correct": float(open_correct(candidates, s["target"])), "parsed": bool(str(text).strip()),
            "extracted": [parsers.capped(c) if isinstance(c, str) else float(c) for c in candidates[:5]]}


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
