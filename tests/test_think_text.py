"""rollout_sft.think_text: linear on adversarial tags, and the same block as the regex reading it replaced
(`<think>(.*?)</think>` with DOTALL, quadratic when no '<think>' is closed: ~6 s on 10,000 tags)."""
import random
import re
import time

import rollout_sft

_OLD_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_TAG = re.compile(r"</?(think|answer)>")


def _old_think_text(completion):
    """The previous implementation, kept here as the reference on ordinary text."""
    if not isinstance(completion, str):
        return None
    match = _OLD_THINK.search(completion)
    if match is None:
        return None
    inner = match.group(1)
    if not inner.strip() or _TAG.search(inner):
        return None
    return inner.strip()


ORDINARY = [
    "<think>The piece at 1 belongs at 3.</think>\n<answer>3 1\n4 2</answer>", "no tags at all", "<think></think>x",
    "<think>  \n</think>", "<think>a<think>b</think>", "<think>a</think><think>b</think>", "pre <think> a\nb </think>",
    "<think>never closed", "</think><think>a</think>", "<think>has <answer>1</answer> inside</think>",
    "<think>a</think", "<THINK>a</THINK>", "<think><think></think>", "", None, 12,
]


def test_same_block_as_the_regex_on_ordinary_text():
    for text in ORDINARY:
        assert rollout_sft.think_text(text) == _old_think_text(text), text
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "a", " ", "\n", "<think", "think>", "</", "b c"]
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        assert rollout_sft.think_text(text) == _old_think_text(text), text


def _seconds(text) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        rollout_sft.think_text(text)
        best = min(best, time.perf_counter() - start)
    return best


def test_linear_on_nested_tags():
    for make in (lambda n: "<think>" * n, lambda n: "<think>" * n + "</think>", lambda n: "</think>" * n,
                 lambda n: "<think>x" + "<think>" * n):
        assert rollout_sft.think_text(make(10_000)) is None
        small, large = _seconds(make(10_000)), _seconds(make(100_000))
        # 10x the tags may take ~10x the time (linear), not ~100x (the old regex): bound 30x + 20 ms of noise.
        assert small < 0.5 and large < 30 * small + 0.02, (make(1), small, large)
