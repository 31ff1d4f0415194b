"""What every benchmark file fills in (the `Benchmark` record) and the small helpers they share.

A benchmark is data + a prompt builder + a scorer + an aggregate, nothing else; eval.py owns the loop
(data loading, seeded subset, batched greedy decoding, cache, results.json). Each file in this package
defines one `BENCHMARK = Benchmark(...)` and benchmarks/__init__.py lists it in the registry.
"""
from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

# Pixel budget of lmms-eval's Qwen2.5-VL wrapper (lmms_eval/models/simple/qwen2_5_vl.py: min_pixels
# 256*28*28, max_pixels 1605632 = 2048*28*28). Every prior-knowledge benchmark uses it unless its file says
# otherwise, so base and fine-tuned models see identical inputs whatever processor a checkpoint saved.
LMMS_EVAL_MIN_PIXELS = 256 * 28 * 28
LMMS_EVAL_MAX_PIXELS = 2048 * 28 * 28

# Hub ids of the published base figures (benchmark files key `published` by these).
QWEN_3B = "Qwen/Qwen2.5-VL-3B-Instruct"
QWEN_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
# Sources of the published figures: Qwen2.5-VL technical report (arXiv 2502.13923) and the model cards
# https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct, https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct
# ("Image benchmark" tables, read 2026-12). The paper (arXiv 2506.23508) gives one absolute base figure:
# MMMU val 51.3 for 7B.
MODEL_CARD_3B = "Qwen2.5-VL-3B-Instruct model card (huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct)"
MODEL_CARD_7B = "Qwen2.5-VL-7B-Instruct model card (huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct)"


@dataclass
class Context:
    """What a prompt builder needs besides the row: the jigsaw prompt style and the pixel budget the model
    will see (RefCOCO converts boxes between the resized and the original image)."""
    prompt_style: str = "thinking"
    min_pixels: int = LMMS_EVAL_MIN_PIXELS
    max_pixels: int = LMMS_EVAL_MAX_PIXELS


@dataclass
class Benchmark:
    name: str
    hub_id: str | None            # default data source; None: a local copy is required (--data NAME=PATH)
    split: str
    columns: tuple                # columns the builder reads (checked before any model is loaded)
    build: Callable               # (row, Context) -> list of samples (see `sample`)
    score: Callable               # (answer text, sample) -> {"correct": float, "parsed": bool, ...}
    aggregate: Callable           # list of records (each with "score") -> metrics dict
    headline: str                 # key of the headline metric in the metrics dict
    unit: str                     # "%", "/2800" (MME total), "/1000" (OCRBench)
    metric: str                   # what the headline means, in words
    max_new_tokens: int           # lmms-eval's generation cap for the task
    lmms_eval_task: str           # the lmms-eval task the prompt follows
    official: str                 # the official evaluation code the scorer follows
    config: str | None = None     # hub config name
    revision: str | None = None   # hub revision to pin (None: the default branch)
    min_pixels: int = LMMS_EVAL_MIN_PIXELS
    max_pixels: int = LMMS_EVAL_MAX_PIXELS
    published: dict = field(default_factory=dict)   # hub id -> published base figure (headline units)
    published_source: str = ""
    published_note: str = ""      # how the published figure's setting differs (split, toolkit)
    paper_base: dict = field(default_factory=dict)  # hub id -> the paper's own base figure
    group_column: str | None = None   # --limit keeps whole groups (MME: both questions of an image)
    prior: bool = True            # part of the prior-knowledge suite ('all')
    local_hint: str = ""          # how to make the local copy when there is no hub default

    @property
    def percent(self) -> bool:
        """Only percentages are averaged across benchmarks (MME /2800 and OCRBench /1000 are not)."""
        return self.unit == "%"


# ----------------------------------------------------------------------------------------------------------
# Helpers for builders and aggregates
# ----------------------------------------------------------------------------------------------------------
def to_pil(value):
    """A datasets Image (PIL already), or a {'bytes', 'path'} dict from a parquet file read without features."""
    from PIL import Image
    if isinstance(value, dict) and value.get("bytes") is not None:
        value = Image.open(io.BytesIO(value["bytes"]))
    if value is None or not hasattr(value, "convert"):
        return None
    return value.convert("RGB")


def sample(prompt: str, images: list, target, **meta) -> dict:
    return {"prompt": prompt, "images": [im for im in images if im is not None], "target": target, "meta": meta}


def pct(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def parse_failure_rate(records: list[dict]) -> float:
    return pct(not r["score"]["parsed"] for r in records)


def accuracy_by(records: list[dict], key: str | None = None) -> dict:
    """Accuracy (%) over all samples (micro) and per value of meta[key]; parse failures count wrong."""
    out = {"accuracy": pct(r["score"]["correct"] for r in records), "parse_failure_rate": parse_failure_rate(records),
           "num_samples": len(records)}
    if key:
        groups = defaultdict(list)
        for r in records:
            groups[str(r["meta"].get(key))].append(r["score"]["correct"])
        out[f"accuracy_by_{key}"] = {k: pct(v) for k, v in sorted(groups.items())}
    return out


def resized_size(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """(width, height) of the image the model actually sees: Qwen2-VL's smart_resize (sides rounded to
    multiples of patch 14 * merge 2 = 28, pixel count clamped to [min_pixels, max_pixels])."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h
