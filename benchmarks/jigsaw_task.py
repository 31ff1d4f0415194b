"""The new task: the held-out jigsaw puzzles that jigsaw.py built (this project's data; no hub copy).

Scored by jigsaw.jigsaw_reward, the same function RFT trains on, so "accuracy" here is the R_acc the
training curves show: exact permutation accuracy, plus hit rate (R_hit) and format rate (R_fmt). There is one
reading of an answer (the reward's own), so the strict and lenient metrics are the same numbers.
Paper (Qwen2.5-VL, 3x3): base 0%; RFT 66% (3B) / 75% (7B); SFT-Non-Rea 53% / 80%.
"""
import jigsaw

from benchmarks.base import Benchmark, pct, parse_failure_rate, sample, to_pil

# The pixel budget a user gives eval.py (--min_pixels/--max_pixels, as the training stages take them); these
# are eval.py's defaults when none is given: Qwen2.5-VL's own preprocessor minimum (4*28*28, so small puzzle
# images are not upscaled) and lmms-eval's maximum.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 2048 * 28 * 28


def build(row: dict, ctx) -> list[dict]:
    column = "prompt" if ctx.prompt_style == "thinking" else "prompt_no_think"
    return [sample(row[column], [to_pil(im) for im in row["images"]], list(row["answer"]),
                   rows=row["rows"], cols=row["cols"], thinking=ctx.prompt_style == "thinking")]


def score(text: str, s: dict) -> dict:
    reward = jigsaw.jigsaw_reward(text, s["target"], thinking=s["meta"]["thinking"])
    return {"correct": reward["acc"], "acc": reward["acc"], "hit": reward["hit"], "fmt": reward["fmt"],
            "parsed": reward["parsed"]}


def aggregate(records: list[dict]) -> dict:
    return {"accuracy": pct(r["score"]["acc"] for r in records), "hit_rate": pct(r["score"]["hit"] for r in records),
            "format_rate": pct(r["score"]["fmt"] for r in records),
            "parse_failure_rate": parse_failure_rate(records), "num_samples": len(records)}


BENCHMARK = Benchmark(
    name="jigsaw", hub_id=None, split="test",
    columns=("images", "prompt", "prompt_no_think", "answer", "rows", "cols"),
    build=build, score=score, aggregate=aggregate, headline="accuracy", unit="%",
    metric="exact accuracy % (+ hit rate, format rate) of jigsaw.jigsaw_reward",
    max_new_tokens=512,  # Jigsaw-R1 / the paper's GRPO runs: max completion 512 tokens (eval --max_completion_length)
    lmms_eval_task="none (this project's task)", official="jigsaw.jigsaw_reward (Jigsaw-R1 conventions)",
    min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, prior=False,
    local_hint="a folder made by `python jigsaw.py --output_dir DIR`")
