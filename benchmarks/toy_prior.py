"""The toy world's prior knowledge: toy.py's held-out questions (colour, colour multiple choice, yes/no,
count), each read by the parser of the real benchmark whose style it mimics. Local data only (toy.py's
prior/ folder, test split); there are no published figures for it.
"""
import jigsaw
import toy

from benchmarks import parsers
from benchmarks.base import Benchmark, accuracy_by, sample, to_pil


def build(row: dict, ctx) -> list[dict]:
    return [sample(row["prompt"], [to_pil(im) for im in row["images"]], str(row["answer"]), category=row["category"])]


def score(text: str, s: dict) -> dict:
    """color -> normalised exact match, color_mc -> option letter, yesno -> yes/no, count -> number,
    color_grid (training-only in toy.py, scored if present) -> the jigsaw grid parser."""
    category, target = s["meta"]["category"], s["target"]
    if category == "color_grid":
        expected = jigsaw.parse_grid_answer(target, len(target.split()))
        extracted = jigsaw.extract_answer(text, len(expected or []))
        return {"correct": float(extracted is not None and extracted == expected), "parsed": extracted is not None,
                "extracted": extracted}
    if category == "color_mc":
        extracted = parsers.parse_choice_letter(text, "ABCD")
    elif category == "yesno":
        extracted = parsers.parse_yes_no(text)
    elif category == "count":
        count = parsers.parse_count(text)
        extracted = None if count is None else str(count)
    else:
        extracted = parsers.normalize_text(text) or None
        target = parsers.normalize_text(target)
    return {"correct": float(extracted is not None and extracted == target), "parsed": extracted is not None,
            "extracted": extracted}


BENCHMARK = Benchmark(
    name="toy_prior", hub_id=None, split="test", columns=("images", "prompt", "answer", "category"),
    build=build, score=score, aggregate=lambda records: accuracy_by(records, "category"), headline="accuracy",
    unit="%", metric="accuracy % overall and per category (color/color_mc/yesno/count)",
    max_new_tokens=64,  # toy answers are a few tokens; 64 leaves room for a think block
    lmms_eval_task="none (toy.py)", official="this project's toy.py; each category read like its real counterpart",
    # toy.py's processor budget (56x56 .. 112x112 images), the images the toy base model was taught on.
    min_pixels=toy.TOY_MIN_PIXELS, max_pixels=toy.TOY_MAX_PIXELS, prior=False,
    local_hint="toy.py's prior-knowledge folder (`python toy.py --output_dir DIR` writes DIR/prior)")
