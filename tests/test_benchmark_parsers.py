"""Every parser of model outputs runs in time linear in its input: each one, and each benchmark's
scorer in both readings (strict and lenient), is timed on 100 KB adversarial inputs against a linear scan of the
same input measured here, with a generous bound (200x the scan + 50 ms). Before the fix
parse_choice_letter('The answer' + ' ' * 400 + 'is the cat') alone took 37 s."""
import re
import time

import pytest

import benchmarks
import eval as ev
from benchmarks import parsers

SIZE = 100_000


def _adversarial():
    runs = {
        "issue16 letters": "The answer" + " " * SIZE + "is the cat",
        "spaces": " " * SIZE, "newlines": "\n" * SIZE, "letters": "a" * SIZE, "digits": "1" * SIZE,
        "dots": "." * SIZE, "digits then e": "9" * SIZE + "e", "open brackets": "(" * SIZE,
        "answer tags": "<answer>" * (SIZE // 8), "close tags": "</answer>" * (SIZE // 9),
        "think tags": "<think>" * (SIZE // 7), "unclosed think": "<think>" + "x" * SIZE,
        "answer phrases": "answer: " * (SIZE // 8), "answer is": "the answer is " * (SIZE // 14),
        "box starts": '"bbox_2d": [1, 2, 3,' * (SIZE // 20), "number lists": "[1, 2, 3, " * (SIZE // 10),
        "comma numbers": "1,2" * (SIZE // 3), "letters spaced": "A B " * (SIZE // 4),
        "mmmu indicators": "so is thus = " * (SIZE // 13), "parens letters": "(A)(B)" * (SIZE // 6),
        "yes no": "yes no " * (SIZE // 7), "percent": "5%" * (SIZE // 2),
    }
    return runs


def _linear_scan_seconds(text: str) -> float:
    start = time.perf_counter()
    re.findall(r"\w", text)
    text.count("a")
    return time.perf_counter() - start


def _assert_linear(fn, text: str, label: str):
    baseline = min(_linear_scan_seconds(text) for _ in range(2))
    start = time.perf_counter()
    fn(text)
    elapsed = time.perf_counter() - start
    assert elapsed < 200 * baseline + 0.05, f"{label}: {elapsed:.3f}s vs linear scan {baseline:.4f}s"


PARSERS = {
    "final_answer": parsers.final_answer,
    "normalize_text": parsers.normalize_text,
    "parse_yes_no": parsers.parse_yes_no,
    "parse_choice_letter": parsers.parse_choice_letter,
    "parse_count": parsers.parse_count,
    "parse_box": parsers.parse_box,
    "anls": lambda t: parsers.anls(t, ["an answer of twenty", "1/8/93"]),
    "most_similar": lambda t: parsers.most_similar(t, ["a short option", "another option text"]),
    "relaxed_correct": lambda t: parsers.relaxed_correct(t, "12.5"),
}


@pytest.mark.parametrize("name", list(PARSERS))
def test_shared_parsers_are_linear(name):
    for label, text in _adversarial().items():
        _assert_linear(PARSERS[name], text, f"{name} on {label}")


SAMPLES = {  # one sample per scorer path (targets and meta as the builders make them)
    "jigsaw": {"target": [2, 1, 4, 3], "meta": {"thinking": True}},
    "toy_prior/color_mc": {"target": "B", "meta": {"category": "color_mc"}},
    "toy_prior/yesno": {"target": "yes", "meta": {"category": "yesno"}},
    "toy_prior/count": {"target": "3", "meta": {"category": "count"}},
    "toy_prior/color": {"target": "red", "meta": {"category": "color"}},
    "refcoco": {"target": [0, 0, 10, 10], "meta": {"seen_width": 28, "seen_height": 28, "width": 28, "height": 28}},
    "docvqa": {"target": ["1/8/93", "january 8, 1993"], "meta": {}},
    "mme": {"target": "yes", "meta": {}},
    "mmstar": {"target": "A", "meta": {}},
    "pope": {"target": "no", "meta": {}},
    "mmmu/mc": {"target": "A", "meta": {"question_type": "multiple-choice", "options": ["cat", "dog", "a bird"],
                                         "question_id": "x"}},
    "mmmu/open": {"target": ["3.14"], "meta": {"question_type": "open", "options": [], "question_id": "y"}},
    "chartqa": {"target": "5", "meta": {}},
    "ai2d": {"target": "A", "meta": {"letters": "ABCD"}},
    "ocrbench": {"target": ["centre"], "meta": {"dataset": "IIIT5K"}},
    "ocrbench/hme": {"target": ["x^2"], "meta": {"dataset": "HME100k"}},
    "mathvista/mc": {"target": "2", "meta": {"question_type": "multi_choice", "answer_type": "text",
                                             "choices": ["1", "2", "a longer option"], "precision": None}},
    "mathvista/float": {"target": "0.67", "meta": {"question_type": "free_form", "answer_type": "float",
                                                   "choices": [], "precision": 2}},
    "mathvista/list": {"target": "[1, 2]", "meta": {"question_type": "free_form", "answer_type": "list",
                                                    "choices": [], "precision": None}},
}


@pytest.mark.parametrize("key", list(SAMPLES))
def test_every_scorer_is_linear_in_both_readings(key):
    bench = benchmarks.REGISTRY[key.split("/")[0]]
    for label, text in _adversarial().items():
        def both(t):
            record = {**SAMPLES[key], "prediction": t}
            ev.score_both(bench, record)
            assert "error" not in record["score"], (key, label, record["score"])
        _assert_linear(both, text, f"{key} on {label}")


def test_the_issue_input_parses_and_is_fast():
    text = "The answer" + " " * 1000 + "is the cat"
    start = time.perf_counter()
    assert parsers.parse_choice_letter(text) is None
    assert time.perf_counter() - start < 0.05
    assert parsers.parse_choice_letter("The answer is (C).") == "C"
