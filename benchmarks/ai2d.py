"""AI2D test (science diagrams, multiple choice).

Data: lmms_eval/tasks/ai2d/ai2d.yaml at commit 75571cf (2026-08): dataset_path lmms-lab-encoder/ai2d (the old
lmms-lab/ai2d redirects there), split test; `answer` is the index of the right option. Card not readable here.
Prompt: lmms-eval's mcq format (options as "A. ..." lines + the letter post-prompt); 16 new tokens.
Answer reading: AI2D ships no VLM scorer of its own, so the reference is lmms-eval's ai2d.yaml (75571cf): the
MultiChoiceRegexFilter takes the letter of a leading "X." (utils.py), otherwise the whole answer is compared
with the target letter by exact_match with ignore_case and ignore_punctuation (api/metrics.py): 'B', 'b',
'(B)', 'B.' are right; 'B) cat' or 'The answer is B' are not. Departure, on purpose: we strip surrounding
whitespace as well (exact_match does not, so ' B' is wrong in lmms-eval before v0.7; since v0.7 its CLI default
--reasoning_tags strips every answer, and ' B' is right there too).
"""
import re
import string

from benchmarks.base import MODEL_CARD_3B, QWEN_3B, Benchmark, accuracy_by, sample, to_pil

LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
_LEADING_LETTER = re.compile(r"\s*([A-Z])\.")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def build(row: dict, ctx) -> list[dict]:
    options = list(row["options"])
    letters = "".join(chr(ord("A") + i) for i in range(len(options)))
    listed = "\n".join(f"{letter}. {o}" for letter, o in zip(letters, options))
    return [sample(f"{row['question']}\n{listed}{LETTER_ANSWER}", [to_pil(row["image"])], letters[int(row["answer"])],
                   letters=letters)]


def read_answer(text) -> str:
    answer = str(text)
    match = _LEADING_LETTER.match(answer)
    if match:
        return match.group(1)
    return answer.translate(_NO_PUNCTUATION).strip().upper()


def score(text: str, s: dict) -> dict:
    extracted = read_answer(text)
    return {"correct": float(extracted == s["target"]), "parsed": extracted in s["meta"].get("letters", "ABCD")
            and len(extracted) == 1, "extracted": extracted[:16]}


BENCHMARK = Benchmark(
    name="ai2d", hub_id="lmms-lab-encoder/ai2d", split="test", columns=("image", "question", "options", "answer"),
    build=build, score=score, aggregate=accuracy_by, headline="accuracy", unit="%", metric="accuracy %",
    max_new_tokens=16, lmms_eval_task="ai2d", official="lmms-eval ai2d.yaml (AI2D has no official VLM scorer)",
    # The 7B model card lists no AI2D figure.
    published={QWEN_3B: 81.5}, published_source=f"{MODEL_CARD_3B} (AI2D_test)")
